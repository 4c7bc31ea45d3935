"""Packed int4 / int8 weights against independent oracles.

- The C++ kernels (both the packed GEMV and the widened-tile GEMM path) vs float32
  dequantize-then-matmul, on random shapes, biases and column-sliced outputs.
- GGUF Q4_0 / Q4_1 / Q8_0 blocks vs `gguf.quants.dequantize` (the gguf package's own reference).
- Load-time int4 / int8 quantization: per-group error bounds, and a quantized model equal to a
  float model built from the dequantized weights.
- Tiny GGUF models end to end (greedy equal to the float run within near ties), kernel choice by
  shape, the torch fallback, and typed errors for bad settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radixkv.errors import ConfigError
from radixkv.model import load_model, quant, validate_quantization
from radixkv.model import quant_kernels as qk
from radixkv.model.quant import (
    GROUP,
    QuantLinear,
    QuantTensor,
    from_gguf_blocks,
    quantize,
)
from radixkv.model.quant_info import weight_bytes
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)
from tests.model_fixtures import PagedRunner, make_tiny_hf, write_tiny_gguf

PROMPTS = [[5, 17, 200, 3, 99, 42, 7], [1, 2, 3],
           [250, 11, 64, 64, 90, 12, 31, 8, 150, 77, 23, 4, 61, 33, 100, 101, 102, 9, 0, 260]]


def random_quant(fmt: str, n: int, k: int, gen: torch.Generator) -> QuantTensor:
    g = k // GROUP
    if fmt == "int4":
        qs = torch.randint(0, 256, (n, g, 16), dtype=torch.uint8, generator=gen)
        scales = (torch.randn(n, g, 2, generator=gen) * 0.05).half()
    else:
        qs = torch.randint(-127, 128, (n, g, 32), dtype=torch.int8, generator=gen)
        scales = (torch.rand(n, g, generator=gen) * 0.002).half()
    return QuantTensor(fmt, qs, scales, "random")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    # float32 products that differ only in summation order (and an FMA in the widening)
    scale = float(b.abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, atol=1e-5 * max(scale, 1.0), rtol=1e-5)


needs_kernels = pytest.mark.skipif(not qk.available(), reason="no C++ compiler for the kernels")


# ---- kernels vs dequantize-then-matmul --------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("n,k", [(1, 32), (37, 64), (130, 96), (64, 320), (50, 800)])
def test_packed_kernels_match_reference(fmt: str, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    qt = random_quant(fmt, n, k, gen)
    w = qt.dequantize()
    np.testing.assert_array_equal(qk.dequantize(fmt, qt.qs, qt.scales, k).numpy(), w.numpy())
    bias = torch.randn(n, generator=gen)
    np.testing.assert_array_equal(  # C++ rounding to bf16 == torch's (nearest even)
        qk.dequantize(fmt, qt.qs, qt.scales, k, dtype=torch.bfloat16).view(torch.int16).numpy(),
        w.bfloat16().view(torch.int16).numpy())
    big = 1 << 30
    paths = {"packed-gemv": dict(gemv_max_rows=big, blocked_min_rows=big, x16=False),
             "packed-blocked": dict(gemv_max_rows=big, blocked_min_rows=0),
             "widen+gemm-float32": dict(gemv_max_rows=0, gemm_dtype=torch.float32)}
    for m in (0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 17, 70):
        x = torch.randn(m, k, generator=gen)
        ref = F.linear(x, w, bias)
        for blocked in (False, True):
            # into a column slice of a wider output (as fused layers write)
            wide = torch.full((m, n + 5), 7.0)
            qk.qgemm(fmt, x, qt.qs, qt.scales, bias, wide[:, 2:2 + n], blocked)
            close(wide[:, 2:2 + n], ref)
            assert (wide[:, :2] == 7).all() and (wide[:, 2 + n:] == 7).all()
        xs = torch.randn(2 * m, k, generator=gen)[::2]  # every other row of a bigger tensor
        for name, kw in paths.items():
            layer = QuantLinear([qt], bias, **kw)
            assert layer.kernel_for(m) == name
            close(layer(x), ref)
            close(layer(xs), F.linear(xs, w, bias))
        # bf16 GEMM (the prefill path on CPUs with native bf16; the panel kernel where built,
        # and widening + torch's GEMM): within bf16 tolerance
        for panel in (None, False):
            layer = QuantLinear([qt], bias, gemv_max_rows=0, gemm_dtype=torch.bfloat16,
                                panel=panel)
            assert layer.kernel_for(m) == ("packed-panel" if layer.panel
                                           else "widen+gemm-bfloat16")
            bf16_close(layer(x), ref, x, w)


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("n,k", [(1, 32), (37, 64), (130, 96), (40, 1536)])
def test_bf16_blocked_kernel_matches_reference(fmt: str, n: int, k: int) -> None:
    """bfloat16 x on the blocked kernel's vdpbf16ps variant (AVX512-BF16): the weight rounded
    to bf16 as the bf16 GEMM rounds it, products exact, sums in float32; so the oracle is the
    float64 product of bf16 x and the bf16-rounded dequantized weight."""
    if not qk.bf16_blocked():
        pytest.skip("no AVX512-BF16 blocked kernel here")
    gen = torch.Generator().manual_seed(n + k)
    qt = random_quant(fmt, n, k, gen)
    w16 = qt.dequantize().bfloat16().double()
    bias = torch.randn(n, generator=gen)
    for m in (0, 1, 3, 4, 5, 7, 8, 13, 20, 33, 127):
        x = torch.randn(m, k, generator=gen).bfloat16()
        ref = (x.double() @ w16.T + bias.double()).float()
        wide = torch.full((m, n + 5), 7.0)
        qk.qgemm(fmt, x, qt.qs, qt.scales, bias, wide[:, 2:2 + n], blocked=True)
        close(wide[:, 2:2 + n], ref)
        assert (wide[:, :2] == 7).all() and (wide[:, 2 + n:] == 7).all()
        layer = QuantLinear([qt], bias)  # default limits: bf16 x takes this kernel at 5-31 rows
        want = "packed-gemv" if m < 5 else "packed-blocked" if m < 32 else "packed-panel"
        assert layer.kernel_for(m, dtype=torch.bfloat16) == want
        out = layer(x)
        assert out.dtype == torch.bfloat16
        if m >= 5:  # the same float32 result rounded once to bf16: within one bf16 step
            torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=2.0 ** -8)
    xs = torch.randn(16, k, generator=gen).bfloat16()[::2]  # rows of a bigger tensor
    torch.testing.assert_close(QuantLinear([qt], bias)(xs).float(),
                               (xs.double() @ w16.T + bias.double()).float(),
                               atol=1e-5, rtol=2.0 ** -8)


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("n,k", [(1, 32), (37, 64), (50, 576), (61, 1536), (300, 96)])
def test_bf16_panel_kernel_matches_reference(fmt: str, n: int, k: int) -> None:
    """The panel kernel (x repacked into K-pairs of 16 rows, outer-product vdpbf16ps tiles of
    64 rows x 6 columns, W widened to bf16 in blocks of 48 rows): every tail of rows (M not a
    multiple of 16 or 64) and columns (N not a multiple of 6 or 48), float32 and bf16 output,
    into column slices; oracle: the float64 product of bf16 x and the bf16-rounded weight."""
    if not qk.bf16_blocked():
        pytest.skip("no AVX512-BF16 kernels here")
    gen = torch.Generator().manual_seed(7 * n + k)
    qt = random_quant(fmt, n, k, gen)
    w16 = qt.dequantize().bfloat16().double()
    bias = torch.randn(n, generator=gen)
    for m in (0, 1, 15, 16, 17, 63, 64, 65, 130):
        x = torch.randn(2 * m, k, generator=gen).bfloat16()[::2]  # row stride 2 K
        for b in (bias, None):
            ref = (x.double() @ w16.T + (0 if b is None else b.double())).float()
            wide = torch.full((m, n + 5), 7.0)
            qk.qgemm(fmt, x, qt.qs, qt.scales, b, wide[:, 2:2 + n], panel=True)
            close(wide[:, 2:2 + n], ref)
            assert (wide[:, :2] == 7).all() and (wide[:, 2 + n:] == 7).all()
            wide16 = torch.full((m, n + 3), 7.0).bfloat16()
            qk.qgemm(fmt, x, qt.qs, qt.scales, b, wide16[:, 1:1 + n], panel=True)
            # the float32 result rounded once to bf16 (nearest even)
            torch.testing.assert_close(wide16[:, 1:1 + n].float(), ref.bfloat16().float(),
                                       atol=1e-5, rtol=2.0 ** -7)
            assert (wide16[:, :1] == 7).all() and (wide16[:, 1 + n:] == 7).all()


def bf16_close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Rounding x and W to bf16 (8-bit mantissa) and the product back: error bounded by
    ~3 * 2^-8 of sum |x| |w| per output."""
    bound = 3 * 2.0 ** -8 * (x.abs() @ w.abs().T) + 1e-6
    assert out.dtype == ref.dtype and ((out - ref).abs() <= bound).all()


