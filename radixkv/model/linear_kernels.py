"""Skinny CPU matrix products (csrc/linear.cpp) for decode-sized batches, built at first use.

    y = linear_kernels.linear(x, weight, bias)   # x [M, in], weight [out, in] -> [M, out]

The interface is one function of plain tensors, so other weight formats (e.g. quantized linears)
can sit next to it. `Linear` in `radixkv.model.layers` calls it for products of at most
`fast_max_rows` rows, a limit set per model at load time by `choose_max_rows` from what this
CPU supports; other products (and every product when the kernels cannot be built, or with
`RADIXKV_LINEAR_KERNELS=0`) run on torch's `F.linear`, the reference path.

Why: at M = 2..16 rows torch's CPU GEMM is no faster than M = 1 repeated (it pays for a full
GEMM setup), and on CPUs without native bfloat16 its bf16 GEMM runs several times slower than
float32. This kernel reads each weight row once per call for all M rows, widening bf16 / fp16
weights in registers (AVX2 is enough), so a bf16 product costs half the memory traffic of a
float32 one. Results equal `F.linear` within float32 rounding (another summation order).

The library is built and cached like the attention kernels (`radixkv.attention.cpu_kernels`:
system C++ compiler, `-O3 -march=native -fopenmp`, cache under `$RADIXKV_CACHE_DIR`).
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from radixkv.native_build import RECORD, LazyLibrary

_SRC = Path(__file__).with_name("csrc") / "linear.cpp"
_X_CODE = {torch.float32: 0, torch.bfloat16: 1}
_W_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# `struct Args` of linear.cpp: 13 int64 fields.
_ARGS = struct.Struct("<13q")

_LIB = LazyLibrary(_SRC, what="the CPU linear kernels", fallback="using torch linears",
                   switch="RADIXKV_LINEAR_KERNELS", signatures={"rkv_linear": RECORD})


def available() -> bool:
    """True when the kernels are built (building them on the first call)."""
    return _LIB.available()


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` handles these operands: 2-D CPU tensors, x float32 / bfloat16 with a
    contiguous last dim, weight [out, in] float32 / bfloat16 / float16 with a contiguous last
    dim, x's dtype equal to weight's unless the weight is float32-compatible half storage."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() == 2
            and weight.dim() == 2 and x.dtype in _X_CODE and weight.dtype in _W_CODE
            and x.shape[1] == weight.shape[1] and x.stride(1) == 1 and weight.stride(1) == 1
            and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x [M, in] @ weight[out, in].T (+ bias [out], x's dtype) -> [M, out] in x's dtype,
    accumulated in float32. The caller checks `supports(x, weight)` first."""
    lib = _LIB.get()
    assert lib is not None, "linear_kernels.linear called without available()"
    m, n = x.shape[0], weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype)
    if m == 0:
        return y
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    lib.rkv_linear(_ARGS.pack(m, n, x.shape[1], _X_CODE[x.dtype], _W_CODE[weight.dtype],
                  x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0),
                  0 if bias is None else bias.data_ptr(), y.data_ptr(), n,
                  torch.get_num_threads()))
    return y


def choose_max_rows(dtype: torch.dtype, native_half: bool) -> int:
    """The largest row count `Linear` sends to this kernel for weights of `dtype` (0: never;
    a single row always stays on torch).

    Measured on a 2-core AVX2 Zen 3 (one thread, thread CPU time, 30 layers of SmolLM2-135M
    shapes, under load): at 1 row torch's GEMV is 2-10% faster in float32 and bfloat16 (both
    read the weights near the memory bandwidth); at 2-16 rows this kernel is 1.4-1.9x faster
    in float32, and torch's GEMM wins from ~32; in bfloat16 (no native bf16) it beats both
    torch's bf16 GEMM (1.3-2.5x) and the float32 upcast up to 32 rows. On CPUs with native
    half GEMMs (AVX512-BF16, AMX) oneDNN is left to do the work.
    """
    if dtype not in _X_CODE or not available():
        return 0  # (float16 activations are not handled: torch's path)
    if dtype == torch.float32:
        return 16
    return 0 if native_half else 32
