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
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from radixkv.attention.validation import AttentionInputError
from radixkv.errors import InvalidSlotError

_log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "paged_attention.cpp"
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Flag sets tried in order; the first that compiles wins (-march=native may be unknown to a
# cross compiler, OpenMP may be missing with clang).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_COMMON = ["-shared", "-fPIC", "-std=c++17", "-fno-math-errno"]


# `struct Args` of paged_attention.cpp: 24 int64 fields (sizes, strides, data pointers, 0 for
# null), then the softmax scale as a double and the thread count. Packing it with struct is a
# few times cheaper than filling a ctypes.Structure, which matters at 30 calls per forward.
_ARGS = struct.Struct("<24qdq")


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_vector_width = 8


def _cache_dir() -> Path:
    env = os.environ.get("RADIXKV_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "radixkv"


def _cpu_fingerprint() -> str:
    # -march=native code is only valid on a CPU with the same features: key the cache on them.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _find_compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _compile(cxx: str, out_dir: Path) -> Path | None:
    src = _SRC.read_bytes()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([src, cxx.encode(), " ".join(flags + _COMMON).encode(),
                                         _cpu_fingerprint().encode()])).hexdigest()[:20]
        target = out_dir / f"paged_attention_{key}.so"
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        # Build to a private name, then rename: concurrent first uses never see a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            res = subprocess.run([cxx, *flags, *_COMMON, str(_SRC), "-o", tmp],
                                 capture_output=True, text=True, timeout=600)
            if res.returncode == 0:
                os.replace(tmp, target)
                return target
            _log.info("radixkv: %s %s failed:\n%s", cxx, " ".join(flags), res.stderr[-2000:])
        except (OSError, subprocess.SubprocessError) as exc:
            _log.info("radixkv: compiling the CPU attention kernels failed: %s", exc)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _vector_width
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("RADIXKV_CPU_KERNELS", "1") == "0":
            return None
        cxx = _find_compiler()
        if cxx is None or not _SRC.exists():
            _log.warning("radixkv: no C++ compiler or kernel source; using torch attention on CPU")
            return None
        path = None
        # An unwritable cache dir (read-only home) falls back to the temp dir.
        for out_dir in (_cache_dir(), Path(tempfile.gettempdir()) / f"radixkv-{os.getuid()}"):
            try:
                path = _compile(cxx, out_dir)
                break
            except OSError as exc:
                _log.info("radixkv: cannot build in %s: %s", out_dir, exc)
        if path is None:
            _log.warning("radixkv: could not build the CPU attention kernels; using torch")
            return None
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            _log.warning("radixkv: could not load %s (%s); using torch attention", path, exc)
            return None
        for fn in (lib.rkv_decode, lib.rkv_extend):
            fn.argtypes = [ctypes.c_int64, ctypes.c_char_p]
            fn.restype = ctypes.c_int64
        lib.rkv_vector_width.restype = ctypes.c_int64
        _vector_width = int(lib.rkv_vector_width())
        _lib = lib
        return lib


def available() -> bool:
    """True when the fused kernels are built (building them on the first call)."""
    return _lib is not None or _load() is not None


def supports(q: torch.Tensor, k_buffer: torch.Tensor) -> bool:
    """Whether the fused kernels handle these inputs: CPU tensors of a supported dtype whose
    head_dim is a multiple of the vector width (8)."""
    return (q.device.type == "cpu" and q.dtype in _DTYPE_CODE
            and q.shape[-1] % _vector_width == 0 and available())


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


def _args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
          kv_indptr: torch.Tensor, kv_indices: torch.Tensor, qo_indptr: torch.Tensor | None,
          sm_scale: float, req_list: torch.Tensor | None = None) -> bytes:
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
        sm_scale, torch.get_num_threads(),
    )


def _index(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Fused paged decode on CPU tensors (inputs already validated by the caller): q [B, Hq, D],
    k_buffer / v_buffer [rows, Hkv, D] -> o [B, Hq, D]. Raises `InvalidSlotError` on a slot
    outside the buffers or a malformed kv_indptr."""
    lib = _lib or _load()
    assert lib is not None, "cpu_kernels.decode called without available()"
    q, k_buffer, v_buffer = _rowmajor_last(q), _rowmajor_last(k_buffer), _rowmajor_last(v_buffer)
    kv_indptr, kv_indices = _index(kv_indptr), _index(kv_indices)
    o = torch.empty(q.shape, dtype=q.dtype)
    if q.shape[0] == 0:
        return o
    args = _args(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, None, sm_scale)
    code = lib.rkv_decode(_DTYPE_CODE[q.dtype], args)
    if code:
        _raise(code, "decode")
    return o


def extend(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
           qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
           sm_scale: float, requests: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused paged extend on CPU tensors (inputs already validated by the caller):
    q [N, Hq, D] -> o [N, Hq, D]; conventions as in `radixkv.attention.extend`.

    `requests` (int64 [k]) limits the work to those request ids, leaving the other rows of
    `out` as they are; `out` [N, Hq, D] (contiguous, q's dtype) is written in place when given.
    Raises `InvalidSlotError` on malformed indptrs or slots outside the buffers.
    """
    lib = _lib or _load()
    assert lib is not None, "cpu_kernels.extend called without available()"
    q, k_buffer, v_buffer = _rowmajor_last(q), _rowmajor_last(k_buffer), _rowmajor_last(v_buffer)
    qo_indptr, kv_indptr, kv_indices = _index(qo_indptr), _index(kv_indptr), _index(kv_indices)
    o = torch.empty(q.shape, dtype=q.dtype) if out is None else out
    if requests is not None:
        requests = _index(requests)
    args = _args(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, qo_indptr, sm_scale, requests)
    code = lib.rkv_extend(_DTYPE_CODE[q.dtype], args)
    if code:
        _raise(code, "extend")
    return o
