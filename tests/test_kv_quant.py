"""Quantized KV cache (int8, fp8 e4m3): formats, the pool, and every CPU attention backend.

Oracles: hand-computed codes and scales, error bounds that follow from the formats (half a
quantum for int8, half an ulp of e4m3 for fp8), torch's own float8 conversion, and the float64
reference kernel on explicitly dequantized K/V.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import radixkv.attention as attention
from radixkv import LLM, SamplingParams
from radixkv.attention import AttentionInputError, cpu_kernels, reference, torch_backend
from radixkv.errors import ConfigError, InvalidSlotError
from radixkv.memory import TokenToKVPool, kv_quant
from radixkv.memory.kv_pool import set_quant_store_hook
from radixkv.tools.calc import get_preset, kv_bytes_per_token
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)
from tests.test_attention import _qo_indptr, fragmented_layout

F8 = kv_quant.fp8_dtype()
needs_fp8 = pytest.mark.skipif(F8 is None, reason="this torch has no float8_e4m3fn")
KV_NAMES = ["int8", pytest.param("fp8_e4m3", marks=needs_fp8)]


def _storage(name: str) -> torch.dtype:
    return kv_quant.parse_kv_cache_dtype(name, torch.float32)


def _skip_unbuilt() -> None:
    if not cpu_kernels.available():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler?)")


# ---- formats ----------------------------------------------------------------------------------
def test_int8_hand_computed() -> None:
    u = 2.0 ** -4  # max |x| = 127 u, so the scale is exactly u
    x = torch.tensor([[[127 * u, -63.5 * u, 0.0, 0.5 * u, -127 * u, 31.75 * u, -1.5 * u,
                        100 * u]]])
    q, s = kv_quant.quantize(x, torch.int8)
    assert s.shape == (1, 1) and s.item() == u
    # x / u = 127, -63.5 (half to even: -64), 0, 0.5 (-> 0), -127, 31.75, -1.5 (-> -2), 100
    assert q.tolist() == [[[127, -64, 0, 0, -127, 32, -2, 100]]]
    assert kv_quant.dequantize(q, s).tolist() == [[[127 * u, -64 * u, 0.0, 0.0, -127 * u,
                                                    32 * u, -2 * u, 100 * u]]]


@needs_fp8
def test_fp8_hand_computed() -> None:
    x = torch.tensor([[448.0, -224.0, 1.0, 0.0, 2.0 ** -9, 3 * 2.0 ** -10, 17.0, -0.5]])
    q, s = kv_quant.quantize(x, F8)
    assert s.item() == 1.0  # max |x| = 448
    # 17 lies between 16 and 18 (step 2 at 2^4): a tie, rounded to even (16); 3 * 2^-10 is a
    # tie between subnormals 1 and 2 (x 2^-9): rounded to even, 2 * 2^-9.
    assert q.float().tolist() == [[448.0, -224.0, 1.0, 0.0, 2.0 ** -9, 2.0 ** -8, 16.0, -0.5]]


def test_zero_row_gets_unit_scale() -> None:
    q, s = kv_quant.quantize(torch.zeros(2, 3, 8), torch.int8)
    assert torch.equal(s, torch.ones(2, 3)) and not q.any()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3), st.sampled_from([8, 64, 128]))
def test_int8_round_trip_error_bound(seed: int, mag: float, d: int) -> None:
    x = torch.randn(5, 2, d, generator=torch.Generator().manual_seed(seed)) * mag
    q, s = kv_quant.quantize(x, torch.int8)
    err = (kv_quant.dequantize(q, s, torch.float64) - x.double()).abs()
    amax = x.abs().amax(-1).double()
    # Half a quantum (amax / 254) plus float32 rounding of x / scale.
    assert bool((err <= (amax / 254 * (1 + 1e-5)).unsqueeze(-1)).all())
    assert bool((q.abs() <= 127).all())


@needs_fp8
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3), st.sampled_from([8, 64]))
def test_fp8_round_trip_error_bound(seed: int, mag: float, d: int) -> None:
    x = torch.randn(5, 2, d, generator=torch.Generator().manual_seed(seed)) * mag
    q, s = kv_quant.quantize(x, F8)
    y = kv_quant.dequantize(q, s, torch.float64)
    xd, sd = x.double(), s.double().unsqueeze(-1)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, and an absolute error
    # <= 2^-10 (half the subnormal step) in scaled units below 2^-6.
    bound = torch.maximum(xd.abs() * 2.0 ** -4, sd * 2.0 ** -10) * (1 + 1e-5)
    assert bool(((y - xd).abs() <= bound).all())
    assert bool((q.float().abs() <= 448).all())


@pytest.mark.parametrize("name", KV_NAMES)
def test_cpp_quant_store_is_bit_identical_to_torch(name: str) -> None:
    _skip_unbuilt()
    dt = _storage(name)
    gen = torch.Generator().manual_seed(3)
    # Wide dynamic range per row, a zero row, exact ties and tiny values (fp8 subnormals).
    x = torch.randn(40, 3, 64, generator=gen) * torch.rand(40, 3, 1, generator=gen) * 7
    x[5, 1] = 0
    x[6, 0, :4] = torch.tensor([1.27, -0.635, 1e-6, -3e-5])
    codes = torch.zeros(50, 3, 64, dtype=dt)
    scales = torch.zeros(50, 3)
    slots = torch.randperm(49, generator=gen)[:40] + 1
    cpu_kernels.quant_store(x, slots, codes, scales)
    q, s = kv_quant.quantize(x, dt)
    assert torch.equal(scales[slots], s)
    assert torch.equal(codes[slots].view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(InvalidSlotError):
        cpu_kernels.quant_store(x[:2], torch.tensor([1, 50]), codes, scales)


# ---- the pool ---------------------------------------------------------------------------------
def test_bytes_per_token_and_capacity() -> None:
    fp32 = TokenToKVPool(4, 30, 3, 64).bytes_per_token()
    for name in ("int8", "fp8_e4m3") if F8 is not None else ("int8",):
        pool = TokenToKVPool(4, 30, 3, 64, kv_cache_dtype=name)
        assert pool.bytes_per_token() == 2 * 30 * 3 * (64 + 4)  # codes plus a float32 scale
        assert pool.bytes_per_token() <= 0.27 * fp32
        allocated = sum(t.numel() * t.element_size()
                        for t in (*pool.k_buffers, *pool.v_buffers, *pool.k_scales,
                                  *pool.v_scales))
        assert allocated == pool.total_bytes() == pool.bytes_per_token() * 5


@pytest.mark.parametrize("name", KV_NAMES)
def test_calc_reports_what_the_pool_allocates(name: str) -> None:
    spec = get_preset("SmolLM2-135M")
    pool = TokenToKVPool(2, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                         kv_cache_dtype=name)
    assert kv_bytes_per_token(spec, "int8" if name == "int8" else "fp8") == \
        pool.bytes_per_token()
    assert kv_bytes_per_token(spec, "fp32") == TokenToKVPool(
        2, spec.num_layers, spec.num_kv_heads, spec.head_dim).bytes_per_token()


@pytest.mark.parametrize("name", KV_NAMES)
@pytest.mark.parametrize("fused", [True, False])
def test_pool_set_get_round_trip(name: str, fused: bool) -> None:
    dt = _storage(name)
    pool = TokenToKVPool(30, 2, 2, 16, kv_cache_dtype=name)
    assert pool.quantized and pool.kv_dtype == dt and pool.dtype == torch.float32
    slots = pool.alloc(10)[torch.randperm(10)]
    k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16) * 3
    if not fused:
        set_quant_store_hook(None)  # the pure torch path
    try:
        pool.set_kv(1, slots, k, v)
    finally:
        set_quant_store_hook(attention.dispatch._cpu_quant_store)
    gk, gv = pool.get_kv(1, slots)
    for got, x in ((gk, k), (gv, v)):
        q, s = kv_quant.quantize(x, dt)
        assert torch.equal(got, kv_quant.dequantize(q, s))
    ks, vs = pool.get_kv_scales(1)
    assert ks.shape == (31, 2) and ks[0].tolist() == [1.0, 1.0]
    assert not pool.get_kv_buffer(1)[0][0].float().any()  # slot 0 reads as zeros
    assert TokenToKVPool(4, 1, 1, 8).get_kv_scales(0) == (None, None)


@pytest.mark.parametrize("bad", ["int4", "fp8_e5m2", "", 3, torch.float16])
def test_unknown_kv_cache_dtype_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="auto, int8, fp8_e4m3"):
        TokenToKVPool(4, 1, 1, 8, kv_cache_dtype=bad)  # type: ignore[arg-type]


def test_quantized_kv_on_a_device_without_kernels_is_a_config_error() -> None:
    attention.check_kv_cache_support(torch.int8, "cpu")
    attention.check_kv_cache_support(torch.float16, "meta")  # float K/V: nothing to check
    with pytest.raises(ConfigError, match="no attention kernel on meta.*'auto'"):
        attention.check_kv_cache_support(torch.int8, "meta")


def test_fp8_without_float8_torch_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_quant, "fp8_dtype", lambda: None)
    with pytest.raises(ConfigError, match="float8_e4m3fn.*'auto' or 'int8'"):
        kv_quant.parse_kv_cache_dtype("fp8_e4m3", torch.float32)


# ---- attention on quantized slots -------------------------------------------------------------
def quant_layout(kv_lens: list[int], hkv: int, d: int, name: str, seed: int):  # noqa: ANN201
    """`fragmented_layout`'s scattered slots, every slot quantized (scales differ per row)."""
    lay = fragmented_layout(kv_lens, hkv, d, torch.float32, seed)
    dt = _storage(name)
    gen = torch.Generator().manual_seed(seed + 1)
    rowmag = torch.rand(lay.k.shape[0], hkv, 1, generator=gen) * 4 + 0.1
    k, ks = kv_quant.quantize(lay.k * rowmag, dt)
    v, vs = kv_quant.quantize(lay.v / rowmag, dt)
    return lay, k, v, ks, vs


