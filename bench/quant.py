"""Speed of the quantized paths against llama.cpp on the same GGUF file and the same token ids.

llama.cpp runs in a subprocess of this script (bench/llamacpp_worker.py under llama-cpp-python's
own venv: --llamacpp-python, default $RADIXKV_LLAMACPP_PYTHON or /work/peers/llamacpp/bin/python),
with as many threads as radixkv. Workloads, greedy, EOS ignored, all systems interleaved phase by
phase so machine load hits them alike:
- one request at a time: the ~600-token shared system prompt + 32 questions, 32 new tokens each
  (llama.cpp: `Llama.generate`, its built-in prefix reuse on; radixkv: its radix cache);
- 32 at once: radixkv's batched engine vs llama.cpp's multi-sequence batch (the shared prefix
  evaluated once and copied to every sequence, one decode batch per step), in each of its KV
  modes (--llamacpp-batched: one unified cell pool or one stream per sequence, flash attention
  auto / off), the best of them compared;
- prefill of a fresh 512-token prompt (best of --reps; radixkv: `generate` of one token, so
  the engine's step is included), against radixkv float32 and bfloat16;
- loaded-model memory (radixkv: bytes of its weights; llama.cpp: llama_model_size).
Prints figures and ratios measured in this one run; asserts nothing.
Run: `.venv/bin/python -m bench.quant [--quick] [--modes gguf,int8] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine import shared_prompts
from radixkv import LLM, SamplingParams, native_build
from radixkv.model.loader import resolve_model

WORKER = Path(__file__).with_name("llamacpp_worker.py")
# llama.cpp's multi-sequence modes: name -> (kv_unified, flash_attn_type: -1 auto, 0 off, 1 on)
BATCHED_MODES = {"unified": (True, -1), "unified-fa": (True, 1), "unified-nofa": (True, 0),
                 "per-seq": (False, -1), "per-seq-fa": (False, 1), "per-seq-nofa": (False, 0)}


class LlamaCpp:
    """The llama.cpp worker process; `call(cmd, **kw)` -> its JSON reply."""

    def __init__(self, python: str) -> None:
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the llama.cpp worker exited")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def best_of(row: dict[str, Any], key: str, value: float) -> None:
    row[key] = max(row.get(key, 0.0), value)


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return f"{same}/{len(a)} identical"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--modes", default="gguf,int8", help="radixkv quantization modes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-fp32", action="store_true",
                    help="skip radixkv float32 in the decode phases (kept for prefill, memory)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the decode phases, keeping each system's best (on a shared "
                    "machine llama.cpp's spinning thread pool suffers most from other load)")
    ap.add_argument("--quick", action="store_true", help="8 requests, 1 prefill rep")
    ap.add_argument("--llamacpp-batched", default="unified,per-seq,per-seq-nofa",
                    help=f"llama.cpp batched modes to try ({', '.join(BATCHED_MODES)}); "
                    "the best is compared")
    ap.add_argument("--llamacpp-python", default=os.environ.get(
        "RADIXKV_LLAMACPP_PYTHON", "/work/peers/llamacpp/bin/python"))
    args = ap.parse_args()
    if args.quick:
        args.requests, args.reps = 8, 1
    torch.set_num_threads(args.threads)
    flags = native_build.cpu_flags()
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")
            if f in flags]
    print(f"# threads {args.threads}, CPU flags {' '.join(simd)}, "
          f"load average {os.getloadavg()[0]:.1f} (start)")

    # Every radixkv system runs in its own LLM, one alive at a time, each loading its model on
    # its loop thread, and this thread runs no parallel torch work: each thread that runs
    # OpenMP regions gets its own libgomp pool, and with more pool threads than cores every
    # region pays a wake-up (~2x a decode step here; see radixkv.engine.engine_loop).
    path = resolve_model(args.model)[1]
    systems: dict[str, dict[str, Any]] = {}  # name -> LLM keyword arguments
    if not args.no_fp32:
        systems["radixkv fp32"] = {}
    for mode in args.modes.split(","):
        systems[f"radixkv {mode}"] = {"quantization": mode}
    floats = {"radixkv fp32": {}, "radixkv bf16": {"dtype": "bfloat16"}}
    probe = LLM(path, max_total_tokens=8192)
    prompts = shared_prompts(probe, args.requests)
    vocab = probe.lm.config.vocab_size
    probe.shutdown()
    del probe
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def run_llm(kwargs: dict[str, Any], fn: Any, **extra: Any) -> Any:
        llm = LLM(path, **kwargs, **extra)
        try:
            return fn(llm)
        finally:
            llm.shutdown()

    cpp = None
    if os.path.exists(args.llamacpp_python):
        cpp = LlamaCpp(args.llamacpp_python)
        reply = cpp.call("load", path=path, threads=args.threads)
        if "error" in reply:
            print(f"# llama.cpp failed to load: {reply['error']}")
            cpp.close()
            cpp = None
    else:
        print(f"# llama.cpp not found at {args.llamacpp_python}: radixkv figures only")
    results: dict[str, dict[str, Any]] = {name: {} for name in systems}
    if cpp is not None:
        results["llama.cpp"] = {}
    tokens: dict[str, dict[str, list[list[int]]]] = {"seq": {}, "batch": {}}
    n_new = args.requests * args.max_tokens
    gen = torch.Generator().manual_seed(0)
    fresh = [torch.randint(100, vocab - 100, (args.prefill,), generator=gen).tolist()
             for _ in range(args.reps)]  # distinct ids each repetition: no cache anywhere
    try:
        # ---- one request at a time, then all at once; --rounds times, each system's best kept
        for rnd in range(args.rounds):
            if cpp is not None:
                r = cpp.call("sequential", prompts=prompts, max_tokens=args.max_tokens)
                if "error" in r:
                    print(f"# llama.cpp sequential: {r['error']}")
                else:
                    best_of(results["llama.cpp"], "seq", n_new / r["wall"])
                    tokens["seq"]["llama.cpp"] = r["tokens"]
            for name, kw in systems.items():
                def seq(llm: LLM, name: str = name, first: bool = rnd == 0) -> None:
                    if first:
                        print(f"# {name}: {json.dumps(llm.lm.kernel_info())}")
                    start = time.perf_counter()
                    outs = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
                    best_of(results[name], "seq", n_new / (time.perf_counter() - start))
                    tokens["seq"][name] = outs
                run_llm(kw, seq, max_total_tokens=16384)
            print(f"# round {rnd + 1}: one at a time done, load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            # ---- all at once
            if cpp is not None:  # each batched mode of llama.cpp; the best one is its figure
                for variant in args.llamacpp_batched.split(","):
                    unified, fa = BATCHED_MODES[variant]
                    r = cpp.call("batched", prompts=prompts, max_tokens=args.max_tokens,
                                 kv_unified=unified, flash_attn=fa)
                    if "error" in r:
                        print(f"# llama.cpp batched {variant}: {r['error']}")
                        continue
                    tps = n_new / r["wall"]
                    print(f"# llama.cpp batched, {variant}: {tps:.1f} tok/s (n_ctx {r['n_ctx']})",
                          flush=True)
                    if tps > results["llama.cpp"].get("batch", 0.0):
                        results["llama.cpp"]["batch"] = tps
                        results["llama.cpp"]["batch_mode"] = variant
                        tokens["batch"]["llama.cpp"] = r["tokens"]
            for name, kw in systems.items():
                def batch(llm: LLM, name: str = name) -> None:
                    start = time.perf_counter()
                    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
                    best_of(results[name], "batch", n_new / (time.perf_counter() - start))
                    tokens["batch"][name] = outs
                run_llm(kw, batch, max_total_tokens=16384, max_running_requests=args.requests)
        print(f"# all at once done, load average {os.getloadavg()[0]:.1f}", flush=True)
        # ---- prefill of fresh prompts (one token out, so the time is the prefill) and memory
        best: dict[str, float] = {}
        if cpp is not None:
            for ids in fresh:
                r = cpp.call("prefill", ids=ids)
                if "error" not in r:
                    best["llama.cpp"] = min(best.get("llama.cpp", 1e9), r["wall"])
            mem = cpp.call("memory")
            results["llama.cpp"]["mem"] = mem.get("model_bytes", 0) / 1e6
        for name, kw in {**floats, **systems}.items():
            def prefill(llm: LLM, name: str = name) -> None:
                llm.generate([fresh[0][:16]], one)  # warm-up
                for ids in fresh:
                    start = time.perf_counter()
                    llm.generate([ids], one)
                    best[name] = min(best.get(name, 1e9), time.perf_counter() - start)
                results.setdefault(name, {})["mem"] = llm.lm.kernel_info()["weight_bytes"] / 1e6
            run_llm(kw, prefill, max_total_tokens=4 * args.prefill * (args.reps + 1))
        for name, wall in best.items():
            results.setdefault(name, {})["prefill"] = args.prefill / wall
    finally:
        if cpp is not None:
            cpp.close()

    print(f"# load average {os.getloadavg()[0]:.1f} (end); {args.requests} requests x "
          f"{args.max_tokens} tokens; prefill {args.prefill} tokens, best of {args.reps}")
    ref = results.get("llama.cpp", {})
    head = f"{'system':<16} {'1-at-a-time tok/s':>18} {'x llama.cpp':>11} " \
           f"{'32-at-once tok/s':>17} {'x llama.cpp':>11} {'prefill tok/s':>14} " \
           f"{'x llama.cpp':>11} {'weights MB':>10}"
    print(head.replace("32-at-once", f"{args.requests}-at-once"))

    def cell(v: float | None, w: int) -> str:
        return f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"

    def ratio(name: str, key: str) -> str:
        v, r = results[name].get(key), ref.get(key)
        return f"{v / r:>11.2f}" if v is not None and r else f"{'-':>11}"

    for name, row in results.items():
        print(f"{name:<16} {cell(row.get('seq'), 18)} {ratio(name, 'seq')} "
              f"{cell(row.get('batch'), 17)} {ratio(name, 'batch')} "
              f"{cell(row.get('prefill'), 14)} {ratio(name, 'prefill')} "
              f"{cell(row.get('mem'), 10)}")
    for phase, outs in tokens.items():
        if "llama.cpp" in outs:
            for name in systems:
                if name in outs:
                    print(f"# {phase}: greedy tokens {name} vs llama.cpp: "
                          f"{agreement(outs[name], outs['llama.cpp'])}")
    if "batch_mode" in ref:
        print(f"# llama.cpp's best batched mode: {ref['batch_mode']}")
    for base_name in ("radixkv bf16", "radixkv fp32"):
        if "prefill" not in results.get(base_name, {}):
            continue
        for name in systems:
            if name != base_name and "prefill" in results[name]:
                print(f"# prefill {name} / {base_name}: "
                      f"{results[name]['prefill'] / results[base_name]['prefill']:.2f}x")
    fp32_mem = results.get("radixkv fp32", {}).get("mem")
    for name in systems:
        if fp32_mem and name != "radixkv fp32":
            print(f"# weights {name}: {fp32_mem / results[name]['mem']:.1f}x smaller than fp32")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
