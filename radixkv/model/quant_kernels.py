"""The packed low-bit CPU kernels (csrc/qgemv.cpp), compiled at first use and called via ctypes.

Same build scheme as `radixkv.attention.cpu_kernels`: plain C++ with OpenMP and no torch or
Python headers, built once with the system compiler (`$CXX`, else g++, c++ or clang++) into
`$RADIXKV_CACHE_DIR` (default `~/.cache/radixkv`), keyed by the source, compiler, flags and CPU.
When no compiler is found or the build fails, `available()` is False and the quantized layers
use the pure torch reference (dequantize, then matmul); `RADIXKV_QUANT_KERNELS=0` forces that.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import torch

from radixkv.native_build import build_library

_log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "qgemv.cpp"
FORMATS = {"int4": 0, "int8": 1}  # the kernel's `fmt` codes

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_simd = False


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _simd
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("RADIXKV_QUANT_KERNELS", "1") == "0":
            return None
        lib = build_library(_SRC, what="the quantized kernels",
                            fallback="quantized layers use torch")
        if lib is None:
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.rkv_qgemm.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, i64]
        lib.rkv_qgemm.restype = i64
        lib.rkv_dequant.argtypes = [i64, i64, i64, ptr, ptr, ptr, i64, i64]
        lib.rkv_dequant.restype = i64
        lib.rkv_qgemm_simd.restype = i64
        _simd = bool(lib.rkv_qgemm_simd())
        _lib = lib
        return lib


def available() -> bool:
    """True when the packed kernels are built (building them on the first call)."""
    return _lib is not None or _load() is not None


def simd() -> bool:
    """True when the kernels were compiled with their AVX2 + FMA + F16C code (else scalar C++)."""
    return available() and _simd


def qgemm(fmt: str, x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor,
          bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[M, N] = x[M, K] @ W.T (+ bias), W [N, K] packed as (qs, scales) in format `fmt`.

    x: float32 with unit last stride; out: float32 [M, N] view with unit last stride (it may be a
    column slice of a wider tensor); bias: float32 [N] or None. Caller checks shapes.
    """
    lib = _lib or _load()
    assert lib is not None, "quant_kernels.qgemm called without available()"
    m, k = x.shape
    code = lib.rkv_qgemm(FORMATS[fmt], m, out.shape[1], k, x.data_ptr(), x.stride(0),
                         qs.data_ptr(), scales.data_ptr(),
                         bias.data_ptr() if bias is not None else None,
                         out.data_ptr(), out.stride(0), torch.get_num_threads())
    if code:
        raise RuntimeError(f"rkv_qgemm failed with code {code}")
    return out


def dequantize(fmt: str, qs: torch.Tensor, scales: torch.Tensor, k: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] widened to float32 (into `out` [N, K] when given; unit last stride)."""
    lib = _lib or _load()
    assert lib is not None, "quant_kernels.dequantize called without available()"
    n = qs.shape[0]
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    code = lib.rkv_dequant(FORMATS[fmt], n, k, qs.data_ptr(), scales.data_ptr(),
                           out.data_ptr(), out.stride(0), torch.get_num_threads())
    if code:
        raise RuntimeError(f"rkv_dequant failed with code {code}")
    return out
