"""The compiled decode step (radixkv.model.decode_kernels) against the layered forward, and the
fused rotary + K/V store (rope_kernels.rotate_store_) against rotate_ + the pool's set_kv."""

from __future__ import annotations

import pytest
import torch

from radixkv.errors import InvalidSlotError
from radixkv.memory import TokenToKVPool
from radixkv.model import build_forward_context, decode_kernels, forward_context, rope_kernels
from radixkv.model.layers import onednn_available, onednn_pack
from radixkv.model.llama import build_model
from tests.model_fixtures import tiny_radixkv_config

DTYPES = [torch.float32, torch.bfloat16]


def needs_step(dtype: torch.dtype, tiles: bool = False) -> None:
    if not onednn_available() or not decode_kernels.available(dtype, tiles=tiles):
        pytest.skip(f"no compiled decode step for {dtype} on this CPU")


def random_model(dtype: torch.dtype, bias: bool = False, tied: bool = False, seed: int = 0):
    """A 2-layer GQA Llama whose shapes are multiples of 64 (what the step's tiles need)."""
    cfg = tiny_radixkv_config(vocab_size=320, hidden_size=128, num_heads=4, num_kv_heads=2,
                              head_dim=32, intermediate_size=192, attention_bias=bias,
                              tie_word_embeddings=tied, max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(seed)
    q_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
              "model.norm.weight": (cfg.hidden_size,), "lm_head.weight":
              (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q_out, cfg.hidden_size),
                   p + "self_attn.k_proj.weight": (kv_out, cfg.hidden_size),
                   p + "self_attn.v_proj.weight": (kv_out, cfg.hidden_size),
                   p + "self_attn.o_proj.weight": (cfg.hidden_size, q_out),
                   p + "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
                   p + "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
                   p + "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
                   p + "input_layernorm.weight": (cfg.hidden_size,),
                   p + "post_attention_layernorm.weight": (cfg.hidden_size,)}
        if bias:
            shapes |= {p + f"self_attn.{x}_proj.bias": (n,)
                       for x, n in (("q", q_out), ("k", kv_out), ("v", kv_out))}
        if cfg.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (cfg.hidden_size,)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = torch.randn(shape, generator=gen) * (0.5 if "embed" in name else 0.1)
    return cfg, build_model(cfg, tensors.__getitem__, dtype, torch.device("cpu"))


