"""The CPU fast linear paths against a float64 product and torch's F.linear: the skinny kernel
(radixkv.model.linear_kernels) and oneDNN-prepacked weights (radixkv.model.layers.Linear.pack);
and a model on its fast paths against the same model on the plain ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from radixkv.model import linear_kernels, load_model
from radixkv.model.layers import Linear, native_half_matmul, onednn_available
from tests.model_fixtures import (  # noqa: F401  (fixtures)
    PagedRunner,
    default_lm,
    make_tiny_hf,
    needs_default_model,
)

needs_kernels = pytest.mark.skipif(not linear_kernels.available(),
                                   reason="no C++ compiler: the linear kernels cannot build")
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def fast_path_in_use(lin: Linear) -> bool:
    """The layer runs on a fast path: oneDNN-packed or the skinny kernel."""
    return lin.packed is not None or lin.fast_max_rows > 0


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), [(0, 4, 8), (1, 7, 13), (1, 960, 576), (5, 9, 100),
                                           (33, 40, 1536), (512, 24, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_float64(m: int, n: int, k: int, bias: bool,
                                       dtype: torch.dtype) -> None:
    """A packed Linear's product equals the exact one within one rounding of its dtype
    (float32 accumulation), and unpack() gives back the very weight that was packed."""
    if dtype != torch.float32 and not native_half_matmul(dtype):
        pytest.skip("no native bf16 GEMM on this CPU: bf16 weights are not packed here")
    torch.manual_seed(m * 1000 + n + k)
    lin = Linear(k, n, bias=bias).to(dtype).requires_grad_(False)
    w = lin.weight.detach().clone()
    x = torch.randn(m, k).to(dtype)
    lin.pack()
    assert lin.packed is not None and lin.weight.device.type == "meta"  # no dense copy kept
    with torch.inference_mode():
        got = lin(x)
    ref = exact(x, w, None if lin.bias is None else lin.bias)
    assert got.shape == (m, n) and got.dtype == dtype
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
    bound = ref.abs() * step + 1e-4 * (x.double().abs() @ w.double().abs().T + 1)
    assert ((got.double() - ref).abs() <= bound).all()
    lin.unpack()
    assert lin.packed is None and torch.equal(lin.weight, w)


def exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 8), (1, 7, 13), (2, 13, 64), (3, 960, 576),
                                           (5, 9, 100), (16, 40, 1536), (33, 6, 24), (0, 4, 8)])
def test_float32_matches_float64(m: int, n: int, k: int, threads: int) -> None:
    """Every tail (rows of x, rows of w, K not a multiple of the vector width), with and without
    bias, on one and two threads: float32 accumulation error only."""
    torch.manual_seed(m * 1000 + n + k)
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            got = linear_kernels.linear(x, w, bias)
            assert got.shape == (m, n) and got.dtype == torch.float32
            ref = exact(x, w, bias)
            tol = 1e-5 * (x.double().abs() @ w.double().abs().T + 1)  # |sum| bound
            assert ((got.double() - ref).abs() <= tol).all()
            torch.testing.assert_close(got, F.linear(x, w, bias), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_strided_rows() -> None:
    """x with a row stride wider than K (the MLP's silu(gate) * up is such a view)."""
    torch.manual_seed(1)
    wide = torch.randn(4, 96)
    x, w = wide[:, :40], torch.randn(17, 40)
    assert not x.is_contiguous()
    torch.testing.assert_close(linear_kernels.linear(x, w), F.linear(x, w), atol=1e-4,
                               rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
def test_half_storage(xdtype: torch.dtype, wdtype: torch.dtype) -> None:
    """Half weights widened in registers: the exact product of the stored values, accumulated
    in float32 and rounded once to x's dtype."""
    torch.manual_seed(2)
    x = torch.randn(6, 72).to(xdtype)
    w, b = torch.randn(11, 72).to(wdtype), torch.randn(11).to(xdtype)
    got = linear_kernels.linear(x, w, b)
    assert got.dtype == xdtype
    ref = exact(x, w, b)
    step = 2.0 ** -7 if xdtype == torch.bfloat16 else 1e-6  # one rounding of the output
    bound = ref.abs() * step + 1e-4 * (x.double().abs() @ w.double().abs().T + 1)
    assert ((got.double() - ref).abs() <= bound).all()


def test_choose_max_rows_policy() -> None:
    """float16 activations and native-half CPUs stay on torch; the limits are small batches."""
    assert linear_kernels.choose_max_rows(torch.float16, native_half=False) == 0
    assert linear_kernels.choose_max_rows(torch.bfloat16, native_half=True) == 0
    if linear_kernels.available():
        assert 1 <= linear_kernels.choose_max_rows(torch.float32, native_half=True) <= 64
        assert 1 <= linear_kernels.choose_max_rows(torch.bfloat16, native_half=False) <= 64


def fast_vs_plain(model: Any, config: Any, prompts: list[list[int]], steps: int,
                  dtype: torch.dtype) -> tuple[list[list[int]], torch.Tensor,
                                               list[list[int]], torch.Tensor]:
    """Greedy decode on the model's fast paths, then on the plain ones (same slots order)."""
    model.configure_cpu_kernels(fast=True)
    try:
        fast = PagedRunner(model, config, dtype=dtype).greedy(prompts, steps)
        model.configure_cpu_kernels(fast=False)
        plain = PagedRunner(model, config, dtype=dtype).greedy(prompts, steps)
    finally:
        model.configure_cpu_kernels(fast=True)
    return fast[0], fast[1], plain[0], plain[1]


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v bias through the kernel
def test_tiny_model_fast_equals_plain(tmp_path: Path, arch: str) -> None:
    make_tiny_hf(tmp_path, arch)
    lm = load_model(str(tmp_path))
    assert fast_path_in_use(lm.model.layers[0].mlp.down_proj)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]
    got, got_logits, ref, ref_logits = fast_vs_plain(lm.model, lm.config, prompts, 6,
                                                     torch.float32)
    assert got == ref
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
@needs_kernels
@needs_default_model
def test_default_model_fast_equals_plain_fp32(default_lm: Any) -> None:  # noqa: F811
    ids = default_lm.apply_chat_template([{"role": "user", "content": "Name three rivers."}])
    got, got_logits, ref, ref_logits = fast_vs_plain(
        default_lm.model, default_lm.config, [ids, ids[:9]], 8, torch.float32)
    assert got == ref
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-3, rtol=0)


