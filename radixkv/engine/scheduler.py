"""Decides what runs each step and moves KV slots between requests, the tree and the free list.

Slot ownership across a request's life (positions of its row in req_to_token):

| event                | [0, cached_len)      | [cached_len, kv_len)               |
|----------------------|----------------------|------------------------------------|
| admit (match + lock) | tree, locked         | (empty)                            |
| extend / decode      | tree, locked         | request (new slots: free list ->)  |
| prefill chunk done   | tree grows to the    | duplicates of tree -> free list;   |
|   (insert + relock)  | page-aligned kv_len  | page tail stays the request's      |
| finish/preempt/abort | unlocked: evictable  | new -> tree (insert); duplicates   |
|                      |                      | and page tail -> free list         |
| forward failed       | unlocked: evictable  | everything -> free list (the KV of |
|                      |                      | the failed step is not trusted)    |

KV tier (optional): before admission, pages fetched for a waiting request go free list -> slots
written from the tier -> tree (insert; duplicates of what the tree gained meanwhile -> free
list), so the request is admitted with them as an ordinary tree hit. Leaves evicted from the tree
are copied to the tier (write-back) before their slots return to the free list.

Forks (parallel samples `n > 1`, beam search; see `fork`): the source's computed, page-aligned
KV goes into the tree first, so every fork shares it by locking the same node:

| event                | [0, cached_len)      | [cached_len, kv_len)               |
|----------------------|----------------------|------------------------------------|
| schedule the step    | (as above)           | (as above); the group's parent also|
|   that forks         |                      | owns `fork_slots`: (forks) x tail  |
| fork (insert + lock) | tree, locked once    | the source's tail (< page_size     |
|                      | more by each fork    | tokens) is copied into fork_slots: |
|                      |                      | each fork owns its own copy (COW)  |
| parent after fork    | nothing (FORKED)     | its tail went to sample 0 / beam 0 |
| beam pruned          | unlocked             | its own tail -> free list          |
| end of the step      |                      | unused fork_slots -> free list     |

A forking parent keeps `width - 1` request rows in reserve from admission to its fork.

Invariant when idle: pool free slots + tree slots == pool size.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from radixkv.engine.request import Request, Status
from radixkv.engine.schedule_policy import order_waiting
from radixkv.errors import EngineError, OutOfSlotsError
from radixkv.memory.base_cache import PrefixCache, common_prefix_len
from radixkv.memory.kv_pool import TokenToKVPool
from radixkv.memory.req_pool import ReqToTokenPool
from radixkv.memory.tiers import KVTier, PageRun

DEFER_MIN_SHARED = 16  # tokens of not-yet-cached overlap that make a request wait one step
HEADROOM_STEPS = 16  # decode steps of each running request kept free when admitting another


@dataclass(slots=True)
class ScheduledReq:
    """One request's share of a forward: positions [start, end) get K/V written to `slots`."""

    req: Request
    start: int
    end: int
    slots: torch.Tensor  # [end - start] int64
    samples_next: bool  # end reaches the request's last token: sample the next one


@dataclass(slots=True)
class Batch:
    is_decode: bool
    items: list[ScheduledReq]

    @property
    def num_tokens(self) -> int:
        return sum(it.end - it.start for it in self.items)


