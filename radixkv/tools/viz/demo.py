"""The demo tree `radixkv viz` draws: a few chat prompts served by radixkv's real scheduler.

No model runs. `radixkv.engine.scheduler.Scheduler` picks every step's batch over a real
`RadixCache`, `TokenToKVPool` and `ReqToTokenPool` exactly as in the engine (admission, prefix
matching and locking, prefill, caching the prompt at the chunk end, eviction under pressure,
release into the tree at finish); where a forward pass and the sampler would produce the next
token, the request is fed the next token of a scripted answer (`DEMO_ANSWERS`). The pool has one
layer, one KV head and head_dim 1, so the buffers are tiny while every slot moves as in a real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from radixkv.engine.request import Request
from radixkv.engine.sampling_params import SamplingParams
from radixkv.engine.scheduler import Scheduler
from radixkv.errors import ConfigError
from radixkv.memory import RadixCache, ReqToTokenPool, TokenToKVPool
from radixkv.tools.viz.tokenizers import encode_chat

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and precisely."
# Chat requests, in arrival order: (name, messages). Two share a user question's beginning, one
# conversation comes back for a second turn: the tree shows the shared system prompt, the split
# where the questions diverge, and the second turn extending the first.
DEMO_CHATS: list[tuple[str, list[dict[str, str]]]] = [
    ("alice-1", [{"role": "system", "content": SYSTEM_PROMPT},
                 {"role": "user", "content": "What is a radix tree?"}]),
    ("bob", [{"role": "system", "content": SYSTEM_PROMPT},
             {"role": "user", "content": "What is paged attention?"}]),
    ("alice-2", [{"role": "system", "content": SYSTEM_PROMPT},
                 {"role": "user", "content": "What is a radix tree?"},
                 {"role": "assistant", "content": "A trie whose edges hold runs of tokens."},
                 {"role": "user", "content": "Why does it help LLM serving?"}]),
    ("carol", [{"role": "system", "content": SYSTEM_PROMPT},
               {"role": "user", "content": "Explain KV caching in one sentence."}]),
]
# Still running while the pictures are taken: its cached prefix is locked, its own slots are its.
DEMO_RUNNING = ("dave", [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": "What is a radix sort?"}])
DEMO_DECODED = 6  # tokens the running request has generated so far
# What each request "generates": no model runs, so the scripted answer stands in for sampling.
DEMO_ANSWERS: dict[str, str] = {
    "alice-1": "A trie whose edges hold runs of tokens.",
    "bob": "Attention that reads keys and values from scattered fixed-size slots.",
    "alice-2": "Requests that share a prefix reuse its KV instead of recomputing it.",
    "carol": "It keeps each token's keys and values so later tokens skip recomputing them.",
    "dave": "It sorts keys digit by digit, from the least significant digit up.",
}


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text, without the special tokens an HF tokenizer may add."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # a tokenizer without that keyword (e.g. WordTokenizer)
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


@dataclass
class DemoTree:
    """What `build_demo` made: the cache, its pool, the running request's slots, a step log.

    `scheduler` still holds the running request (its row, its lock on the tree, its own slots).
    """

    cache: RadixCache
    pool: TokenToKVPool
    running: dict[str, Any]  # request name -> all slots it reads (CPU int64 tensor)
    prompts: dict[str, list[int]]
    log: list[str]
    scheduler: Scheduler | None = field(default=None, repr=False)


def _step(sched: Scheduler, answers: dict[str, list[int]]) -> None:
    """One engine step without a model: schedule, then the end-of-step memory work."""
    batch = sched.schedule()
    if batch is None:
        return
    tokens = [answers[it.req.rid][len(it.req.output_ids)] for it in batch.items
              if it.samples_next]
    for req in sched.postprocess(batch, tokens):  # the scheduler's own end-of-step work
        if len(req.output_ids) >= len(answers[req.rid]):
            sched.finish(req, "stop")  # as at EOS: the KV goes into the tree


def _serve_demo(tokenizer: Any, num_slots: int, with_running: bool) -> DemoTree:
    prompts = {name: encode_chat(tokenizer, msgs) for name, msgs in DEMO_CHATS}
    run_name, run_msgs = DEMO_RUNNING
    prompts[run_name] = encode_chat(tokenizer, run_msgs)
    answers = {name: encode_text(tokenizer, text) or [0] for name, text in DEMO_ANSWERS.items()}
    answers[run_name] = (answers[run_name] * (DEMO_DECODED + 1))[:max(DEMO_DECODED + 1,
                                                               len(answers[run_name]))]
    longest = max(len(prompts[n]) + len(answers[n]) for n in prompts)
    pool = TokenToKVPool(num_slots, num_layers=1, num_kv_heads=1, head_dim=1)
    cache = RadixCache(pool)
    sched = Scheduler(cache, pool, ReqToTokenPool(1, longest + 1), policy="fcfs",
                      max_running_requests=1)
    log: list[str] = []

    def serve(name: str, until: int) -> Request:
        """Add a request and step until it has generated `until` tokens (or finished)."""
        req = Request(name, np.asarray(prompts[name], dtype=np.int32),
                      SamplingParams(temperature=0.0, max_tokens=len(answers[name]),
                                     ignore_eos=True))
        sched.add(req)
        while not req.finished and len(req.output_ids) < until:
            evicted = cache.stats().evicted_tokens
            _step(sched, answers)
            if cache.stats().evicted_tokens > evicted:
                log.append(f"  pool short of slots: the scheduler evicted "
                           f"{cache.stats().evicted_tokens - evicted} cached tokens (LRU leaves)")
        return req

    for name, _ in DEMO_CHATS:
        req = serve(name, len(answers[name]))
        n = len(req.prompt_ids)
        log.append(f"{name}: {n} prompt tokens, {req.prefix_hit} matched in the tree, "
                   f"{n - req.prefix_hit} computed, {len(req.output_ids)} answer tokens; "
                   "finished and cached")
    if not with_running:
        return DemoTree(cache, pool, {}, prompts, log, sched)
    req = serve(run_name, DEMO_DECODED)
    n = len(req.prompt_ids)
    row = sched.req_pool.req_to_token[req.row, :req.kv_len].to(torch.int64).cpu()
    log.append(f"req:{run_name}: {n} prompt tokens, {req.prefix_hit} matched (locked), "
               f"{n - req.prefix_hit} computed and cached at the prefill's end, "
               f"{len(req.output_ids)} generated so far ({req.kv_len - req.cached_len} own "
               "slots); still running")
    return DemoTree(cache, pool, {f"req:{run_name}": row}, prompts, log, sched)


def build_demo(tokenizer: Any, headroom: int = 8) -> DemoTree:
    """Serve `DEMO_CHATS` one after another through the real scheduler; leave `DEMO_RUNNING`
    running after `DEMO_DECODED` generated tokens.

    Each chat is admitted (its cached prefix matched and locked), prefilled, fed its scripted
    answer and finished, so its prompt and answer go into the tree. The pool is sized to what
    the finished chats cache plus `headroom` slots, so the running request's decode steps make
    the scheduler evict the least recently used leaves, as an engine under memory pressure does.
    """
    if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 0:
        raise ConfigError(f"headroom must be an integer >= 0, got {headroom!r}")
    # First pass on a roomy pool only measures how many tokens the finished chats cache.
    probe = _serve_demo(tokenizer, 1 << 16, with_running=False)
    return _serve_demo(tokenizer, probe.cache.total_size() + headroom, with_running=True)
