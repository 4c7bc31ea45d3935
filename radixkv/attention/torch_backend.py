"""Paged attention in plain torch: the CPU fallback, and the big-extend path on CPU.

Decode gathers the K/V rows of a few requests at a time into a padded `[b, L, Hkv, D]` block,
sized to stay in cache, and runs SDPA on its `[b, Hkv, L, D]` strided view with a padding mask
and `enable_gqa` (no repeat_interleave, no second copy). Extend runs SDPA per request with
`enable_gqa` on K/V gathered once per request: a big extend is compute bound, so the gather is a
small cost, and SDPA's CPU flash kernel (blocked GEMMs) is the fastest option for big tiles.

Quantized K/V (int8 / fp8 codes with `k_scale` / `v_scale` [rows, Hkv]) are dequantized right
after the gather, on the gathered rows only (a chunk of requests, or one request), never the pool.

Inputs are assumed validated (`radixkv.attention.validation`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Budget of gathered K+V bytes per decode chunk: small enough to stay in L2/L3 between the
# gather and the matmuls that read it back.
_DECODE_CHUNK_BYTES = 4 << 20


def _gather(buf: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Rows `buf[slots]` [n, Hkv, D] in `dtype`, dequantized with `scale` [rows, Hkv] if given."""
    rows = buf.index_select(0, slots)
    if scale is None:
        return rows
    return (rows.float() * scale.index_select(0, slots).unsqueeze(-1)).to(dtype)


def decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float, *,
           k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D], k_buffer / v_buffer [rows, Hkv, D] -> o [B, Hq, D] (see `attention.decode`).
    A request with no KV slots gets a zero output row."""
    bsz, hq, d = q.shape
    hkv = k_buffer.shape[1]
    out = torch.zeros_like(q)
    if bsz == 0:
        return out
    indptr = kv_indptr.to(torch.int64)
    lens = indptr[1:] - indptr[:-1]  # [B]
    lens_l = lens.tolist()
    row_bytes = 2 * hkv * d * q.element_size()  # as gathered (dequantized)
    start = 0
    while start < bsz:
        # Greedy chunk: add requests while the padded gather fits the budget.
        end, lmax = start + 1, lens_l[start]
        while end < bsz:
            nl = max(lmax, lens_l[end])
            if (end + 1 - start) * nl * row_bytes > _DECODE_CHUNK_BYTES:
                break
            end, lmax = end + 1, nl
        if lmax > 0:
            _decode_chunk(q[start:end], k_buffer, v_buffer, indptr[start:end],
                          lens[start:end], kv_indices, lmax, sm_scale, out[start:end],
                          k_scale, v_scale)
        start = end
    return out


def _decode_chunk(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                  starts: torch.Tensor, lens: torch.Tensor, kv_indices: torch.Tensor,
                  lmax: int, sm_scale: float, out: torch.Tensor,
                  k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    b, hq, d = q.shape
    hkv = k_buffer.shape[1]
    dev = q.device
    pos = torch.arange(lmax, device=dev)
    valid = pos[None, :] < lens[:, None]  # [b, L]
    flat = (starts[:, None] + pos[None, :]).clamp_(max=max(kv_indices.shape[0] - 1, 0))
    slots = torch.where(valid, kv_indices[flat].to(torch.int64), 0).view(-1)  # pad -> slot 0
    # [b, L, Hkv, D] gathered, viewed [b, Hkv, L, D] without a copy: SDPA takes strided input.
    k = _gather(k_buffer, k_scale, slots, q.dtype).view(b, lmax, hkv, d).transpose(1, 2)
    v = _gather(v_buffer, v_scale, slots, q.dtype).view(b, lmax, hkv, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None, :],
                                       scale=sm_scale, enable_gqa=hq != hkv)  # [b, Hq, 1, D]
    out.copy_(o[:, :, 0])
    # Requests with no KV: softmax over nothing; the output is defined as zeros.
    empty = lens == 0
    if bool(empty.any()):
        out[empty] = 0


def extend(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
           sm_scale: float, requests: list[int] | None = None,
           out: torch.Tensor | None = None, *, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [N, Hq, D] -> o [N, Hq, D] (see `attention.extend`), one SDPA call per request.

    `requests` limits the work to those request ids (the others' rows of `out` are left as
    they are); `out` [N, Hq, D] is written in place when given.
    """
    hq, hkv = q.shape[1], k_buffer.shape[1]
    if out is None:
        out = torch.empty_like(q)
    qo = qo_indptr.tolist()
    kv = kv_indptr.tolist()
    ids = range(len(qo) - 1) if requests is None else requests
    for b in ids:
        q0, q1, k0, k1 = qo[b], qo[b + 1], kv[b], kv[b + 1]
        n, kv_len = q1 - q0, k1 - k0
        if n == 0:
            continue
        idx = kv_indices[k0:k1]
        kb = _gather(k_buffer, k_scale, idx, q.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D]
        vb = _gather(v_buffer, v_scale, idx, q.dtype).transpose(0, 1)[None]
        qb = q[q0:q1].transpose(0, 1)[None]  # [1, Hq, n, D]
        if n == kv_len:  # no cached prefix: the plain (top-left) causal mask is the right one
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=sm_scale,
                                               enable_gqa=hq != hkv)
        else:
            # New token i sits at position kv_len - n + i and sees positions 0 .. that one.
            qpos = torch.arange(kv_len - n, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= qpos[:, None]  # [n, L]
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=sm_scale,
                                               enable_gqa=hq != hkv)
        out[q0:q1] = o[0].transpose(0, 1)
    return out
