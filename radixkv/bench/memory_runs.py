"""Memory-level runs: the real `Scheduler`, `RadixCache` / `NaiveCache`, `TokenToKVPool` and
`ReqToTokenPool`, with no model. Each step the scheduler picks a batch exactly as in the engine
(admission, policy order, chunked prefill, eviction, preemption); instead of a forward pass the
step feeds each sampling request the next token of its scripted answer. The pool has one layer,
one KV head and head_dim 1, so long traces replay fast while every slot moves as in a real run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from radixkv.bench.runlog import RunLog, drive
from radixkv.bench.workloads import Trace
from radixkv.engine.request import Request
from radixkv.engine.sampling_params import SamplingParams
from radixkv.engine.scheduler import Scheduler
from radixkv.errors import InvalidRequestError
from radixkv.memory import NaiveCache, RadixCache, ReqToTokenPool, TokenToKVPool


@dataclass(frozen=True)
class System:
    """A system under test: a label, the scheduling policy and whether the radix cache is on."""

    name: str
    policy: str
    prefix_cache: bool


SYSTEMS = (
    System("radixkv lpm", "lpm", True),
    System("radixkv fcfs", "fcfs", True),
    System("radixkv dfs-weight", "dfs-weight", True),
    System("radixkv cache off", "fcfs", False),
)


class SchedulerAdapter:
    """`EngineAdapter` over a bare `Scheduler`: a step is schedule + scripted outputs."""

    def __init__(self, trace: Trace, capacity: int, policy: str, prefix_cache: bool,
                 max_running: int, chunk: int, eviction_policy: str = "lru",
                 declared_max_tokens: int = 0) -> None:
        self.trace = trace
        self.declared = declared_max_tokens
        self.pool = TokenToKVPool(capacity, num_layers=1, num_kv_heads=1, head_dim=1)
        self.cache: Any = (RadixCache(self.pool, eviction_policy=eviction_policy)
                           if prefix_cache else NaiveCache(self.pool))
        self.req_pool = ReqToTokenPool(max_running, trace.max_total_len() + 1)
        self.sched = Scheduler(self.cache, self.pool, self.req_pool, policy, chunk, max_running)
        self.answers: dict[int, np.ndarray] = {}  # id(request) -> scripted answer
        self.prefill_counter = 0  # extend tokens over all steps (the engine's counter)

    def add(self, j: int, prompt: np.ndarray, max_tokens: int) -> Request:
        # a client asks for up to `declared` tokens; the scripted answer stops earlier (as at EOS)
        max_tokens = max(max_tokens, self.declared)
        if len(prompt) + max_tokens > self.pool.num_slots:  # the engine's own admission check
            raise InvalidRequestError(f"request {j}: {len(prompt)} + {max_tokens} tokens cannot "
                                      f"fit a pool of {self.pool.num_slots} slots")
        req = Request(f"req-{j}", prompt.astype(np.int32),
                      SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        self.answers[id(req)] = self.trace.requests[j].answer
        self.sched.add(req)
        return req

    def step(self) -> None:
        batch = self.sched.schedule()
        if batch is None:
            return
        # the scheduler's own end-of-step work, the scripted answer standing in for sampling
        tokens = [int(self.answers[id(it.req)][len(it.req.output_ids)])
                  for it in batch.items if it.samples_next]
        before = self.sched.prefill_tokens
        for req in self.sched.postprocess(batch, tokens):
            answer = self.answers[id(req)]
            if len(req.output_ids) >= len(answer):
                self.sched.finish(req, "stop" if len(answer) < req.params.max_tokens else "length")
                del self.answers[id(req)]
        self.prefill_counter += self.sched.prefill_tokens - before

    def running(self) -> list[Request]:
        return list(self.sched.running)

    def num_waiting(self) -> int:
        return len(self.sched.waiting)

    def has_work(self) -> bool:
        return self.sched.has_work()

    def pool_state(self) -> tuple[int, int]:
        return self.pool.num_slots - self.pool.available_size(), self.cache.evictable_size()

    def leak_free(self) -> bool:
        """Idle: tree consistent, every slot free or in the tree, no locks, no rows held."""
        self.cache.check_invariants()
        return (not self.sched.has_work()
                and self.pool.available_size() + self.cache.total_size() == self.pool.num_slots
                and self.cache.protected_size() == 0
                and self.req_pool.available_size() == self.req_pool.max_requests)


@dataclass
class MemoryRun:
    system: System
    log: RunLog
    prefill_counter: int  # extend tokens counted step by step
    evicted_tokens: int
    leak_free: bool


def run_memory(trace: Trace, system: System, capacity: int, *, max_running: int, window: int,
               chunk: int, eviction_policy: str = "lru", declared_max_tokens: int = 0,
               progress: Callable[[int], Any] | None = None) -> MemoryRun:
    """Replay `trace` on the memory levels with `system`'s policy and cache at `capacity` slots.

    Each request declares max_tokens = max(len(answer), declared_max_tokens) and stops at the
    end of its scripted answer (the memory-efficiency table charges a contiguous cache for the
    declared length, as the client's cap is all it knows in advance).
    """
    adapter = SchedulerAdapter(trace, capacity, system.policy, system.prefix_cache, max_running,
                               chunk, eviction_policy, declared_max_tokens)
    log = drive(trace, adapter, capacity, window, progress)
    return MemoryRun(system, log, adapter.prefill_counter, adapter.cache.stats().evicted_tokens
                     if system.prefix_cache else 0, adapter.leak_free())
