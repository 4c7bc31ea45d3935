"""The model runtime against transformers.

Fast: the layers (RMSNorm, RoPE incl. its table growth, the half-precision matmul policy) and
the forward context. Slow (`-m slow`): the default model (SmolLM2-135M-Instruct Q4_1) against
transformers loading the same GGUF: float32 logits within 1e-3 for a ragged batch in one forward
and for an extend over a cached prefix, and greedy decoding through the paged decode path picks
HF's tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from radixkv.model import (
    ForwardContext,
    build_forward_context,
    forward_context,
    get_forward_context,
)
from tests.model_fixtures import (  # noqa: F401  (fixtures)
    PagedRunner,
    default_lm,
    hf_default,
    needs_default_model,
)

ATOL = 1e-3
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Radix trees share prefixes. A radix tree of token sequences lets requests that begin with the"
    " same system prompt reuse",
]


def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [n, vocab]


@pytest.fixture(scope="module")
def prompts(default_lm: Any) -> list[list[int]]:  # noqa: F811
    tok = default_lm.tokenizer
    chat = default_lm.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    return [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS] + [chat]


@pytest.mark.slow
@needs_default_model
def test_config_facts(default_lm: Any) -> None:  # noqa: F811
    c = default_lm.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama", 30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.rope_theta == 1e5 and abs(c.rms_norm_eps - 1e-5) < 1e-9
    assert c.tie_word_embeddings and c.rope_scaling is None and not c.attention_bias
    im_end = default_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in c.eos_token_ids and default_lm.tokenizer.eos_token_id in c.eos_token_ids


@pytest.mark.slow
@needs_default_model
def test_chat_template(default_lm: Any) -> None:  # noqa: F811
    ids = default_lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert default_lm.tokenizer.decode(ids) == expected
    assert ids[0] == default_lm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    no_prompt = default_lm.apply_chat_template([{"role": "user", "content": "Hi"}],
                                               add_generation_prompt=False)
    assert ids[:len(no_prompt)] == no_prompt and len(no_prompt) < len(ids)


@pytest.mark.slow
@needs_default_model
def test_ragged_prefill_matches_hf(default_lm: Any, hf_default: Any,  # noqa: F811
                                   prompts: list[list[int]]) -> None:
    runner = PagedRunner(default_lm.model, default_lm.config)
    batch = prompts[:3]
    ours, _ = runner.forward(batch, logits="all")  # 3 ragged prompts, one extend forward
    ref = torch.cat([hf_logits(hf_default, p) for p in batch])
    assert ours.shape == ref.shape == (sum(map(len, batch)), 49152)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.slow
@needs_default_model
def test_extend_over_cached_prefix(default_lm: Any, hf_default: Any,  # noqa: F811
                                   prompts: list[list[int]]) -> None:
    """Prefix in one forward, the rest in a second one that reads the prefix from the pool and
    also carries a request with no cached prefix (a mixed extend batch); both must give the
    single-pass logits."""
    long, other = prompts[2], prompts[0]
    cut = len(long) // 2
    runner = PagedRunner(default_lm.model, default_lm.config)
    prefix_last, (prefix_slots,) = runner.forward([long[:cut]], logits="last")
    rest, _ = runner.forward([long[cut:], other], cached=[prefix_slots, None], logits="all")
    full = hf_logits(hf_default, long)
    torch.testing.assert_close(prefix_last[0], full[cut - 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(rest[:len(long) - cut], full[cut:], atol=ATOL, rtol=0)
    torch.testing.assert_close(rest[len(long) - cut:], hf_logits(hf_default, other), atol=ATOL,
                               rtol=0)


@pytest.mark.slow
@needs_default_model
def test_greedy_decode_matches_hf(default_lm: Any, hf_default: Any,  # noqa: F811
                                  prompts: list[list[int]]) -> None:
    """Batched greedy decoding (requests at different positions) through the decode kernel.

    HF scores prompt + our tokens in one pass: its argmax at every step must be the token we
    picked (so HF's own greedy decoding produces the same sequence), and its logits ours.
    """
    steps = 5
    batch = [prompts[0], prompts[1], prompts[3]]
    runner = PagedRunner(default_lm.model, default_lm.config)
    generated, step_logits = runner.greedy(batch, steps)  # [steps, B, vocab]
    for b, (prompt, gen) in enumerate(zip(batch, generated, strict=True)):
        ref = hf_logits(hf_default, prompt + gen[:-1])[len(prompt) - 1:]  # [steps, vocab]
        assert ref.argmax(-1).tolist() == gen
        torch.testing.assert_close(step_logits[:, b], ref, atol=ATOL, rtol=0)


def test_forward_context_scope() -> None:
    from radixkv.memory import TokenToKVPool

    with pytest.raises(RuntimeError, match="forward context"):
        get_forward_context()
    pool = TokenToKVPool(8, 1, 1, 2)
    a = build_forward_context(pool, [torch.tensor([3])])
    b = build_forward_context(pool, [torch.tensor([4, 5])])
    assert isinstance(a, ForwardContext) and a.is_decode and not b.is_decode
    with forward_context(a):
        with forward_context(b):
            assert get_forward_context() is b
        assert get_forward_context() is a
    with pytest.raises(RuntimeError):
        get_forward_context()


def test_build_forward_context_layout() -> None:
    """Hand-computed CSR layout: request 0 has 3 cached + 2 new tokens, request 1 has 1 new."""
    from radixkv.memory import TokenToKVPool

    pool = TokenToKVPool(16, 1, 1, 2)
    ctx = build_forward_context(pool, [torch.tensor([9, 4]), torch.tensor([7])],
                                [torch.tensor([1, 2, 3]), None], logits="last")
    assert not ctx.is_decode
    assert ctx.positions.tolist() == [3, 4, 0]
    assert ctx.out_slots.tolist() == [9, 4, 7]
    assert ctx.qo_indptr.tolist() == [0, 2, 3]
    assert ctx.kv_indptr.tolist() == [0, 5, 6]
    assert ctx.kv_indices.tolist() == [1, 2, 3, 9, 4, 7]
    assert ctx.logits_indices.tolist() == [1, 2]
    assert all(t.dtype == torch.int64 for t in (ctx.positions, ctx.out_slots, ctx.qo_indptr,
                                               ctx.kv_indptr, ctx.kv_indices,
                                               ctx.logits_indices))
    with pytest.raises(ValueError):
        build_forward_context(pool, [])


def test_model_needs_context() -> None:
    from radixkv.model.llama import LlamaForCausalLM
    from tests.model_fixtures import tiny_radixkv_config

    model = LlamaForCausalLM(tiny_radixkv_config()).eval()
    with pytest.raises(RuntimeError, match="forward context"), torch.inference_mode():
        model(torch.tensor([1]))


# ---- layers against transformers' own implementations -------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from radixkv.model.layers import RMSNorm

    torch.manual_seed(0)
    x = (torch.randn(7, 64) * 3).to(dtype)
    w = torch.rand(64) + 0.5
    ref, ours = LlamaRMSNorm(64, eps=1e-5), RMSNorm(64, 1e-5)
    with torch.no_grad():
        ref.weight.copy_(w)
        ours.weight.copy_(w)
    ref, ours = ref.to(dtype), ours.to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6 if dtype == torch.float32 else 0,
                                   rtol=1e-5 if dtype == torch.float32 else 0)


def test_rotary_matches_transformers_and_grows() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from radixkv.model.layers import RotaryEmbedding, apply_rotary
    from tests.model_fixtures import tiny_radixkv_config

    cfg = tiny_radixkv_config(max_position_embeddings=32)  # head_dim 16, theta 10000
    rope = RotaryEmbedding(cfg)
    positions = torch.tensor([0, 5, 31, 40, 100])  # beyond the table: it grows on the CPU
    cos, sin = rope(positions, torch.float32)  # [N, 1, D/2]
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angles = positions[:, None].double() * inv  # [N, D/2]
    torch.testing.assert_close(cos[:, 0].double(), angles.cos(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin[:, 0].double(), angles.sin(), atol=1e-7, rtol=0)
    # HF's rotate-half form with full-width cos/sin [N, D] on q, k [1, H, N, D]
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    cos_full = torch.cat([cos[:, 0], cos[:, 0]], -1)
    sin_full = torch.cat([sin[:, 0], sin[:, 0]], -1)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                        cos_full[None], sin_full[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_ref[0].transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_ref[0].transpose(0, 1))


def test_half_matmul_upcast_equals_native() -> None:
    """The float32 route for bf16 products gives the bf16 GEMM's numbers (float32 accumulation,
    one rounding), to within one bf16 rounding step."""
    from radixkv.model.layers import linear

    torch.manual_seed(0)
    x = torch.randn(9, 64).bfloat16()
    w, b = torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    exact = (x.double() @ w.double().T + b.double())
    native = linear(x, w, b)
    upcast = linear(x, w, b, upcast_min_rows=4)
    assert upcast.dtype == native.dtype == torch.bfloat16
    assert linear(x[:3], w, b, upcast_min_rows=4).equal(native[:3])  # below the threshold
    ulp = exact.abs() * 2.0 ** -7 + 1e-3
    assert ((upcast.double() - exact).abs() <= ulp).all()
    assert ((native.double() - exact).abs() <= ulp).all()
