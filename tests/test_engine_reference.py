"""The engine on the default model agrees with Hugging Face transformers (the oracle).

Greedy token ids from `LLM.generate` equal transformers' `generate(do_sample=False)` on the same
GGUF, for 8 prompts x 32 new tokens, run one at a time and as one batch, with the prefix cache
on (the batch shares a system prompt, so later requests read cached KV) and off.
"""

from __future__ import annotations

import os

import pytest
import torch

from radixkv import LLM, SamplingParams
from tests.engine_fixtures import needs_default_model

pytestmark = [needs_default_model, pytest.mark.slow]

NEW_TOKENS = 32
SYSTEM = "You are a concise assistant. Answer in one sentence."
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What does a bee make?",
    "Translate 'thank you' to Spanish.",
]
RAW = ["The history of the printing press begins", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_total_tokens=8192)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    chats = [llm.lm.apply_chat_template([{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": q}]) for q in QUESTIONS]
    return chats + [llm.tokenizer.encode(t) for t in RAW]


@pytest.fixture(scope="module")
def hf_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    path = llm.lm.path
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    eos = list(llm.lm.config.eos_token_ids)
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                 pad_token_id=eos[0])
            new = gen[0, len(p):].tolist()
            # transformers pads after EOS; the engine stops at the EOS it emits
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
            outs.append(new[:cut])
    return outs


PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)


def test_one_at_a_time_matches_transformers(llm, prompts, hf_tokens):
    for p, expected in zip(prompts, hf_tokens, strict=True):
        assert llm.generate([p], PARAMS)[0].outputs[0].token_ids == expected
    llm.engine.check_no_leak()


def test_batch_with_cache_matches_transformers(llm, prompts, hf_tokens):
    llm.engine.cache.reset()
    outs = llm.generate(prompts, PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens
    assert sum(o.num_cached_tokens for o in outs) > 0  # the shared system prompt was reused
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == ("stop" if len(c.token_ids) < NEW_TOKENS else "length")
    llm.engine.check_no_leak()


def test_chat_api_and_cache_off_match(llm, prompts, hf_tokens):
    off = LLM(max_total_tokens=4096, enable_prefix_cache=False)
    outs = off.chat([[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
                     for q in QUESTIONS], PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == hf_tokens[:len(QUESTIONS)]
    assert all(o.num_cached_tokens == 0 for o in outs)
    off.engine.check_no_leak()
