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
- prefill of a fresh 512-token prompt (best of --reps), against radixkv float32 and bfloat16;
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
from radixkv import LLM, SamplingParams
from radixkv.memory import TokenToKVPool
from radixkv.model import build_forward_context, forward_context, load_model

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


def prefill_once(lm, ids: list[int]) -> float:
    c = lm.config
    pool = TokenToKVPool(len(ids) + 1, c.num_layers, c.num_kv_heads, c.head_dim, dtype=lm.dtype)
    ctx = build_forward_context(pool, [pool.alloc(len(ids))], None, logits="last")
    x = torch.tensor(ids, dtype=torch.int64)
    with torch.inference_mode(), forward_context(ctx):
        start = time.perf_counter()
        lm.model(x)
        return time.perf_counter() - start


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
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo")
                  if ln.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")
            if f in flags]
    print(f"# threads {args.threads}, CPU flags {' '.join(simd)}, "
          f"load average {os.getloadavg()[0]:.1f} (start)")

    systems: dict[str, Any] = {}
    base = load_model(args.model)
    path = base.path
    if not args.no_fp32:
        systems["radixkv fp32"] = base
    for mode in args.modes.split(","):
        systems[f"radixkv {mode}"] = load_model(path, quantization=mode)
    bf16 = load_model(path, dtype="bfloat16")
    probe = LLM(base, max_total_tokens=8192)
    prompts = shared_prompts(probe, args.requests)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for name, lm in systems.items():
        print(f"# {name}: {json.dumps(lm.kernel_info())}")

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
            for name, lm in systems.items():
                llm = LLM(lm, max_total_tokens=16384)
                start = time.perf_counter()
                outs = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
                best_of(results[name], "seq", n_new / (time.perf_counter() - start))
                tokens["seq"][name] = outs
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
            for name, lm in systems.items():
                llm = LLM(lm, max_total_tokens=16384, max_running_requests=args.requests)
                start = time.perf_counter()
                outs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
                best_of(results[name], "batch", n_new / (time.perf_counter() - start))
                tokens["batch"][name] = outs
        print(f"# all at once done, load average {os.getloadavg()[0]:.1f}", flush=True)
        # ---- prefill of fresh prompts (distinct ids each repetition, no cache anywhere)
        gen = torch.Generator().manual_seed(0)
        pre = {"radixkv fp32": base, **systems, "radixkv bf16": bf16}
        best: dict[str, float] = {}
        for _ in range(args.reps):
            ids = torch.randint(100, base.config.vocab_size - 100, (args.prefill,),
                                generator=gen).tolist()
            if cpp is not None:
                r = cpp.call("prefill", ids=ids)
                if "error" not in r:
                    best["llama.cpp"] = min(best.get("llama.cpp", 1e9), r["wall"])
            for name, lm in pre.items():
                best[name] = min(best.get(name, 1e9), prefill_once(lm, ids))
        for name, wall in best.items():
            results.setdefault(name, {})["prefill"] = args.prefill / wall
        if cpp is not None:
            mem = cpp.call("memory")
            results["llama.cpp"]["mem"] = mem.get("model_bytes", 0) / 1e6
        for name, lm in pre.items():
            results.setdefault(name, {})["mem"] = lm.kernel_info()["weight_bytes"] / 1e6
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
