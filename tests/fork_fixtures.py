"""Helpers for the fork tests (parallel samples, beam search): slot accounting while requests
run, and a tiny random Llama that often predicts EOS (so beams finish at different steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radixkv.engine import Engine, Status

__all__ = ["assert_slot_accounting", "eos_llama_dir", "own_slots"]


def own_slots(engine: Engine) -> dict[int, np.ndarray]:
    """Slots [cached_len, kv_len) each running sequence owns, by id(request)."""
    out = {}
    for req in engine.scheduler.running:
        row = engine.req_pool.req_to_token[req.row, :req.kv_len].to(torch.int64).numpy()
        out[id(req)] = row[req.cached_len:]
    return out


def assert_slot_accounting(engine: Engine) -> None:
    """Between steps: every slot is free, in the tree or owned by exactly one running sequence
    (so a pruned beam or a finished sample left nothing behind), and sequences of one request
    read the same slots for the part they share in the tree."""
    pool = engine.kv_pool
    tree = engine.cache.cached_slots()
    owned = list(own_slots(engine).values())
    own = np.concatenate(owned) if owned else np.empty(0, dtype=np.int64)
    assert np.unique(own).size == own.size, "a slot is owned by two sequences"
    assert not np.isin(own, tree).any(), "a sequence owns a slot the tree holds"
    assert not pool.is_free(own).any(), "a sequence owns a free slot"
    assert pool.available_size() + tree.size + own.size == pool.num_slots, (
        f"leak: free {pool.available_size()} + tree {tree.size} + owned {own.size} != "
        f"{pool.num_slots}")
    for req in engine.scheduler.running:
        row = engine.req_pool.req_to_token[req.row, :req.cached_len].to(torch.int64).numpy()
        m = engine.cache.match_prefix(req.token_ids()[:req.cached_len], req.namespace,
                                      record=False)
        if engine.cache.retains_slots:
            assert m.length == req.cached_len and np.array_equal(m.slots.numpy(), row), \
                "a sequence's shared prefix is not the tree's"
    for req in engine.requests.values():
        if req.status is Status.FORKED:
            assert req.row == -1 and req.node is None, "a forked parent still holds memory"


@pytest.fixture(scope="session")
def eos_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """tests.engine_fixtures' tiny Llama with the EOS row of the (tied) LM head pointed along the
    mean final hidden state, so EOS is a top-8 candidate at about a third of positions."""
    from transformers import AutoModelForCausalLM

    from radixkv.model import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    rng = np.random.default_rng(1)
    with torch.no_grad():
        h = torch.cat([model.model(torch.tensor([rng.integers(10, 2000, 16).tolist()]))
                       .last_hidden_state[0] for _ in range(20)])  # [N, D]
        d = h.mean(0)
        w = model.lm_head.weight
        w[eos] = 4.5 * d / d.norm() * w.norm(dim=1).mean()
    path = tmp_path_factory.mktemp("eos_llama")
    model.save_pretrained(path)
    load_tokenizer(None).save_pretrained(path)
    return path
