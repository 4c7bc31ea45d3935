"""Fragmentation simulator: the hand-traced seed scenario, an oracle for first-fit, invariants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import png_size
from hypothesis import given, settings
from hypothesis import strategies as st

from radixkv.cli import main
from radixkv.errors import ConfigError, InvalidSlotError
from radixkv.tools.simulate import (
    ContiguousAllocator,
    TraceRequest,
    compare,
    format_report,
    load_trace,
    plot_comparison,
    random_trace,
    seed_trace,
    simulate_contiguous,
    simulate_paged,
)


# ---- the seed scenario, traced by hand ---------------------------------------------------------
# A: prompt 38, 2 new (max 2) -> reserves 40; holds 39 after t0, 40 after t1, leaves at t2.
# B: prompt 35, 5 new (max 5) -> reserves 40; holds 36..40 over t0..t4, leaves at t5.
# C: arrives t1, prompt 29, 1 new of max 21 -> needs 30, reserves 50.
def test_seed_contiguous_refuses_c_with_60_blocks_free() -> None:
    r = simulate_contiguous(seed_trace(), 100)
    assert r.admitted == {"A": 0, "B": 0, "C": 5}
    assert r.finished == {"A": 2, "C": 6, "B": 5}
    # t1: 20 free at [80,100): plainly too little. t2..t4: A's [0,40) is free too: 60 free,
    # but in holes of 40 and 20, and C must reserve 50 adjacent blocks.
    refusals = [(f.tick, f.request, f.need, f.free, f.largest_hole) for f in r.refusals]
    assert refusals == [(1, "C", 50, 20, 20), (2, "C", 50, 60, 40), (3, "C", 50, 60, 40),
                        (4, "C", 50, 60, 40)]
    assert not r.refusals[0].despite_free and "not enough" in r.refusals[0].reason
    frag = r.refused_despite_free()
    assert [f.tick for f in frag] == [2, 3, 4]
    assert "external fragmentation" in frag[0].reason
    assert frag[0].layout == ((0, 40, None), (40, 40, "B"), (80, 20, None))


def test_seed_paged_admits_c_once_a_finishes() -> None:
    r = simulate_paged(seed_trace(), 100)
    assert r.admitted == {"A": 0, "B": 0, "C": 2}
    assert r.finished == {"A": 2, "C": 3, "B": 5}
    # t1: A holds 39 and B 36, so 25 slots are free; C needs 29 + 1, plus 2 slots for A's and
    # B's next tokens.
    [f] = r.refusals
    assert (f.tick, f.request, f.need, f.free) == (1, "C", 32, 25)
    assert not r.refused_despite_free() and r.preemptions == 0


def test_seed_series_by_hand() -> None:
    cmp = compare(seed_trace(), 100)
    c, p = cmp.contiguous, cmp.paged
    # After each tick: contiguous reserved 80, 80, 40, 40, 40, 50 and holds A+B / B / C tokens.
    # The last tick (6) is the one at which C leaves: nothing is held after it.
    assert c.reserved.tolist() == [80, 80, 40, 40, 40, 50, 0]
    assert c.used.tolist() == [39 + 36, 40 + 37, 38, 39, 40, 30, 0]
    assert c.free.tolist() == [20, 20, 60, 60, 60, 50, 100]
    assert c.largest_hole.tolist() == [20, 20, 40, 40, 40, 50, 100]
    assert c.internal_fragmentation()[0] == pytest.approx(0.05)  # 80 reserved, 75 used
    assert c.external_fragmentation()[2] == pytest.approx(20 / 60)
    # Paged: t2 holds B 38 + C 30, t3 B 39, t4 B 40; nothing reserved beyond use.
    assert p.used.tolist() == [75, 77, 68, 39, 40, 0]
    assert (p.reserved == p.used).all() and (p.free == 100 - p.used).all()
    assert p.running.tolist() == [2, 2, 2, 1, 1, 0] and c.running.max() == 2
    report = format_report(cmp)
    assert "60 blocks free, but the largest hole is 40 < 50 that C must reserve" in report
    assert "[0,40) free, [40,80) B, [80,100) free" in report
    assert "Paged admitted C at t=2; contiguous at t=5" in report


def test_seed_block_maps_match_the_layout() -> None:
    c = simulate_contiguous(seed_trace(), 100)
    assert c.owner is not None and c.in_use is not None
    assert (c.owner[0, :40] == 0).all() and (c.owner[0, 40:80] == 1).all()
    assert (c.owner[2, :40] == -1).all() and (c.owner[2, 80:] == -1).all()
    assert c.in_use[0, :39].all() and not c.in_use[0, 39]  # A's 40th block is reserved only
    p = simulate_paged(seed_trace(), 100)
    assert p.owner is not None
    assert (p.owner >= 0).sum(axis=1).tolist() == p.used.tolist()


# ---- first-fit against a brute-force oracle ----------------------------------------------------
def _oracle_alloc(free: np.ndarray, n: int) -> int | None:
    run = 0
    for i, f in enumerate(free):
        run = run + 1 if f else 0
        if run == n:
            return i - n + 1
    return None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), min_size=1, max_size=60))
def test_first_fit_matches_oracle(ops: list[tuple[bool, int]]) -> None:
    n = 48
    alloc = ContiguousAllocator(n)
    free = np.ones(n, dtype=bool)
    live: list[tuple[int, int]] = []
    for do_alloc, k in ops:
        if do_alloc or not live:
            want = _oracle_alloc(free, k)
            got = alloc.alloc(k)
            assert got == want
            if got is not None:
                free[got:got + k] = False
                live.append((got, k))
        else:
            start, size = live.pop(k % len(live))
            alloc.free(start)
            free[start:start + size] = True
        holes = alloc.holes()
        assert sum(h for _, h in holes) == free.sum() == alloc.free_blocks()
        for s, h in holes:  # each hole is free, maximal, and they are disjoint and sorted
            assert free[s:s + h].all()
            assert (s == 0 or not free[s - 1]) and (s + h == n or not free[s + h])
        assert [s for s, _ in holes] == sorted(s for s, _ in holes)


def test_contiguous_allocator_errors() -> None:
    a = ContiguousAllocator(10)
    start = a.alloc(4)
    a.free(start)
    with pytest.raises(InvalidSlotError):
        a.free(start)
    with pytest.raises(ConfigError):
        ContiguousAllocator(0)


# ---- invariants on random traces ---------------------------------------------------------------
def test_random_trace_invariants() -> None:
    trace = random_trace(60, seed=3, arrival_rate=0.2, prompt_len=(4, 40), output_len=(2, 40),
                         max_new_tokens=40)
    assert trace == random_trace(60, seed=3, arrival_rate=0.2, prompt_len=(4, 40),
                                 output_len=(2, 40), max_new_tokens=40)
    cmp = compare(trace, 256)
    for r in (cmp.contiguous, cmp.paged):
        assert set(r.finished) == {q.name for q in trace}  # everyone served
        assert (r.used <= r.reserved).all() and (r.reserved + r.free == 256).all()
        assert (r.largest_hole <= r.free).all()
        for q in trace:
            assert r.admitted[q.name] >= q.arrival
    c, p = cmp.contiguous, cmp.paged
    for q in trace:  # contiguous never preempts: each request lives exactly output_len ticks
        assert c.finished[q.name] - c.admitted[q.name] == q.output_len
    assert all(f.free < f.need for f in p.refusals)  # paged refuses only when memory is short
    assert (p.largest_hole == p.free).all()
    assert c.internal_fragmentation().max() > 0 and p.internal_fragmentation().max() == 0


def test_paged_preempts_when_requests_outgrow_the_pool() -> None:
    # 10 slots; A and B (2-token prompts, 6 new tokens each) are both admitted at t0 and grow by
    # one slot per tick: 6, 8, 10 slots after t0..t2. t3: no slot left for two more tokens, so
    # B (the newest) is preempted and A grows to 6. t4: B fits again (2 + 1 + 1 for A = 4 free)
    # and both grow to 10; t5: B is preempted again, A reaches 8. t6: A leaves, B restarts and
    # runs alone until it leaves at t12.
    trace = [TraceRequest("A", 0, 2, 6, 6), TraceRequest("B", 0, 2, 6, 6)]
    p = simulate_paged(trace, 10)
    assert p.used.tolist() == [6, 8, 10, 6, 10, 8, 3, 4, 5, 6, 7, 8, 0]
    assert p.preemptions == 2 and p.finished == {"A": 6, "B": 12}
    assert sum("B preempted" in e for e in p.events) == 2
    # The contiguous cache reserves 8 for each: only one runs at a time.
    c = simulate_contiguous(trace, 10)
    assert c.running.max() == 1 and c.admitted == {"A": 0, "B": 6}


@pytest.mark.parametrize("trace, match", [
    ([], "empty"),
    ([TraceRequest("A", 0, 5, 9, 8)], "exceeds max_new_tokens"),
    ([TraceRequest("A", -1, 5, 1, 1)], "arrival"),
    ([TraceRequest("A", 0, 0, 1, 1)], "prompt_len"),
    ([TraceRequest("A", 0, 5, 1, 1), TraceRequest("A", 1, 5, 1, 1)], "twice"),
    ([TraceRequest("A", 0, 90, 5, 20)], "could never run"),
])
def test_bad_traces_raise_config_error(trace: list[TraceRequest], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        simulate_contiguous(trace, 100)


def test_fixed_reservation_and_paged_capacity_errors() -> None:
    with pytest.raises(ConfigError, match="fixed reservation"):
        simulate_contiguous([TraceRequest("A", 0, 50, 10, 10)], 100, reserve=32)
    with pytest.raises(ConfigError, match="could never finish"):
        simulate_paged([TraceRequest("A", 0, 90, 20, 20)], 100)
    with pytest.raises(ConfigError):
        simulate_paged(seed_trace(), 0)
    r = simulate_contiguous(seed_trace(), 100, reserve=50)
    assert r.reserved[0] == 100  # A and B reserve 50 each


def test_load_trace_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([{"name": q.name, "arrival": q.arrival, "prompt_len": q.prompt_len,
                                 "output_len": q.output_len, "max_new_tokens": q.max_new_tokens}
                                for q in seed_trace()]))
    assert load_trace(path) == seed_trace()
    path.write_text(json.dumps([{"arrival": 0, "prompt_len": 3}]))
    with pytest.raises(ConfigError, match="lacks"):
        load_trace(path)


# ---- plot and CLI ------------------------------------------------------------------------------
def test_plot_is_a_png(tmp_path: Path) -> None:
    out = plot_comparison(compare(seed_trace(), 100), tmp_path / "sub" / "seed.png")
    width, height = png_size(out)
    assert (width, height) == (1200, 850)  # 12 x 8.5 inches at 100 dpi
    assert out.stat().st_size > 20_000


def test_cli_simulate_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "seed.png"
    assert main(["simulate", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "t=2   C refused: needs 50, 60 free, largest hole 40" in out
    assert "60 blocks free, but the largest hole is 40 < 50" in out
    assert "Why C reserves 50 and not 30" in out
    png_size(png)
    assert main(["simulate", "--blocks", "45"]) == 2  # C's 50-block reservation never fits
    assert "could never run" in capsys.readouterr().err
