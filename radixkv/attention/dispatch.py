"""Dispatch of the paged attention calls to a backend by device and size (see the package
docstring), and the quantized-KV store kernel the pool uses on the CPU."""

from __future__ import annotations

import os

import torch

from radixkv.attention import cpu_kernels, torch_backend
from radixkv.attention import shared_prefix as shared_prefix_kernel
from radixkv.attention.validation import (
    check_decode,
    check_extend,
    check_index_values,
)
from radixkv.errors import ConfigError
from radixkv.memory.kv_pool import set_quant_store_hook
from radixkv.memory.kv_quant import is_quantized, kv_cache_dtype_name

# A request with at least this many (query, key, query head) score entries runs its extend on
# torch's SDPA (flash kernel on oneDNN/MKL GEMMs) over K/V gathered once, when the fused kernel
# is the dot-product one (quantized K/V, RADIXKV_CPU_EXTEND_DOT=1, builds without AVX2 + FMA):
# measured single-threaded on a 2-core AVX2 machine, that kernel won below ~1.5M entries per
# request (short prompts: up to 1.4x), SDPA by 10-30% above ~4M (long cached prefixes).
# The outer-product kernels (cpu_kernels.outer_extend) beat SDPA at every size measured, so
# with them every extend of float K/V stays on the kernel. 16-wide AVX-512 (2-core Zen 5, 9 / 3
# heads, head_dim 64, fp32): 512 new tokens 1.1 vs 5.2 ms, 512 over 2048 cached 8.4 vs 22.6
# ms, 2048 new 14.0 vs 41.1 ms; bf16 alike. 8-wide AVX2 (2-core Zen 3, same shapes, 2
# threads): 512 new 3.6 vs 8.5 ms, 512 over 600 cached 8.7 vs 18.4, 512 over 2048 25.5 vs
# 42.0, 2048 new 40.9 vs 61.7, 21 over 600 0.37 vs 0.77.
_EXTEND_SDPA_WORK = 1 << 21


def _check_cuda_indices() -> bool:
    return os.environ.get("RADIXKV_CHECK_INDICES", "0") == "1"


def check_kv_cache_support(kv_dtype: torch.dtype, device: str | torch.device) -> None:
    """Raise `ConfigError` when no attention backend here reads `kv_dtype` K/V on `device`.

    Float K/V run everywhere the model runs. Quantized K/V (int8, fp8_e4m3) are read by the
    CPU kernels (fused C++, or the torch fallback) and on CUDA by the Triton kernels, so they
    need triton there; other devices must use kv_cache_dtype "auto".
    """
    if not is_quantized(kv_dtype):
        return
    dev = torch.device(device)
    name = kv_cache_dtype_name(kv_dtype)
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"kv_cache_dtype {name!r} on CUDA needs the Triton kernels, but "
                              f"triton cannot be imported ({exc}); choose 'auto'") from exc
        return
    raise ConfigError(f"kv_cache_dtype {name!r} has no attention kernel on {dev.type} (CPU "
                      f"and CUDA only); choose 'auto'")


def _cpu_quant_store(src: torch.Tensor, slots: torch.Tensor, codes: torch.Tensor,
                     scales: torch.Tensor) -> bool:
    # The pool's set_kv on CPU: one fused pass (absmax, scale, round, store) instead of ~8
    # torch ops per K or V, which at batch 1 would cost more than the attention itself.
    if codes.device.type != "cpu" or src.device.type != "cpu" or \
            not cpu_kernels.supports_quant_store(codes.dtype, codes.shape[-1]):
        return False
    cpu_kernels.quant_store(src, slots, codes, scales)
    return True


set_quant_store_hook(_cpu_quant_store)


def decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
           sm_scale: float | None = None, *, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None, shared_prefix: int = 0) -> torch.Tensor:
    """Attention of one new query per request over its KV slots.

    Args:
        q: `[B, Hq, D]` float32 / bfloat16 / float16, the query of each request.
        k_buffer, v_buffer: `[rows, Hkv, D]`, same dtype and device as q (a layer's pool
            buffers, `TokenToKVPool.get_kv_buffer(layer)`); Hq must be a multiple of Hkv, and
            query head h reads KV head h // (Hq // Hkv).
        kv_indptr: `[B + 1]` int32/int64, CSR offsets into kv_indices.
        kv_indices: `[nnz]` int32/int64 slots; request b attends to
            `kv_indices[kv_indptr[b]:kv_indptr[b+1]]` (its whole context, the new token's own
            K/V included once written).
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        k_scale, v_scale: `[rows, Hkv]` float32 for quantized buffers (int8 / float8_e4m3fn,
            the pool's `get_kv_scales(layer)`): slot s, head h holds `code * scale[s, h]`.
        shared_prefix: a promise that the first `shared_prefix` slots of every request are the
            same slots (`shared_prefix.common_prefix_len`; the CPU kernel checks it): on the
            CPU they are then read once for the whole batch. 0: no promise.

    Returns:
        o `[B, Hq, D]` in q's dtype; a request with no slots gets zeros.

    Raises `AttentionInputError` on inconsistent shapes/dtypes/devices and `InvalidSlotError`
    on a malformed kv_indptr or a slot outside the buffers (both before writing any output; on
    CUDA the value checks run only with `RADIXKV_CHECK_INDICES=1`, as they need a sync).
    """
    scale = check_decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale, k_scale,
                         v_scale)
    dev = q.device.type
    if dev == "cuda":
        if _check_cuda_indices():
            check_index_values(q.shape[0], k_buffer.shape[0], kv_indptr, kv_indices)
        from radixkv.attention import triton_backend
        return triton_backend.decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, scale,
                                     k_scale=k_scale, v_scale=v_scale)
    if shared_prefix >= shared_prefix_kernel.MIN_SHARED and q.shape[0] > 1 \
            and k_scale is None and shared_prefix_kernel.supports(q, k_buffer):
        return shared_prefix_kernel.decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, scale,
                                           shared_prefix)
    if cpu_kernels.supports(q, k_buffer):
        return cpu_kernels.decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, scale,
                                  k_scale, v_scale)
    check_index_values(q.shape[0], k_buffer.shape[0], kv_indptr, kv_indices)
    return torch_backend.decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, scale,
                                k_scale=k_scale, v_scale=v_scale)