class Scheduler:
    """Continuous batching over a prefix cache: admission, chunked prefill, preemption."""

    def __init__(self, cache: PrefixCache, kv_pool: TokenToKVPool, req_pool: ReqToTokenPool,
                 policy: str = "lpm", chunked_prefill_size: int = 512,
                 max_running_requests: int = 64, tier: KVTier | None = None) -> None:
        self.cache = cache
        self.kv_pool = kv_pool
        self.req_pool = req_pool
        self.policy = policy  # validated by EngineConfig
        self.chunked_prefill_size = chunked_prefill_size
        self.max_running_requests = max_running_requests
        self.page_size = cache.page_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefill_tokens = 0  # tokens sent through extend (prompt tokens fed by decode too)
        self.decode_tokens = 0
        self.tier = tier
        self.prefill_tokens_per_s: float | None = None  # measured by the engine, for the tier
        if tier is not None and cache.retains_slots:
            cache.evict_hook = tier.save  # write-back of evicted prefixes
        self.reserved_rows = 0  # rows promised to admitted parents for their coming forks

    # ---- queue ------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- phase 1 of a step ------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Pick the next forward: prefill/extend work first, else one decode step for all.

        None only when there is nothing to run. If running requests block each other (all
        mid-prefill, memory full of their own KV), the newest is preempted until one can move.
        """
        while True:
            batch = self._schedule_extend()
            if batch is None:
                batch = self._schedule_decode()
            if batch is not None or not self.running:
                return batch
            self._preempt(self.running[-1])

    def _schedule_extend(self) -> Batch | None:
        budget = self.chunked_prefill_size
        items: list[ScheduledReq] = []
        for req in self.running:  # unfinished chunked prefills first
            if budget and req.in_prefill:
                item = self._extend_item(req, budget)
                if item is None:
                    break
                items.append(item)
                budget -= item.end - item.start
        if self.waiting and budget and len(self.running) < self.max_running_requests:
            for req in order_waiting(self.policy, list(self.waiting), self.cache):
                if not budget or len(self.running) >= self.max_running_requests:
                    break
                if items and self._waits_for_batch(req, items):
                    continue
                if self.tier is not None and not self._tier_settled(req):
                    continue  # its pages are being fetched: others go first
                if not self._admit(req):
                    break
                item = self._extend_item(req, budget)
                if item is None:
                    self._release(req, cache_kv=False)
                    self.running.remove(req)
                    req.status = Status.WAITING
                    break
                self.waiting.remove(req)
                if req.prefix_hit < 0:
                    req.prefix_hit = req.cached_len
                items.append(item)
                budget -= item.end - item.start
        return Batch(False, items) if items else None

    def _waits_for_batch(self, req: Request, items: list[ScheduledReq]) -> bool:
        """Defer `req` one step if a request in this batch is computing a prefix it shares.

        Both would miss the cache and compute the shared part twice; a step later it is in the
        tree. Only deferred when the overlap beyond what is cached is worth a step.
        """
        if not self.cache.retains_slots:
            return False
        ids = req.token_ids()[:-1]
        for it in items:
            if it.req.namespace != req.namespace:
                continue
            shared = common_prefix_len(it.req.token_ids()[:it.end], ids)
            if shared - it.start >= DEFER_MIN_SHARED:
                return True
        return False

    # ---- KV tier -----------------------------------------------------------------------------
    def _tier_settled(self, req: Request) -> bool:
        """False while a fetch for `req` is in flight; starts one on first sight, installs the
        fetched pages into the tree once it is done."""
        state = req.tier_lookup
        if state is True:
            return True
        if state is None:
            if not self.cache.retains_slots:
                req.tier_lookup = True
                return True
            ids = req.token_ids()
            t = self.tier.page_tokens
            m = self.cache.match_prefix(ids[:-1], req.namespace, record=False)
            first, last = m.length // t, (len(ids) - 1) // t  # full pages before the last token
            if last <= first or not self.tier.worth_fetching((last - first) * t,
                                                             self.prefill_tokens_per_s):
                req.tier_lookup = True
                return True
            req.tier_lookup = self.tier.lookup(req.namespace, ids, first, last - first)
            return False
        if not state.done():
            return False
        req.tier_lookup = True
        self._install_pages(req, state.result())
        return True

    def wait_for_fetches(self, timeout: float) -> None:
        """Block up to `timeout` s until a waiting request's tier fetch lands (if any runs)."""
        pending = [r.tier_lookup for r in self.waiting
                   if r.tier_lookup is not None and r.tier_lookup is not True]
        if pending:
            concurrent.futures.wait(pending, timeout, concurrent.futures.FIRST_COMPLETED)

    def _install_pages(self, req: Request, run: PageRun) -> None:
        """Put fetched pages into the tree (locked while slots are found, so the prefix they
        extend cannot be evicted under them)."""
        if not run.payloads:
            return
        t = self.tier.page_tokens
        ids = req.token_ids()
        m = self.cache.match_prefix(ids[:-1], req.namespace, record=False)
        start, end = run.first_page * t, (run.first_page + len(run.payloads)) * t
        skip = max(0, m.length - start) // t  # pages the tree gained meanwhile
        start += skip * t
        if start >= end or start > m.length:  # nothing new, or the tree lost the prefix before
            return
        self.cache.lock(m.node)
        try:
            slots = self._alloc(end - start)
            if slots is None:
                return
            self.tier.load(slots, run.payloads[skip:])
            full = torch.cat([m.slots[:start], slots])
            already = self.cache.insert(ids[:end], full, req.namespace)
            if already > start:
                self.kv_pool.free(slots[:already - start])
            self.tier.stats.hit_tokens += end - max(already, start)
        finally:
            self.cache.unlock(m.node)

    def _schedule_decode(self) -> Batch | None:
        while True:
            decoding = [r for r in self.running if not r.in_prefill]
            if not decoding:
                return None
            owners = self._decode_fork_needs(decoding)
            slots = self._alloc(len(decoding) + sum(k for _, k in owners))
            if slots is not None:
                break
            self._preempt(self.running[-1])  # newest admitted loses the least work
        off = len(decoding)
        for owner, k in owners:
            owner.fork_slots, off = slots[off:off + k], off + k
        items = []
        for i, req in enumerate(decoding):
            self.req_pool.write(req.row, req.kv_len, slots[i:i + 1])
            items.append(ScheduledReq(req, req.kv_len, req.kv_len + 1, slots[i:i + 1], True))
        return Batch(True, items)

    # ---- forks ------------------------------------------------------------------------------
    def _tail(self, kv: int) -> int:
        """Tokens of a sequence of length kv not in the tree after `cache_prefix` (COW copies)."""
        return kv % self.page_size if self.cache.retains_slots else kv

    def _fork_need(self, req: Request, end: int) -> int:
        """Slots the forks of a pending parent take when its forward ends at `end`."""
        if not req.pending_fork or end != req.total_len:
            return 0
        return (req.width - 1) * self._tail(end)

    def _decode_fork_needs(self, decoding: list[Request]) -> list[tuple[Request, int]]:
        """(owner, slots) reserved for the forks of this decode step: pending parents and beam
        groups (at most width - 1 forks per group per step, each copying the tail)."""
        out: list[tuple[Request, int]] = []
        seen: set[int] = set()
        for req in decoding:
            owner = req.group
            if id(owner) in seen or not (req.pending_fork or req.is_beam):
                continue
            seen.add(id(owner))
            k = (owner.width - 1) * self._tail(req.kv_len + 1)
            if k:
                out.append((owner, k))
        return out

    def fork(self, src: Request, children: list[Request], tokens: list[int], owner: Request,
             src_continues: bool) -> None:
        """Fork `src` (all its tokens computed) into `children`, child i then taking tokens[i].

        The source's page-aligned KV goes into the tree and each child locks that node; the
        unaligned tail is copied into slots from `owner.fork_slots` (reserved when the step was
        scheduled), so no slot is ever written or owned by two sequences. Unless
        `src_continues`, children[0] takes over the source's row, lock and tail and the source
        turns FORKED holding nothing (a parent at its first sample).
        """
        self.cache_prefix(src)
        kv, cached = src.kv_len, src.cached_len
        tail = kv - cached
        copies = len(children) - (0 if src_continues else 1)
        if copies and src.row < 0:
            raise EngineError("fork of a sequence that holds no row")
        src_tail = torch.from_numpy(self._row_slots(src, kv)[cached:])
        new = torch.empty(0, dtype=torch.int64)
        if copies * tail:
            reserve = owner.fork_slots
            if reserve is None or len(reserve) < copies * tail:
                raise EngineError("fork without reserved copy-on-write slots")
            new, owner.fork_slots = reserve[:copies * tail], reserve[copies * tail:]
        if not src_continues:  # the parent's promised rows are now taken
            self.reserved_rows -= src.reserved_rows
            src.reserved_rows = 0
        prefix = self.req_pool.req_to_token[src.row, :cached]
        pos = self.running.index(src) + 1 if src in self.running else len(self.running)
        j = 0
        for i, (child, tok) in enumerate(zip(children, tokens, strict=True)):
            child.copy_tokens_from(src)
            if i == 0 and not src_continues:
                child.row, child.node = src.row, src.node
            else:
                child.row = self.req_pool.alloc()
                self.req_pool.req_to_token[child.row, :cached] = prefix
                self.cache.lock(src.node)
                child.node = src.node
                own = new[j * tail:(j + 1) * tail]
                j += 1
                self.kv_pool.copy_slots(src_tail, own)  # copy-on-write of the partial page
                self.req_pool.write(child.row, cached, own)
            child.cached_len, child.kv_len = cached, kv
            child.status = Status.RUNNING
            child.append_token(tok)
        self.running[pos:pos] = children
        if not src_continues:
            self.running.remove(src)
            src.row, src.node, src.cached_len, src.kv_len = -1, None, 0, 0
            src.status = Status.FORKED

    def prune(self, req: Request) -> None:
        """Drop a beam: free its own tail, unlock its shared prefix, give back its row."""
        self._release(req, cache_kv=False)
        self.running.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = "pruned"

    def drop_fork_slots(self, owner: Request) -> None:
        """Free what is left of `owner`'s reserved copy-on-write slots."""
        if owner.fork_slots is not None:
            self.kv_pool.free(owner.fork_slots)
            owner.fork_slots = None

    def _restart_beams(self, group: Request) -> None:
        """Preempting one beam preempts its search: every live beam's KV goes into the tree
        (evictable), the search state is reset and the parent requeues at the front."""
        for beam in group.samples or ():
            if beam.status is Status.RUNNING:
                self._release(beam)
                self.running.remove(beam)
            beam.status = Status.FINISHED
            beam.finish_reason = "preempted"
        self.drop_fork_slots(group)
        group.samples = []
        group.beam.reset()
        group.status = Status.WAITING
        group.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(group)

    # ---- memory -----------------------------------------------------------------------------
    def _alloc(self, n: int) -> torch.Tensor | None:
        """n free slots, evicting from the tree first; None if even that is not enough."""
        short = n - self.kv_pool.available_size()
        if short > 0:
            self.cache.evict(short)
        try:
            return self.kv_pool.alloc(n)
        except OutOfSlotsError:
            return None

    def _headroom(self) -> int:
        """Slots kept back for the next few decode steps of the running requests."""
        return sum(min(r.params.max_tokens - len(r.output_ids), HEADROOM_STEPS)
                   for r in self.running)

    def _admit(self, req: Request) -> bool:
        """Give a waiting request a row and lock its cached prefix; False if it must wait."""
        extra = req.width - 1 if req.parent is None and (req.beam is not None
                                                         or req.params.n > 1) else 0
        if self.req_pool.available_size() - self.reserved_rows < 1 + extra:
            return False
        ids = req.token_ids()
        need = len(ids) - 1  # upper bound of what it will compute before decoding
        free_soon = self.kv_pool.available_size() + self.cache.evictable_size()
        if self.running and free_soon < min(need, self.chunked_prefill_size) + self._headroom():
            return False
        m = self.cache.match_prefix(ids[:-1], req.namespace)  # always leave a token to compute
        self.cache.lock(m.node)
        req.row = self.req_pool.alloc()
        req.node, req.cached_len, req.kv_len = m.node, m.length, m.length
        if m.length:
            self.req_pool.write(req.row, 0, m.slots)
        req.status = Status.RUNNING
        req.reserved_rows = extra
        self.reserved_rows += extra
        self.running.append(req)
        return True

    def _extend_item(self, req: Request, budget: int) -> ScheduledReq | None:
        start = req.kv_len
        end = min(req.total_len, start + budget)
        need = self._fork_need(req, end)
        slots = self._alloc(end - start + need)
        if slots is None:
            return None
        if need:
            req.fork_slots, slots = slots[end - start:], slots[:end - start]
        self.req_pool.write(req.row, start, slots)
        return ScheduledReq(req, start, end, slots, end == req.total_len)

    def _row_slots(self, req: Request, end: int) -> np.ndarray:
        return self.req_pool.req_to_token[req.row, :end].to(torch.int64).cpu().numpy()

    def cache_prefix(self, req: Request) -> None:
        """After a prefill chunk: hand the computed, page-aligned KV to the tree (stays locked)."""
        if not self.cache.retains_slots:
            return  # a cache that keeps nothing would free KV the request still reads
        kv = req.kv_len
        if kv // self.page_size * self.page_size <= req.cached_len:
            return
        fill = req.token_ids()[:kv]
        slots = self._row_slots(req, kv)
        already = self.cache.insert(fill, slots, req.namespace)
        if already > req.cached_len:  # someone cached these meanwhile: use theirs, free ours
            self.kv_pool.free(slots[req.cached_len:already])
        m = self.cache.match_prefix(fill, req.namespace, record=False)
        if already > req.cached_len:
            self.req_pool.write(req.row, req.cached_len, m.slots[req.cached_len:already])
        self.cache.lock(m.node)
        self.cache.unlock(req.node)
        req.node, req.cached_len = m.node, m.length

    def _release(self, req: Request, cache_kv: bool = True) -> None:
        """Give back everything a running request holds (see the table above)."""
        kv = req.kv_len
        if kv > req.cached_len:
            slots = self._row_slots(req, kv)
            own = slots[req.cached_len:]
            if cache_kv:
                already = self.cache.insert(req.token_ids()[:kv], slots, req.namespace)
                adopted_end = kv // self.page_size * self.page_size
                with self.kv_pool.free_group():
                    if already > req.cached_len:
                        self.kv_pool.free(slots[req.cached_len:already])
                    if adopted_end < kv:
                        self.kv_pool.free(slots[max(adopted_end, req.cached_len):kv])
            else:
                self.kv_pool.free(own)
        self.cache.unlock(req.node)
        self.req_pool.free(req.row)
        req.row, req.node, req.cached_len, req.kv_len = -1, None, 0, 0
        self.reserved_rows -= req.reserved_rows
        req.reserved_rows = 0

    def _preempt(self, req: Request) -> None:
        """Stop a running request: cache its KV, free the rest, requeue it at the front.

        A sample of an n-request is preempted alone; a beam takes its whole search along."""
        if req.parent is not None and req.is_beam:
            self._restart_beams(req.parent)
            return
        self._release(req)
        self.running.remove(req)
        req.status = Status.WAITING
        req.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- phase 3 -----------------------------------------------------------------------------
    def postprocess(self, batch: Batch, next_tokens: list[int]) -> list[Request]:
        """End-of-step memory work: advance kv_len, share computed prefixes with the tree at
        chunk ends, append each sampled token (`next_tokens`, one per `samples_next` item, in
        item order). Returns the requests that got a token; finishing them is the caller's.

        An entry may also be a list (a pending parent's first token of each sample: the parent
        forks into `req.samples`, which are returned) or None (a beam: the caller chooses)."""
        sampled: list[Request] = []
        tokens = iter(next_tokens)
        for it in batch.items:
            req = it.req
            req.kv_len = it.end
            # A decode step that feeds a prompt token (a chunk stopped one short of the prompt's
            # end, or a cache hit covered all but the last token) is prefill work.
            if batch.is_decode and req.output_ids:
                self.decode_tokens += 1
            else:
                self.prefill_tokens += it.end - it.start
                req.prefill_tokens += it.end - it.start
            if not it.samples_next or not batch.is_decode:
                self.cache_prefix(req)  # chunk boundary / prompt done: share the prefix early
                if it.samples_next and self.tier is not None and self.tier.write_through:
                    self.tier.save(req.namespace, req.token_ids()[:req.kv_len],
                                   self._row_slots(req, req.kv_len))
            if it.samples_next:
                tok = next(tokens)
                if isinstance(tok, list):
                    self.fork(req, req.samples, tok, owner=req, src_continues=False)
                    self.drop_fork_slots(req)
                    sampled.extend(req.samples)
                elif tok is not None:
                    req.append_token(tok)
                    sampled.append(req)
        return sampled

    def fail(self, batch: Batch) -> list[Request]:
        """A forward of `batch` raised: free everything its requests hold (nothing of theirs
        goes into the tree: the failed step's KV is not trusted) and mark them finished."""
        reqs = []
        for it in batch.items:
            req = it.req
            if req.status is not Status.RUNNING:
                continue
            with self.kv_pool.free_group():
                self.kv_pool.free(it.slots)  # written (or not) by the failed forward
                self._release(req, cache_kv=False)
                self.drop_fork_slots(req.group)
            self.running.remove(req)
            req.status = Status.FINISHED
            req.finish_reason = "error"
            reqs.append(req)
        return reqs

    def finish(self, req: Request, reason: str) -> None:
        """Release a request's memory (its KV goes into the tree) and mark it finished."""
        if req.status is Status.RUNNING:
            self._release(req)
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
