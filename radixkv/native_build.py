"""Build a C++ source file into a shared library at first use and load it with ctypes.

    lib = build_library(SRC, flag_sets=NATIVE_FLAG_SETS, what="the CPU attention kernels",
                        fallback="using torch attention")
    _LIB = LazyLibrary(SRC, what=..., fallback=..., switch="RADIXKV_CPU_KERNELS",
                       signatures={"rkv_decode": RECORD})   # built at the first _LIB.get()

Every compiled path of radixkv (paged attention, skinny linears, packed low-bit GEMVs, the slot
allocator) is plain C++ exchanging raw pointers, so it needs no torch or Python headers and
builds in seconds with the system compiler (`$CXX`, else g++, c++ or clang++). The result is
cached under `$RADIXKV_CACHE_DIR` (default `~/.cache/radixkv`; the temp dir when that is not
writable), keyed by the source, the compiler, the flags and (for `-march=native` builds) the
CPU's feature flags, so a later process loads it in milliseconds.

Failure is never an error: no compiler, a failed build or a failed load logs one warning and
returns None, and the caller runs its pure-torch / numpy reference path instead. `LazyLibrary`
wraps this for the modules that own a library: built once, at first use, under a lock, with
its environment switch (`RADIXKV_CPU_KERNELS=0` ...) and function signatures.

Why not torch.utils.cpp_extension: it compiles against the torch headers (about a minute on two
cores) and needs the Python headers; these libraries only exchange raw pointers and strides.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

_log = logging.getLogger(__name__)

# Tried in order; the first that compiles wins (-march=native may be unknown to a cross
# compiler, OpenMP may be missing with clang).
NATIVE_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
COMMON_FLAGS: tuple[str, ...] = ("-shared", "-fPIC", "-std=c++17", "-fno-math-errno")


def cache_dir() -> Path:
    """Where built libraries are kept: `$RADIXKV_CACHE_DIR`, else `$XDG_CACHE_HOME/radixkv`,
    else `~/.cache/radixkv`."""
    env = os.environ.get("RADIXKV_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "radixkv"


def cpu_fingerprint() -> str:
    """The CPU's feature-flag line: -march=native code is valid only on a CPU with the same
    features, so the cache key includes it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as a set (e.g. {'avx2', 'fma', 'avx512_bf16'}); empty when
    /proc/cpuinfo cannot be read."""
    line = cpu_fingerprint()
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def find_compiler() -> str | None:
    """The C++ compiler to use: `$CXX`, else g++, c++ or clang++ on PATH; None if none."""
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _compile(cxx: str, src: Path, out_dir: Path, flag_sets: Sequence[Sequence[str]],
             common: Sequence[str]) -> Path | None:
    text = src.read_bytes()
    for flags in flag_sets:
        args = [*flags, *common]
        parts = [text, cxx.encode(), " ".join(args).encode()]
        if "-march=native" in args:
            parts.append(cpu_fingerprint().encode())
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
        target = out_dir / f"{src.stem}_{key}.so"
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        # Build to a private name, then rename: a concurrent first use never sees a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            res = subprocess.run([cxx, *args, str(src), "-o", tmp],
                                 capture_output=True, text=True, timeout=600)
            if res.returncode == 0:
                os.replace(tmp, target)
                return target
            _log.info("radixkv: %s %s %s failed:\n%s", cxx, " ".join(flags), src.name,
                      res.stderr[-2000:])
        except (OSError, subprocess.SubprocessError) as exc:
            _log.info("radixkv: compiling %s failed: %s", src.name, exc)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None


def build_library(src: Path, *, what: str, fallback: str,
                  flag_sets: Sequence[Sequence[str]] = NATIVE_FLAG_SETS,
                  common: Sequence[str] = COMMON_FLAGS,
                  loader: type[ctypes.CDLL] = ctypes.CDLL) -> ctypes.CDLL | None:
    """Compile `src` (cached) and load it with `loader` (ctypes.CDLL releases the GIL around
    each call; ctypes.PyDLL keeps it, cheaper for sub-microsecond functions).

    Args:
        src: the C++ source file.
        what: what the library is, for log messages ("the CPU attention kernels").
        fallback: what runs instead when it cannot be built ("using torch attention").
        flag_sets: compiler flag sets tried in order; the first that compiles is kept.
        common: flags added to every set (shared library, C++17 ...).

    Returns:
        The loaded library, or None (after one warning) when there is no compiler or source,
        or every build or the load failed.
    """
    cxx = find_compiler()
    if cxx is None or not src.exists():
        _log.warning("radixkv: no C++ compiler or source for %s; %s", what, fallback)
        return None
    path = None
    # An unwritable cache dir (read-only home) falls back to the temp dir.
    for out_dir in (cache_dir(), Path(tempfile.gettempdir()) / f"radixkv-{os.getuid()}"):
        try:
            path = _compile(cxx, src, out_dir, flag_sets, common)
            break
        except OSError as exc:
            _log.info("radixkv: cannot build in %s: %s", out_dir, exc)
    if path is None:
        _log.warning("radixkv: could not build %s; %s", what, fallback)
        return None
    try:
        return loader(str(path))
    except OSError as exc:
        _log.warning("radixkv: could not load %s (%s); %s", path, exc, fallback)
        return None


RECORD: tuple[type, ...] = (ctypes.c_char_p,)  # one packed-struct argument (the usual signature)


class LazyLibrary:
    """A compiled library built at its first use, once per process (thread-safe).

        _LIB = LazyLibrary(SRC, what="the CPU RMSNorm kernel", fallback="using torch",
                           switch="RADIXKV_NORM_KERNELS", signatures={"rkv_rms_norm": RECORD})
        lib = _LIB.get()   # None: run the reference path

    Args:
        src, what, fallback, flag_sets, common, loader: as for `build_library`.
        switch: an environment variable that, set to "0" when the library is first wanted,
            keeps it unbuilt (the reference path), or None.
        signatures: {function: argument types}; each returns `restype`. A library lacking one
            of them counts as not built.
        on_load: called with the library once its functions are declared (to read build facts
            such as its vector width).
    """

    def __init__(self, src: Path, *, what: str, fallback: str, switch: str | None = None,
                 signatures: dict[str, Sequence[type]] | None = None,
                 restype: type = ctypes.c_int64,
                 flag_sets: Sequence[Sequence[str]] = NATIVE_FLAG_SETS,
                 common: Sequence[str] = COMMON_FLAGS,
                 loader: type[ctypes.CDLL] = ctypes.CDLL,
                 on_load: Callable[[ctypes.CDLL], None] | None = None) -> None:
        self.src, self.what, self.fallback, self.switch = src, what, fallback, switch
        self.signatures = dict(signatures or {})
        self.restype, self.flag_sets, self.common, self.loader = restype, flag_sets, common, loader
        self.on_load = on_load
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        """The library, building it on the first call; None when it cannot (or may not) be."""
        if self._tried:
            return self._lib
        with self._lock:  # concurrent first users wait for the one build
            if not self._tried:
                self._lib = self._build()
                self._tried = True
        return self._lib

    def available(self) -> bool:
        return self.get() is not None

    def _build(self) -> ctypes.CDLL | None:
        if self.switch is not None and os.environ.get(self.switch, "1") == "0":
            return None
        lib = build_library(self.src, what=self.what, fallback=self.fallback,
                            flag_sets=self.flag_sets, common=self.common, loader=self.loader)
        if lib is None:
            return None
        try:
            for name, args in self.signatures.items():
                fn = getattr(lib, name)
                fn.argtypes = list(args)
                fn.restype = self.restype
        except AttributeError as exc:
            _log.warning("radixkv: %s lacks %s; %s", self.src.name, exc, self.fallback)
            return None
        if self.on_load is not None:
            self.on_load(lib)
        return lib
