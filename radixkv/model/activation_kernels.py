"""SwiGLU's silu(gate) * up on the CPU in one pass (csrc/silu_mul.cpp), built at first use.

    act = activation_kernels.silu_mul(gate_up)   # [N, 2I] -> [N, I], contiguous

Why: torch does it in three passes (silu, the product, then the contiguous copy the next
matmul needs, since the product is a strided view of gate_up), each its own OpenMP region at
prefill sizes. `SwiGLUMLP` uses this for CPU float32 / bfloat16 when it builds
(`RADIXKV_ACT_KERNELS=0`: torch, the reference). Equal to torch within one rounding (expf vs
torch's vectorised exp).
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from pathlib import Path

import torch

from radixkv.native_build import build_library

_SRC = Path(__file__).with_name("csrc") / "silu_mul.cpp"
_CODE = {torch.float32: 0, torch.bfloat16: 1}
_ARGS = struct.Struct("<7q")  # `struct Args` of silu_mul.cpp

_lock = threading.Lock()
_fn = None
_tried = False


def _load():
    global _fn, _tried
    with _lock:
        if _tried:
            return _fn
        _tried = True
        if os.environ.get("RADIXKV_ACT_KERNELS", "1") == "0":
            return None
        lib = build_library(_SRC, what="the CPU SwiGLU kernel", fallback="using torch")
        if lib is None:
            return None
        lib.rkv_silu_mul.argtypes = [ctypes.c_char_p]
        lib.rkv_silu_mul.restype = ctypes.c_int64
        _fn = lib.rkv_silu_mul
        return _fn


def available() -> bool:
    """True when the kernel is built (building it on the first call)."""
    return _fn is not None or _load() is not None


def supports(gate_up: torch.Tensor) -> bool:
    """gate_up [N, 2I] on the CPU, float32 / bfloat16, last dim contiguous."""
    return (gate_up.device.type == "cpu" and gate_up.dim() == 2 and gate_up.dtype in _CODE
            and gate_up.shape[1] % 2 == 0 and gate_up.stride(1) == 1 and available())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] -> a new contiguous [N, I]. The caller checks
    `supports(gate_up)`."""
    fn = _fn or _load()
    assert fn is not None, "activation_kernels.silu_mul called without available()"
    n, two_i = gate_up.shape
    out = torch.empty((n, two_i // 2), dtype=gate_up.dtype)
    if n:
        fn(_ARGS.pack(n, two_i // 2, _CODE[gate_up.dtype], gate_up.data_ptr(),
                      gate_up.stride(0), out.data_ptr(), torch.get_num_threads()))
    return out
