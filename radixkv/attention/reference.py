"""Naive paged attention: gather each request's K/V into contiguous tensors, softmax in float64.

Slow and obviously correct; the fast kernels in this package are tested against it. Conventions
are those of `radixkv.attention.decode` / `extend` (CSR slot lists, query head h reads KV head
h // (Hq // Hkv), a request with no KV slots gets zeros). Pass float64 inputs to get the exact
result instead of one rounded back to q's dtype. Quantized K/V (with `k_scale` / `v_scale`) are
dequantized explicitly, in float64, with `radixkv.memory.kv_quant.dequantize`.
"""

from __future__ import annotations

import math

import torch

from radixkv.memory.kv_quant import dequantize


def _rows(buf: torch.Tensor, scale: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    return buf[idx] if scale is None else dequantize(buf[idx], scale[idx], torch.float64)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            sm_scale: float) -> torch.Tensor:
    # q [Nq, Hq, D], k/v [Nk, Hkv, D]; each KV head serves Hq // Hkv query heads.
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    qd, kd, vd = q.double(), k.double(), v.double()
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(hq):
        scores = qd[:, h] @ kd[:, h // group].T * sm_scale  # [Nq, Nk]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ vd[:, h // group]
    return out.to(q.dtype)


def decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
           sm_scale: float | None = None, *, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference decode: q [B, Hq, D] -> o [B, Hq, D]; request b reads slots
    kv_indices[kv_indptr[b]:kv_indptr[b+1]] of k_buffer / v_buffer [num_slots + 1, Hkv, D].
    `sm_scale` defaults to 1 / sqrt(D)."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        idx = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long()
        out[b:b + 1] = _attend(q[b:b + 1], _rows(k_buffer, k_scale, idx),
                               _rows(v_buffer, v_scale, idx), None, scale)
    return out


def extend(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
           sm_scale: float | None = None, *, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference extend: q [total_new, Hq, D] -> o [total_new, Hq, D].

    Request b has n_b = qo_indptr[b+1] - qo_indptr[b] new tokens and kv_len_b slots in
    kv_indices[kv_indptr[b]:kv_indptr[b+1]]: its cached prefix first, then its new tokens (whose
    K/V are already written). New token i sits at position kv_len_b - n_b + i and attends to
    positions 0..kv_len_b - n_b + i.
    """
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for b in range(qo_indptr.numel() - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        idx = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long()
        n, kv_len = q1 - q0, idx.numel()
        if n == 0:
            continue
        pos_q = torch.arange(kv_len - n, kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= pos_q[:, None]  # [n, kv_len]
        out[q0:q1] = _attend(q[q0:q1], _rows(k_buffer, k_scale, idx),
                             _rows(v_buffer, v_scale, idx), mask, scale)
    return out
