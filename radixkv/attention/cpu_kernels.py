"""Fused CPU kernels (csrc/paged_attention.cpp), compiled at first use and called through ctypes.

The library is plain C++ with OpenMP: it needs no torch or Python headers, so it builds once in
about ten seconds of CPU time with the system compiler (`$CXX`, else g++, c++ or clang++). The
build is cached under `$RADIXKV_CACHE_DIR` (default `~/.cache/radixkv`), keyed by the source, the
compiler, its flags and the CPU, so a later process loads it in milliseconds. When no compiler
is found, or the build fails, `available()` is False and `radixkv.attention` uses the pure torch
backend instead; set `RADIXKV_CPU_KERNELS=0` to force that.

OpenMP: the library links `libgomp.so.1`, the same soname torch's CPU build ships and loads
first, so both share one OpenMP runtime and thread pool; kernels run on `torch.get_num_threads()`
threads (tiny calls on the calling thread only).

Why not torch.utils.cpp_extension: it compiles against the torch headers (about a minute on two
cores) and needs the Python headers; this library only exchanges raw pointers and strides.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import torch

from radixkv.attention.validation import AttentionInputError
from radixkv.errors import InvalidSlotError
from radixkv.native_build import RECORD, LazyLibrary

_SRC = Path(__file__).with_name("csrc") / "paged_attention.cpp"
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Quantized KV storage dtypes (radixkv.memory.kv_quant), shifted into bits 4..7 of the code.
_KV_CODE = {torch.int8: 3}
if getattr(torch, "float8_e4m3fn", None) is not None:
    _KV_CODE[torch.float8_e4m3fn] = 4


# `struct Args` of paged_attention.cpp: 24 int64 fields (sizes, strides, data pointers, 0 for
# null), then the softmax scale as a double, the thread count and the K / V scale pointers and
# strides (quantized KV; 0 otherwise). Packing it with struct is a few times cheaper than filling
# a ctypes.Structure, which matters at 30 calls per forward.
_ARGS = struct.Struct("<24qdq6q")
_QARGS = struct.Struct("<16q")  # `struct QArgs` (rkv_quant_store)
_NO_SCALES = (0, 0, 0, 0, 0, 0)


_vector_width = 8  # floats per vector in the built kernels (read once they load)


_wide = False  # the 16-wide AVX-512 kernels are built and enabled
_outer = False  # float K/V extends run on an outer-product kernel (16- or 8-wide)


def _read_width(lib: ctypes.CDLL) -> None:
    global _vector_width, _wide, _outer
    lib.rkv_vector_width.restype = ctypes.c_int64
    _vector_width = int(lib.rkv_vector_width())
    lib.rkv_wide_kernels.restype = ctypes.c_int64
    _wide = bool(lib.rkv_wide_kernels())
    lib.rkv_outer_extend.restype = ctypes.c_int64
    _outer = bool(lib.rkv_outer_extend())


def wide(head_dim: int) -> bool:
    """Whether float K/V of this head_dim run on the 16-wide AVX-512 kernels (built here and
    not turned off with RADIXKV_CPU_AVX512=0)."""
    return available() and _wide and head_dim % 16 == 0


def outer_extend(head_dim: int) -> bool:
    """Whether extends of float K/V of this head_dim run on an outer-product kernel (the
    16-wide one of `wide`, or the 8-wide one of AVX2 + FMA builds unless
    RADIXKV_CPU_EXTEND_DOT=1): no horizontal sums, faster than SDPA at every size measured."""
    if wide(head_dim):
        return True
    return available() and _outer and head_dim % 8 == 0


_LIB = LazyLibrary(_SRC, what="the CPU attention kernels", fallback="using torch attention on CPU",
                   switch="RADIXKV_CPU_KERNELS",
                   signatures={"rkv_decode": (ctypes.c_int64, ctypes.c_char_p),
                               "rkv_extend": (ctypes.c_int64, ctypes.c_char_p),
                               "rkv_quant_store": RECORD},
                   on_load=_read_width)


def available() -> bool:
    """True when the fused kernels are built (building them on the first call)."""
    return _LIB.available()


def decode_function() -> int:
    """The address of the built `rkv_decode` (for compiled callers that run attention inside
    their own loop, such as radixkv/model/decode_kernels.py), 0 when the kernels are not built.
    Its argument is the `struct Args` packed by `_args` below."""
    lib = _LIB.get()
    return 0 if lib is None else int(ctypes.cast(lib.rkv_decode, ctypes.c_void_p).value or 0)


def supports(q: torch.Tensor, k_buffer: torch.Tensor) -> bool:
    """Whether the fused kernels handle these inputs: CPU tensors of a supported dtype (K/V in
    q's dtype, or int8 / fp8 e4m3 with scales) whose head_dim is a multiple of the vector
    width (8)."""
    return (q.device.type == "cpu" and q.dtype in _DTYPE_CODE
            and (k_buffer.dtype == q.dtype or k_buffer.dtype in _KV_CODE)
            and q.shape[-1] % _vector_width == 0 and available())


def supports_quant_store(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `quant_store` handles this storage dtype and head_dim (builds on first call)."""
    return dtype in _KV_CODE and head_dim % _vector_width == 0 and available()


def _raise(code: int, what: str) -> None:
    msgs = {
        1: "kv_indptr must start at >= 0, be non-decreasing and end at <= len(kv_indices)",
        2: "kv_indices holds a slot outside the K/V buffers",
        3: "qo_indptr must start at 0, be non-decreasing and end at q.shape[0]",
        4: "a request has more new tokens (qo_indptr) than KV slots (kv_indptr)",
        5: "unsupported dtype",
        6: "a request id in requests is outside the batch",
    }
    err = InvalidSlotError if code in (1, 2, 3, 4) else AttentionInputError
    raise err(f"{what}: {msgs.get(code, f'kernel error {code}')}")


def _rowmajor_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale_fields(k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[int, ...]:
    if k_scale is None or v_scale is None:
        return _NO_SCALES
    return (k_scale.data_ptr(), k_scale.stride(0), k_scale.stride(1),
            v_scale.data_ptr(), v_scale.stride(0), v_scale.stride(1))


def _args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
          kv_indptr: torch.Tensor, kv_indices: torch.Tensor, qo_indptr: torch.Tensor | None,
          sm_scale: float, req_list: torch.Tensor | None = None,
          scales: tuple[int, ...] = _NO_SCALES) -> bytes:
    return _ARGS.pack(
        q.shape[0], kv_indptr.shape[0] - 1, q.shape[1], k.shape[1], q.shape[2], k.shape[0],
        kv_indices.shape[0],
        q.data_ptr(), q.stride(0), q.stride(1),
        k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1),
        o.data_ptr(), o.stride(0), o.stride(1),
        kv_indptr.data_ptr(), kv_indices.data_ptr(),
        qo_indptr.data_ptr() if qo_indptr is not None else 0,
        req_list.data_ptr() if req_list is not None else 0,
        req_list.shape[0] if req_list is not None else -1,  # -1: every request
        sm_scale, torch.get_num_threads(), *scales,
    )