def _backends() -> dict[str, object]:
    return {
        "dispatch": lambda q, *a, **kw: attention.decode(q, *a, **kw),
        "torch": lambda q, k, v, ip, ix, **kw: torch_backend.decode(q, k, v, ip, ix,
                                                                   q.shape[-1] ** -0.5, **kw),
        "cpp": lambda q, k, v, ip, ix, **kw: cpu_kernels.decode(q, k, v, ip, ix,
                                                               q.shape[-1] ** -0.5, **kw),
    }


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("name", KV_NAMES)
@pytest.mark.parametrize("backend", ["dispatch", "torch", "cpp"])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_quantized_decode_matches_reference(name: str, backend: str, group: int, d: int) -> None:
    if backend == "cpp":
        _skip_unbuilt()
    kv_lens = [1, 37, 700, 0, 129]
    lay, k, v, ks, vs = quant_layout(kv_lens, 2, d, name, seed=group * 10 + d)
    q = torch.randn(len(kv_lens), 2 * group, d, generator=torch.Generator().manual_seed(2))
    exact = reference.decode(q.double(), k, v, lay.kv_indptr, lay.kv_indices, k_scale=ks,
                             v_scale=vs)
    for dtype in (torch.float32, torch.bfloat16):
        qd = q.to(dtype)
        exact_d = exact if dtype == torch.float32 else reference.decode(
            qd.double(), k, v, lay.kv_indptr, lay.kv_indices, k_scale=ks, v_scale=vs)
        out = _backends()[backend](qd, k, v, lay.kv_indptr, lay.kv_indices, k_scale=ks,
                                   v_scale=vs)
        assert out.dtype == dtype and out.shape == q.shape
        assert (out.double() - exact_d).abs().max().item() <= TOL[dtype]
    assert not out[3].float().any()  # the empty request


