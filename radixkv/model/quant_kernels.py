"""The packed low-bit CPU kernels (csrc/qgemv.cpp), compiled at first use and called via ctypes.

Same build scheme as `radixkv.attention.cpu_kernels`: plain C++ with OpenMP and no torch or
Python headers, built once with the system compiler (`$CXX`, else g++, c++ or clang++) into
`$RADIXKV_CACHE_DIR` (default `~/.cache/radixkv`), keyed by the source, compiler, flags and CPU.
When no compiler is found or the build fails, `available()` is False and the quantized layers
use the pure torch reference (dequantize, then matmul); `RADIXKV_QUANT_KERNELS=0` forces that.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch

from radixkv.native_build import LazyLibrary

_SRC = Path(__file__).with_name("csrc") / "qgemv.cpp"
FORMATS = {"int4": 0, "int8": 1}  # the kernel's `fmt` codes

_simd = False  # built with SIMD code (read once the library loads)
_bf16_blocked = False  # built with the bf16 blocked kernel (likewise)
_x16_preferred = False  # the int16-activation row kernel is this build's default (likewise)
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _read_simd(lib: ctypes.CDLL) -> None:
    global _simd, _bf16_blocked, _x16_preferred

    def flag(name: str) -> bool:  # a build flag entry point; False where it is missing
        fn = getattr(lib, name, None)
        if fn is None:
            return False
        fn.restype = ctypes.c_int64
        return bool(fn())

    _simd = flag("rkv_qgemm_simd")
    _bf16_blocked = flag("rkv_qgemm_bf16_blocked")
    _x16_preferred = flag("rkv_qgemm_x16_preferred")


_LIB = LazyLibrary(_SRC, what="the quantized kernels", fallback="quantized layers use torch",
                   switch="RADIXKV_QUANT_KERNELS",
                   signatures={"rkv_qgemm": (_i64,) * 4 + (_ptr, _i64) + (_ptr,) * 4 + (_i64,) * 2,
                               "rkv_dequant": (_i64,) * 3 + (_ptr,) * 3 + (_i64,) * 2},
                   on_load=_read_simd)


def available() -> bool:
    """True when the packed kernels are built (building them on the first call)."""
    return _LIB.available()


def qgemm_function(x16: bool = False) -> int:
    """The address of the built `rkv_qgemm` (the row kernel, for compiled callers such as
    radixkv/model/decode_kernels.py), or with `x16` of `rkv_qgemm_x16` (same arguments: the
    int16-activation row kernel; needs `simd()`), 0 when the kernels are not built."""
    lib = _LIB.get()
    if lib is None or (x16 and not _simd):
        return 0
    fn = lib.rkv_qgemm_x16 if x16 else lib.rkv_qgemm
    return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)


def x16_preferred() -> bool:
    """True where the int16-activation row kernel (`qgemm(..., x16=True)`) is the measured default
    for decode-sized products: kernels built with AVX2 but without AVX-512. (Read once at
    load.)"""
    return simd() and _x16_preferred


def simd() -> bool:
    """True when the kernels were compiled with their AVX2 + FMA + F16C code (else scalar C++)."""
    return available() and _simd


_declared: set[str] = set()
_EXTRA_ARGS = {  # entry points declared on first use (beside those of `_LIB`)
    "rkv_qgemm_blocked": ["i64"] * 4 + ["ptr", "i64"] + ["ptr"] * 4 + ["i64"] * 2,
    "rkv_qgemm_x16": ["i64"] * 4 + ["ptr", "i64"] + ["ptr"] * 4 + ["i64"] * 2,
    "rkv_gemm_bf16w": ["i64"] * 3 + ["ptr", "i64"] + ["ptr"] * 3 + ["i64"] * 2,
    "rkv_dequant_bf16": ["i64"] * 3 + ["ptr"] * 3 + ["i64"] * 2,
    "rkv_qgemm_blocked_bf16": ["i64"] * 4 + ["ptr", "i64"] + ["ptr"] * 4 + ["i64"] * 2,
    "rkv_qgemm_panel_bf16": ["i64"] * 4 + ["ptr", "i64"] + ["ptr"] * 4 + ["i64"] * 3,
}


def _fn(lib: ctypes.CDLL, name: str) -> Any:
    """`lib.name` with its argument types declared."""
    fn = getattr(lib, name)
    if name not in _declared:
        types = {"i64": ctypes.c_int64, "ptr": ctypes.c_void_p}
        fn.argtypes = [types[t] for t in _EXTRA_ARGS[name]]
        fn.restype = ctypes.c_int64
        _declared.add(name)
    return fn


def bf16_blocked() -> bool:
    """True when the kernels for bfloat16 x (vdpbf16ps tiles: AVX512-BF16) are built; then
    `qgemm(..., blocked=True)` and `qgemm(..., panel=True)` take bf16 x as it is. (Read once at
    load: QuantLinear asks on every forward.)"""
    return available() and _bf16_blocked


def width() -> int:
    """The SIMD width in floats the kernels were built for: 16 (AVX-512), 8 (AVX2), 1 (scalar
    C++), 0 (not built)."""
    if not available():
        return 0
    fn = getattr(_LIB.get(), "rkv_qgemm_width", None)
    if fn is None:
        return 8 if _simd else 1
    fn.restype = ctypes.c_int64
    return int(fn())


def qgemm(fmt: str, x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor,
          bias: torch.Tensor | None, out: torch.Tensor, blocked: bool = False,
          panel: bool = False, x16: bool = False) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W.T (+ bias), W [N, K] packed as (qs, scales) in format `fmt`.

    x: float32 with unit last stride, or bfloat16 with `blocked` or `panel` where
    `bf16_blocked()`; out: float32 [M, N] view with unit last stride (it may be a column slice
    of a wider tensor), or bfloat16 with `panel`; bias: float32 [N] or None. Caller checks
    shapes.
    `blocked`: the kernel that widens blocks of W once for all M rows: a 4 x 6 register tile
    over an L1-sized block on AVX-512 builds (for bf16 x, W widened to bf16 and vdpbf16ps
    tiles), the float32 panel kernel (16 x 6 outer-product tiles) on AVX2 builds; faster from
    a dozen rows on. Else the row kernel, which widens each group in registers once per 8 rows
    of x (fastest for decode's 1-4 rows).
    `x16` (float32 x, needs `simd()`): the row kernel on x quantized to int16 per group of 32
    (scale max|x| / 32767, round to nearest even) and integer dot products; the faster one for
    1-4 rows on AVX2-only CPUs (`x16_preferred`).
    `panel` (bf16 x only): the prefill-sized kernel, x repacked into K-pairs of 16 rows and
    outer-product vdpbf16ps tiles (no horizontal sums), W widened to bf16 in L2-sized blocks.
    """
    lib = _LIB.get()
    assert lib is not None, "quant_kernels.qgemm called without available()"
    m, k = x.shape
    bias_ptr = bias.data_ptr() if bias is not None else None
    if panel:
        assert x.dtype == torch.bfloat16 and out.dtype in (torch.float32, torch.bfloat16)
        code = _fn(lib, "rkv_qgemm_panel_bf16")(
            FORMATS[fmt], m, out.shape[1], k, x.data_ptr(), x.stride(0), qs.data_ptr(),
            scales.data_ptr(), bias_ptr, out.data_ptr(), out.stride(0),
            int(out.dtype == torch.bfloat16), torch.get_num_threads())
        if code:
            raise RuntimeError(f"rkv_qgemm_panel_bf16 failed with code {code}")
        return out
    if x.dtype == torch.bfloat16:
        assert blocked, "bf16 x needs the blocked kernel"
        fn = _fn(lib, "rkv_qgemm_blocked_bf16")
    elif x16:
        assert not blocked and _simd, "x16 is a row kernel of the SIMD build"
        fn = _fn(lib, "rkv_qgemm_x16")
    else:
        fn = _fn(lib, "rkv_qgemm_blocked") if blocked else lib.rkv_qgemm
    code = fn(FORMATS[fmt], m, out.shape[1], k, x.data_ptr(), x.stride(0),
              qs.data_ptr(), scales.data_ptr(), bias_ptr,
              out.data_ptr(), out.stride(0), torch.get_num_threads())
    if code:
        raise RuntimeError(f"rkv_qgemm failed with code {code}")
    return out


