"""Decode attention over a prefix shared by every request of the batch (csrc/shared_prefix.cpp).

    n = common_prefix_len(kv_indptr, kv_indices)   # leading slots all requests have in common
    o = shared_prefix.decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, scale, n)

Why: with B requests over one P-token system prompt, the plain decode kernel reads the prompt's
K/V once per request. Measured on a 2-core Zen 5 (32 requests x 650 tokens, 30 layers): decode
attention took 41 ms of an 83 ms float32 step (43 of 67 ms in bfloat16). This kernel reads the
prefix once per block of query rows and scores it as a small matrix product; each request then
finishes over its own slots. Same results as `cpu_kernels.decode` within float32 rounding.

Built at first use like the other CPU kernels (`RADIXKV_CPU_KERNELS=0` turns it off too).
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import numpy as np
import torch

from radixkv.attention.validation import AttentionInputError
from radixkv.errors import InvalidSlotError
from radixkv.native_build import RECORD, LazyLibrary

_SRC = Path(__file__).with_name("csrc") / "shared_prefix.cpp"
_ARGS = struct.Struct("<7q3q3q3q3q2qd2q")  # `struct Args` of shared_prefix.cpp
_CODE = {torch.float32: 0, torch.bfloat16: 1}
MIN_SHARED = 64  # shorter common prefixes go to the plain decode kernel


def _read_width(lib: ctypes.CDLL) -> None:
    global _width
    lib.rkv_shared_width.restype = ctypes.c_int64
    _width = int(lib.rkv_shared_width())


_width = 16
_LIB = LazyLibrary(_SRC, what="the shared-prefix decode kernel",
                   fallback="the plain decode kernel", switch="RADIXKV_CPU_KERNELS",
                   signatures={"rkv_shared_prefix_decode": RECORD}, on_load=_read_width)


def enabled() -> bool:
    """Whether shared-prefix decode is on (`RADIXKV_SHARED_PREFIX=0` turns it off) and built."""
    return os.environ.get("RADIXKV_SHARED_PREFIX", "1") != "0" and _LIB.available()


def supports(q: torch.Tensor, k_buffer: torch.Tensor) -> bool:
    """CPU float32 / bfloat16 q with K/V of its dtype, head_dim a multiple of the vector width
    and at most 128."""
    return (q.device.type == "cpu" and q.dtype in _CODE and k_buffer.dtype == q.dtype
            and q.shape[-1] <= 128 and enabled() and q.shape[-1] % _width == 0)


def common_prefix_len(kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> int:
    """How many leading slots every request of the CSR batch has in common (0 for fewer than
    two requests, or when the common part is shorter than MIN_SHARED). CPU tensors."""
    ip = kv_indptr.numpy()
    if ip.shape[0] < 3:
        return 0
    lens = np.diff(ip)
    n = int(lens.min())
    if n < MIN_SHARED:
        return 0
    idx = kv_indices.numpy()
    block = idx[ip[:-1, None] + np.arange(n)]  # [B, n]: every request's first n slots
    same = (block == block[0]).all(axis=0)  # [n]
    shared = n if bool(same.all()) else int(np.argmin(same))
    return shared if shared >= MIN_SHARED else 0


def decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
           shared: int) -> torch.Tensor:
    """Decode attention (conventions of `radixkv.attention.decode`: q [B, Hq, D] -> o
    [B, Hq, D]) when the first `shared` slots of every request are the same slots. Raises
    `InvalidSlotError` (before writing anything) when they are not, or on a malformed kv_indptr
    or a slot outside the buffers. The caller checks `supports`."""
    lib = _LIB.get()
    assert lib is not None, "shared_prefix.decode called without supports()"
    if q.stride(-1) != 1:
        q = q.contiguous()
    ip = kv_indptr if kv_indptr.dtype == torch.int64 else kv_indptr.to(torch.int64)
    idx = kv_indices if kv_indices.dtype == torch.int64 else kv_indices.to(torch.int64)
    ip, idx = ip.contiguous(), idx.contiguous()
    o = torch.empty(q.shape, dtype=q.dtype)
    if q.shape[0] == 0:
        return o
    code = lib.rkv_shared_prefix_decode(_ARGS.pack(
        q.shape[0], q.shape[1], k_buffer.shape[1], q.shape[2], k_buffer.shape[0],
        idx.shape[0], shared,
        q.data_ptr(), q.stride(0), q.stride(1),
        k_buffer.data_ptr(), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.data_ptr(), v_buffer.stride(0), v_buffer.stride(1),
        o.data_ptr(), o.stride(0), o.stride(1),
        ip.data_ptr(), idx.data_ptr(), float(sm_scale), torch.get_num_threads(),
        _CODE[q.dtype]))
    if code in (1, 2, 3):
        raise InvalidSlotError("shared-prefix decode: " + {
            1: "kv_indptr must start at >= 0, be non-decreasing and end at <= len(kv_indices)",
            2: "kv_indices holds a slot outside the K/V buffers",
            3: f"the first {shared} slots are not the same for every request"}[code])
    if code:
        raise AttentionInputError(f"shared-prefix decode: unsupported input (code {code})")
    return o