@pytest.mark.parametrize("name", KV_NAMES)
@pytest.mark.parametrize("backend", ["dispatch", "torch", "cpp"])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_quantized_extend_matches_reference(name: str, backend: str, group: int, d: int) -> None:
    if backend == "cpp":
        _skip_unbuilt()
    kv_lens, n_new = [5, 90, 33, 1], [5, 17, 1, 1]  # no prefix, prefix, decode-like rows
    lay, k, v, ks, vs = quant_layout(kv_lens, 2, d, name, seed=group + d)
    qo = _qo_indptr(n_new)
    q = torch.randn(sum(n_new), 2 * group, d, generator=torch.Generator().manual_seed(4))
    exact = reference.extend(q.double(), k, v, qo, lay.kv_indptr, lay.kv_indices, k_scale=ks,
                             v_scale=vs)
    sc = q.shape[-1] ** -0.5
    fn = {"dispatch": lambda: attention.extend(q, k, v, qo, lay.kv_indptr, lay.kv_indices,
                                               k_scale=ks, v_scale=vs),
          "torch": lambda: torch_backend.extend(q, k, v, qo, lay.kv_indptr, lay.kv_indices, sc,
                                                k_scale=ks, v_scale=vs),
          "cpp": lambda: cpu_kernels.extend(q, k, v, qo, lay.kv_indptr, lay.kv_indices, sc,
                                            k_scale=ks, v_scale=vs)}[backend]
    assert (fn().double() - exact).abs().max().item() <= TOL[torch.float32]


