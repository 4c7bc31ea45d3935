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
With --bf16 (CPUs with AVX512-BF16), x in bfloat16 as a bf16 model runs it, the limits
BF16X_BLOCKED_MIN_ROWS / BF16X_GEMV_MAX_ROWS: rows (x widened to float32), blocked16 (the
vdpbf16ps blocked kernel), panel (the panel kernel), widen16 (bf16 widening + torch's GEMM) and
onednn16 (oneDNN on a prepacked bf16 weight: the unquantized bf16 model's product), summed over
the four layer products of one layer x 30 as well.
With --decode, decode-sized products over 30 distinct layers (int4, 66 MB of weights: as a
decode step reads them, from memory rather than cache) plus the int8 LM head: the float32 row
kernel against the int16-activation row kernel (X16_MAX_ROWS, on by default on AVX2-only CPUs),
with the weight bytes read per second.
Prints milliseconds and ratios; asserts nothing.
Run: `.venv/bin/python bench/quant_kernels.py [--threads 1] [--rows 1,8,32,64,128,512]
[--bf16 | --decode]`.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from radixkv.model import quant_kernels
from radixkv.model.layers import onednn_available, onednn_linear, onednn_pack
from radixkv.model.quant import QuantLinear, quantize

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]  # qkv, gate_up, down, lm_head
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
ROWS = "1,2,4,8,16,32,64,128,512"


def best_of(paths: dict, reps: int) -> dict[str, float]:
    """Best wall time (ms) of each path, the paths interleaved within each repetition."""
    best = dict.fromkeys(paths, float("inf"))
    with torch.inference_mode():
        for fn, fargs in paths.values():
            fn(*fargs)
        for _ in range(reps):
            for name, (fn, fargs) in paths.items():
                t = time.perf_counter()
                fn(*fargs)
                best[name] = min(best[name], time.perf_counter() - t)
    return {k: v * 1e3 for k, v in best.items()}


def bf16_table(rows: list[int], reps: int) -> None:
    """bfloat16 x: the kernels QuantLinear picks between for a bf16 model (int4 weights)."""
    if not quant_kernels.bf16_blocked():
        raise SystemExit("--bf16 needs the AVX512-BF16 kernels (not built on this CPU)")
    names = ["rows", "blocked16", "panel", "widen16"] + (["onednn16"] if onednn_available()
                                                         else [])
    print(f"{'shape':>12} {'M':>4} " + " ".join(f"{n + ' ms':>12}" for n in names) + "  best")
    gen = torch.Generator().manual_seed(0)
    weights = {s: torch.randn(*s, generator=gen) * 0.05 for s in LAYER}
    for m in rows:
        total = dict.fromkeys(names, 0.0)
        for (n, k), w in weights.items():
            qt = quantize(w, "int4")
            widen16 = QuantLinear([qt], gemv_max_rows=0, gemm_dtype=torch.bfloat16, panel=False)
            x = torch.randn(m, k, generator=gen).bfloat16()
            out = torch.empty(m, n)
            args = ("int4", None, qt.qs, qt.scales, None, out)
            paths = {"rows": (lambda a=args, x=x: quant_kernels.qgemm(*a[:1], x.float(),
                                                                     *a[2:]), ()),
                     "blocked16": (lambda a=args, x=x: quant_kernels.qgemm(
                         a[0], x, *a[2:], blocked=True), ()),
                     "panel": (lambda a=args, x=x: quant_kernels.qgemm(
                         a[0], x, *a[2:], panel=True), ()),
                     "widen16": (widen16, (x,))}
            if "onednn16" in names:
                paths["onednn16"] = (onednn_linear, (x, onednn_pack(w.bfloat16()), None))
            best = best_of(paths, reps)
            for name in names:
                total[name] += best[name]
            print(f"{n:>6}x{k:<5} {m:>4} " + " ".join(f"{best[nm]:>12.3f}" for nm in names)
                  + f"  {min(names[:4], key=best.__getitem__)}", flush=True)
        print(f"{'layer x 30':>12} {m:>4} " + " ".join(f"{30 * total[nm]:>12.1f}" for nm in names)
              + f"  {min(names[:4], key=total.__getitem__)}", flush=True)


def decode_table(rows: list[int], reps: int) -> None:
    """Float32 x on the row kernel vs the int16-activation row kernel, decode-sized M."""
    if not quant_kernels.simd():
        raise SystemExit("--decode needs the SIMD build of the kernels")
    gen = torch.Generator().manual_seed(0)
    layers = [[quantize(torch.randn(*s, generator=gen) * 0.05, "int4") for s in LAYER]
              for _ in range(30)]
    head = quantize(torch.randn(49152, 576, generator=gen) * 0.05, "int8")
    nbytes = sum(q.qs.numel() + 2 * q.scales.numel() for ly in layers for q in ly)
    hbytes = head.qs.numel() + 2 * head.scales.numel()
    print(f"# 30 layers x {len(LAYER)} int4 products ({nbytes / 1e6:.1f} MB), int8 LM head "
          f"({hbytes / 1e6:.1f} MB)")
    print(f"{'M':>3} {'rows ms':>9} {'x16 ms':>9} {'x16 GB/s':>9} {'x16 / rows':>10} "
          f"{'head rows':>10} {'head x16':>9}")
    # the entry points called straight through ctypes with prebuilt arguments, as the compiled
    # decode step calls them (QuantLinear's per-call argument handling would add ~10 us each)
    lib = quant_kernels._LIB.get()
    fns = {False: lib.rkv_qgemm, True: quant_kernels._fn(lib, "rkv_qgemm_x16")}
    nt = torch.get_num_threads()
    for m in rows:
        xs = {k: torch.randn(m, k, generator=gen) for k in {k for _, k in LAYER}}
        outs = {n: torch.empty(m, n) for n, _ in LAYER}
        calls = [(quant_kernels.FORMATS["int4"], m, n, k, xs[k].data_ptr(), k, q.qs.data_ptr(),
                  q.scales.data_ptr(), None, outs[n].data_ptr(), n, nt)
                 for ly in layers for q, (n, k) in zip(ly, LAYER, strict=True)]
        hx, hout = torch.randn(m, 576, generator=gen), torch.empty(m, 49152)
        hcall = [(quant_kernels.FORMATS["int8"], m, 49152, 576, hx.data_ptr(), 576,
                  head.qs.data_ptr(), head.scales.data_ptr(), None, hout.data_ptr(), 49152, nt)]

        def run(x16: bool, calls: list = calls) -> None:
            fn = fns[x16]
            for a in calls:
                fn(*a)

        best = best_of({"rows": (run, (False,)), "x16": (run, (True,)),
                        "head rows": (run, (False, hcall)), "head x16": (run, (True, hcall))},
                       reps)
        print(f"{m:>3} {best['rows']:>9.2f} {best['x16']:>9.2f} "
              f"{nbytes / best['x16'] / 1e6:>9.1f} {best['rows'] / best['x16']:>9.2f}x "
              f"{best['head rows']:>10.2f} {best['head x16']:>9.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--bf16", action="store_true", help="the bf16-x table instead")
    ap.add_argument("--decode", action="store_true",
                    help="the decode table (row kernel vs int16-activation kernel) instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not quant_kernels.available():
        raise SystemExit("the packed kernels did not build (no C++ compiler?)")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?")
    print(f"# {cpu}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}, "
          f"simd={quant_kernels.simd()}")
    if args.bf16:
        bf16_table([int(r) for r in args.rows.split(",")], args.reps)
        return
    if args.decode:
        decode_table([int(r) for r in args.rows.split(",")] if args.rows != ROWS
                     else [1, 2, 3, 4, 5, 8], args.reps)
        return
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
                best = best_of(paths, args.reps)
                r, b, wi, w16, f = (best[k_] for k_ in
                                    ("rows", "blocked", "widen", "widen16", "fp32"))
                win = min(("rows", "blocked", "widen", "widen16"), key=best.__getitem__)
                print(f"{n:>6}x{k:<5} {fmt:>4} {m:>4} {r:>8.3f} {b:>10.3f} {wi:>9.3f} "
                      f"{w16:>10.3f} {f:>8.3f}  {win}", flush=True)


if __name__ == "__main__":
    main()
