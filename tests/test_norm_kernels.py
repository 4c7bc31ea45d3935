"""The fused CPU RMSNorm kernel (radixkv.model.norm_kernels) against a float64 reference and
the torch path of `RMSNorm` (Hugging Face's rounding order for bf16)."""

from __future__ import annotations

import pytest
import torch

from radixkv.model import norm_kernels
from radixkv.model.layers import RMSNorm

needs_kernel = pytest.mark.skipif(not norm_kernels.available(),
                                  reason="no C++ compiler: the RMSNorm kernel cannot build")


def exact(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)


@needs_kernel
@pytest.mark.parametrize(("n", "h"), [(0, 8), (1, 576), (3, 17), (7, 64), (130, 960)])
def test_float32_matches_float64(n: int, h: int) -> None:
    torch.manual_seed(n * 100 + h)
    x, w = torch.randn(n, h) * 3, torch.randn(h)
    got = norm_kernels.rms_norm(x, w, 1e-5)
    assert got.shape == (n, h) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact(x, w, 1e-5), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
def test_equals_torch_path(dtype: torch.dtype, with_delta: bool) -> None:
    """Fused vs the torch reference of RMSNorm on the same inputs: x updated in place
    identically (x += delta), outputs within one rounding of the dtype."""
    torch.manual_seed(3)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.copy_(torch.randn(576))
    x = (torch.randn(9, 576) * 2).to(dtype)
    delta = torch.randn(9, 576).to(dtype) if with_delta else None
    x_ref = x.clone()
    norm.fused = False
    ref = norm(x_ref, delta)
    norm.fused = True
    got = norm(x, delta)
    assert torch.equal(x, x_ref)  # the residual sum, rounded once to the dtype either way
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    else:  # bf16: equal, or one bf16 step apart where float32 sums round differently
        step = ref.float().abs() * 2.0 ** -7 + 1e-6
        assert ((got.float() - ref.float()).abs() <= step * 2.01).all()
        assert (got == ref).float().mean() > 0.97


@needs_kernel
def test_strided_rows_and_unsupported_inputs() -> None:
    """A row-strided view (x[:, :H] of a wider buffer) is read by its stride; float16 and
    mismatched weights are not claimed (the torch path takes them)."""
    torch.manual_seed(4)
    buf, w = torch.randn(5, 80), torch.randn(64)
    x = buf[:, :64]
    torch.testing.assert_close(norm_kernels.rms_norm(x, w, 1e-6).double(),
                               exact(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    assert not norm_kernels.supports(x.half(), w.half())
    assert not norm_kernels.supports(x, w.bfloat16())
    assert not norm_kernels.supports(x, torch.randn(63))
