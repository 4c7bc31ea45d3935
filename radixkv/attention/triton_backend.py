"""Paged attention in Triton, for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1).

- decode: split-KV. Program (b, kv head, split) scores its share of request b's slots for the
  G = Hq / Hkv query heads of that KV head at once (one K/V tile serves the whole group, no
  repeat_interleave), keeping a running max / sum in base 2. A second kernel merges the splits
  with a log-sum-exp combine. The split count is picked on the host from the batch shape only,
  so no call synchronises the GPU.
- extend: program (query tile, query head) walks its request's slots in tiles of BLOCK_N,
  stopping at the causal limit of the tile; the mapping from program to (request, tile) is a
  cumulative count of tiles per request computed on the device.

Quantized KV (QUANT = 1: int8, 2: fp8 e4m3 read as uint8 codes): each K/V tile is widened to
float32 codes in registers and its per-(slot, head) scales are folded in afterwards, the K scale
into the scores and the V scale into the softmax weights, so nothing dequantized is ever stored.
fp8 codes are decoded with integer ops (exponent rebias, subnormals as m * 2^-9), the same code
compiled and interpreted, so the interpreter tests cover what runs on a GPU.

Kernels are decorated at first use, keyed on whether the interpreter is on, so a process can
import this module before or after setting TRITON_INTERPRET. Inputs are assumed validated
(`radixkv.attention.validation`).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_FP8 = getattr(torch, "float8_e4m3fn", None)


def _decode_stage1(Q, K, V, KvIndptr, KvIndices, MidO, MidLse, scale_log2, KScale, VScale,
                   stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                   stride_kss, stride_ksh, stride_vss, stride_vsh,
                   stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr, QUANT: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    heads = hk * GROUP + offs_g  # [BLOCK_H] the query heads of this KV head
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    kv_start = tl.load(KvIndptr + b).to(tl.int64)
    kv_len = tl.load(KvIndptr + b + 1).to(tl.int64) - kv_start
    per_split = tl.cdiv(kv_len, NUM_SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_len)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        slots = tl.load(KvIndices + kv_start + offs_n, mask=nmask, other=0).to(tl.int64)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + slots[:, None] * stride_ks + hk * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0)  # [BLOCK_N, BLOCK_D]
        if UPCAST and QUANT == 0:
            k = k.to(tl.float32)
        if QUANT == 1:
            k = k.to(tl.float32).to(q.dtype)  # int8 codes: exact in every float dtype
        elif QUANT == 2:  # fp8 e4m3 codes: rebias normals, m * 2^-9 for subnormals
            kx = k.to(tl.int32)
            kn = (((kx & 0x7F) + (120 << 3)) << 20).to(tl.float32, bitcast=True)
            kf = tl.where((kx & 0x78) == 0, (kx & 7).to(tl.float32) * 0.001953125, kn)
            k = tl.where((kx & 0x80) != 0, -kf, kf).to(q.dtype)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_H, BLOCK_N]
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        if QUANT:  # q . (c k) = c (q . k): one multiply per score, not per element
            ksc = tl.load(KScale + slots * stride_kss + hk * stride_ksh, mask=nmask, other=0.0)
            s = s * ksc[None, :]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slots[:, None] * stride_vs + hk * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0)  # [BLOCK_N, BLOCK_D]
        if UPCAST and QUANT == 0:
            v = v.to(tl.float32)
        pw = p
        if QUANT == 1:
            v = v.to(tl.float32).to(q.dtype)  # int8 codes: exact in every float dtype
        elif QUANT == 2:  # fp8 e4m3 codes: rebias normals, m * 2^-9 for subnormals
            vx = v.to(tl.int32)
            vn = (((vx & 0x7F) + (120 << 3)) << 20).to(tl.float32, bitcast=True)
            vf = tl.where((vx & 0x78) == 0, (vx & 7).to(tl.float32) * 0.001953125, vn)
            v = tl.where((vx & 0x80) != 0, -vf, vf).to(q.dtype)
        if QUANT:  # sum_t p_t (c_t v_t) = sum_t (p_t c_t) v_t
            vsc = tl.load(VScale + slots * stride_vss + hk * stride_vsh, mask=nmask, other=0.0)
            pw = p * vsc[None, :]
        if IEEE_DOT:
            pv = tl.dot(pw.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(pw.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    # An empty split stores lse = -inf and a zero partial, which the combine weighs by zero.
    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos
             + offs_d[None, :], o, mask=hmask[:, None] & dmask[None, :])
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=hmask)


def _decode_stage2(MidO, MidLse, O, stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                   stride_ob, stride_oh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < NUM_SPLITS
    dmask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=smask,
                  other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # an empty request: every weight below is 0
    w = tl.exp2(lse - m)  # [BLOCK_S]
    parts = tl.load(MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos
                    + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [BLOCK_D]
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, o.to(O.dtype.element_ty), mask=dmask)


def _extend_kernel(Q, K, V, O, QoIndptr, KvIndptr, KvIndices, TileIndptr, scale_log2, batch,
                   KScale, VScale,
                   stride_qn, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                   stride_on, stride_oh, stride_kss, stride_ksh, stride_vss, stride_vsh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
                   IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr, QUANT: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // GROUP
    # Which request and tile: b = number of requests whose tiles all come before pid.
    offs_b = tl.arange(0, BLOCK_B)
    ends = tl.load(TileIndptr + 1 + offs_b, mask=offs_b < batch, other=2147483647)
    b = tl.sum((ends <= pid).to(tl.int32), 0)
    if b < batch:
        tile = pid - tl.load(TileIndptr + b)
        q_start = tl.load(QoIndptr + b).to(tl.int64)
        n_new = tl.load(QoIndptr + b + 1).to(tl.int64) - q_start
        kv_start = tl.load(KvIndptr + b).to(tl.int64)
        kv_len = tl.load(KvIndptr + b + 1).to(tl.int64) - kv_start
        prefix = kv_len - n_new
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < n_new
        dmask = offs_d < HEAD_DIM
        q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qn + h * stride_qh
                    + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = prefix + offs_m  # [BLOCK_M] absolute positions of the tile's queries
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kv_end = tl.minimum(kv_len, prefix + (tile + 1) * BLOCK_M)  # causal limit of the tile
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < kv_end
            slots = tl.load(KvIndices + kv_start + offs_n, mask=nmask, other=0).to(tl.int64)
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(K + slots[:, None] * stride_ks + hk * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0)
            if UPCAST and QUANT == 0:
                k = k.to(tl.float32)
            if QUANT == 1:
                k = k.to(tl.float32).to(q.dtype)  # int8 codes: exact in every float dtype
            elif QUANT == 2:  # fp8 e4m3 codes: rebias normals, m * 2^-9 for subnormals
                kx = k.to(tl.int32)
                kn = (((kx & 0x7F) + (120 << 3)) << 20).to(tl.float32, bitcast=True)
                kf = tl.where((kx & 0x78) == 0, (kx & 7).to(tl.float32) * 0.001953125, kn)
                k = tl.where((kx & 0x80) != 0, -kf, kf).to(q.dtype)
            if IEEE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale_log2
            if QUANT:
                ksc = tl.load(KScale + slots * stride_kss + hk * stride_ksh, mask=nmask,
                              other=0.0)
                s = s * ksc[None, :]
            visible = nmask[None, :] & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            # Every query sees key 0 in the first tile, so m_new is finite from then on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slots[:, None] * stride_vs + hk * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0)
            if UPCAST and QUANT == 0:
                v = v.to(tl.float32)
            pw = p
            if QUANT == 1:
                v = v.to(tl.float32).to(q.dtype)  # int8 codes: exact in every float dtype
            elif QUANT == 2:  # fp8 e4m3 codes: rebias normals, m * 2^-9 for subnormals
                vx = v.to(tl.int32)
                vn = (((vx & 0x7F) + (120 << 3)) << 20).to(tl.float32, bitcast=True)
                vf = tl.where((vx & 0x78) == 0, (vx & 7).to(tl.float32) * 0.001953125, vn)
                v = tl.where((vx & 0x80) != 0, -vf, vf).to(q.dtype)
            if QUANT:
                vsc = tl.load(VScale + slots * stride_vss + hk * stride_vsh, mask=nmask,
                              other=0.0)
                pw = p * vsc[None, :]
            if IEEE_DOT:
                pv = tl.dot(pw.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(pw.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(O + (q_start + offs_m)[:, None] * stride_on + h * stride_oh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


_KERNELS: dict[bool, SimpleNamespace] = {}


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _kernels() -> SimpleNamespace:
    # triton.jit decides at decoration time whether a kernel is interpreted, so decorate lazily
    # and keep one set per mode.
    mode = _interpreting()
    if mode not in _KERNELS:
        _KERNELS[mode] = SimpleNamespace(
            stage1=triton.jit(_decode_stage1),
            stage2=triton.jit(_decode_stage2),
            extend=triton.jit(_extend_kernel),
        )
    return _KERNELS[mode]


def _ieee_dot(dtype: torch.dtype) -> bool:
    # Float32 dots must not drop to TF32 (the tests demand 1e-5); half types use the default.
    return dtype == torch.float32 or _upcast(dtype)


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot returns garbage for bfloat16 operands (triton 3.9), so widen the
    # tiles to float32 there; compiled kernels keep bf16 tensor-core dots.
    return dtype == torch.bfloat16 and _interpreting()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _quant_args(k_buffer: torch.Tensor, v_buffer: torch.Tensor, k_scale: torch.Tensor | None,
                v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor, int]:
    """(K, V as the kernels read them, K scales, V scales, QUANT code). fp8 buffers are viewed
    as uint8 codes; without scales, K stands in for the unused scale pointers."""
    if k_scale is None or v_scale is None:
        return k_buffer, v_buffer, k_buffer, k_buffer, 0
    if k_buffer.dtype == torch.int8:
        return k_buffer, v_buffer, k_scale, v_scale, 1
    assert _FP8 is not None and k_buffer.dtype == _FP8, k_buffer.dtype
    return k_buffer.view(torch.uint8), v_buffer.view(torch.uint8), k_scale, v_scale, 2


def _num_splits(batch: int, hkv: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, but enough to exercise the combine
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    # Aim for ~2 waves of programs; cap so each split still has work at typical lengths.
    return max(1, min(16, math.ceil(2 * sms / max(1, batch * hkv))))


def decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
           num_splits: int | None = None, *, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Split-KV paged decode: q [B, Hq, D], k_buffer / v_buffer [rows, Hkv, D] -> o [B, Hq, D].

    `num_splits` (default: chosen from B, Hkv and the GPU) is how many programs share one
    request's slots. A request with no slots gets zeros. Quantized buffers come with
    k_scale / v_scale [rows, Hkv] float32.
    """
    k_buffer, v_buffer, ksc, vsc, quant = _quant_args(k_buffer, v_buffer, k_scale, v_scale)
    kern = _kernels()
    bsz, hq, d = q.shape
    hkv = k_buffer.shape[1]
    group = hq // hkv
    o = torch.empty_like(q)
    if bsz == 0:
        return o
    q = q if q.stride(-1) == 1 else q.contiguous()
    splits = num_splits or _num_splits(bsz, hkv, q.device)
    mid_o = torch.empty((bsz, hq, splits, d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((bsz, hq, splits), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    block_h = max(16, triton.next_power_of_2(group))  # ... and M >= 16
    block_n = 64 if block_d <= 128 else 32
    kern.stage1[(bsz, hkv, splits)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, mid_o, mid_lse, sm_scale * _LOG2E,
        ksc, vsc,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        ksc.stride(0), ksc.stride(1), vsc.stride(0), vsc.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n,
        NUM_SPLITS=splits, IEEE_DOT=_ieee_dot(q.dtype), UPCAST=_upcast(q.dtype), QUANT=quant,
    )
    kern.stage2[(bsz, hq)](
        mid_o, mid_lse, o, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), o.stride(0), o.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )
    return o


def extend(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
           sm_scale: float, *, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Tiled paged extend: q [N, Hq, D] -> o [N, Hq, D] (conventions of `attention.extend`;
    quantized buffers come with k_scale / v_scale as in `decode`)."""
    k_buffer, v_buffer, ksc, vsc, quant = _quant_args(k_buffer, v_buffer, k_scale, v_scale)
    kern = _kernels()
    n, hq, d = q.shape
    hkv = k_buffer.shape[1]
    bsz = qo_indptr.shape[0] - 1
    o = torch.empty_like(q)
    if n == 0 or bsz == 0:
        return o
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    block_m = 32 if block_d <= 128 else 16
    block_n = 32
    # Tiles per request, prefix-summed on the device: no host sync to size the grid, which is
    # the upper bound cdiv(N, BLOCK_M) + B (each request wastes at most one partial tile).
    new = (qo_indptr[1:] - qo_indptr[:-1]).to(torch.int32)
    tile_indptr = torch.zeros(bsz + 1, dtype=torch.int32, device=q.device)
    torch.cumsum((new + block_m - 1) // block_m, 0, out=tile_indptr[1:])
    grid = (triton.cdiv(n, block_m) + bsz, hq)
    kern.extend[grid](
        q, k_buffer, v_buffer, o, qo_indptr, kv_indptr, kv_indices, tile_indptr,
        sm_scale * _LOG2E, bsz, ksc, vsc,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), o.stride(0), o.stride(1),
        ksc.stride(0), ksc.stride(1), vsc.stride(0), vsc.stride(1),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_B=max(2, triton.next_power_of_2(bsz)), IEEE_DOT=_ieee_dot(q.dtype),
        UPCAST=_upcast(q.dtype), QUANT=quant,
    )
    return o
