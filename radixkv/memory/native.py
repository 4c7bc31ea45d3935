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
import os
from pathlib import Path

from radixkv.native_build import LazyLibrary

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

_LIB = LazyLibrary(_SRC, what="the slot allocator", fallback="it runs on numpy",
                   signatures=_SIGNATURES, flag_sets=_FLAGS, common=_COMMON, loader=ctypes.PyDLL)


def enabled() -> bool:
    """False when the environment asks for the reference path (read at each call)."""
    env = os.environ
    return env.get("RADIXKV_CPU_KERNELS", "1") != "0" and env.get("RADIXKV_TREE_KERNELS",
                                                                   "1") != "0"


def lib() -> ctypes.PyDLL | None:
    """The compiled library (building it on first use), or None for the reference path."""
    if not enabled():
        return None
    return _LIB.get()
