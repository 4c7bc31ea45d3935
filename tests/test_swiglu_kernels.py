"""The one-pass CPU SwiGLU kernel (radixkv.model.swiglu_kernels) against torch's silu and
product (the reference path of `SwiGLUMLP`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixkv.model import swiglu_kernels
from radixkv.model.layers import SwiGLUMLP

needs_kernel = pytest.mark.skipif(not swiglu_kernels.available(),
                                  reason="no C++ compiler: the SwiGLU kernel cannot build")


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.clone().split(gate_up.shape[1] // 2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "i"), [(1, 1536), (3, 5), (512, 1536), (7, 33), (0, 16)])
def test_matches_torch(dtype: torch.dtype, n: int, i: int) -> None:
    torch.manual_seed(n + i)
    gu = (torch.randn(n, 2 * i) * 6).to(dtype)
    gu[:, 0] = torch.tensor([-200.0, 200.0, 0.0] * n)[:n].to(dtype)  # saturated exponentials
    out = swiglu_kernels.swiglu(gu)
    assert out.is_contiguous() and out.shape == (n, i) and out.dtype == dtype
    ref = reference(gu)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=2e-6)
    else:  # one bf16 rounding step apart at most
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
        if out.numel() >= 1000:  # rarely off by that step (the exponentials round differently)
            assert (out != ref).float().mean().item() < 0.02


@needs_kernel
def test_mlp_fused_equals_reference_path() -> None:
    torch.manual_seed(0)
    mlp = SwiGLUMLP(64, 96)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.2)
        x = torch.randn(10, 64)
        fused = mlp(x)
        mlp.fused = False
        plain = mlp(x)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_unsupported_inputs_are_refused() -> None:
    assert not swiglu_kernels.supports(torch.randn(4, 6).half())
    assert not swiglu_kernels.supports(torch.randn(4, 5))  # odd width: no two halves
    assert not swiglu_kernels.supports(torch.randn(6, 4).t())  # strided last dim