def prefill(model, pool: TokenToKVPool, lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    slots = [pool.alloc(n) for n in lengths]
    ctx = build_forward_context(pool, slots, None, logits="last")
    ids = torch.randint(0, model.config.vocab_size, (sum(lengths),), generator=gen)
    with torch.inference_mode(), forward_context(ctx):
        model(ids)
    return slots


def both_paths(model, pool, cached, ids):
    """(step logits, layered logits, K/V of the new tokens per path) on the same batch."""
    new = [pool.alloc(1) for _ in cached]
    ctx = build_forward_context(pool, new, cached, logits="last")
    step = model.decode_step
    assert step is not None and step.accepts(ctx, torch.empty(len(cached), 1, dtype=model.
                                                              norm.weight.dtype))
    slots = torch.cat(new)
    with torch.inference_mode(), forward_context(ctx):
        fast = model(ids)
        kv_fast = [(k[slots].clone(), v[slots].clone())
                   for k, v in zip(pool.k_buffers, pool.v_buffers, strict=True)]
        model.decode_step = None
        try:
            ref = model(ids)
        finally:
            model.decode_step = step
        kv_ref = [(k[slots].clone(), v[slots].clone())
                  for k, v in zip(pool.k_buffers, pool.v_buffers, strict=True)]
    return fast, ref, kv_fast, kv_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bias", "tied"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_step_equals_layered_forward(dtype: torch.dtype, bias: bool, tied: bool,
                                     batch: int) -> None:
    needs_step(dtype)
    cfg, model = random_model(dtype, bias=bias, tied=tied, seed=batch)
    assert model.decode_step is not None, model.cpu_kernel
    assert "compiled step" in model.cpu_kernel
    pool = TokenToKVPool(4096, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    cached = prefill(model, pool, [37 + 101 * b for b in range(batch)])  # ragged, > one block
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=torch.Generator().manual_seed(5))
    fast, ref, kv_fast, kv_ref = both_paths(model, pool, cached, ids)
    assert fast.dtype == torch.float32 and fast.shape == (batch, cfg.vocab_size)
    if dtype == torch.float32:
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
        for (kf, vf), (kr, vr) in zip(kv_fast, kv_ref, strict=True):
            torch.testing.assert_close(kf, kr, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vf, vr, atol=1e-5, rtol=1e-5)
    else:  # bf16: a few units in the last place of the logits' magnitude
        scale = ref.abs().max().item()
        assert (fast - ref).abs().max().item() <= 0.05 * scale
        assert (fast.argmax(-1) == ref.argmax(-1)).all()
        for (kf, _), (kr, _) in zip(kv_fast, kv_ref, strict=True):
            assert (kf.float() - kr.float()).abs().max().item() <= 0.05 * kr.abs().max().item()
    assert pool.available_size() == 4096 - sum(37 + 101 * b for b in range(batch)) - batch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_dense_weights_step_equals_layered_forward(monkeypatch, dtype: torch.dtype,
                                                   batch: int) -> None:
    """Without oneDNN packing the step multiplies the dense weights on its own row kernel:
    what bfloat16 models use on CPUs without native bf16 GEMMs."""
    needs_step(dtype)
    monkeypatch.setenv("RADIXKV_ONEDNN", "0")
    cfg, model = random_model(dtype, bias=True, seed=11)
    assert model.decode_step is not None and model.decode_step.kinds == {"dense"}
    pool = TokenToKVPool(2048, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    cached = prefill(model, pool, [70, 131, 5, 40][:batch])
    ids = torch.tensor([3, 200, 17, 99][:batch])
    fast, ref, kv_fast, kv_ref = both_paths(model, pool, cached, ids)
    tol = 1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max().item()
    assert (fast - ref).abs().max().item() <= tol
    assert (fast.argmax(-1) == ref.argmax(-1)).all()
    for (kf, vf), (kr, vr) in zip(kv_fast, kv_ref, strict=True):
        assert (kf.float() - kr.float()).abs().max().item() <= max(tol, 1e-5)
        assert (vf.float() - vr.float()).abs().max().item() <= max(tol, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_decode_equal_over_many_steps(dtype: torch.dtype) -> None:
    """Ten greedy steps through the step pick the tokens the layered forward picks."""
    needs_step(dtype)
    cfg, model = random_model(dtype, seed=3)
    pool = TokenToKVPool(2048, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    step = model.decode_step

    def run(use_step: bool) -> list[int]:
        model.decode_step = step if use_step else None
        slots = prefill(model, pool, [50], seed=9)[0]
        tok, out = 7, []
        for _ in range(10):
            new = pool.alloc(1)
            ctx = build_forward_context(pool, [new], [slots], logits="last")
            with torch.inference_mode(), forward_context(ctx):
                tok = int(model(torch.tensor([tok])).argmax(-1))
            out.append(tok)
            slots = torch.cat([slots, new])
        pool.free(slots)
        return out

    try:
        assert run(True) == run(False)
    finally:
        model.decode_step = step


def test_bad_slot_raises_before_anything_is_written() -> None:
    needs_step(torch.float32)
    cfg, model = random_model(torch.float32)
    pool = TokenToKVPool(512, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    cached = prefill(model, pool, [20])
    before = [b.clone() for b in (*pool.k_buffers, *pool.v_buffers)]
    for new, idx in ((torch.tensor([pool.num_slots + 7]), None),
                     (pool.alloc(1), torch.tensor([1, 2, pool.num_slots + 3]))):
        ctx = build_forward_context(pool, [new], cached, logits="last")
        if idx is not None:
            ctx.kv_indices = torch.cat([ctx.kv_indices[:-3], idx])
        assert model.decode_step.accepts(ctx, torch.empty(1, 1))
        with pytest.raises(InvalidSlotError), torch.inference_mode(), forward_context(ctx):
            model(torch.tensor([3]))
        for b, ref in zip((*pool.k_buffers, *pool.v_buffers), before, strict=True):
            assert torch.equal(b.view(torch.int32), ref.view(torch.int32))  # bits: NaN-safe


def test_other_batches_take_the_layered_path() -> None:
    needs_step(torch.float32)
    cfg, model = random_model(torch.float32)
    pool = TokenToKVPool(512, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    cached = prefill(model, pool, [9] * 5)
    step = model.decode_step
    five = build_forward_context(pool, [pool.alloc(1) for _ in range(5)], cached)
    assert not step.accepts(five, torch.empty(5, 1))  # more than MAX_ROWS rows
    extend = build_forward_context(pool, [pool.alloc(2)], cached[:1])
    assert not step.accepts(extend, torch.empty(2, 1))
    quant = TokenToKVPool(64, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                          kv_cache_dtype="int8")
    assert not step.accepts(build_forward_context(quant, [quant.alloc(1)]), torch.empty(1, 1))
    model.configure_cpu_kernels(fast=False)
    assert model.decode_step is None
    model.configure_cpu_kernels()
    assert model.decode_step is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (192, 128), (128, 576), (960, 576)])
def test_packed_layout_is_the_documented_tiling(dtype: torch.dtype,
                                                shape: tuple[int, int]) -> None:
    """`layout_matches` says exactly whether the bytes oneDNN packed are `tiles_of(weight)`
    (checked here on random values, independently of the function). The 64-output tiling is
    what oneDNN picks for the shapes of SmolLM2 on AVX-512 and AVX2; for some other shapes it
    may block differently (on AVX2, O = 192 gets 16-output blocks), and then the check must
    say no so that the model keeps the layered forward."""
    needs_step(dtype, tiles=True)
    w = torch.randn(shape).to(dtype)
    packed = onednn_pack(w)
    raw = decode_kernels._raw(packed, dtype)
    want = decode_kernels.tiles_of(w)
    tiled = raw.numel() == want.numel() and torch.equal(raw.view(want.shape), want)
    assert decode_kernels.layout_matches(packed, shape, dtype) == tiled
    if shape != (192, 128):
        assert tiled
    assert not decode_kernels.layout_matches(packed, (shape[0], shape[1] + 64), dtype)


# ---- fused rotary + K/V store ----------------------------------------------------------------
@pytest.mark.skipif(not rope_kernels.available(), reason="the rotary kernel cannot build")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 300])
def test_rotate_store_equals_rotate_then_set_kv(dtype: torch.dtype, n: int) -> None:
    hq, hkv, d = 6, 2, 32
    gen = torch.Generator().manual_seed(n)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    ang = torch.rand(n, 1, d // 2, generator=gen) * 6
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    pool_a = TokenToKVPool(512, 1, hkv, d, dtype=dtype)
    pool_b = TokenToKVPool(512, 1, hkv, d, dtype=dtype)
    slots = torch.randperm(512, generator=gen)[:n] + 1
    ref = qkv.clone().view(n, -1, d)
    rope_kernels.rotate_(ref[:, :hq + hkv], cos, sin)
    pool_a.set_kv(0, slots, ref[:, hq:hq + hkv], ref[:, hq + hkv:])
    heads = qkv.view(n, -1, d)
    k_buf, v_buf = pool_b.get_kv_buffer(0)
    k_buf.zero_()  # (fresh buffers are uninitialised: NaN bytes would fail torch.equal)
    assert rope_kernels.supports_store(heads, cos, slots, k_buf, v_buf)
    rope_kernels.rotate_store_(heads, cos, sin, slots, k_buf, v_buf)
    assert torch.equal(heads, ref)
    assert torch.equal(k_buf[slots], pool_a.k_buffers[0][slots])
    assert torch.equal(v_buf[slots], pool_a.v_buffers[0][slots])
    bad = slots.clone()
    bad[-1] = 513  # one past the buffers' last row
    kept = (heads.clone(), k_buf.clone())
    with pytest.raises(InvalidSlotError):
        rope_kernels.rotate_store_(heads, cos, sin, bad, k_buf, v_buf)
    assert torch.equal(heads, kept[0]) and torch.equal(k_buf, kept[1])


@pytest.mark.parametrize("x16", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_step_runs_quantized_weights_like_the_layered_forward(tmp_path, monkeypatch, mode: str,
                                                              dtype: torch.dtype,
                                                              x16: str) -> None:
    """Group-quantized layers (and a quantized tied LM head) run in the step on the packed
    low-bit row kernel: the same numbers as the layered forward's QuantLinear calls, in float32
    and in bfloat16 (what dtype="auto" picks for quantized weights on CPUs with native bf16).
    With the int16-activation row kernel (x16, both paths) the two stay within a few of x's
    rounding steps: the paths' float32 inputs agree only to ~1e-6, which can move a value of x
    across a rounding boundary of its 16-bit code."""
    from radixkv.model import load_model
    from radixkv.model import quant_kernels as qk
    from tests.model_fixtures import make_tiny_hf

    needs_step(dtype)
    if x16 == "1" and not qk.simd():
        pytest.skip("the x16 kernel is part of the SIMD build")
    monkeypatch.setenv("RADIXKV_QUANT_X16", x16)
    make_tiny_hf(tmp_path / "hf", "llama", tie_word_embeddings=True, attention_bias=True)
    lm = load_model(str(tmp_path / "hf"), quantization=mode, dtype=dtype)
    model, cfg = lm.model, lm.config
    assert model.quant_head is not None and model.decode_step is not None, model.cpu_kernel
    assert model.decode_step._qgemm == qk.qgemm_function(x16 == "1")
    assert {m.x16 for m in model.modules() if hasattr(m, "x16")} == {x16 == "1"}
    pool = TokenToKVPool(2048, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=lm.dtype)
    cached = prefill(model, pool, [23, 70, 5, 130])
    ids = torch.tensor([3, 50, 200, 7])
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a last-bit rounding apart at most
    for batch in (1, 4):
        fast, ref, kv_fast, kv_ref = both_paths(model, pool, cached[:batch], ids[:batch])
        t = tol if x16 == "0" else max(tol, 1e-3 * float(ref.abs().max()))
        torch.testing.assert_close(fast, ref, atol=t, rtol=tol)
        for (kf, vf), (kr, vr) in zip(kv_fast, kv_ref, strict=True):
            tk = tol / 10 if x16 == "0" else max(tol / 10, 1e-3 * float(kr.abs().max()))
            torch.testing.assert_close(kf.float(), kr.float(), atol=tk, rtol=tol / 10)
            tv = tol / 10 if x16 == "0" else max(tol / 10, 1e-3 * float(vr.abs().max()))
            torch.testing.assert_close(vf.float(), vr.float(), atol=tv, rtol=tol / 10)
