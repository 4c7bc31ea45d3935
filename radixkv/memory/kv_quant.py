"""Quantized KV cache formats: int8 and fp8 (e4m3) slots with one scale per (slot, KV head).

A token's K (or V) row of one KV head, `x [D]`, is stored as `q [D]` in int8 or float8_e4m3fn
plus one float32 `scale`, and read back as `q * scale`:

- int8:     scale = max|x| / 127, q = clamp(round_half_even(x / scale), -127, 127)
- fp8_e4m3: scale = max|x| / 448, q = float8_e4m3fn(clamp(x / scale, -448, 448)) (RNE)

A row of zeros gets scale 1 (q = 0). The scale is per token and head, so an outlier token (the
attention sink, a large-norm key) only coarsens its own row, not the whole tensor as with the
per-tensor scales of SGLang/vLLM.

Why symmetric (no zero point), by measurement (`bench/kv_quant.py --quick --zero-point`,
SmolLM2-135M, float32 weights): an asymmetric int8 (scale = (max - min) / 255 plus a zero point,
simulated) lowers the relative RMS reconstruction error of K rows from 0.0108 to 0.0078 and of V
rows from 0.0066 to 0.0057 (30 layers x 1024 tokens), and the mean teacher-forced logit error
from 0.090 to 0.078 (perplexity 163.79 -> 163.34, float32 KV 163.40). It would cost 4 more bytes
per (slot, head): 0.266x -> 0.281x of float32 at head_dim 64, over the 0.27x capacity budget
(~3.7x the tokens), plus a sum(q) term in every score. The gain is small next to that, so the
format is symmetric; a zero point stored in float16 next to a float16 scale would fit the budget
if a model needs it.

The C++ kernels (`csrc/paged_attention.cpp`) and the Triton kernels implement the same formulas;
the tests check them against `quantize` / `dequantize` here.
"""

from __future__ import annotations

import torch

from radixkv.errors import ConfigError
from radixkv.memory import kv_size
from radixkv.memory.kv_size import SCALE_BYTES

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
SCALE_DTYPE = torch.float32

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
_ALIASES = {"auto": "auto", "int8": "int8", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3",
            "fp8_e4m3fn": "fp8_e4m3"}


def fp8_dtype() -> torch.dtype | None:
    """torch.float8_e4m3fn, or None on a torch without float8 dtypes."""
    return getattr(torch, "float8_e4m3fn", None)


def quantized_dtypes() -> tuple[torch.dtype, ...]:
    """Storage dtypes that carry a per-(slot, head) scale."""
    f8 = fp8_dtype()
    return (torch.int8,) if f8 is None else (torch.int8, f8)


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether `dtype` is a quantized KV storage dtype (int8 or float8_e4m3fn)."""
    return dtype in quantized_dtypes()


def parse_kv_cache_dtype(name: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The KV storage dtype for `kv_cache_dtype=name`: "auto" (the model's dtype), "int8" or
    "fp8_e4m3" (alias "fp8"); a torch.dtype among those is accepted as is.

    Raises `ConfigError` naming the choices for anything else, and for fp8 on a torch without
    float8 dtypes.
    """
    if isinstance(name, torch.dtype):
        if name == model_dtype or is_quantized(name):
            return name
        raise ConfigError(f"kv_cache_dtype {name} is neither the model dtype ({model_dtype}) nor "
                          f"a quantized dtype; choose one of {', '.join(KV_CACHE_DTYPES)}")
    canon = _ALIASES.get(str(name).strip().lower()) if isinstance(name, str) else None
    if canon is None:
        raise ConfigError(f"unknown kv_cache_dtype {name!r}; choose one of "
                          f"{', '.join(KV_CACHE_DTYPES)}")
    if canon == "auto":
        return model_dtype
    if canon == "int8":
        return torch.int8
    f8 = fp8_dtype()
    if f8 is None:
        raise ConfigError(f"kv_cache_dtype 'fp8_e4m3' needs torch.float8_e4m3fn, which torch "
                          f"{torch.__version__} lacks; choose 'auto' or 'int8'")
    return f8


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """Short name of a storage dtype: "int8", "fp8_e4m3", or the float dtype's name."""
    if dtype == torch.int8:
        return "int8"
    if dtype == fp8_dtype():
        return "fp8_e4m3"
    return str(dtype).removeprefix("torch.")


def pool_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                         kv_dtype: torch.dtype) -> int:
    """Bytes one token's K and V take in the pool across all layers, scales included.

    `TokenToKVPool.bytes_per_token()` and `radixkv calc` both use this, so they agree exactly.
    """
    scales = SCALE_BYTES if is_quantized(kv_dtype) else 0
    return kv_size.kv_bytes_per_token(num_layers, num_kv_heads, head_dim, kv_dtype,
                                      scale_bytes=scales)


def _qmax(dtype: torch.dtype) -> float:
    if dtype == torch.int8:
        return INT8_MAX
    if dtype == fp8_dtype():
        return FP8_E4M3_MAX
    raise ConfigError(f"{dtype} is not a quantized KV dtype")


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (q [..., D] in `dtype`, scale [...] float32), one scale per row."""
    qmax = _qmax(dtype)
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # [...]
    scale = amax / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (xf / scale.unsqueeze(-1)).clamp_(-qmax, qmax)
    if dtype == torch.int8:
        return y.round_().to(torch.int8), scale
    return y.to(dtype), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., D] int8 / float8_e4m3fn, scale [...] -> q * scale [..., D] in `dtype`.

    For tests, references and moving KV between tiers; the attention kernels never call it on
    the pool (they dequantize inside the kernel).
    """
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(wide) * scale.to(wide).unsqueeze(-1)).to(dtype)