def x16_reference(x: torch.Tensor, qt: QuantTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int16-activation product computed from its definition in float64: x quantized per
    group of 32 (dx = max|x| / 32767, xq = round(x * (32767 / max|x|)), half to even), integer dot
    products with the codes, scaled by d * dx, plus m * sum(x) for int4; and the bound on its
    distance to the exact product, sum_k |w_k| * dx_g(k) / 2 (x's rounding error)."""
    m, k = x.shape
    g = k // GROUP
    xg = x.reshape(m, g, GROUP)
    top = xg.abs().amax(-1)  # [M, G]
    inv = torch.where(top > 0, 32767.0 / top, torch.zeros_like(top))  # float32, as the kernel
    xq = torch.round(xg * inv[..., None]).double()  # [M, G, 32]
    dx = (top / 32767.0).double()
    if qt.fmt == "int4":
        q = torch.stack([qt.qs & 15, qt.qs >> 4], 2).reshape(-1, g, GROUP).double()
        d, mins = qt.scales[..., 0].double(), qt.scales[..., 1].double()  # [N, G]
    else:
        q, d, mins = qt.qs.double(), qt.scales.double(), None
    dots = torch.einsum("mgj,ngj->mng", xq, q)
    ref = torch.einsum("mng,ng,mg->mn", dots, d, dx)
    if mins is not None:
        ref += torch.einsum("ng,mg->mn", mins, xg.double().sum(-1))
    w = qt.dequantize().double().reshape(-1, g, GROUP)
    bound = torch.einsum("ngj,mg->mn", w.abs(), dx) / 2
    return ref, bound


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("n,k", [(1, 32), (37, 64), (130, 96), (64, 1536)])
def test_x16_row_kernel_matches_reference(fmt: str, n: int, k: int) -> None:
    """The row kernel on int8-quantized x: equal to the float64 product of its definition up to
    float32 summation, and within x's rounding bound of the exact float product."""
    if not qk.simd():
        pytest.skip("the x16 kernel is part of the SIMD build")
    gen = torch.Generator().manual_seed(7 * n + k)
    qt = random_quant(fmt, n, k, gen)
    w = qt.dequantize()
    bias = torch.randn(n, generator=gen)
    for m in (1, 2, 3, 4, 5, 7, 9):
        x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
        x[0, :GROUP] = 0.0  # an all-zero group: scale 0
        ref, bound = x16_reference(x, qt)
        wide = torch.full((m, n + 5), 7.0)
        qk.qgemm(fmt, x, qt.qs, qt.scales, bias, wide[:, 2:2 + n], x16=True)
        out = wide[:, 2:2 + n]
        assert (wide[:, :2] == 7).all() and (wide[:, 2 + n:] == 7).all()
        # float32 sums of terms of magnitude |w| |x|: their rounding, relative to that mass
        mass = F.linear(x.abs().double(), w.abs().double()) + bias.abs().double()
        slack = 1e-5 * mass + 1e-6
        assert ((out.double() - (ref + bias.double())).abs() <= slack).all()
        exact = F.linear(x.double(), w.double(), bias.double())
        assert ((out.double() - exact).abs() <= bound + slack).all()
        xs = torch.cat([x, x], 1)[:, :k]  # strided rows
        layer = QuantLinear([qt], bias, x16=True)
        if m <= quant.X16_MAX_ROWS:
            assert layer.kernel_for(m) == "packed-gemv-x16"
        want = ref if m <= quant.X16_MAX_ROWS else F.linear(x, w).double()
        assert ((layer(xs).double() - (want + bias.double())).abs() <= slack).all()
    x = torch.randn(3, k, generator=gen)
    x[1, 5] = float("nan")
    x[2, -1] = float("inf")
    out = torch.empty(3, n)
    qk.qgemm(fmt, x, qt.qs, qt.scales, None, out, x16=True)
    assert out[0].isfinite().all() and out[1].isnan().all() and not out[2].isfinite().any()


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_lm_head_tiles_and_whole_widening(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight past WIDEN_MAX_ELEMS goes tile by tile (uneven last tile), in both GEMM dtypes."""

    monkeypatch.setattr(quant, "WIDEN_MAX_ELEMS", 64 * 64)
    monkeypatch.setattr(quant, "TILE_ELEMS", 23 * 64)  # tiles of 23 rows
    gen = torch.Generator().manual_seed(5)
    qt = random_quant(fmt, 100, 64, gen)
    w, bias = qt.dequantize(), torch.randn(100, generator=gen)
    x = torch.randn(70, 64, generator=gen)
    close(QuantLinear([qt], bias, gemv_max_rows=0, gemm_dtype=torch.float32)(x),
          F.linear(x, w, bias))
    for panel in (False, None):  # the widened tiles, and the panel kernel where built
        layer = QuantLinear([qt], bias, gemv_max_rows=0, gemm_dtype=torch.bfloat16, panel=panel)
        bf16_close(layer(x), F.linear(x, w, bias), x, w)


@needs_kernels
def test_mixed_segments_and_half_activations() -> None:
    """A fused weight whose parts are int4, int8 and float (as a GGUF may store q/k/v)."""
    gen = torch.Generator().manual_seed(3)
    a, b = random_quant("int4", 24, 64, gen), random_quant("int8", 10, 64, gen)
    f = torch.randn(6, 64, generator=gen)
    layer = QuantLinear([a, b, f], torch.randn(40, generator=gen), gemm_dtype=torch.float32,
                        x16=False)
    w = torch.cat([a.dequantize(), b.dequantize(), f])
    for m in (1, 5, 9, 40, 100):
        x = torch.randn(m, 64, generator=gen)
        close(layer(x), F.linear(x, w, layer.bias))
    x = torch.randn(100, 64, generator=gen)
    for panel in (False, None):
        layer16 = QuantLinear([a, b, f], layer.bias, gemm_dtype=torch.bfloat16, panel=panel)
        bf16_close(layer16(x), F.linear(x, w, layer.bias), x, w)
        if layer16.panel:  # bf16 x, and the bf16 result a caller with gemm_out takes
            xb = x.bfloat16()
            ref = F.linear(xb.float(), w, layer.bias)
            layer16.gemm_out = True
            for inp in (xb, x):
                out = layer16(inp)
                assert out.dtype == torch.bfloat16
                torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=1.6e-2)
    xb = torch.randn(4, 64, generator=gen).bfloat16()
    out = layer(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(xb.float(), w, layer.bias),
                               atol=0.05, rtol=1.6e-2)


@needs_kernels
def test_kernel_choice_by_shape() -> None:

    qt = random_quant("int4", 8, 32, torch.Generator().manual_seed(0))
    layer = QuantLinear([qt], gemv_max_rows=16, blocked_min_rows=4, gemm_dtype=torch.float32,
                        x16=False)
    assert [layer.kernel_for(m) for m in (1, 3, 4, 15, 16, 512)] == [
        "packed-gemv", "packed-gemv", "packed-blocked", "packed-blocked",
        "widen+gemm-float32", "widen+gemm-float32"]
    # the int16-activation row kernel: up to X16_MAX_ROWS rows of the row kernel's range, by
    # default exactly where measured faster (AVX2 builds without AVX-512)
    assert quant.default_x16() == (qk.simd() and qk.width() == 8)
    if qk.simd():
        x16 = QuantLinear([qt], gemv_max_rows=16, blocked_min_rows=8, x16=True)
        rows = (1, quant.X16_MAX_ROWS, quant.X16_MAX_ROWS + 1, 8)
        assert [x16.kernel_for(m) for m in rows] == [
            "packed-gemv-x16", "packed-gemv-x16", "packed-gemv", "packed-blocked"]
    assert layer.kernel_for(1, torch.device("meta")) == "reference"
    # the defaults: the measured limits, bf16 GEMMs exactly where the CPU has native bf16
    d = QuantLinear([qt])
    native = quant.native_half_matmul(torch.bfloat16)
    assert d.gemm_dtype == (torch.bfloat16 if native else torch.float32)
    assert d.gemv_max_rows == quant.gemv_max_rows_for(d.gemm_dtype)
    lo = quant.BLOCKED_MIN_ROWS_AVX2 if qk.width() == 8 else quant.BLOCKED_MIN_ROWS
    assert d.blocked_min_rows == lo < d.gemv_max_rows
    assert d.kernel_for(1) == ("packed-gemv-x16" if d.x16 else "packed-gemv")
    assert d.kernel_for(lo - 1) == "packed-gemv" and d.kernel_for(lo) == "packed-blocked"
    if native:
        assert d.kernel_for(quant.GEMV_MAX_ROWS_BF16) == (
            "packed-panel" if qk.bf16_blocked() else "widen+gemm-bfloat16")
        assert QuantLinear([qt], panel=False).kernel_for(512) == "widen+gemm-bfloat16"
    # without native bf16: the blocked kernel (AVX-512) or the float32 panel kernel (AVX2) up
    # to any M
    f32 = QuantLinear([qt], gemm_dtype=torch.float32)
    assert f32.gemv_max_rows == 1 << 62 and f32.kernel_for(4096) == "packed-blocked"
    # bf16 x: the bf16 blocked kernel's limits where it is built, else the float32 ones
    if qk.bf16_blocked():
        assert d.limits(torch.bfloat16) == (quant.BF16X_BLOCKED_MIN_ROWS,
                                            quant.BF16X_GEMV_MAX_ROWS)
        assert [d.kernel_for(m, dtype=torch.bfloat16) for m in (4, 5, 31, 32, 512)] == [
            "packed-gemv-x16" if d.x16 else "packed-gemv", "packed-blocked", "packed-blocked",
            "packed-panel", "packed-panel"]
    else:
        assert d.limits(torch.bfloat16) == d.limits(torch.float32)
    assert layer.limits(torch.bfloat16) == (4, 16)  # explicit limits hold for every dtype
    from radixkv.model import decode_kernels  # its batches stay on the row kernel either way
    assert quant.BF16X_BLOCKED_MIN_ROWS > decode_kernels.MAX_ROWS


def test_kernels_built_with_this_cpus_simd() -> None:
    """The native build did not silently fall back to the portable flags (a compile error in
    the AVX2 / AVX-512 code would otherwise only show up as slow scalar kernels)."""
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo")
                  if ln.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    if not qk.available() or not {"avx2", "fma", "f16c"} <= set(flags):
        pytest.skip("no compiled kernels or no AVX2 + FMA + F16C here")
    assert qk.simd()
    assert qk.width() == (16 if "avx512f" in flags else 8)


def test_torch_fallback_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    qt = random_quant("int8", 16, 64, gen)
    monkeypatch.setattr(qk, "available", lambda: False)
    layer = QuantLinear([qt])
    assert layer.kernel_for(1) == "reference"
    x = torch.randn(3, 64, generator=gen)
    close(layer(x), F.linear(x, qt.dequantize()))


# ---- GGUF blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_match_gguf_dequantize(name: str) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 128)) * 0.3).astype(np.float32)
    data = gguf.quants.quantize(w, qtype)  # [48, bytes per row]
    want = gguf.quants.dequantize(data, qtype).reshape(48, 128)
    qt = from_gguf_blocks(np.ascontiguousarray(data).reshape(-1), name, (48, 128))
    assert qt is not None and qt.fmt == ("int8" if name == "Q8_0" else "int4")
    # Q4_1's d * q + m rounds twice in numpy and may differ from the reference by an ulp
    np.testing.assert_allclose(qt.dequantize().numpy(), want, rtol=0, atol=1e-6)
    if qk.available():
        wt = torch.from_numpy(want)
        for m in (1, 5, 40, 100):  # row kernel, blocked kernel, widened GEMM
            x = torch.randn(m, 128)
            close(QuantLinear([qt], gemm_dtype=torch.float32, x16=False)(x), x @ wt.T)
            bf16_close(QuantLinear([qt], gemm_dtype=torch.bfloat16, x16=False)(x), x @ wt.T, x,
                       wt)
            if qk.simd() and m <= quant.X16_MAX_ROWS:  # the int16-activation row kernel
                ref, bound = x16_reference(x, qt)
                got = QuantLinear([qt], x16=True)(x).double()
                slack = 1e-5 * (x.abs() @ wt.abs().T).double() + 1e-6
                assert ((got - ref).abs() <= slack).all()
                assert ((got - (x @ wt.T).double()).abs() <= bound + slack).all()
    assert from_gguf_blocks(np.zeros(8, np.uint8), "F16", (2, 2)) is None


# ---- load-time quantization -----------------------------------------------------------------
@pytest.mark.parametrize("fmt,levels", [("int4", 15), ("int8", 254)])
def test_quantize_error_bound(fmt: str, levels: int) -> None:
    w = torch.randn(33, 96) * torch.rand(33, 1) * 3
    qt = quantize(w, fmt)
    err = (qt.dequantize() - w).reshape(33, 3, GROUP).abs().amax(-1)  # [N, G]
    g = w.reshape(33, 3, GROUP)
    spread = g.amax(-1) - g.amin(-1) if fmt == "int4" else 2 * g.abs().amax(-1)
    # half a step, plus the float16 rounding of the scale and the offset
    assert (err <= spread / levels * 0.5 * 1.01 + 2e-3 * g.abs().amax(-1)).all()
    with pytest.raises(ConfigError):
        quantize(torch.randn(4, 33), fmt)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_hf_model_equals_dequantized_float_model(tmp_path: Path, mode: str) -> None:
    make_tiny_hf(tmp_path / "hf", "llama", tie_word_embeddings=True, attention_bias=True)
    q = load_model(str(tmp_path / "hf"), quantization=mode, dtype="float32")
    f = load_model(str(tmp_path / "hf"))
    f.model.configure_cpu_kernels(fast=False)  # dense weights back, to be edited
    with torch.no_grad():  # the oracle: the float model with its matrices round-tripped
        for mod in f.model.modules():
            if isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
                fmt = "int4" if mode == "int4" and isinstance(mod, torch.nn.Linear) else "int8"
                mod.weight.copy_(quantize(mod.weight, fmt).dequantize())
    f.model.configure_cpu_kernels()  # repacked from the edited weights
    ours, _ = PagedRunner(q.model, q.config).forward(PROMPTS, logits="all")
    ref, _ = PagedRunner(f.model, f.config).forward(PROMPTS, logits="all")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    info = q.kernel_info()
    assert info["quantization"] == mode and info["float_linears"] == 0
    summary = info["quant_report"]
    assert summary["tensors"] == 2 * 7 + 1 and 0 < summary["rel_error_max"] < 0.2
    assert weight_bytes(q.model) < weight_bytes(f.model) / (3 if mode == "int4" else 2)


# ---- tiny GGUF end to end --------------------------------------------------------------------
def _greedy_agree(a: list[int], b: list[int], logits: torch.Tensor, tol: float) -> None:
    """Equal tokens, or the first difference is a near tie in the reference logits."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            row = logits[i]
            assert float(row.max() - row[y]) < tol, f"step {i}: {x} vs {y} is no near tie"
            return


@pytest.mark.parametrize("x16", ["0", "1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_quantized_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        arch: str, x16: str) -> None:
    """Float products: logits equal to the float model's to 1e-4 and greedy equal within near
    ties. With the int16-activation decode kernel (x16): the prefill is unchanged, each decode
    step's logits stay within 0.1% of the logit range of the float run's, and greedy tokens
    agree until a step whose float top-2 margin is below twice the deviation seen there (the
    only place x's 16-bit rounding can flip a token)."""
    import gguf

    if x16 == "1" and not qk.simd():
        pytest.skip("the x16 kernel is part of the SIMD build")
    monkeypatch.setenv("RADIXKV_QUANT_X16", x16)
    Q = gguf.GGMLQuantizationType
    hf = make_tiny_hf(tmp_path / "hf", arch)
    write_tiny_gguf(tmp_path / "m.gguf", hf, arch, [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.F32])
    f = load_model(str(tmp_path / "m.gguf"))
    q = load_model(str(tmp_path / "m.gguf"), quantization="gguf", dtype="float32")
    # every stored type shows up: int4 from Q4_0 and Q4_1, int8 from Q8_0, widened F16 / F32
    fmts = q.kernel_info()["quantized_formats"]
    assert {k.split(" ")[0] for k in fmts} >= {"int4", "int8", "float32"}, fmts
    assert any("Q4_0" in k for k in fmts) and any("Q4_1" in k for k in fmts)
    ref, _ = PagedRunner(f.model, f.config).forward(PROMPTS, logits="all")
    ours, _ = PagedRunner(q.model, q.config).forward(PROMPTS, logits="all")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    out_f, lf = PagedRunner(f.model, f.config).greedy(PROMPTS, 12)
    out_q, lq = PagedRunner(q.model, q.config).greedy(PROMPTS, 12)
    for b in range(len(PROMPTS)):
        if x16 == "0":
            _greedy_agree(out_f[b], out_q[b], lf[:, b], tol=1e-3)
            continue
        same = next((i for i, (x, y) in enumerate(zip(out_f[b], out_q[b], strict=True))
                     if x != y), len(out_f[b]) - 1)
        dev = float((lq[:same + 1, b] - lf[:same + 1, b]).abs().max())  # same history so far
        assert dev <= 1e-3 * float(lf[:, b].max() - lf[:, b].min()), dev
        _greedy_agree(out_f[b], out_q[b], lf[:, b], tol=2 * dev + 1e-3)


# ---- settings ---------------------------------------------------------------------------------
def test_auto_dtype_is_float32_unless_quantized_on_native_bf16() -> None:
    from radixkv.errors import ModelLoadError
    from radixkv.model import resolve_dtype
    from radixkv.model.layers import native_half_matmul

    cpu = torch.device("cpu")
    native = native_half_matmul(torch.bfloat16)
    assert resolve_dtype("auto", None, cpu) == torch.float32  # token-exact default
    for mode in ("gguf", "int4", "int8"):
        assert resolve_dtype("auto", mode, cpu) == (torch.bfloat16 if native else torch.float32)
        assert resolve_dtype("float32", mode, cpu) == torch.float32  # asked for: kept
    assert resolve_dtype("bf16", None, cpu) == torch.bfloat16
    assert resolve_dtype(torch.float32, "gguf", cpu) == torch.float32
    with pytest.raises(ModelLoadError, match="dtype"):
        resolve_dtype("float8", None, cpu)


def test_bad_quantization_settings(tmp_path: Path) -> None:
    assert validate_quantization(None) is None
    assert validate_quantization("INT4") == "int4"
    for bad in ("int3", "", 4, "q4_0"):
        with pytest.raises(ConfigError, match="quantization"):
            validate_quantization(bad)
    with pytest.raises(ConfigError, match="quantization"):
        load_model(str(tmp_path), quantization="int3")  # checked before the path
    # widths not divisible by the group (hidden 48, head_dim 12)
    make_tiny_hf(tmp_path / "odd", "llama", hidden_size=48, intermediate_size=96)
    with pytest.raises(ConfigError, match="divisible"):
        load_model(str(tmp_path / "odd"), quantization="int4")
    make_tiny_hf(tmp_path / "hf", "llama")
    with pytest.raises(ConfigError, match="GGUF"):
        load_model(str(tmp_path / "hf"), quantization="gguf")


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_engine_with_quantized_weights(tiny_llama_dir: Path, mode: str) -> None:  # noqa: F811
    """Prefix cache on == off, and a pool small enough to force eviction / preemption, with
    packed weights (the oracle: each prompt alone, cache off, same weights)."""
    from radixkv import LLM, SamplingParams
    from tests.test_engine import workload

    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = workload()[:8]
    off = LLM(str(tiny_llama_dir), quantization=mode, enable_prefix_cache=False,
              max_total_tokens=4096)
    assert off.lm.kernel_info()["quantized_linears"] > 0
    oracle = [off.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    on = LLM(off.lm, max_total_tokens=4096)
    assert [o.outputs[0].token_ids for o in on.generate(prompts, greedy)] == oracle
    assert on.cache_stats()["cached_tokens"] > 0
    tight = LLM(off.lm, max_total_tokens=160, max_running_requests=8)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, greedy)] == oracle
    for llm in (off, on, tight):
        llm.engine.check_no_leak()
    with pytest.raises(ConfigError):
        LLM(str(tiny_llama_dir), quantization="int3")


def test_forks_with_quantized_weights(tiny_llama_dir: Path) -> None:  # noqa: F811
    """Parallel samples (n > 1, forked after one prefill) on packed weights:
    greedy samples equal the n = 1 greedy output, seeded sample i equals a separate request with
    seed + i, and no slot leaks (the oracle: separate requests on the same weights)."""
    from radixkv import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), quantization="int4", max_total_tokens=4096)
    prompt = list(range(40, 70))
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    (one,) = llm.generate([prompt], greedy)
    (four,) = llm.generate([prompt], SamplingParams(n=4, temperature=0.0, max_tokens=8,
                                                      ignore_eos=True))
    assert [c.token_ids for c in four.outputs] == [one.outputs[0].token_ids] * 4
    seeded = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    (forked,) = llm.generate([prompt], seeded)
    for i, c in enumerate(forked.outputs):
        alone = SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8, ignore_eos=True)
        assert c.token_ids == llm.generate([prompt], alone)[0].outputs[0].token_ids
    llm.engine.check_no_leak()


def test_server_with_quantized_weights(tmp_path: Path) -> None:
    """`radixkv serve --quantization int8`: the startup line names the packed kernels and the
    greedy completion equals the in-process LLM on the same quantized weights."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from radixkv import LLM, SamplingParams
    from radixkv.serving.launcher import ServerProcess

    make_tiny_hf(tmp_path / "hf", "llama")
    prompt = [5, 17, 200, 3, 99, 42, 7, 11]
    want = LLM(str(tmp_path / "hf"), quantization="int8", max_total_tokens=4096).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    srv = ServerProcess([str(tmp_path / "hf"), "--quantization", "int8",
                         "--served-model-name", "q", "--max-total-tokens", "4096"])
    try:
        srv.start()
        assert "'quantization': 'int8'" in srv.output and "packed int4/int8" in srv.output
        r = httpx.post(f"{srv.base_url}/completions", timeout=120, json={
            "model": "q", "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want.outputs[0].text
    finally:
        srv.stop()
