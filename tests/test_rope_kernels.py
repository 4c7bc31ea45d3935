"""The in-place CPU rotary kernel (radixkv.model.rope_kernels) against `layers.apply_rotary`,
torch's seven-op reference: bit-identical in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from radixkv.model import rope_kernels
from radixkv.model.config import ModelConfig
from radixkv.model.layers import RotaryEmbedding, apply_rotary

needs_kernel = pytest.mark.skipif(not rope_kernels.available(),
                                  reason="no C++ compiler: the rotary kernel cannot build")


def tables(n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=d * 4, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=d, intermediate_size=8,
                      rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, attention_bias=False,
                      max_position_embeddings=4096, bos_token_id=None)
    pos = torch.randint(0, 4096, (n,))
    return RotaryEmbedding(cfg)(pos, dtype)  # [N, 1, D/2] each


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "h", "d"), [(0, 3, 8), (1, 12, 64), (5, 3, 2), (512, 12, 64),
                                           (70, 5, 128)])
def test_bit_identical_to_torch(dtype: torch.dtype, n: int, h: int, d: int) -> None:
    """In place on a strided view (q and k of a fused qkv row, v after them untouched)."""
    torch.manual_seed(n + h + d)
    cos, sin = tables(n, d, dtype)
    qkv = (torch.randn(n, (h + 2) * d) * 4).to(dtype)
    x = qkv[:, :h * d].view(n, h, d)
    ref = apply_rotary(x.clone(), cos, sin)
    tail = qkv[:, h * d:].clone()
    assert rope_kernels.supports(x, cos)
    out = rope_kernels.rotate_(x, cos, sin)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(x, ref)
    assert torch.equal(qkv[:, h * d:], tail)


@needs_kernel
def test_unsupported_layouts_are_refused() -> None:
    cos, _ = tables(4, 8, torch.float32)
    assert not rope_kernels.supports(torch.randn(4, 3, 8).half(), cos.half())
    assert not rope_kernels.supports(torch.randn(4, 8, 3).transpose(1, 2), cos)  # D strided
    assert not rope_kernels.supports(torch.randn(4, 3, 8), cos.bfloat16())
    assert not rope_kernels.supports(torch.randn(4, 3, 6), cos)  # D/2 mismatch
