"""radixkv against vLLM-CPU on the same token ids, in one run (`bench/engine.py --vs-vllm`).

Order: radixkv (float32, bfloat16), vLLM-CPU (float32, subprocess in its own venv), radixkv
again; each radixkv figure is the mean of its two passes (both printed, so a drifting load on
a shared machine shows). Prints figures and ratios; asserts nothing.

Also printed:
- the weight-bandwidth limit: bytes of weights read per decode step (every parameter once; the
  tied embedding counted once, as the LM head) / the read bandwidth measured by summing a
  256 MB float32 tensor on the same threads;
- the host-overhead share: 1 - (time inside the model's forward) / (wall time), per workload.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from radixkv import LLM, SamplingParams, native_build
from radixkv.model.layers import native_half_matmul

WORKLOADS = ("sequential", "batch_cold", "batch_warm")


def read_bandwidth(threads: int, mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of summing a `mb` MB float32 tensor (best of `repeats`) on `threads` threads."""
    t = torch.ones(mb * 1024 * 1024 // 4)
    t.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - start)
    return t.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads (parameters() yields a tied weight once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class ForwardTimer:
    """Wraps a module's forward to add up the wall time spent inside it."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.inside = 0.0
        inner: Callable[..., Any] = module.forward

        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.inside += time.perf_counter() - start

        module.forward = timed  # type: ignore[method-assign]


def cpu_flags() -> str:
    """The SIMD flags that decide radixkv's fast paths, as this CPU reports them."""
    flags = native_build.cpu_flags()
    keep = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni",
            "avx_vnni")
    return " ".join(f for f in keep if f in flags) or "?"


def load_note() -> str:
    try:
        return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average ?"


def radixkv_pass(llm: LLM, shared: list[list[int]], prefill: list[int], n: int
                 ) -> dict[str, dict[str, float]]:
    """The workloads of bench/peers/vllm_cpu.py's worker, on radixkv."""
    timer = ForwardTimer(llm.lm.model)
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def gen(prompts: list[list[int]], params: SamplingParams = greedy
            ) -> tuple[float, int, float]:
        inside0 = timer.inside
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
        return wall, sum(len(o.outputs[0].token_ids) for o in outs), timer.inside - inside0

    gen(shared[:2])  # warm-up
    llm.engine.cache.reset()
    out: dict[str, dict[str, float]] = {}
    wall = toks = inside = 0.0
    for p in shared:
        w, t, i = gen([p])
        wall, toks, inside = wall + w, toks + t, inside + i
    out["sequential"] = {"wall": wall, "tokens": toks, "inside": inside}
    llm.engine.cache.reset()
    for name in ("batch_cold", "batch_warm"):
        w, t, i = gen(shared)
        out[name] = {"wall": w, "tokens": t, "inside": i}
    best = float("inf")
    for _ in range(3):
        llm.engine.cache.reset()
        best = min(best, gen([prefill], one)[0])
    out["prefill"] = {"wall": best, "tokens": len(prefill)}
    w1 = min(gen([shared[0]], one)[0] for _ in range(2))
    wn, inside_n = float("inf"), 0.0
    for _ in range(2):
        w, _, i = gen([shared[0]])
        if w < wn:
            wn, inside_n = w, i
    out["decode1"] = {"wall_n": wn, "wall_1": w1, "n": n, "inside": inside_n}
    llm.engine.check_no_leak()
    return out


def rates(r: dict[str, dict[str, float]]) -> dict[str, float]:
    """tokens/s per workload (decode1: (n - 1) / (t(n) - t(1)), the decode step rate)."""
    out = {k: r[k]["tokens"] / r[k]["wall"] for k in (*WORKLOADS, "prefill")}
    d = r["decode1"]
    out["decode1"] = (d["n"] - 1) / max(d["wall_n"] - d["wall_1"], 1e-9)
    return out


