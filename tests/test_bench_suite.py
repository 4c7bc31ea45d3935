"""The prefix-sharing benchmark suite (`radixkv/bench/`): its optima checked against brute force
and hand-computed cases, its replays against the bounds, and `radixkv bench --quick` end to end."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radixkv.bench import optimal, workloads
from radixkv.bench.memory_runs import SYSTEMS, System, run_memory
from radixkv.bench.metrics import hit_metrics
from radixkv.bench.options import WORKLOAD_NAMES
from radixkv.bench.report import run_checks
from radixkv.bench.workloads import Trace, TraceRequest
from tests.engine_fixtures import default_model_available

REPO = Path(__file__).resolve().parent.parent


def _seq(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int32)


def _random_trace(rng: np.random.Generator, vocab: int = 3) -> Trace:
    """Short prompts over a tiny vocabulary (much accidental sharing), some extending a parent."""
    reqs = []
    for i in range(int(rng.integers(4, 24))):
        parent = int(rng.integers(-1, i)) if i and rng.random() < 0.4 else -1
        reqs.append(TraceRequest(
            parent, rng.integers(100, 100 + vocab, int(rng.integers(1, 10))).astype(np.int32),
            rng.integers(100, 100 + vocab, int(rng.integers(1, 5))).astype(np.int32), ""))
    return Trace("random", "random", reqs)


def _scripted_sequences(trace: Trace) -> list[np.ndarray]:
    return [np.concatenate([p, r.answer])[:-1]
            for p, r in zip(trace.scripted_prompts(), trace.requests, strict=True)]


# ---- building blocks against brute force ---------------------------------------------------------
def test_prefix_node_ids_match_a_dict_trie() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 3, int(rng.integers(1, 12))).astype(np.int32) for _ in range(40)]
    ids, count = optimal.prefix_node_ids(seqs)
    expected: dict[tuple[int, ...], int] = {}
    flat = []
    for s in seqs:
        for d in range(1, len(s) + 1):
            flat.append(expected.setdefault(tuple(s[:d].tolist()), len(expected)))
    assert count == len(expected)
    # same partition of positions into nodes, whatever the numbering
    pairs = set(zip(ids.tolist(), flat, strict=True))
    assert len(pairs) == count == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def test_lcp_index_and_union_size_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 2, int(rng.integers(1, 9))).astype(np.int32) for _ in range(30)]
    idx = optimal.LcpIndex(seqs)

    def lcp(a: np.ndarray, b: np.ndarray) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    for i in range(len(seqs)):
        got = idx.lcp(i, np.arange(len(seqs)))
        assert got.tolist() == [lcp(seqs[i], s) for s in seqs]
    for _ in range(50):
        js = rng.choice(len(seqs), size=int(rng.integers(1, 6)), replace=False)
        ns = np.array([int(rng.integers(0, len(seqs[j]) + 1)) for j in js])
        nodes = {tuple(seqs[j][:d].tolist()) for j, n in zip(js, ns, strict=True)
                 for d in range(1, n + 1)}
        assert idx.union_size(js, ns) == len(nodes)


def test_interval_packing_is_optimal() -> None:
    """The greedy packing equals an exhaustive search over all subsets of unit intervals."""
    rng = np.random.default_rng(2)
    for _ in range(100):
        t = int(rng.integers(1, 6))
        g = int(rng.integers(1, 6))
        lefts = rng.integers(0, t, g)
        rights = np.array([int(rng.integers(a, t)) for a in lefts])
        weights = rng.integers(1, 3, g)
        cap = rng.integers(0, 3, t)
        taken = optimal.pack_intervals(lefts, rights, weights, cap)
        units = [k for k in range(g) for _ in range(int(weights[k]))]
        best = 0
        for r in range(len(units), 0, -1):
            for chosen in itertools.combinations(units, r):
                load = np.zeros(t, np.int64)
                for k in chosen:
                    load[lefts[k]:rights[k] + 1] += 1
                if (load <= cap).all():
                    best = r
                    break
            if best:
                break
        assert int(taken.sum()) == best
        assert (taken <= weights).all()


# ---- the optima ----------------------------------------------------------------------------------
def test_infinite_bound_hand_computed() -> None:
    # P0 = 1 2 3 4 (answer 9 8): computes 4; S0 = 1 2 3 4 9 (decode node "1 2 3 4 9")
    # P1 = 1 2 3 5 (answer 7):   can reuse "1", "1 2", "1 2 3" -> hit 3
    # P2 = 1 2 3 4 9 8 6 (child of P0): nodes of P2[:-1] are all P0's prompt nodes, P0's full
    #      prompt node and the decode node "...9"; "...9 8" was never given KV -> hit 5
    # P3 = 7 (one token): nothing to reuse, computes its only token
    trace = Trace("hand", "hand", [
        TraceRequest(-1, _seq(1, 2, 3, 4), _seq(9, 8), ""),
        TraceRequest(-1, _seq(1, 2, 3, 5), _seq(7), ""),
        TraceRequest(0, _seq(6), _seq(5), ""),
        TraceRequest(-1, _seq(7), _seq(1), ""),
    ])
    prompts = trace.scripted_prompts()
    assert prompts[2].tolist() == [1, 2, 3, 4, 9, 8, 6]
    bound = optimal.infinite_bound(_scripted_sequences(trace), np.array([len(p) for p in prompts]))
    assert bound.prompt_tokens == 16
    assert bound.hit_tokens == 3 + 5
    assert bound.unique_prefix_tokens == 16 - 8


def _by_prompt_length(trace: Trace) -> Trace:
    prompts = trace.scripted_prompts()
    order = sorted(range(len(trace)), key=lambda i: (len(prompts[i]), i))
    where = {old: new for new, old in enumerate(order)}
    return Trace("sorted", "sorted", [
        TraceRequest(where[trace.requests[o].parent] if trace.requests[o].parent >= 0 else -1,
                     trace.requests[o].new_tokens, trace.requests[o].answer, "")
        for o in order])


def test_infinite_bound_is_attained_serving_by_prompt_length() -> None:
    """One request at a time, shortest prompt first, pool large enough: the real radix cache
    serves exactly the bound, so it is what an unbounded cache could serve."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        trace = _by_prompt_length(_random_trace(rng))
        ws = optimal.working_set(_scripted_sequences(trace))
        run = run_memory(trace, SYSTEMS[1], ws + trace.max_total_len(), max_running=1,
                         window=1, chunk=int(rng.integers(1, 8)))
        bound = optimal.infinite_bound(run.log.sequences, run.log.prompt_lens)
        assert int(run.log.hits.sum()) == bound.hit_tokens


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_replays_under_pressure_respect_the_optima(eviction: str) -> None:
    """Random traces, tight pools, every policy, cache on and off: achieved <= Belady <= infinite,
    tokens conserved, no slot leaked."""
    rng = np.random.default_rng(4 if eviction == "lru" else 5)
    gaps = 0
    for it in range(40):
        trace = _random_trace(rng)
        need = trace.max_total_len()
        system = SYSTEMS[it % len(SYSTEMS)]
        run = run_memory(trace, system, int(rng.integers(need, 3 * need + 2)),
                         max_running=int(rng.integers(1, 5)), window=int(rng.integers(1, 6)),
                         chunk=int(rng.integers(1, 12)), eviction_policy=eviction)
        entry = {**hit_metrics(run.log, run.prefill_counter), "leak_free": run.leak_free}
        assert run_checks(entry) == [], (it, system, entry)
        gaps += entry["belady_hit_tokens"] - entry["hit_tokens"]
    assert gaps > 0  # the optimum is not trivially the achieved value


