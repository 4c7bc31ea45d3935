"""SwiGLU activation rows on the CPU (csrc/swiglu.cpp), built at first use like the norms.

    act = swiglu_kernels.swiglu(gate_up)   # [N, 2I] -> [N, I]: silu(gate) * up, contiguous

Why: torch takes three passes (silu_ on the strided gate half, mul_, and the copy that makes
the product contiguous for the down projection): 12 ms of a 512-token float32 prefill on two
cores (2-core Zen 5). One vectorised pass does it here. `SwiGLUMLP` uses it for CPU float32 /
bfloat16 rows when it builds (`RADIXKV_SWIGLU_KERNELS=0`: torch, the reference). The compiled
decode step (`decode_kernels`) calls it too.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import torch

from radixkv.native_build import RECORD, LazyLibrary

_SRC = Path(__file__).with_name("csrc") / "swiglu.cpp"
_CODE = {torch.float32: 0, torch.bfloat16: 1}
_ARGS = struct.Struct("<8q")  # `struct Args` of swiglu.cpp

_LIB = LazyLibrary(_SRC, what="the CPU SwiGLU kernel", fallback="using torch",
                   switch="RADIXKV_SWIGLU_KERNELS", signatures={"rkv_swiglu": RECORD})


def available() -> bool:
    """True when the kernel is built (building it on the first call)."""
    return _LIB.available()


def function() -> int:
    """The address of the built `rkv_swiglu` (for compiled callers), 0 when not built."""
    lib = _LIB.get()
    return 0 if lib is None else int(ctypes.cast(lib.rkv_swiglu, ctypes.c_void_p).value or 0)


def supports(gate_up: torch.Tensor) -> bool:
    """2-D CPU float32 / bfloat16 [N, 2I] with a contiguous last dim."""
    return (gate_up.device.type == "cpu" and gate_up.dim() == 2 and gate_up.dtype in _CODE
            and gate_up.shape[1] % 2 == 0 and gate_up.stride(1) == 1 and available())


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] as a new contiguous [N, I] tensor (torch's
    rounding order; within a unit in the last place of torch's values). The caller checks
    `supports`."""
    lib = _LIB.get()
    assert lib is not None, "swiglu_kernels.swiglu called without available()"
    n, two_i = gate_up.shape
    out = torch.empty((n, two_i // 2), dtype=gate_up.dtype)
    if n:
        lib.rkv_swiglu(_ARGS.pack(n, two_i // 2, _CODE[gate_up.dtype], gate_up.data_ptr(),
                                  gate_up.stride(0), out.data_ptr(), out.stride(0),
                                  torch.get_num_threads()))
    return out
