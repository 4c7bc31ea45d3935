"""The default model (SmolLM2-135M-Instruct Q4_1) against transformers loading the same GGUF.

Float32 logits must agree within 1e-3 for a ragged batch in one forward, for an extend over a
cached prefix, and greedy decoding through the paged decode path must pick HF's tokens.
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

pytestmark = [pytest.mark.slow, needs_default_model]

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


def test_config_facts(default_lm: Any) -> None:  # noqa: F811
    c = default_lm.config
    assert (c.architecture, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama", 30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.rope_theta == 1e5 and abs(c.rms_norm_eps - 1e-5) < 1e-9
    assert c.tie_word_embeddings and c.rope_scaling is None and not c.attention_bias
    im_end = default_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in c.eos_token_ids and default_lm.tokenizer.eos_token_id in c.eos_token_ids


def test_chat_template(default_lm: Any) -> None:  # noqa: F811
    ids = default_lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert default_lm.tokenizer.decode(ids) == expected
    assert ids[0] == default_lm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    no_prompt = default_lm.apply_chat_template([{"role": "user", "content": "Hi"}],
                                               add_generation_prompt=False)
    assert ids[:len(no_prompt)] == no_prompt and len(no_prompt) < len(ids)


def test_ragged_prefill_matches_hf(default_lm: Any, hf_default: Any,  # noqa: F811
                                   prompts: list[list[int]]) -> None:
    runner = PagedRunner(default_lm.model, default_lm.config)
    batch = prompts[:3]
    ours, _ = runner.forward(batch, logits="all")  # 3 ragged prompts, one extend forward
    ref = torch.cat([hf_logits(hf_default, p) for p in batch])
    assert ours.shape == ref.shape == (sum(map(len, batch)), 49152)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


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


def test_forward_context_scope(default_lm: Any) -> None:  # noqa: F811
    with pytest.raises(RuntimeError, match="forward context"):
        get_forward_context()
    runner = PagedRunner(default_lm.model, default_lm.config, num_slots=8)
    a = build_forward_context(runner.pool, [runner.take(1)])
    b = build_forward_context(runner.pool, [runner.take(2)])
    assert isinstance(a, ForwardContext) and a.is_decode and not b.is_decode
    with forward_context(a):
        with forward_context(b):
            assert get_forward_context() is b
        assert get_forward_context() is a
    with pytest.raises(RuntimeError):
        get_forward_context()
    with pytest.raises(RuntimeError), torch.inference_mode():
        default_lm.model(torch.tensor([1]))  # no context
