"""The compiled slot-allocator path (csrc/slot_ops.cpp), built at first use, called via ctypes.

The library is a few loops of plain C++ with no headers beyond <cstdint>: it builds in about a
second with the system compiler (`$CXX`, else g++, c++ or clang++) and is cached under
`$RADIXKV_CACHE_DIR` (default `~/.cache/radixkv`), keyed by the source, compiler and flags.
`TokenToKVPool` uses it when `lib()` returns one; otherwise (no compiler, failed build, or
`RADIXKV_CPU_KERNELS=0` / `RADIXKV_TREE_KERNELS=0` in the environment when the pool is built) it
runs the numpy reference path, which the tests check the compiled one against.

The functions are loaded through `ctypes.PyDLL`: they run in well under a microsecond, so
keeping the GIL (instead of releasing and re-taking it around each call) is the cheaper choice.
For the same reason each takes one packed record instead of separate arguments.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

_log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "slot_ops.cpp"
_FLAGS = ["-O2", "-shared", "-fPIC", "-std=c++17"]

# Every allocator function takes one packed int64 record (see slot_ops.cpp): ctypes converts
# each argument separately at a few hundred nanoseconds apiece, a bytes object is the cheapest.
_REC = [ctypes.c_char_p]
_SIGNATURES = {
    "rkv_take": _REC,
    "rkv_release": _REC,
    "rkv_free": _REC,
    "rkv_alloc": _REC,
    "rkv_mismatch": [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64],
}

_lock = threading.Lock()
_lib: ctypes.PyDLL | None = None
_tried = False


def enabled() -> bool:
    """False when the environment asks for the reference path (read at each call)."""
    env = os.environ
    return env.get("RADIXKV_CPU_KERNELS", "1") != "0" and env.get("RADIXKV_TREE_KERNELS",
                                                                   "1") != "0"


def _cache_dir() -> Path:
    env = os.environ.get("RADIXKV_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "radixkv"


def _find_compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _build(cxx: str, out_dir: Path) -> Path | None:
    src = _SRC.read_bytes()
    key = hashlib.sha256(b"\0".join([src, cxx.encode(), " ".join(_FLAGS).encode()]))
    target = out_dir / f"slot_ops_{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build to a private name, then rename: a concurrent first use never sees a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *_FLAGS, str(_SRC), "-o", tmp], capture_output=True,
                             text=True, timeout=300)
        if res.returncode == 0:
            os.replace(tmp, target)
            return target
        _log.info("radixkv: building %s failed:\n%s", _SRC.name, res.stderr[-2000:])
    except (OSError, subprocess.SubprocessError) as exc:
        _log.info("radixkv: building %s failed: %s", _SRC.name, exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return None


def _load() -> ctypes.PyDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        cxx = _find_compiler()
        if cxx is None or not _SRC.exists():
            _log.warning("radixkv: no C++ compiler or %s; the slot allocator runs on numpy",
                         _SRC.name)
            return None
        path = None
        # An unwritable cache dir (read-only home) falls back to the temp dir.
        for out_dir in (_cache_dir(), Path(tempfile.gettempdir()) / f"radixkv-{os.getuid()}"):
            try:
                path = _build(cxx, out_dir)
                break
            except OSError as exc:
                _log.info("radixkv: cannot build in %s: %s", out_dir, exc)
        if path is None:
            _log.warning("radixkv: could not build %s; the slot allocator runs on numpy",
                         _SRC.name)
            return None
        try:
            lib = ctypes.PyDLL(str(path))
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = ctypes.c_int64
        except (OSError, AttributeError) as exc:
            _log.warning("radixkv: could not load %s (%s); the slot allocator runs on numpy",
                         path, exc)
            return None
        _lib = lib
        return lib


def lib() -> ctypes.PyDLL | None:
    """The compiled library (building it on first use), or None for the reference path."""
    if not enabled():
        return None
    return _lib if _tried else _load()
