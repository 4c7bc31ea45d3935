"""Trace benchmark of the radix tree and pools, no model: prints figures, asserts nothing.

Each of N requests is one of P shared prompts (S tokens) plus U unique tokens, and runs the life a
request has in the engine: match -> lock -> evict if short -> alloc -> insert -> free duplicates ->
unlock. radixkv runs it twice, with the compiled slot allocator and with its numpy reference
(`RADIXKV_TREE_KERNELS=0`), and SGLang 0.5.23's RadixCache runs the identical trace in its own
venv (bench/tree_ops_sglang.py, a subprocess fed one capacity at a time, so the three alternate
within one run). Each figure is the best of `--rounds`; the clock is CPU time by default, which a
shared machine's load disturbs far less than wall time (`--clock wall` for wall time).

Run: `.venv/bin/python bench/tree_ops.py [--requests N --prompts P ...]`. SGLang's venv (found at
`--sglang-python`, default /work/peers/sglang/bin/python or $RADIXKV_SGLANG_PYTHON) is made with:
    python3 -m venv /work/peers/sglang
    /work/peers/sglang/bin/pip install torch==2.13.0 numpy
    /work/peers/sglang/bin/pip install --no-deps sglang==0.5.23
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixkv import RadixCache, TokenToKVPool

_SGLANG_PY = os.environ.get("RADIXKV_SGLANG_PYTHON", "/work/peers/sglang/bin/python")


def make_trace(n: int, p: int, s: int, u: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, 50_000, size=(p, s), dtype=np.int32)
    which = rng.integers(0, p, size=n)
    uniques = rng.integers(0, 50_000, size=(n, u), dtype=np.int32)
    reqs = [np.concatenate([prompts[w], uniques[i]]) for i, w in enumerate(which)]
    return reqs, which


def _pool(capacity: int, compiled: bool) -> TokenToKVPool:
    """A pool on the compiled allocator path or on its numpy reference."""
    old = os.environ.get("RADIXKV_TREE_KERNELS")
    os.environ["RADIXKV_TREE_KERNELS"] = "1" if compiled else "0"
    try:
        return TokenToKVPool(capacity, num_layers=1, num_kv_heads=1, head_dim=1)
    finally:
        if old is None:
            del os.environ["RADIXKV_TREE_KERNELS"]
        else:
            os.environ["RADIXKV_TREE_KERNELS"] = old


class SGLangRecencyCache(RadixCache):
    """RadixCache with SGLang's recency rule for a split (bench only, to compare equal work).

    When a match ends inside a node, SGLang stamps the whole node with the access time before
    cutting it, so the lower half, which the request did not use, counts as just used too.
    radixkv leaves that half's recency alone. On this trace that is the only difference in
    what the two trees evict: with this rule radixkv's hit rate equals SGLang's exactly.
    """

    def _split(self, child: Any, m: int) -> Any:
        upper = super()._split(child, m)
        self._tick += 1
        child.last_access = self._tick
        if child.evict_key is not None:  # an evictable leaf: re-enter it under its new time
            self._index_leaf(child)
        return upper


def run_trace(reqs: list[np.ndarray], capacity: int, timed_ops: bool, compiled: bool = True,
              clock: Callable[[], float] = time.perf_counter,
              sglang_recency: bool = False) -> dict[str, Any]:
    pool = _pool(capacity, compiled)
    cache = (SGLangRecencyCache if sglang_recency else RadixCache)(pool)
    t_match = t_insert = t_evict = 0.0
    n_evict = 0
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
        slots = torch.cat([m.slots, pool.alloc(need)])  # [len(tokens)]
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


def time_evict_one(num_leaves: int, repeats: int = 2000) -> tuple[float, float]:
    """Mean (wall, CPU) seconds of evict(1) with `num_leaves` evictable leaves (kept topped up)."""
    pool = TokenToKVPool(2 * num_leaves + 2 * repeats, num_layers=1, num_kv_heads=1, head_dim=1)
    cache = RadixCache(pool)
    for i in range(num_leaves + repeats):  # distinct first tokens: every sequence is a leaf
        cache.insert(np.array([i, i], dtype=np.int32), pool.alloc(2))
    assert cache.stats().node_count == num_leaves + repeats
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        cache.evict(1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cache.check_invariants()
    return wall / repeats, cpu / repeats


class SGLangPeer:
    """SGLang's RadixCache on the same trace, in a subprocess of SGLang's venv."""

    def __init__(self, python: str, reqs: list[np.ndarray], clock: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="radixkv-tree-")
        trace = Path(self._dir.name) / "trace.npy"
        np.save(trace, np.stack(reqs))
        script = Path(__file__).with_name("tree_ops_sglang.py")
        self._proc = subprocess.Popen([python, str(script), str(trace), "--clock", clock],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, capacity: int) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(f"{capacity}\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the SGLang run exited with {self._proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._dir.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--shared", type=int, default=500, help="tokens per shared prompt")
    ap.add_argument("--unique", type=int, default=50, help="unique tokens per request")
    ap.add_argument("--capacity", type=int, nargs="+", default=[60_000, 150_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side; best is shown")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--sglang-python", default=_SGLANG_PY,
                    help="python of a venv with sglang==0.5.23 (see the module docstring)")
    ap.add_argument("--no-sglang", action="store_true", help="skip the SGLang comparison")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    reqs, _ = make_trace(args.requests, args.prompts, args.shared, args.unique, args.seed)
    print(f"trace: {args.requests} requests, {args.prompts} prompts x {args.shared} shared + "
          f"{args.unique} unique tokens; {args.clock} clock, best of {args.rounds}; load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    peer = None
    if not args.no_sglang:
        if Path(args.sglang_python).exists():
            peer = SGLangPeer(args.sglang_python, reqs, args.clock)
        else:
            print(f"SGLang: no {args.sglang_python} (make its venv as the docstring says); "
                  "skipped")
    best: dict[tuple[str, int], dict[str, Any]] = {}

    def keep(name: str, cap: int, res: dict[str, Any]) -> None:
        if (name, cap) not in best or res["req_s"] > best[name, cap]["req_s"]:
            best[name, cap] = res

    try:
        for _ in range(args.rounds):  # alternate the sides so a change of load hits all three
            for cap in args.capacity:
                keep("compiled", cap, run_trace(reqs, cap, False, True, clock))
                keep("same_rule", cap, run_trace(reqs, cap, False, True, clock, True))
                keep("reference", cap, run_trace(reqs, cap, False, False, clock))
                if peer is not None:
                    keep("sglang", cap, peer.run(cap))
    finally:
        if peer is not None:
            peer.close()
    print("radixkv: compiled allocator; same rule: compiled, with SGLang's split recency (equal "
          "hit rate); numpy ref: RADIXKV_TREE_KERNELS=0")
    print(f"{'capacity':>9} {'side':>12} {'req/s':>9} {'x SGLang':>9} {'hit rate':>9}")
    for cap in args.capacity:
        sg = best.get(("sglang", cap))
        for name, label in (("compiled", "radixkv"), ("same_rule", "same rule"),
                            ("reference", "numpy ref"), ("sglang", "SGLang")):
            if (name, cap) not in best:
                continue
            res = best[name, cap]
            ratio = f"{res['req_s'] / sg['req_s']:>8.2f}x" if sg else f"{'-':>9}"
            print(f"{cap:>9} {label:>12} {res['req_s']:>9.0f} {ratio} {res['hit_rate']:>9.6f}")
    print("target: radixkv >= 3x SGLang's requests/s at every capacity, same hit rate")
    print(f"{'capacity':>9} {'match µs':>9} {'insert µs':>10} {'evict µs':>9} {'evicts':>7} "
          f"{'nodes':>6}   (compiled path, per call)")
    for cap in args.capacity:
        ops = run_trace(reqs, cap, True, True, clock)
        print(f"{cap:>9} {ops['match_us']:>9.2f} {ops['insert_us']:>10.2f} "
              f"{ops['evict_us']:>9.2f} {ops['evict_calls']:>7} {ops['nodes']:>6}")
    print(f"{'evictable leaves':>17} {'evict(1) µs':>12} {'CPU µs':>8}")
    for leaves in (1_000, 10_000, 50_000):
        wall, cpu = time_evict_one(leaves)
        print(f"{leaves:>17} {1e6 * wall:>12.2f} {1e6 * cpu:>8.2f}")
    print("target: evict(1) <= 100 µs at 50k leaves")


if __name__ == "__main__":
    sys.exit(main())
