"""Shared fixtures for engine tests: a tiny random Llama saved as an HF folder, and the default
model. Import the fixtures from a test module to use them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model_fixtures import default_model_available, needs_default_model

__all__ = ["default_model_available", "needs_default_model", "tiny_llama_dir"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (GQA 4/2 heads) with the default model's tokenizer, saved offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from radixkv.model import load_tokenizer

    tok = load_tokenizer(None)
    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits spread: fewer near-ties between greedy candidates
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
