"""Rotary embedding in place on the CPU (csrc/rope.cpp), built at first use like the norms.

    rope_kernels.rotate_(x, cos, sin)   # x [N, H, D] (heads contiguous), cos / sin [N, 1, D/2]

Why: torch computes the rotation in seven ops with temporaries (chunk, four products, a
difference, a sum, a concatenation); on a prefill of 512 tokens those ops took more time than
the attention on two busy cores, and at decode they are ~18 us of dispatch per layer. Results
are bit-identical to `layers.apply_rotary` (each product and sum rounded to x's dtype, no FMA).
`LlamaAttention` uses it for CPU float32 / bfloat16 when it builds (`RADIXKV_ROPE_KERNELS=0`:
torch, the reference).
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from radixkv.errors import InvalidSlotError
from radixkv.native_build import RECORD, LazyLibrary

_SRC = Path(__file__).with_name("csrc") / "rope.cpp"
_CODE = {torch.float32: 0, torch.bfloat16: 1}
_ARGS = struct.Struct("<10q")  # `struct Args` of rope.cpp
_STORE_ARGS = struct.Struct("<15q")  # `struct StoreArgs`: Args, then hkv, slots, rows, k, v
# -ffp-contract=off: a fused multiply-add would round differently from torch's separate ops.
_FLAG_SETS = (("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),
              ("-O3", "-fopenmp", "-ffp-contract=off"), ("-O3", "-ffp-contract=off"))

_LIB = LazyLibrary(_SRC, what="the CPU rotary kernel", fallback="using torch",
                   switch="RADIXKV_ROPE_KERNELS",
                   signatures={"rkv_rope": RECORD, "rkv_rope_store": RECORD},
                   flag_sets=_FLAG_SETS)


def available() -> bool:
    """True when the kernel is built (building it on the first call)."""
    return _LIB.available()


def supports(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """x [N, H, D] on the CPU, float32 / bfloat16, heads and dims contiguous within a token
    (any token stride); cos [N, 1, D/2] of x's dtype with a contiguous last dim."""
    return (x.device.type == "cpu" and x.dim() == 3 and x.dtype in _CODE
            and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.shape[2] % 2 == 0
            and cos.dtype == x.dtype and cos.dim() == 3 and cos.shape[0] == x.shape[0]
            and cos.shape[2] * 2 == x.shape[2] and cos.stride(2) == 1 and available())


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, H, D] in place by cos / sin [N, 1, D/2] (sin strided like cos); returns x.
    The caller checks `supports(x, cos)`."""
    lib = _LIB.get()
    assert lib is not None, "rope_kernels.rotate_ called without available()"
    assert sin.stride() == cos.stride() and sin.shape == cos.shape and sin.dtype == cos.dtype
    n, h, d = x.shape
    if n:
        lib.rkv_rope(_ARGS.pack(n, h, d, _CODE[x.dtype], x.data_ptr(), x.stride(0), cos.data_ptr(),
                      sin.data_ptr(), cos.stride(0), torch.get_num_threads()))
    return x


def supports_store(qkv: torch.Tensor, cos: torch.Tensor, slots: torch.Tensor,
                   k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> bool:
    """What `rotate_store_` handles: `supports(qkv, cos)`, int64 contiguous slots on the CPU and
    contiguous K / V buffers [rows, Hkv, D] in qkv's dtype (a float pool, not a quantized one)."""
    return (supports(qkv, cos) and slots.dtype == torch.int64 and slots.dim() == 1
            and slots.is_contiguous() and slots.device.type == "cpu"
            and slots.shape[0] == qkv.shape[0]
            and k_buffer.dtype == qkv.dtype and v_buffer.dtype == qkv.dtype
            and k_buffer.dim() == 3 and k_buffer.shape == v_buffer.shape
            and k_buffer.shape[2] == qkv.shape[2] and k_buffer.is_contiguous()
            and v_buffer.is_contiguous() and k_buffer.device.type == "cpu"
            and qkv.shape[1] > 2 * k_buffer.shape[1])


def rotate_store_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> torch.Tensor:
    """The attention layer's step between the qkv projection and attention, in one call:
    qkv [N, Hq + 2 Hkv, D] (q heads, k heads, v heads of each token) has its q and k heads
    rotated in place as `rotate_` does, then k (rotated) and v are written to
    `k_buffer[slots]` / `v_buffer[slots]` ([rows, Hkv, D]; what `TokenToKVPool.set_kv` does for
    a float pool). Returns qkv. Raises `InvalidSlotError`, with nothing written, when a slot is
    outside [0, rows). The caller checks `supports_store`."""
    lib = _LIB.get()
    assert lib is not None, "rope_kernels.rotate_store_ called without available()"
    assert sin.stride() == cos.stride() and sin.shape == cos.shape and sin.dtype == cos.dtype
    n, h, d = qkv.shape
    hkv = k_buffer.shape[1]
    if n == 0:
        return qkv
    code = lib.rkv_rope_store(_STORE_ARGS.pack(
        n, h - hkv, d, _CODE[qkv.dtype], qkv.data_ptr(), qkv.stride(0), cos.data_ptr(),
        sin.data_ptr(), cos.stride(0), torch.get_num_threads(),
        hkv, slots.data_ptr(), k_buffer.shape[0], k_buffer.data_ptr(), v_buffer.data_ptr()))
    if code == 2:
        raise InvalidSlotError(f"set_kv: a slot is outside the K/V buffers [0, "
                               f"{k_buffer.shape[0]})")
    if code:
        raise ValueError(f"rope_kernels.rotate_store_: unsupported dtype {qkv.dtype}")
    return qkv
