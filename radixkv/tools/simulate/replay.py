"""The tick loop that replays one trace on one allocator, and both allocators on one trace.

Each tick: finished requests release memory; arrivals join a FCFS queue; the queue head is
admitted while it fits (a refusal blocks the queue that tick); then every running request
produces one token. A request admitted at tick t with output_len n finishes after tick t + n - 1
and holds prompt_len + n blocks at the end.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from radixkv.errors import ConfigError, InvariantError
from radixkv.tools.simulate.backends import Backend, ContiguousBackend, PagedBackend, RunState
from radixkv.tools.simulate.results import Comparison, Refusal, SimResult
from radixkv.tools.simulate.trace import TraceRequest, validate_trace

_HISTORY_CELLS = 4_000_000  # keep per-tick block maps only while ticks x blocks stays below this


def _simulate(trace: list[TraceRequest], backend: Backend, max_ticks: int | None) -> SimResult:
    trace = validate_trace(trace)
    for r in trace:
        backend.check(r)
    if max_ticks is None:  # a generous bound: everything run back to back, plus the arrivals
        max_ticks = max(r.arrival for r in trace) + 2 * sum(r.final_len for r in trace) + 10
    n = backend.num_blocks
    pending = deque(sorted(range(len(trace)), key=lambda i: (trace[i].arrival, i)))
    waiting: deque[RunState | int] = deque()
    running: list[RunState] = []
    admitted: dict[str, int] = {}
    finished: dict[str, int] = {}
    refusals: list[Refusal] = []
    events: list[str] = []
    last_logged: dict[str, tuple[int, int, str]] = {}
    series: list[tuple[int, int, int, int, int, int]] = []
    owners: list[np.ndarray] | None = []
    uses: list[np.ndarray] = []
    preemptions = 0
    t = 0
    while len(finished) < len(trace):
        if t > max_ticks:
            raise InvariantError(f"{backend.name}: trace not done after {max_ticks} ticks")
        for run in [r for r in running if r.generated == r.req.output_len]:
            backend.release(run)
            running.remove(run)
            finished[run.req.name] = t
            events.append(f"t={t:<3} {run.req.name} finished: released "
                          f"{run.reserved or run.req.final_len} {backend.unit}")
        while pending and trace[pending[0]].arrival <= t:
            waiting.append(pending.popleft())
        while waiting:
            head = waiting[0]
            run = head if isinstance(head, RunState) else RunState(trace[head], head, t)
            run.admitted = t
            need, reason = backend.try_admit(run, running)
            if reason is not None:
                free, hole = backend.free_blocks(), backend.largest_hole()
                refusals.append(Refusal(t, run.req.name, need, free, hole, reason,
                                        backend.layout(running)))
                if last_logged.get(run.req.name) != (free, hole, reason):
                    last_logged[run.req.name] = (free, hole, reason)
                    where = f", largest hole {hole}" if hole != free else ""
                    events.append(f"t={t:<3} {run.req.name} refused: needs {need}, {free} free"
                                  f"{where}: {reason}")
                break
            waiting.popleft()
            running.append(run)
            admitted.setdefault(run.req.name, t)
            events.append(f"t={t:<3} {run.req.name} admitted: {backend.describe_admit(run)}")
        victims = backend.grow(running)
        for victim in reversed(victims):  # the oldest victim ends up first in the queue
            running.remove(victim)
            victim.generated = 0
            waiting.appendleft(victim)
            preemptions += 1
            events.append(f"t={t:<3} {victim.req.name} preempted: slots freed, will recompute")
        for run in running:
            run.generated += 1
        used = sum(r.req.prompt_len + r.generated for r in running)
        series.append((used, backend.reserved(running), backend.free_blocks(),
                       backend.largest_hole(), len(running), len(waiting)))
        if owners is not None:
            if (t + 1) * n > _HISTORY_CELLS:
                owners = None
            else:
                owner = np.full(n, -1, dtype=np.int32)
                in_use = np.zeros(n, dtype=bool)
                backend.fill_owner(running, owner, in_use)
                owners.append(owner)
                uses.append(in_use)
        t += 1
    backend.finish_check()
    cols = np.array(series, dtype=np.int64).reshape(-1, 6).T
    return SimResult(
        allocator=backend.name, num_blocks=n, trace=trace, used=cols[0], reserved=cols[1],
        free=cols[2], largest_hole=cols[3], running=cols[4], waiting=cols[5], admitted=admitted,
        finished=finished, refusals=refusals, preemptions=preemptions, events=events,
        owner=np.stack(owners) if owners else None, in_use=np.stack(uses) if owners else None)


def simulate_contiguous(trace: list[TraceRequest], num_blocks: int, reserve: int | None = None,
                        max_ticks: int | None = None) -> SimResult:
    """Replay `trace` on a first-fit contiguous allocator over `num_blocks` blocks.

    Each request reserves prompt_len + max_new_tokens blocks, or `reserve` blocks when given (a
    cache that reserves the model's maximum length for everyone).
    """
    if reserve is not None and (not isinstance(reserve, int) or reserve < 1):
        raise ConfigError(f"reserve must be a positive integer, got {reserve!r}")
    return _simulate(trace, ContiguousBackend(_blocks(num_blocks), reserve), max_ticks)


def simulate_paged(trace: list[TraceRequest], num_blocks: int,
                   max_ticks: int | None = None) -> SimResult:
    """Replay `trace` on radixkv's `TokenToKVPool` with `num_blocks` one-token slots."""
    return _simulate(trace, PagedBackend(_blocks(num_blocks)), max_ticks)


def _blocks(num_blocks: Any) -> int:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ConfigError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    return num_blocks


def compare(trace: list[TraceRequest], num_blocks: int,
            reserve: int | None = None) -> Comparison:
    """Run the trace on both allocators."""
    return Comparison(simulate_contiguous(trace, num_blocks, reserve),
                      simulate_paged(trace, num_blocks))
