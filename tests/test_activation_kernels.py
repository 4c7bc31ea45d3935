"""SwiGLU's fused CPU activation (radixkv.model.activation_kernels) against torch's
silu(gate) * up: within one rounding of the dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixkv.model import activation_kernels

needs_kernel = pytest.mark.skipif(not activation_kernels.available(),
                                  reason="no C++ compiler: the SwiGLU kernel cannot build")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "i"), [(0, 4), (1, 1536), (3, 5), (512, 1536)])
def test_matches_torch(dtype: torch.dtype, n: int, i: int) -> None:
    torch.manual_seed(n + i)
    buf = (torch.randn(n, 2 * i + 6) * 4).to(dtype)  # a row stride wider than 2I
    gate_up = buf[:, :2 * i]
    got = activation_kernels.silu_mul(gate_up)
    gate, up = gate_up.split(i, dim=-1)
    ref = F.silu(gate) * up
    assert got.shape == (n, i) and got.dtype == dtype and got.is_contiguous()
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22
    bound = ref.float().abs() * ulp * 2 + 1e-30
    assert ((got.float() - ref.float()).abs() <= bound).all()


@needs_kernel
def test_refuses_what_it_cannot_take() -> None:
    assert not activation_kernels.supports(torch.randn(2, 8).half())
    assert not activation_kernels.supports(torch.randn(2, 7))
    assert not activation_kernels.supports(torch.randn(8, 2).t())