def test_belady_equals_achieved_when_nothing_is_evicted() -> None:
    """A pool that never evicts keeps every materialized token: the optimum in that order is what
    the tree served, less only hits on other running requests' not-yet-cached tokens."""
    trace = workloads.build("shared-system", "memory-quick", 0)
    ws = optimal.working_set(_scripted_sequences(trace))
    run = run_memory(trace, SYSTEMS[0], ws + 8 * trace.max_total_len(), max_running=1,
                     window=4, chunk=64)
    assert run.evicted_tokens == 0
    assert optimal.belady(run.log).hit_tokens == int(run.log.hits.sum())


# ---- workloads -----------------------------------------------------------------------------------
def test_workloads_are_seeded_and_shaped() -> None:
    assert workloads.WORKLOADS == WORKLOAD_NAMES
    for name in workloads.WORKLOADS:
        a = workloads.build(name, "memory-quick", 7)
        b = workloads.build(name, "memory-quick", 7)
        c = workloads.build(name, "memory-quick", 8)
        pa, pb, pc = a.scripted_prompts(), b.scripted_prompts(), c.scripted_prompts()
        assert all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))
        assert not all(len(x) == len(y) and np.array_equal(x, y)
                       for x, y in zip(pa, pc, strict=True))
        for i, r in enumerate(a.requests):
            if r.parent >= 0:  # a child's prompt extends its parent's prompt and answer
                head = np.concatenate([pa[r.parent], a.requests[r.parent].answer])
                assert np.array_equal(pa[i][:len(head)], head)
    shared = workloads.build("shared-system", "memory-quick", 0).scripted_prompts()
    system_len = workloads.SIZES["shared-system"]["memory-quick"]["system_len"]
    assert all(np.array_equal(p[:system_len], shared[0][:system_len]) for p in shared)
    control = workloads.build("no-sharing", "memory-quick", 0).scripted_prompts()
    assert len({int(p[0]) for p in control}) == len(control)


