"""Trace benchmark of the radix tree and pools, no model: prints figures, asserts nothing.

Each of N requests is one of P shared prompts (S tokens) plus U unique tokens, and runs the life a
request has in the engine: match -> lock -> evict if short -> alloc -> insert -> free duplicates ->
unlock. Run: `.venv/bin/python bench/tree_ops.py [--requests N --prompts P ...]`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from radixkv import RadixCache, TokenToKVPool


def make_trace(n: int, p: int, s: int, u: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, 50_000, size=(p, s), dtype=np.int32)
    which = rng.integers(0, p, size=n)
    uniques = rng.integers(0, 50_000, size=(n, u), dtype=np.int32)
    reqs = [np.concatenate([prompts[w], uniques[i]]) for i, w in enumerate(which)]
    return reqs, which


def run_trace(reqs: list[np.ndarray], capacity: int, timed_ops: bool) -> dict[str, float]:
    pool = TokenToKVPool(capacity, num_layers=1, num_kv_heads=1, head_dim=1)
    cache = RadixCache(pool)
    t_match = t_insert = t_evict = 0.0
    n_evict = 0
    clock = time.perf_counter
    start = clock()
    for tokens in reqs:
        t0 = clock() if timed_ops else 0.0
        m = cache.match_prefix(tokens)
        if timed_ops:
            t_match += clock() - t0
        cache.lock(m.node)
        need = len(tokens) - m.length
        short = need - pool.available_size()
        if short > 0:
            t0 = clock() if timed_ops else 0.0
            cache.evict(short)
            if timed_ops:
                t_evict += clock() - t0
            n_evict += 1
        new = pool.alloc(need).numpy()
        slots = np.concatenate([m.slots.numpy(), new])
        t0 = clock() if timed_ops else 0.0
        cached = cache.insert(tokens, slots)
        if timed_ops:
            t_insert += clock() - t0
        if cached > m.length:  # another request cached these positions meanwhile: ours are extra
            pool.free(slots[m.length:cached])
        cache.unlock(m.node)
    elapsed = clock() - start
    cache.check_invariants()
    assert pool.available_size() + cache.total_size() == capacity, "slots leaked"
    st = cache.stats()
    n = len(reqs)
    return {"req_s": n / elapsed, "match_us": 1e6 * t_match / n, "insert_us": 1e6 * t_insert / n,
            "evict_us": 1e6 * t_evict / max(n_evict, 1), "evict_calls": n_evict,
            "hit_rate": st.hit_rate, "nodes": st.node_count}


def time_evict_one(num_leaves: int, repeats: int = 2000) -> float:
    """Mean seconds of evict(1) with `num_leaves` evictable leaves (kept topped up)."""
    pool = TokenToKVPool(2 * num_leaves + 2 * repeats, num_layers=1, num_kv_heads=1, head_dim=1)
    cache = RadixCache(pool)
    for i in range(num_leaves + repeats):  # distinct first tokens: every sequence is a leaf
        cache.insert(np.array([i, i], dtype=np.int32), pool.alloc(2))
    assert cache.stats().node_count == num_leaves + repeats
    start = time.perf_counter()
    for _ in range(repeats):
        cache.evict(1)
    elapsed = time.perf_counter() - start
    cache.check_invariants()
    return elapsed / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--shared", type=int, default=500, help="tokens per shared prompt")
    ap.add_argument("--unique", type=int, default=50, help="unique tokens per request")
    ap.add_argument("--capacity", type=int, nargs="+", default=[60_000, 150_000])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    reqs, _ = make_trace(args.requests, args.prompts, args.shared, args.unique, args.seed)
    print(f"trace: {args.requests} requests, {args.prompts} prompts x {args.shared} shared + "
          f"{args.unique} unique tokens")
    print(f"{'capacity':>9} {'req/s':>9} {'match µs':>9} {'insert µs':>10} {'evict µs':>9} "
          f"{'evicts':>7} {'hit rate':>9} {'nodes':>6}")
    for cap in args.capacity:
        plain = run_trace(reqs, cap, timed_ops=False)
        ops = run_trace(reqs, cap, timed_ops=True)
        print(f"{cap:>9} {plain['req_s']:>9.0f} {ops['match_us']:>9.2f} {ops['insert_us']:>10.2f} "
              f"{ops['evict_us']:>9.2f} {ops['evict_calls']:>7} {plain['hit_rate']:>9.3f} "
              f"{plain['nodes']:>6}")
    print("targets: >= 50,000 req/s at 60000, >= 20,000 at 150000")
    print(f"{'evictable leaves':>17} {'evict(1) µs':>12}")
    for leaves in (1_000, 10_000, 50_000):
        print(f"{leaves:>17} {1e6 * time_evict_one(leaves):>12.2f}")
    print("target: evict(1) < 100 µs at 50k leaves")


if __name__ == "__main__":
    main()