def extend(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
           sm_scale: float | None = None, *, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a ragged batch of new tokens (prefill, or extend over a cached prefix).

    Convention: request b has `n_b = qo_indptr[b+1] - qo_indptr[b]` new tokens, the rows
    `q[qo_indptr[b]:qo_indptr[b+1]]`, and `kv_len_b = kv_indptr[b+1] - kv_indptr[b]` slots
    `kv_indices[kv_indptr[b]:kv_indptr[b+1]]`: its cached prefix first, then its n_b new tokens,
    whose K/V must already be written to the pool. New token i sits at position
    `kv_len_b - n_b + i` and attends to positions `0 .. kv_len_b - n_b + i` (the whole prefix,
    causally to the new tokens).

    Args:
        q: `[N, Hq, D]`, N = total new tokens; float32 / bfloat16 / float16.
        k_buffer, v_buffer: `[rows, Hkv, D]`, same dtype and device as q; Hq % Hkv == 0.
        qo_indptr: `[B + 1]` int32/int64, qo_indptr[0] = 0, qo_indptr[B] = N.
        kv_indptr: `[B + 1]` int32/int64; kv_indices `[nnz]` int32/int64 slots.
        sm_scale: softmax scale, default `1 / sqrt(D)`.
        k_scale, v_scale: scales of quantized buffers, as in `decode`.

    Returns:
        o `[N, Hq, D]` in q's dtype.

    Raises `AttentionInputError` / `InvalidSlotError` as `decode` does, and `InvalidSlotError`
    when qo_indptr is malformed or a request has more new tokens than KV slots.
    """
    scale = check_extend(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, sm_scale,
                         k_scale, v_scale)
    sc = {"k_scale": k_scale, "v_scale": v_scale}
    dev = q.device.type
    if dev == "cuda":
        if _check_cuda_indices():
            check_index_values(q.shape[0], k_buffer.shape[0], kv_indptr, kv_indices, qo_indptr)
        from radixkv.attention import triton_backend
        return triton_backend.extend(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
                                     scale, **sc)
    if not cpu_kernels.supports(q, k_buffer):
        check_index_values(q.shape[0], k_buffer.shape[0], kv_indptr, kv_indices, qo_indptr)
        return torch_backend.extend(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
                                    scale, **sc)
    return _cpu_extend(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, scale, sc)


def _cpu_extend(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                scale: float, sc: dict[str, torch.Tensor | None]) -> torch.Tensor:
    if q.shape[0] * kv_indices.shape[0] * q.shape[1] < _EXTEND_SDPA_WORK or (
            sc["k_scale"] is None and cpu_kernels.outer_extend(q.shape[-1])):
        # No request can reach the threshold: skip the per-request arithmetic below.
        return cpu_kernels.extend(q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
                                  scale, **sc)
    qo = qo_indptr.to(torch.int64)
    kv = kv_indptr.to(torch.int64)
    n_new = qo[1:] - qo[:-1]
    work = (n_new * (kv[1:] - kv[:-1] - n_new) + n_new * (n_new + 1) // 2) * q.shape[1]
    big = work >= _EXTEND_SDPA_WORK
    if not bool(big.any()):
        return cpu_kernels.extend(q, k_buffer, v_buffer, qo, kv, kv_indices, scale, **sc)
    # The fused call goes first: it validates every index of the batch (raising before any
    # SDPA work) and computes the small requests; SDPA then fills in the big ones (with
    # quantized KV, on K/V gathered and dequantized one request at a time).
    out = cpu_kernels.extend(q, k_buffer, v_buffer, qo, kv, kv_indices, scale,
                             requests=(~big).nonzero().view(-1), **sc)
    return torch_backend.extend(q, k_buffer, v_buffer, qo, kv, kv_indices, scale,
                                requests=big.nonzero().view(-1).tolist(), out=out, **sc)