@pytest.mark.parametrize("name", KV_NAMES)
def test_quantized_big_extend_mixes_fused_and_sdpa(name: str) -> None:
    # One request above the SDPA threshold (its rows via torch on dequantized gathers), one
    # small (fused kernel), bfloat16 q: the fused result is widened back into the same output.
    _skip_unbuilt()
    kv_lens, n_new = [700, 9], [700, 3]
    lay, k, v, ks, vs = quant_layout(kv_lens, 1, 64, name, seed=9)
    qo = _qo_indptr(n_new)
    q = torch.randn(sum(n_new), 8, 64, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.float32, torch.bfloat16):
        qd = q.to(dtype)
        exact = reference.extend(qd.double(), k, v, qo, lay.kv_indptr, lay.kv_indices,
                                 k_scale=ks, v_scale=vs)
        out = attention.extend(qd, k, v, qo, lay.kv_indptr, lay.kv_indices, k_scale=ks,
                               v_scale=vs)
        assert (out.double() - exact).abs().max().item() <= TOL[dtype]


def test_quantized_inputs_are_validated() -> None:
    lay, k, v, ks, vs = quant_layout([3, 4], 2, 64, "int8", seed=1)
    q = torch.randn(2, 4, 64)
    args = (lay.kv_indptr, lay.kv_indices)
    with pytest.raises(AttentionInputError, match="need k_scale and v_scale"):
        attention.decode(q, k, v, *args)
    with pytest.raises(AttentionInputError, match="together"):
        attention.decode(q, k, v, *args, k_scale=ks)
    with pytest.raises(AttentionInputError, match=r"\[rows, Hkv\]"):
        attention.decode(q, k, v, *args, k_scale=ks[:-1], v_scale=vs)
    with pytest.raises(AttentionInputError, match="float32"):
        attention.decode(q, k, v, *args, k_scale=ks.double(), v_scale=vs)
    with pytest.raises(AttentionInputError, match="must be one of"):
        attention.decode(q, k.float(), v.float(), *args, k_scale=ks, v_scale=vs)
    with pytest.raises(InvalidSlotError):
        attention.decode(q, k, v, lay.kv_indptr, lay.kv_indices + 10_000, k_scale=ks,
                         v_scale=vs)


# ---- the engine -------------------------------------------------------------------------------
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    system = torch.randint(10, 2000, (30,), generator=g).tolist()
    out = [system + torch.randint(10, 2000, (n,), generator=g).tolist() for n in (4, 9, 2)]
    out.append(out[0] + torch.randint(10, 2000, (6,), generator=g).tolist())
    out.append(torch.randint(10, 2000, (12,), generator=g).tolist())
    return out


@pytest.mark.parametrize("name", KV_NAMES)
def test_engine_cache_on_equals_off_with_quantized_kv(tiny_llama_dir, name):  # noqa: F811
    off = LLM(str(tiny_llama_dir), max_total_tokens=2048, enable_prefix_cache=False,
              kv_cache_dtype=name)
    oracle = [off.generate([p], GREEDY)[0].outputs[0].token_ids for p in _prompts()]
    on = LLM(off.lm, max_total_tokens=2048, kv_cache_dtype=name)
    assert [o.outputs[0].token_ids for o in on.generate(_prompts(), GREEDY)] == oracle
    stats = on.cache_stats()
    assert stats["cached_tokens"] > 0
    assert stats["kv_bytes_per_token"] == on.engine.kv_pool.bytes_per_token()
    assert on.engine.kv_pool.kv_dtype == _storage(name)
    on.engine.check_no_leak()
    # Memory pressure: eviction and preemption with a quantized pool, same outputs, no leak.
    tight = LLM(off.lm, max_total_tokens=60, max_running_requests=4, kv_cache_dtype=name)
    assert [o.outputs[0].token_ids for o in tight.generate(_prompts(), GREEDY)] == oracle
    assert tight.cache_stats()["evicted_tokens"] > 0
    tight.engine.check_no_leak()


def test_llm_rejects_unknown_kv_cache_dtype(tiny_llama_dir):  # noqa: F811
    with pytest.raises(ConfigError, match="auto, int8, fp8_e4m3"):
        LLM(str(tiny_llama_dir), max_total_tokens=64, kv_cache_dtype="int4")
