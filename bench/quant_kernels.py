"""Packed int4 / int8 products vs float32 by rows M: the measurements behind
`radixkv.model.quant.GEMV_MAX_ROWS` (which path QuantLinear takes for a given M).

For each weight shape of SmolLM2-135M and each M, times (best of --reps, paths interleaved
within each repetition so machine load hits them alike):
- packed: the C++ GEMV on the packed weight (what QuantLinear runs below GEMV_MAX_ROWS);
- tiles: widen tiles of the weight to float32 + torch GEMM (QuantLinear at or above it);
- fp32: torch F.linear on a float32 weight (the unquantized model; needs 4.6x the bytes).
Prints milliseconds and ratios; asserts nothing.
Run: `.venv/bin/python bench/quant_kernels.py [--threads 1] [--rows 1,8,32,64,128,512]`.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from radixkv.model import quant_kernels
from radixkv.model.quant import QuantLinear, quantize

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]  # qkv, gate_up, down, lm_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--formats", default="int4,int8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not quant_kernels.available():
        raise SystemExit("the packed kernels did not build (no C++ compiler?)")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    print(f"# {cpu}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}, "
          f"simd={quant_kernels.simd()}")
    print(f"{'shape':>12} {'fmt':>4} {'M':>4} {'packed ms':>10} {'tiles ms':>9} {'fp32 ms':>8} "
          f"{'fp32/packed':>11} {'tiles/packed':>12}")
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=gen) * 0.05
        for fmt in args.formats.split(","):
            qt = quantize(w, fmt)
            wf = qt.dequantize()
            packed = QuantLinear([qt], gemv_max_rows=1 << 30)
            tiles = QuantLinear([qt], gemv_max_rows=0)
            for m in (int(r) for r in args.rows.split(",")):
                if n * m > 49152 * 128:  # the LM head only scores a few rows
                    continue
                x = torch.randn(m, k, generator=gen)
                paths = {"packed": (packed, (x,)), "tiles": (tiles, (x,)),
                         "fp32": (F.linear, (x, wf))}
                best = dict.fromkeys(paths, float("inf"))
                with torch.inference_mode():
                    for fn, fargs in paths.values():
                        fn(*fargs)
                    for _ in range(args.reps):
                        for name, (fn, fargs) in paths.items():
                            t = time.perf_counter()
                            fn(*fargs)
                            best[name] = min(best[name], time.perf_counter() - t)
                p, ti, f = (best[k_] * 1e3 for k_ in ("packed", "tiles", "fp32"))
                print(f"{n:>6}x{k:<5} {fmt:>4} {m:>4} {p:>10.3f} {ti:>9.3f} {f:>8.3f} "
                      f"{f / p:>11.2f} {ti / p:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
