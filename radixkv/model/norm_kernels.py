"""Fused CPU RMSNorm rows (csrc/rms_norm.cpp), built at first use like the linear kernels.

    y = norm_kernels.rms_norm(x, weight, eps)            # x [N, H] -> [N, H]
    y = norm_kernels.rms_norm(x, weight, eps, delta=d)   # x += d first (in place), then norm

Why: torch's CPU `F.rms_norm` is a composite of ~7 ops, each a dispatch and a pass over the row;
at decode (one to a few rows of 576) that is 15-40 us a call and 61 calls per token, more than
the rest of the non-matmul work of a step. `RMSNorm` in `radixkv.model.layers` uses this for
CPU float32 / bfloat16 rows when it builds (`RADIXKV_NORM_KERNELS=0`: torch, the reference).
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from radixkv.native_build import RECORD, LazyLibrary

_SRC = Path(__file__).with_name("csrc") / "rms_norm.cpp"
_CODE = {torch.float32: 0, torch.bfloat16: 1}
# `struct Args` of rms_norm.cpp: 10 int64 fields, then eps as a double.
_ARGS = struct.Struct("<10qd")
# Single-threaded rows: -fopenmp is not needed; -march=native lets the compiler vectorise.
_FLAG_SETS = (("-O3", "-march=native"), ("-O3",))

_LIB = LazyLibrary(_SRC, what="the CPU RMSNorm kernel", fallback="using torch",
                   switch="RADIXKV_NORM_KERNELS", signatures={"rkv_rms_norm": RECORD},
                   flag_sets=_FLAG_SETS)


def available() -> bool:
    """True when the kernel is built (building it on the first call)."""
    return _LIB.available()


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """2-D CPU x [N, H] float32 / bfloat16 with a contiguous last dim, weight [H] of x's dtype,
    contiguous."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.dtype in _CODE
            and weight.dtype == x.dtype and weight.dim() == 1 and weight.is_contiguous()
            and x.shape[1] == weight.shape[0] and x.stride(1) == 1 and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             delta: torch.Tensor | None = None) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) per row -> a new [N, H] tensor in x's dtype. With
    `delta` ([N, H], x's dtype, last dim contiguous), x += delta in place first. The caller
    checks `supports(x, weight)`."""
    lib = _LIB.get()
    assert lib is not None, "norm_kernels.rms_norm called without available()"
    n, h = x.shape
    y = torch.empty((n, h), dtype=x.dtype)
    if delta is not None:
        assert delta.shape == x.shape and delta.dtype == x.dtype and delta.stride(1) == 1
    lib.rkv_rms_norm(_ARGS.pack(n, h, _CODE[x.dtype], x.data_ptr(), x.stride(0),
                  0 if delta is None else delta.data_ptr(),
                  0 if delta is None else delta.stride(0), weight.data_ptr(), y.data_ptr(), h,
                  float(eps)))
    return y
