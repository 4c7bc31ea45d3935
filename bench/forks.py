"""KV memory of forks: n parallel samples and beam search vs the same number of independent
requests.

For each case the engine runs alone and the bench records, between steps, the peak of
- held: KV slots pinned by running requests (locked tree nodes + their own slots), the memory a
  request really needs;
- used: held + unlocked cached slots (reclaimable by eviction);
and the prompt tokens computed. Forked: `SamplingParams(n=k)` / `BeamSearchParams(beam_width=k)`
(the prompt prefilled once, shared through the tree). Independent: k separate requests of the same
prompt, with the prefix cache off (each holds its own prompt KV) and on (the radix tree lets
them share the prompt too, once one has computed it). Also draws the KV memory map of a forked
request mid-run (`Engine.sequence_slots` into `radixkv.tools.viz.memory_map`).
Prints figures measured in this one run; asserts nothing.
Run: `.venv/bin/python bench/forks.py [--prompt 256] [--max-tokens 32] [--page-size 1]
[--model PATH]` (default: a tiny random Llama, since slot counts do not depend on the weights).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np
import torch

from radixkv import BeamSearchParams, SamplingParams
from radixkv.engine import Engine, EngineConfig


def tiny_model(folder: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from radixkv.model import load_model, load_tokenizer

    tok = load_tokenizer(None)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(folder)


def measure(lm: Any, prompt: list[int], params: list[Any], cache: bool, page_size: int,
            pool: int) -> dict[str, float]:
    eng = Engine(lm, EngineConfig(max_total_tokens=pool, page_size=page_size,
                                  enable_prefix_cache=cache, max_running_requests=64))
    for p in params:
        eng.add_request(prompt, p)
    held = used = 0
    t0 = time.perf_counter()
    while eng.has_work():
        eng.step()
        s = eng.stats()
        used = max(used, s["pool_used"])
        held = max(held, s["pool_used"] - s["evictable_tokens"])
    eng.check_no_leak()
    s = eng.stats()
    return {"held": held, "used": used, "prefill": s["prefill_tokens_computed"],
            "preempt": s["preemptions"], "seconds": time.perf_counter() - t0}


def draw_map(lm: Any, page_size: int) -> str:
    """The pool of an n=4 request (prompt 22, page_size) three decode steps after its fork."""
    from radixkv.tools.viz import format_memory_map, memory_map

    eng = Engine(lm, EngineConfig(max_total_tokens=96, page_size=page_size))
    prompt = np.random.default_rng(1).integers(10, 2000, 22).tolist()
    req = eng.add_request(prompt, SamplingParams(n=4, seed=0, max_tokens=8, ignore_eos=True))
    for _ in range(4):
        eng.step()
    mm = memory_map(eng.cache, eng.kv_pool, eng.sequence_slots(req.rid))
    text = format_memory_map(mm, width=48)
    while eng.has_work():
        eng.step()
    eng.check_no_leak()
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--model", default=None, help="model path (default: tiny random Llama)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from radixkv.model import load_model

            lm = load_model(args.model)
        else:
            lm = tiny_model(tmp)
        prompt = np.random.default_rng(0).integers(10, 2000, args.prompt).tolist()
        t = args.max_tokens
        pool = 16 * (args.prompt + t) + 64  # room for 16 independent requests: no preemption
        print(f"prompt {args.prompt} tokens, max_tokens {t}, page_size {args.page_size}, "
              f"pool {pool} slots; peak KV slots (held = pinned by running requests, used = "
              f"held + reclaimable cache)")
        print(f"{'case':<42} {'held':>6} {'used':>6} {'prefill':>8} {'held/forked':>11}")
        for kind, k in (("n", 1), ("n", 4), ("n", 16), ("beam", 4), ("beam", 16)):
            if kind == "n":
                forked = [SamplingParams(n=k, seed=0, max_tokens=t, ignore_eos=True)]
                alone = [SamplingParams(seed=i, max_tokens=t, ignore_eos=True) for i in range(k)]
                name = f"n={k}"
            else:
                forked = [BeamSearchParams(beam_width=k, max_tokens=t, ignore_eos=True)]
                alone = [SamplingParams(temperature=0.0, max_tokens=t, ignore_eos=True)] * k
                name = f"beam width {k}"
            rows = [(f"{name}: forked", measure(lm, prompt, forked, True, args.page_size, pool))]
            if k > 1 or kind == "n":
                rows += [(f"{name}: {k} independent, cache off",
                          measure(lm, prompt, alone, False, args.page_size, pool)),
                         (f"{name}: {k} independent, cache on",
                          measure(lm, prompt, alone, True, args.page_size, pool))]
            base = rows[0][1]["held"]
            for label, r in rows:
                print(f"{label:<42} {r['held']:>6} {r['used']:>6} {r['prefill']:>8} "
                      f"{r['held'] / base:>10.2f}x")
        print("\nKV memory map of an n=4 request (prompt 22 tokens, page_size 4) 3 steps after "
              "its fork: the prompt's pages are one tree node read by all 4 samples, each sample "
              "owns its copy of the partial last page and its own tokens\n")
        print(draw_map(lm, 4))


if __name__ == "__main__":
    main()
