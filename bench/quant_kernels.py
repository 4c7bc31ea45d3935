"""Packed int4 / int8 products vs float32 by rows M: the measurements behind
`radixkv.model.quant.BLOCKED_MIN_ROWS` and `GEMV_MAX_ROWS` (which path QuantLinear takes for
a given M).

For each weight shape of SmolLM2-135M and each M, times (best of --reps, paths interleaved
within each repetition so machine load hits them alike):
- rows: the C++ row kernel on the packed weight (each group widened in registers once per 8
  rows of x; what QuantLinear runs below BLOCKED_MIN_ROWS);
- blocked: the C++ blocked kernel (blocks of W widened into L1 once for all rows, 4 x 3
  register tile; QuantLinear from BLOCKED_MIN_ROWS to below GEMV_MAX_ROWS);
- widen: the weight widened to float32 (whole, or in tiles for the LM head) + torch GEMM
  (QuantLinear from GEMV_MAX_ROWS on);
- widen16: the same in bfloat16 (x rounded too; QuantLinear's choice on CPUs with native bf16);
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
    print(f"{'shape':>12} {'fmt':>4} {'M':>4} {'rows ms':>8} {'blocked ms':>10} {'widen ms':>9} "
          f"{'bf16 w ms':>10} {'fp32 ms':>8}  best")
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=gen) * 0.05
        for fmt in args.formats.split(","):
            qt = quantize(w, fmt)
            wf = qt.dequantize()
            widen = QuantLinear([qt], gemv_max_rows=0, gemm_dtype=torch.float32)
            widen16 = QuantLinear([qt], gemv_max_rows=0, gemm_dtype=torch.bfloat16)
            for m in (int(r) for r in args.rows.split(",")):
                if n * m > 49152 * 128:  # the LM head only scores a few rows
                    continue
                x = torch.randn(m, k, generator=gen)
                out = torch.empty(m, n)
                paths = {"rows": (quant_kernels.qgemm, (fmt, x, qt.qs, qt.scales, None, out)),
                         "blocked": (quant_kernels.qgemm,
                                     (fmt, x, qt.qs, qt.scales, None, out, True)),
                         "widen": (widen, (x,)), "widen16": (widen16, (x,)),
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
                r, b, wi, w16, f = (best[k_] * 1e3 for k_ in
                                    ("rows", "blocked", "widen", "widen16", "fp32"))
                win = min(("rows", "blocked", "widen", "widen16"), key=best.__getitem__)
                print(f"{n:>6}x{k:<5} {fmt:>4} {m:>4} {r:>8.3f} {b:>10.3f} {wi:>9.3f} "
                      f"{w16:>10.3f} {f:>8.3f}  {win}", flush=True)


if __name__ == "__main__":
    main()
