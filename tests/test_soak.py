"""Soak: thousands of short requests through the engine loop leave no trace.

Bookkeeping is bounded (a finished request is forgotten once delivered), so after 2,000 requests
from 8 threads nothing is left in the engine or the loop, every KV slot is free or in the tree,
and the resident memory has not grown with the request count. `bench/concurrency.py --soak`
runs the full 20,000.
"""

from __future__ import annotations

import threading

import numpy as np

from radixkv import LLM, SamplingParams
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)
from tests.test_engine_loop import assert_idle_and_clean

THREADS = 8
SHORT = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def run_requests(llm: LLM, n: int, seed: int) -> None:
    """n requests of distinct random prompts, from THREADS threads, one request per call."""
    per = n // THREADS

    def worker(k: int) -> None:
        rng = np.random.default_rng(seed * 1000 + k)
        for _ in range(per):
            out = llm.generate([rng.integers(10, 5000, 8).tolist()], SHORT)[0]
            assert len(out.outputs[0].token_ids) == 2

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)


def test_soak_2000_requests_rss_and_slots_flat(tiny_llama_dir):  # noqa: F811
    with LLM(str(tiny_llama_dir), max_total_tokens=1024) as llm:
        run_requests(llm, 240, seed=0)  # warm up: allocator pools, tree at pool size
        rss0 = rss_bytes()
        run_requests(llm, 2000, seed=1)
        grown = rss_bytes() - rss0
        assert_idle_and_clean(llm)
        stats = llm.cache_stats()
        assert stats["requests_finished"] == stats["requests"] == 2240
        assert stats["tree_tokens"] <= stats["pool_size"]
        assert stats["evicted_tokens"] > 0  # the tree really cycled through the pool
        assert not llm.loop._live
        # 2,000 more requests: a leak of even 10 kB each would show as 20 MB
        assert grown < 20 << 20, f"RSS grew {grown / 2**20:.1f} MiB over 2,000 requests"