def vs_vllm(args: argparse.Namespace) -> None:
    from bench.engine import shared_prompts
    from bench.peers import vllm_cpu

    torch.set_num_threads(args.threads)
    n = args.max_tokens
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, {args.threads} threads; "
          f"{load_note()}")
    # One LLM alive at a time, and no parallel torch work on this thread: each thread running
    # OpenMP regions gets its own libgomp pool, and with more pool threads than cores every
    # region pays a wake-up (see radixkv.engine.engine_loop). A finished loop thread frees its
    # pool.
    dtypes = ("float32", "bfloat16")
    base = LLM(dtype="float32", max_total_tokens=40_000)
    shared = shared_prompts(base, args.requests)
    rng = np.random.default_rng(1)
    prefill = rng.integers(100, base.lm.config.vocab_size - 100, 512).tolist()
    model_path = base.lm.path
    wb = {"float32": weight_bytes(base.lm.model)}
    kernels = {"float32": base.lm.model.cpu_kernel}
    base.shutdown()
    del base
    print(f"workload: {len(shared)} requests, prompts {len(shared[0])}-{len(shared[-1])} tokens "
          f"(shared system prompt), {n} new tokens, greedy; prefill {len(prefill)} tokens")

    def in_thread(fn: Callable[[], Any]) -> Any:
        """fn() on a short-lived thread (its OpenMP pool ends with it)."""
        box: list[Any] = []
        th = threading.Thread(target=lambda: box.append(fn()))
        th.start()
        th.join()
        return box[0]

    def with_llm(dt: str, fn: Callable[[LLM], Any]) -> Any:
        llm = LLM(dtype=dt, max_total_tokens=40_000)
        try:
            wb.setdefault(dt, weight_bytes(llm.lm.model))
            kernels.setdefault(dt, llm.lm.model.cpu_kernel)
            return fn(llm)
        finally:
            llm.shutdown()

    bw = in_thread(lambda: read_bandwidth(args.threads))

    passes: dict[str, list[dict[str, dict[str, float]]]] = {dt: [] for dt in dtypes}
    for dt in dtypes:
        passes[dt].append(with_llm(dt, lambda llm: radixkv_pass(llm, shared, prefill, n)))
        print(f"radixkv {dt} pass 1 done ({load_note()})", flush=True)
    print("radixkv CPU linears: " + "; ".join(f"{dt} {k}" for dt, k in kernels.items()))
    for dt in dtypes:
        print(f"limit ({dt}): {wb[dt] / 1e6:.0f} MB of weights per token / {bw / 1e9:.1f} GB/s "
              f"read bandwidth (sum of 256 MB, {args.threads} threads) = "
              f"{1e3 * wb[dt] / bw:.1f} ms/token = {bw / wb[dt]:.1f} tok/s at batch 1")

    # vLLM in fp32 always, and in bf16 where the CPU has native bf16 (the bf16 goal).
    vllm_dtypes = args.vllm_dtypes.split(",") if args.vllm_dtypes else (
        ["float32", "bfloat16"] if native_half_matmul(torch.bfloat16) else ["float32"])
    vllm_all: dict[str, dict[str, Any]] = {}
    vllm_err = None
    try:
        py = vllm_cpu.setup_venv() if args.setup_vllm else vllm_cpu.find_python()
        folder = vllm_cpu.hf_folder(model_path)
        for vdt in vllm_dtypes:
            vllm_all[vdt] = vllm_cpu.run(py, folder, {"dtype": vdt, "max_tokens": n,
                                                      "shared": shared, "prefill": prefill},
                                         threads=args.threads)
            print(f"vLLM-CPU {vllm_all[vdt]['version']} {vdt} done (load "
                  f"{vllm_all[vdt]['load_s']:.0f}s; {load_note()})", flush=True)
    except (vllm_cpu.PeerUnavailable, OSError, subprocess.SubprocessError) as exc:
        vllm_err = str(exc)
        print(f"vLLM-CPU unavailable: {vllm_err}")
    vllm_res = vllm_all.get("float32")

    first_tokens: list[int] = []
    for dt in dtypes:
        def second(llm: LLM, dt: str = dt) -> dict[str, dict[str, float]]:
            out = radixkv_pass(llm, shared, prefill, n)
            if dt == "float32":
                first_tokens.extend(llm.generate([shared[0]], SamplingParams(
                    temperature=0.0, max_tokens=n, ignore_eos=True))[0].outputs[0].token_ids)
            return out
        passes[dt].append(with_llm(dt, second))
        print(f"radixkv {dt} pass 2 done ({load_note()})", flush=True)

    names = {"sequential": "one request at a time", "batch_cold": f"{len(shared)} at once, cold",
             "batch_warm": f"{len(shared)} at once, warm", "decode1": "decode step rate, batch 1",
             "prefill": f"prefill {len(prefill)} tokens"}
    vr = rates({k: vllm_res[k] for k in (*WORKLOADS, "prefill", "decode1")}) if vllm_res else {}
    vb = vllm_all.get("bfloat16")
    vrb = rates({k: vb[k] for k in (*WORKLOADS, "prefill", "decode1")}) if vb else {}
    per = {dt: [rates(p) for p in ps] for dt, ps in passes.items()}
    print(f"\n{'workload (tokens/s)':<28} {'rkv fp32 (p1/p2)':>20} {'rkv bf16 (p1/p2)':>20} "
          f"{'vLLM fp32':>10} {'vLLM bf16':>10} {'fp32/vLLM':>10} {'bf16/vLLM':>10} "
          f"{'bf16/fp32':>10}")

    def fmt(v: float | None, suffix: str = "") -> str:
        return f"{v:.2f}{suffix}" if suffix and v else (f"{v:.1f}" if v else "-")

    for k, label in names.items():
        f32 = [p[k] for p in per["float32"]]
        b16 = [p[k] for p in per["bfloat16"]]
        m32, m16 = statistics.mean(f32), statistics.mean(b16)
        v, vb16 = vr.get(k), vrb.get(k)
        print(f"{label:<28} {m32:>8.1f} ({f32[0]:.0f}/{f32[1]:.0f}) "
              f"{m16:>8.1f} ({b16[0]:.0f}/{b16[1]:.0f}) {fmt(v):>10} {fmt(vb16):>10} "
              f"{fmt(m32 / v if v else None, 'x'):>10} {fmt(m16 / vb16 if vb16 else None, 'x'):>10}"
              f" {m16 / m32:>9.2f}x")
    targets = {"sequential": 1.5, "batch_cold": 1.3, "batch_warm": 1.3, "prefill": 1.0}
    if vr:
        print("targets (fp32 / vLLM fp32): " + ", ".join(
            f"{names[k]} >= {t}x: {statistics.mean(p[k] for p in per['float32']) / vr[k]:.2f}x"
            for k, t in targets.items()))
    if vrb:
        print("targets (bf16 / vLLM bf16, native-bf16 CPU): " + ", ".join(
            f"{names[k]} >= {t}x: {statistics.mean(p[k] for p in per['bfloat16']) / vrb[k]:.2f}x"
            for k, t in {"sequential": 1.3, "batch_cold": 1.3, "batch_warm": 1.3,
                         "prefill": 1.0}.items()))
    for dt in dtypes:
        d1 = statistics.mean(p["decode1"] for p in per[dt])
        lim = bw / wb[dt]
        print(f"radixkv {dt} decode at batch 1: {d1:.1f} tok/s = {100 * d1 / lim:.0f}% of the "
              f"bandwidth limit {lim:.1f} tok/s (target >= 70% for fp32)")
    for dt, ps in passes.items():
        shares = []
        for k in ("sequential", "batch_warm"):
            host = [1 - p[k]["inside"] / p[k]["wall"] for p in ps]
            shares.append(f"{names[k]} {100 * statistics.mean(host):.1f}%")
        print(f"radixkv {dt} host overhead (wall outside the model forward): "
              + ", ".join(shares) + " (target <= 5%)")
    if vllm_res:
        same = first_tokens == vllm_res["first_tokens"]
        print(f"first request's greedy tokens equal to vLLM's: {same}")
    else:
        print(f"(no vLLM figures: {vllm_err.splitlines()[0] if vllm_err else '?'})")
    print(f"({load_note()})")
