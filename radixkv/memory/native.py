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
import logging
import os
import threading
from pathlib import Path

from radixkv.native_build import build_library

_log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "slot_ops.cpp"
_FLAGS = (("-O2",),)
_COMMON = ("-shared", "-fPIC", "-std=c++17")

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


def _load() -> ctypes.PyDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        lib = build_library(_SRC, what="the slot allocator", fallback="it runs on numpy",
                            flag_sets=_FLAGS, common=_COMMON, loader=ctypes.PyDLL)
        if lib is None:
            return None
        try:
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = ctypes.c_int64
        except AttributeError as exc:
            _log.warning("radixkv: %s lacks %s; the slot allocator runs on numpy", _SRC.name, exc)
            return None
        _lib = lib
        return lib


def lib() -> ctypes.PyDLL | None:
    """The compiled library (building it on first use), or None for the reference path."""
    if not enabled():
        return None
    return _lib if _tried else _load()