_bf16w: bool | None = None  # rkv_gemm_bf16w built (probed once)


def bf16w_available() -> bool:
    """True where `gemm_bf16w` runs (the float32 panel kernel: AVX2 builds without AVX-512)."""
    global _bf16w
    if _bf16w is None:
        lib = _LIB.get()
        _bf16w = lib is not None and _fn(lib, "rkv_gemm_bf16w")(
            0, 0, 8, None, 8, None, None, None, 0, 1) == 0
    return _bf16w


def gemm_bf16w(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor) -> torch.Tensor:
    """out[M, N] = x[M, K] @ w.T (+ bias) for a dense bfloat16 w [N, K] (contiguous, K a
    multiple of 8), float32 x (unit last stride), bias and out: the float32 panel kernel with w
    widened block by block, exactly, instead of a float32 copy of the whole weight. Needs
    `bf16w_available()`; the caller checks shapes."""
    lib = _LIB.get()
    assert lib is not None and w.dtype == torch.bfloat16 and x.dtype == torch.float32
    code = _fn(lib, "rkv_gemm_bf16w")(
        x.shape[0], w.shape[0], w.shape[1], x.data_ptr(), x.stride(0), w.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0),
        torch.get_num_threads())
    if code:
        raise RuntimeError(f"rkv_gemm_bf16w failed with code {code}")
    return out


def dequantize(fmt: str, qs: torch.Tensor, scales: torch.Tensor, k: int,
               out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """W [N, K] widened to float32, or bfloat16 (rounded to nearest even) with
    `dtype=torch.bfloat16`, into `out` [N, K] of that dtype when given (unit last stride)."""
    lib = _LIB.get()
    assert lib is not None, "quant_kernels.dequantize called without available()"
    n = qs.shape[0]
    if out is None:
        out = torch.empty(n, k, dtype=dtype)
    fn = lib.rkv_dequant if out.dtype == torch.float32 else _fn(lib, "rkv_dequant_bf16")
    assert out.dtype in (torch.float32, torch.bfloat16), f"cannot widen to {out.dtype}"
    code = fn(FORMATS[fmt], n, k, qs.data_ptr(), scales.data_ptr(),
              out.data_ptr(), out.stride(0), torch.get_num_threads())
    if code:
        raise RuntimeError(f"rkv_dequant failed with code {code}")
    return out
