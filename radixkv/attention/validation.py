"""Cheap checks of attention inputs, run before any kernel.

Shape, dtype and device checks read only tensor metadata, so they cost microseconds and never
synchronise a GPU. Value checks on the index tensors (non-decreasing indptr, slots inside the
buffers) are done inside the CPU kernels, where they are nearly free; on CUDA they are skipped
(they would need a device sync per layer) unless `RADIXKV_CHECK_INDICES=1`.
"""

from __future__ import annotations

import math

import torch

from radixkv.errors import AttentionInputError, InvalidSlotError
from radixkv.memory.kv_quant import quantized_dtypes

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANT_DTYPES = quantized_dtypes()  # int8, float8_e4m3fn: K/V codes read with per-row scales
_INDEX_DTYPES = (torch.int32, torch.int64)


def _index_tensor(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise AttentionInputError(f"{name} must be a 1-D tensor")
    if t.dtype not in _INDEX_DTYPES:
        raise AttentionInputError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise AttentionInputError(f"{name} is on {t.device} but q is on {device}")


def check_common(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                 kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 sm_scale: float | None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> float:
    """Validate q [N, Hq, D], k_buffer / v_buffer [rows, Hkv, D] and the CSR index tensors;
    returns the softmax scale (default 1 / sqrt(D)).

    K/V are either in q's dtype (no scales) or quantized (int8 / float8_e4m3fn, one dtype for
    both) with k_scale / v_scale `[rows, Hkv]` float32 on q's device.
    """
    # One boolean expression for the common (valid) case: the model calls this per layer, so
    # it must cost microseconds; `_diagnose` finds what is wrong only when it fails.
    try:
        qs, ks, dt, dev = q.shape, k_buffer.shape, q.dtype, q.device
        if k_scale is None and v_scale is None:
            kv_ok = k_buffer.dtype is dt and v_buffer.dtype is dt
        else:
            kv_ok = (k_buffer.dtype in QUANT_DTYPES and v_buffer.dtype is k_buffer.dtype
                     and k_scale.dtype is torch.float32 and v_scale.dtype is torch.float32
                     and k_scale.shape == ks[:2] and v_scale.shape == ks[:2]
                     and k_scale.device == dev and v_scale.device == dev)
        ok = (len(qs) == 3 and len(ks) == 3 and ks == v_buffer.shape and dt in FLOAT_DTYPES
              and kv_ok and qs[2] == ks[2] > 0
              and ks[1] > 0 and qs[1] % ks[1] == 0
              and kv_indptr.dim() == 1 and kv_indices.dim() == 1 and kv_indptr.shape[0] >= 1
              and kv_indptr.dtype in _INDEX_DTYPES and kv_indices.dtype in _INDEX_DTYPES
              and k_buffer.device == dev and v_buffer.device == dev
              and kv_indptr.device == dev and kv_indices.device == dev)
    except (AttributeError, TypeError):
        ok = False
    if not ok:
        if k_scale is not None or v_scale is not None:
            _diagnose_scales(q, k_buffer, v_buffer, k_scale, v_scale)
        _diagnose(q, k_buffer, v_buffer, kv_indptr, kv_indices)
    if sm_scale is None:
        return 1.0 / math.sqrt(qs[2])
    scale = float(sm_scale)
    if not math.isfinite(scale):
        raise AttentionInputError(f"sm_scale must be finite, got {sm_scale}")
    return scale


def _diagnose_scales(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """Raise an `AttentionInputError` naming what is wrong with quantized K/V inputs, if
    anything; the checks shared with float K/V are then left to `_diagnose`."""
    names = ", ".join(str(d) for d in QUANT_DTYPES)
    if k_scale is None or v_scale is None:
        raise AttentionInputError("k_scale and v_scale must be given together")
    for name, t in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if not isinstance(t, torch.Tensor) or t.dtype not in QUANT_DTYPES:
            raise AttentionInputError(f"with scales, {name} must be one of {names}, got "
                                      f"{getattr(t, 'dtype', t)!r}")
    if k_buffer.dtype != v_buffer.dtype:
        raise AttentionInputError(f"k_buffer ({k_buffer.dtype}) and v_buffer "
                                  f"({v_buffer.dtype}) must share a dtype")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise AttentionInputError(f"{name} must be a float32 tensor")
        if k_buffer.dim() == 3 and tuple(t.shape) != tuple(k_buffer.shape[:2]):
            raise AttentionInputError(f"{name} must be [rows, Hkv] = "
                                      f"{tuple(k_buffer.shape[:2])}, got {tuple(t.shape)}")
        if isinstance(q, torch.Tensor) and t.device != q.device:
            raise AttentionInputError(f"{name} is on {t.device} but q is on {q.device}")
    if not isinstance(q, torch.Tensor) or q.dtype not in FLOAT_DTYPES:
        raise AttentionInputError("q must be float32, bfloat16 or float16")


def _diagnose(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
              kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> None:
    """Raise an `AttentionInputError` naming the first inconsistency found."""
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise AttentionInputError(f"{name} must be a 3-D tensor, got "
                                      f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
        if t.dtype not in FLOAT_DTYPES and not (name != "q" and t.dtype in QUANT_DTYPES):
            raise AttentionInputError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if k_buffer.shape != v_buffer.shape:
        raise AttentionInputError(f"k_buffer {tuple(k_buffer.shape)} and v_buffer "
                                  f"{tuple(v_buffer.shape)} differ in shape")
    if k_buffer.dtype in QUANT_DTYPES and k_buffer.dtype == v_buffer.dtype:
        raise AttentionInputError(f"{k_buffer.dtype} K/V buffers need k_scale and v_scale")
    if not q.dtype == k_buffer.dtype == v_buffer.dtype:
        raise AttentionInputError(f"q, k_buffer and v_buffer must share a dtype, got {q.dtype}, "
                                  f"{k_buffer.dtype}, {v_buffer.dtype}")
    if not q.device == k_buffer.device == v_buffer.device:
        raise AttentionInputError("q, k_buffer and v_buffer must be on one device")
    hq, d = q.shape[1], q.shape[2]
    hkv = k_buffer.shape[1]
    if k_buffer.shape[2] != d:
        raise AttentionInputError(f"head_dim of q ({d}) and of the K/V buffers "
                                  f"({k_buffer.shape[2]}) differ")
    if d == 0:
        raise AttentionInputError("head_dim must be positive")
    if hkv == 0 or hq % hkv != 0:
        raise AttentionInputError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    _index_tensor("kv_indptr", kv_indptr, q.device)
    _index_tensor("kv_indices", kv_indices, q.device)
    if kv_indptr.shape[0] < 1:
        raise AttentionInputError("kv_indptr needs at least one entry (B + 1 for B requests)")
    raise AttentionInputError("inconsistent attention inputs")  # unreachable in practice


def check_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                 kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 sm_scale: float | None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> float:
    """`check_common` plus: one query per request (q.shape[0] == len(kv_indptr) - 1)."""
    scale = check_common(q, k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale, k_scale,
                         v_scale)
    if kv_indptr.shape[0] != q.shape[0] + 1:
        raise AttentionInputError(f"decode has one query per request: q has {q.shape[0]} rows "
                                  f"but kv_indptr describes {kv_indptr.shape[0] - 1} requests")
    return scale


def check_extend(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                 qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 sm_scale: float | None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> float:
    """`check_common` plus: qo_indptr and kv_indptr describe the same number of requests."""
    scale = check_common(q, k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale, k_scale,
                         v_scale)
    _index_tensor("qo_indptr", qo_indptr, q.device)
    if qo_indptr.shape[0] != kv_indptr.shape[0]:
        raise AttentionInputError(f"qo_indptr ({qo_indptr.shape[0]} entries) and kv_indptr "
                                  f"({kv_indptr.shape[0]} entries) must both have B + 1 entries")
    return scale


def check_index_values(q_rows: int, rows: int, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                       qo_indptr: torch.Tensor | None = None) -> None:
    """Value checks on the CSR tensors (used where no kernel does them; syncs a GPU).

    Raises `InvalidSlotError` when kv_indptr is not non-decreasing within [0, len(kv_indices)],
    when a slot is outside [0, rows), or (extend) when qo_indptr does not run from 0 to `q_rows`
    non-decreasingly or gives a request more new tokens than KV slots.
    """
    nnz = kv_indices.shape[0]
    ip = kv_indptr.to("cpu", torch.int64)
    if int(ip[0]) < 0 or int(ip[-1]) > nnz or bool((ip[1:] < ip[:-1]).any()):
        raise InvalidSlotError("kv_indptr must start at >= 0, be non-decreasing and end at "
                               "<= len(kv_indices)")
    used = kv_indices[int(ip[0]):int(ip[-1])]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= rows):
        raise InvalidSlotError(f"kv_indices holds a slot outside the K/V buffers (0..{rows - 1})")
    if qo_indptr is not None:
        qp = qo_indptr.to("cpu", torch.int64)
        if int(qp[0]) != 0 or int(qp[-1]) != q_rows or bool((qp[1:] < qp[:-1]).any()):
            raise InvalidSlotError("qo_indptr must start at 0, be non-decreasing and end at "
                                   "q.shape[0]")
        if bool(((qp[1:] - qp[:-1]) > (ip[1:] - ip[:-1])).any()):
            raise InvalidSlotError("a request has more new tokens (qo_indptr) than KV slots "
                                   "(kv_indptr)")
