"""KV bytes per token: the memory level's one formula, against hand-computed counts and the bytes
a real `TokenToKVPool` allocates."""

from __future__ import annotations

import pytest
import torch

from radixkv.memory import TokenToKVPool
from radixkv.memory.kv_pool import kv_bytes_per_token


def test_hand_computed_counts() -> None:
    # Llama-3-70B: 2 (K and V) x 80 layers x 8 KV heads x 128 x 2 B (fp16) = 320 KiB.
    assert kv_bytes_per_token(80, 8, 128, torch.float16) == 327_680
    assert kv_bytes_per_token(80, 8, 128, torch.bfloat16) == 327_680
    assert kv_bytes_per_token(80, 8, 128, torch.float32) == 655_360
    assert kv_bytes_per_token(80, 8, 128, 1) == 163_840  # an fp8/int8 cache, by element size
    # K of 192, V of 128 (different head sizes): 2 layers x 4 heads x (192 + 128) x 2 B.
    assert kv_bytes_per_token(2, 4, 192, torch.float16, v_head_dim=128) == 2 * 4 * 320 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pool_reports_what_its_buffers_hold(dtype: torch.dtype) -> None:
    pool = TokenToKVPool(10, num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype)
    held = sum(pool.get_kv_buffer(layer)[0].nbytes + pool.get_kv_buffer(layer)[1].nbytes
               for layer in range(3))
    assert pool.bytes_per_token() * (pool.num_slots + 1) == held == pool.total_bytes()
    assert pool.bytes_per_token() == kv_bytes_per_token(3, 2, 8, dtype)
