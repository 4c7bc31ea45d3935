"""KV bytes per token: the one formula every layer sizes the cache with (the pool, the engine's
pool sizing, `radixkv calc`). Imports nothing, so a sizing tool can use it without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype | int, v_head_dim: int | None = None) -> int:
    """Bytes of K plus V that one token leaves in the cache, across every layer and KV head.

    `dtype` is the cache's torch dtype or its bytes per element (for formats torch has no dtype
    for, e.g. a sizing tool's int8 or fp8 cache). `v_head_dim` is V's head size when it differs
    from K's (None: the same). 2 x layers x KV heads x head_dim x bytes when they are equal.
    """
    elem = dtype if isinstance(dtype, int) else dtype.itemsize
    v_dim = head_dim if v_head_dim is None else v_head_dim
    return num_layers * num_kv_heads * (head_dim + v_dim) * elem