def _prepare(q: torch.Tensor, k_buffer: torch.Tensor, k_scale: torch.Tensor | None,
             v_scale: torch.Tensor | None) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """(q as the kernel reads it, dtype code, scale fields). Quantized KV runs on float32 q."""
    kv_code = _KV_CODE.get(k_buffer.dtype)
    if kv_code is None:
        return q, _DTYPE_CODE[q.dtype], _NO_SCALES
    if k_scale is None or v_scale is None:
        raise AttentionInputError(f"{k_buffer.dtype} K/V buffers need k_scale and v_scale")
    return q.float(), kv_code << 4, _scale_fields(k_scale, v_scale)


def _index(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float,
           k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fused paged decode on CPU tensors (inputs already validated by the caller): q [B, Hq, D],
    k_buffer / v_buffer [rows, Hkv, D] -> o [B, Hq, D]. Quantized (int8 / fp8) buffers come
    with k_scale / v_scale [rows, Hkv] float32 and are dequantized inside the kernel. Raises
    `InvalidSlotError` on a slot outside the buffers or a malformed kv_indptr."""
    lib = _LIB.get()
    assert lib is not None, "cpu_kernels.decode called without available()"
    out_dtype = q.dtype
    q, dcode, scales = _prepare(q, k_buffer, k_scale, v_scale)
    q, k_buffer, v_buffer = _rowmajor_last(q), _rowmajor_last(k_buffer), _rowmajor_last(v_buffer)
    kv_indptr, kv_indices = _index(kv_indptr), _index(kv_indices)
    o = torch.empty(q.shape, dtype=q.dtype)
    if q.shape[0] == 0:
        return o.to(out_dtype)
    args = _args(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, None, sm_scale, None, scales)
    code = lib.rkv_decode(dcode, args)
    if code:
        _raise(code, "decode")
    return o if o.dtype == out_dtype else o.to(out_dtype)


def extend(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
           sm_scale: float, requests: torch.Tensor | None = None,
           out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fused paged extend on CPU tensors (inputs already validated by the caller):
    q [N, Hq, D] -> o [N, Hq, D]; conventions as in `radixkv.attention.extend`.

    `requests` (int64 [k]) limits the work to those request ids, leaving the other rows of
    `out` as they are; `out` [N, Hq, D] (contiguous, q's dtype) is written in place when given.
    Quantized buffers come with k_scale / v_scale as in `decode`.
    Raises `InvalidSlotError` on malformed indptrs or slots outside the buffers.
    """
    lib = _LIB.get()
    assert lib is not None, "cpu_kernels.extend called without available()"
    out_dtype = q.dtype
    q, dcode, scales = _prepare(q, k_buffer, k_scale, v_scale)
    q, k_buffer, v_buffer = _rowmajor_last(q), _rowmajor_last(k_buffer), _rowmajor_last(v_buffer)
    qo_indptr, kv_indptr, kv_indices = _index(qo_indptr), _index(kv_indptr), _index(kv_indices)
    # Quantized KV with half q computes in float32: `out` is then filled from a float32 result.
    widened = q.dtype != out_dtype
    o = torch.empty(q.shape, dtype=q.dtype) if out is None or widened else out
    if requests is not None:
        requests = _index(requests)
    args = _args(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, qo_indptr, sm_scale, requests,
                 scales)
    code = lib.rkv_extend(dcode, args)
    if code:
        _raise(code, "extend")
    if not widened:
        return o
    if out is None:
        return o.to(out_dtype)
    rows = _request_rows(qo_indptr, requests)
    out[rows] = o[rows].to(out_dtype)
    return out


def _request_rows(qo_indptr: torch.Tensor, requests: torch.Tensor | None) -> torch.Tensor:
    """Rows of q owned by `requests` (all rows when None)."""
    if requests is None:
        return torch.arange(int(qo_indptr[-1]))
    qo = qo_indptr.tolist()
    parts = [torch.arange(qo[b], qo[b + 1]) for b in requests.tolist()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def quant_store(src: torch.Tensor, slots: torch.Tensor, dst: torch.Tensor,
                scale: torch.Tensor) -> None:
    """Quantize src [n, H, D] into dst[slots] (int8 / fp8 codes, [rows, H, D]) and
    scale[slots] ([rows, H] float32), the formulas of `radixkv.memory.kv_quant.quantize`.
    Raises `InvalidSlotError` (writing nothing) on a slot outside [0, rows)."""
    lib = _LIB.get()
    assert lib is not None, "cpu_kernels.quant_store called without available()"
    src = _rowmajor_last(src.float())
    slots = _index(slots)
    n, h, d = src.shape
    if n == 0:
        return
    args = _QARGS.pack(n, h, d, dst.shape[0], src.data_ptr(), src.stride(0), src.stride(1),
                       dst.data_ptr(), dst.stride(0), dst.stride(1),
                       scale.data_ptr(), scale.stride(0), scale.stride(1), slots.data_ptr(),
                       _KV_CODE[dst.dtype], torch.get_num_threads())
    code = lib.rkv_quant_store(args)
    if code:
        _raise(code, "set_kv")