def teacher_forced(model: Any, config: Any, prompts: list[list[int]],
                   tokens: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
    """Logits [steps, B, vocab] of prefilling `prompts`, then decoding each request's
    `tokens[b][:-1]` one batched step at a time (B >= 2 rows: the fast path's products)."""
    runner = PagedRunner(model, config, dtype=dtype)
    logits, slots = runner.forward(prompts, logits="last")
    out = [logits]
    for step in range(len(tokens[0]) - 1):
        logits, new = runner.forward([[t[step]] for t in tokens], cached=slots, logits="last")
        slots = [torch.cat([s, n]) for s, n in zip(slots, new, strict=True)]
        out.append(logits)
    return torch.stack(out)


@pytest.mark.slow
@needs_kernels
@needs_default_model
def test_default_model_fast_equals_plain_bf16() -> None:
    """bf16: the kernel keeps float32 sums where torch's bf16 path may round differently, so
    the decode logits agree to bf16 accuracy. Both runs are teacher-forced on the plain path's
    greedy tokens, so one near-tie cannot make the sequences diverge."""
    lm = load_model(None, dtype="bfloat16")
    assert fast_path_in_use(lm.model.layers[0].mlp.down_proj)
    prompts = [lm.apply_chat_template([{"role": "user", "content": q}])
               for q in ("Name three rivers.", "What is a harbour?")]
    model = lm.model
    model.configure_cpu_kernels(fast=False)
    tokens = PagedRunner(model, lm.config, dtype=torch.bfloat16).greedy(prompts, 8)[0]
    ref = teacher_forced(model, lm.config, prompts, tokens, torch.bfloat16)
    model.configure_cpu_kernels(fast=True)
    got = teacher_forced(model, lm.config, prompts, tokens, torch.bfloat16)
    assert ref.argmax(-1).T.tolist() == tokens
    scale = ref.abs().amax()
    assert (got - ref).abs().max() <= 0.05 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


@needs_onednn
def test_packed_model_fingerprint_and_weight_bytes_match_plain(tmp_path: Path) -> None:
    """A shared KV tier keys pages by the weights' fingerprint: a process with packed weights
    and one without must agree. The packed model also reports its weight bytes (the packed
    tensors are not parameters)."""
    from radixkv.memory.tiers.keys import weights_fingerprint
    from radixkv.model.quant_info import weight_bytes

    make_tiny_hf(tmp_path, "llama")
    lm = load_model(str(tmp_path))
    lin = lm.model.layers[0].mlp.down_proj
    assert lin.packed is not None  # float32 is packed wherever oneDNN is
    packed_fp, packed_bytes = weights_fingerprint(lm.model), weight_bytes(lm.model)
    lm.model.configure_cpu_kernels(fast=False)
    assert lin.packed is None
    assert weights_fingerprint(lm.model) == packed_fp
    assert packed_bytes >= weight_bytes(lm.model) * 0.99


@pytest.mark.parametrize("n,k", [(1, 8), (37, 64), (130, 96), (50, 1536)])
def test_bf16_weight_panel_matches_float_product(n: int, k: int) -> None:
    """bf16 weights on CPUs without native bf16 GEMMs (AVX2 builds): the float32 panel kernel,
    widening W block by block, gives the float32 product of the exactly widened weight (sums in
    another order only), and `linear` rounds it to bf16 as the upcast path does."""
    from radixkv.model import quant_kernels
    from radixkv.model.layers import linear

    if not quant_kernels.bf16w_available():
        pytest.skip("the float32 panel kernel is built on AVX2 CPUs without AVX-512 only")
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen)
    for m in (0, 1, 4, 7, 8, 9, 16, 17, 33, 70):
        x = torch.randn(m, 2 * k, generator=gen)[:, ::2]  # strided rows and columns
        x32 = x.contiguous()
        ref = F.linear(x32.double(), w.double(), bias.double())
        wide = torch.full((m, n + 3), 7.0)
        quant_kernels.gemm_bf16w(x32, w, bias, wide[:, 1:1 + n])
        mass = F.linear(x32.abs().double(), w.abs().double()) + bias.abs().double()
        assert ((wide[:, 1:1 + n].double() - ref).abs() <= 1e-5 * mass + 1e-6).all()
        assert (wide[:, 0] == 7).all() and (wide[:, 1 + n:] == 7).all()
        if m >= 4:  # linear's upcast range: bf16 in, bf16 out, within one bf16 rounding
            xb = x.bfloat16()
            got = linear(xb, w, bias.bfloat16(), upcast_min_rows=4)
            want = F.linear(xb.float(), w.float(), bias.bfloat16().float())
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=8e-3)