def test_memory_runs_are_deterministic() -> None:
    trace = workloads.build("mixed", "memory-quick", 0)
    ws = optimal.working_set(_scripted_sequences(trace))
    runs = [run_memory(trace, System("lpm", "lpm", True), ws // 5 + trace.max_total_len(),
                       max_running=8, window=16, chunk=128) for _ in range(2)]
    assert np.array_equal(runs[0].log.hits, runs[1].log.hits)
    assert runs[0].log.admissions == runs[1].log.admissions


# ---- end to end ----------------------------------------------------------------------------------
def test_quick_suite_smoke(tmp_path: Path) -> None:
    """`python -m radixkv.bench --quick` writes the summary, results and plots; every run of every
    workload passes the internal checks, read back from results.json."""
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "radixkv.bench", "--quick", "--out", str(out),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    model_level = default_model_available()  # the tiny model borrows the default tokenizer
    assert list(results["workloads"]) == list(WORKLOAD_NAMES)
    for w in results["workloads"].values():
        assert f"## {list(results['workloads'].values()).index(w) + 1}. {w['title']}" in summary
        levels = ["memory", "model"] if model_level else ["memory"]
        for level in levels:
            systems = w[level]["systems"]
            names = [s["system"] for s in systems]
            assert names[:4] == [s.name for s in SYSTEMS]
            for s in systems:
                assert s["checks"] == [], (w["title"], level, s["system"], s["checks"])
                assert s["hit_tokens"] <= s["infinite_hit_tokens"]
                if "belady_hit_tokens" in s:
                    assert s["hit_tokens"] <= s["belady_hit_tokens"] <= s["infinite_hit_tokens"]
                    assert s["conserved"] and s["leak_free"]
                    assert (s["hit_tokens"] + s["computed_tokens"] == s["prompt_tokens"])
        for p in w["memory"]["capacity_sweep"]:
            assert p["hit_tokens"] <= p["belady_hit_tokens"] <= p["infinite_hit_tokens"]
        off = next(s for s in w["memory"]["systems"] if s["system"] == "radixkv cache off")
        assert off["hit_tokens"] == 0
    for png in ("hit_rate_vs_optima_memory.png", "hit_vs_capacity.png",
                "memory_efficiency.png"):
        assert (out / png).stat().st_size > 1000
    if model_level:
        assert (out / "throughput.png").exists() and (out / "ttft_cdf.png").exists()
        assert "transformers generate" in summary
    assert "| level | system | hit rate | Belady | infinite |" in proc.stdout


def test_radixkv_bench_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from radixkv.cli import main

    out = tmp_path / "r"
    assert main(["bench", "--quick", "--skip-model", "--no-plots", "--workload", "1",
                 "--workload", "no-sharing", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["workloads"]) == ["shared-system", "no-sharing"]
    assert "Shared system prompt" in capsys.readouterr().out
