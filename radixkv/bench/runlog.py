"""Drives a trace through an engine step by step and records what the optimum analysis needs.

`drive` releases requests in trace order into a bounded waiting queue (a child only once its
parent has finished, its prompt built from the parent's real output), calls one engine step at a
time and, around each step, reads the scheduler's state: who was admitted for the first time (and
with what prefix hit), who is running with how many tokens' KV, who finished or was preempted, and
the pool's usage. The same driver serves memory-level runs (the real `Scheduler` with scripted
tokens, no model) and model-level runs (the real `Engine`); see `EngineAdapter`.

`RunLog` fields are indexed by trace request j. Step s = 1..T is one engine iteration;
`snapshots[s]` is the running set after step s (`snapshots[0]`: before the first step).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from radixkv.bench.workloads import Trace
from radixkv.engine.request import Request, Status


@dataclass
class RunLog:
    """One run of a trace, as the analysis in `optimal.py` reads it."""

    capacity: int  # KV pool slots
    sequences: list[np.ndarray]  # S_j: (prompt + output)[:-1], the tokens whose KV j computed
    prompt_lens: np.ndarray  # int64 [N]: L_j
    max_tokens: np.ndarray  # int64 [N]
    hits: np.ndarray  # int64 [N]: prefix hit at j's first admission (match of prompt[:-1])
    admissions: list[tuple[int, int]]  # (step, j) of first admissions, in admission order
    snapshots: list[list[tuple[int, int]]]  # [s] -> (j, kv_len) of running requests
    finished: list[list[int]]  # [s] -> requests that finished in step s
    preempted: list[list[int]]  # [s] -> requests preempted during step s
    prefill_tokens: np.ndarray  # int64 [N]: tokens each request sent through extend (recompute in)
    # int64 [N]: 1 when j's last prompt token was computed by a decode step instead of an extend
    # (a prefill chunk that ended one token short of the prompt); no prefill counter sees it
    prompt_decoded: np.ndarray
    preemptions: np.ndarray  # int64 [N]
    # per step after the step: pool slots in use, of which evictable (unlocked tree), running
    # requests' KV tokens (sum of kv_len) and their contiguous reservation (prompt + max_tokens)
    pool_used: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    evictable: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    running_kv: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reserved: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # wall-clock (perf_counter) per request: arrival (release), first token, finish
    arrival: np.ndarray = field(default_factory=lambda: np.zeros(0))
    first_token: np.ndarray = field(default_factory=lambda: np.zeros(0))
    finish: np.ndarray = field(default_factory=lambda: np.zeros(0))
    outputs: list[np.ndarray] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def num_steps(self) -> int:
        return len(self.snapshots) - 1


class EngineAdapter(Protocol):
    """What `drive` needs from an engine (memory-level or model-level)."""

    def add(self, j: int, prompt: np.ndarray, max_tokens: int) -> Request: ...
    def step(self) -> None: ...
    def running(self) -> list[Request]: ...
    def num_waiting(self) -> int: ...
    def has_work(self) -> bool: ...
    def pool_state(self) -> tuple[int, int]: ...  # (slots in use, evictable tree tokens)


def drive(trace: Trace, engine: EngineAdapter, capacity: int, window: int,
          progress: Callable[[int], Any] | None = None) -> RunLog:
    """Run every request of `trace` to completion; returns the run's log.

    At most `window` released requests wait for admission at a time, so the scheduling policy
    chooses among a bounded queue (as a server sees its recent arrivals). `progress(n)` is called
    with the number of requests finished in each step.
    """
    n = len(trace)
    children: list[list[int]] = [[] for _ in range(n)]
    for i, r in enumerate(trace.requests):
        if r.parent >= 0:
            children[r.parent].append(i)
    ready = [i for i, r in enumerate(trace.requests) if r.parent < 0]
    heapq.heapify(ready)
    outputs: list[np.ndarray | None] = [None] * n
    reqs: list[Request | None] = [None] * n
    index: dict[int, int] = {}  # id(request) -> j
    prompt_lens = np.zeros(n, np.int64)
    prompt_decoded = np.zeros(n, np.int64)
    max_tokens = np.array([trace.max_tokens(i) for i in range(n)], np.int64)
    arrival = np.zeros(n)
    first_token = np.zeros(n)
    finish = np.zeros(n)
    admissions: list[tuple[int, int]] = []
    snapshots: list[list[tuple[int, int]]] = [[]]
    finished: list[list[int]] = [[]]
    preempted: list[list[int]] = [[]]
    used, evict, run_kv, reserved = [], [], [], []
    active: set[int] = set()  # released, not finished
    unadmitted: set[int] = set()  # released, never admitted
    done = 0
    start = time.perf_counter()
    ready_time = np.full(n, start)  # when a request could arrive (its parent's finish)
    while done < n:
        while ready and engine.num_waiting() < window:
            j = heapq.heappop(ready)
            prompt = trace.prompt(j, outputs)
            prompt_lens[j] = len(prompt)
            req = engine.add(j, prompt, int(max_tokens[j]))
            arrival[j] = ready_time[j]
            reqs[j] = req
            index[id(req)] = j
            active.add(j)
            unadmitted.add(j)
        if not engine.has_work():
            raise RuntimeError(f"{trace.name}: engine idle with {n - done} requests unfinished")
        before = {j: reqs[j].preemptions for j in active}
        # running with all but the last prompt token computed: this step decodes that token
        one_short = [index[id(r)] for r in engine.running()
                     if r.kv_len == len(r.prompt_ids) - 1 and not r.output_ids]
        engine.step()
        for j in one_short:  # a decode step fed the last prompt token
            if reqs[j].output_ids and reqs[j].preemptions == before[j]:
                prompt_decoded[j] = 1
        running = engine.running()
        run_ids = [index[id(r)] for r in running]
        new_adm = [j for j in run_ids if j in unadmitted and reqs[j].prefix_hit >= 0]
        fin = sorted(j for j in active if reqs[j].status is Status.FINISHED)
        new_adm += [j for j in fin if j in unadmitted]  # admitted and finished within the step
        step_no = len(snapshots)
        for j in new_adm:
            admissions.append((step_no, j))
            unadmitted.discard(j)
        snapshots.append([(j, r.kv_len) for j, r in zip(run_ids, running, strict=True)])
        preempted.append([j for j in active if reqs[j].preemptions > before[j]])
        finished.append(fin)
        now = time.perf_counter()
        for j in fin:
            r = reqs[j]
            out = np.asarray(r.output_ids, dtype=np.int32)
            outputs[j] = out
            first_token[j] = r.first_token_time if r.first_token_time is not None else now
            finish[j] = r.finish_time if r.finish_time is not None else now
            active.discard(j)
            for c in children[j]:
                ready_time[c] = finish[j]
                heapq.heappush(ready, c)
        done += len(fin)
        if progress is not None and fin:
            progress(len(fin))
        pool_used, evictable = engine.pool_state()
        used.append(pool_used)
        evict.append(evictable)
        run_kv.append(sum(r.kv_len for r in running))
        reserved.append(sum(len(r.prompt_ids) + r.params.max_tokens for r in running))
    wall = time.perf_counter() - start
    final = [r for r in reqs if r is not None]
    assert len(final) == n
    sequences = [np.concatenate([r.prompt_ids, np.asarray(r.output_ids, np.int32)])[:-1]
                 for r in final]
    return RunLog(
        capacity=capacity, sequences=sequences, prompt_lens=prompt_lens, max_tokens=max_tokens,
        hits=np.array([r.prefix_hit for r in final], np.int64), admissions=admissions,
        snapshots=snapshots, finished=finished, preempted=preempted,
        prefill_tokens=np.array([r.prefill_tokens for r in final], np.int64),
        prompt_decoded=prompt_decoded,
        preemptions=np.array([r.preemptions for r in final], np.int64),
        pool_used=np.array(used, np.int64), evictable=np.array(evict, np.int64),
        running_kv=np.array(run_kv, np.int64), reserved=np.array(reserved, np.int64),
        arrival=arrival, first_token=first_token, finish=finish,
        outputs=[o if o is not None else np.zeros(0, np.int32) for o in outputs], wall_s=wall)
