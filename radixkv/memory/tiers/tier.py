"""`KVTier`: the engine's door to a KV store below the device pool.

Engine thread (never waits on the store):
- `save(namespace, tokens, slots, from_token)`: copy the K/V of every full tier page that ends
  after `from_token` out of the pool (a gather, synchronous, before the slots can be reused) and
  queue it; a writer thread encodes and stores batches in the background.
- `lookup(namespace, tokens, first_page, num_pages)`: a Future of the longest run of consecutive,
  verified pages from `first_page` on, fetched by a reader thread.
- `load(slots, run)`: write fetched pages into pool slots.

Store failures never reach the engine: a failed read is a miss, a failed write is dropped; both
are counted by kind, warned about once per episode (until the store answers again), and the
redis client reconnects by itself. `close()` flushes queued writes within a bounded time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from radixkv.memory.kv_pool import TokenToKVPool
from radixkv.memory.tiers.codec import CorruptPage, decode_page, encode_page
from radixkv.memory.tiers.keys import chain_seed, layout_fingerprint, page_keys
from radixkv.memory.tiers.stores import KVStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_PAGE_TOKENS = 64
WRITE_BATCH = 16  # pages per store round-trip
MAX_QUEUED_PAGES = 256  # beyond this, writes are dropped (counted) rather than held in memory
KNOWN_KEYS = 1 << 16  # keys remembered as stored, so a page is not written twice
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)  # fetch seconds


@dataclass(slots=True)
class PageRun:
    """Consecutive verified pages: page `first_page` .. first_page + len(payloads) - 1."""

    first_page: int
    payloads: list[bytes]


@dataclass(slots=True)
class TierStats:
    hit_tokens: int = 0  # tokens the engine took from the tier into the tree
    fetched_pages: int = 0
    missed_pages: int = 0  # looked up, not there (or not verifiable)
    written_pages: int = 0
    dropped_writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    fetch_latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    fetch_seconds: float = 0.0


class KVTier:
    """A store of KV pages shared across restarts (disk) or processes (Redis)."""

    def __init__(self, store: KVStore, pool: TokenToKVPool, model_fingerprint: bytes,
                 page_tokens: int = DEFAULT_PAGE_TOKENS, write_through: bool = False) -> None:
        self.store = store
        self.pool = pool
        self.page_tokens = page_tokens
        self.write_through = write_through
        buffers = pool.slot_buffers()
        self._row_bytes = [b[0].numel() * b.element_size() for b in buffers]
        self.page_bytes = page_tokens * sum(self._row_bytes)
        layout = ";".join(f"{b.dtype}{tuple(b.shape[1:])}" for b in buffers)
        self._layout_fp = layout_fingerprint(layout, str(pool.dtype), page_tokens)
        self._model_fp = model_fingerprint
        self._seeds: dict[Hashable, bytes] = {}
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()  # stats, _known, health
        self.stats = TierStats()
        self._healthy = True
        self._bw: float | None = None  # measured fetch bytes/s
        self._writes: queue.Queue = queue.Queue()
        self._queued = 0
        self._writer = threading.Thread(target=self._write_loop, name="radixkv-tier-writer",
                                        daemon=True)
        self._writer.start()
        self._reader = concurrent.futures.ThreadPoolExecutor(1, "radixkv-tier-reader")

    # ---- keys -------------------------------------------------------------------------------
    def seed(self, namespace: Hashable) -> bytes:
        s = self._seeds.get(namespace)
        if s is None:
            s = self._seeds[namespace] = chain_seed(self._model_fp, self._layout_fp, namespace)
        return s

    def keys(self, namespace: Hashable, tokens: np.ndarray, first_page: int = 0,
             num_pages: int | None = None) -> list[bytes]:
        return page_keys(self.seed(namespace), tokens, self.page_tokens, num_pages,
                         first_page=first_page)

    # ---- write path (engine thread -> writer thread) ----------------------------------------
    def save(self, namespace: Hashable, tokens: np.ndarray, slots: np.ndarray,
             from_token: int = 0) -> int:
        """Queue the full pages of (tokens, slots) that end after `from_token`; returns pages
        queued. Pages already stored (as far as this process knows) are skipped."""
        t = self.page_tokens
        n_full = len(tokens) // t
        first = max(0, from_token // t)
        if first >= n_full:
            return 0
        keys = self.keys(namespace, tokens, 0, n_full)[first:]
        with self._lock:
            todo = [(first + i, k) for i, k in enumerate(keys) if k not in self._known]
            room = MAX_QUEUED_PAGES - self._queued
            if len(todo) > room:
                self.stats.dropped_writes += len(todo) - max(room, 0)
                todo = todo[:max(room, 0)]
            self._queued += len(todo)
        if not todo:
            return 0
        idx = np.concatenate([slots[j * t:(j + 1) * t] for j, _ in todo]).astype(np.int64)
        rows = self._gather(torch.from_numpy(idx))  # per buffer [len(todo) * t, ...] on CPU
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        pages = []
        for n, (j, key) in enumerate(todo):
            payload = b"".join(r[n * t:(n + 1) * t].numpy().tobytes() for r in rows)
            pages.append((key, toks[j * t:(j + 1) * t].copy(), payload))
        self._writes.put(pages)
        return len(pages)

    def _gather(self, idx: torch.Tensor) -> list[torch.Tensor]:
        dev = self.pool.device
        rows = [b.index_select(0, idx.to(dev)) for b in self.pool.slot_buffers()]
        return [r.cpu().contiguous().view(torch.uint8) for r in rows]  # raw bytes, any dtype

    def _write_loop(self) -> None:
        while True:
            batch = self._writes.get()
            if batch is None:
                return
            for i in range(0, len(batch), WRITE_BATCH):
                chunk = batch[i:i + WRITE_BATCH]
                items = [(k, encode_page(k, toks, payload)) for k, toks, payload in chunk]
                try:
                    self.store.put_many(items)
                except StoreError as exc:
                    self._failed(exc)
                    with self._lock:
                        self.stats.dropped_writes += len(chunk)
                else:
                    self._ok()
                    with self._lock:
                        self.stats.written_pages += len(items)
                        self.stats.bytes_written += sum(len(v) for _, v in items)
                        for k, _ in items:
                            self._remember(k)
            with self._lock:
                self._queued -= len(batch)

    def _remember(self, key: bytes) -> None:  # under _lock
        self._known[key] = None
        self._known.move_to_end(key)
        if len(self._known) > KNOWN_KEYS:
            self._known.popitem(last=False)

    # ---- read path (engine thread -> reader thread) -----------------------------------------
    def worth_fetching(self, num_tokens: int, prefill_tokens_per_s: float | None) -> bool:
        """Fetch when bytes / measured bandwidth beats tokens / measured prefill speed; before
        either is measured, assume a full tier page is cheaper to fetch."""
        if not self._bw or not prefill_tokens_per_s:
            return True
        fetch_s = num_tokens * self.page_bytes / self.page_tokens / self._bw
        return fetch_s < num_tokens / prefill_tokens_per_s

    def lookup(self, namespace: Hashable, tokens: np.ndarray, first_page: int,
               num_pages: int) -> concurrent.futures.Future:
        """A Future of the `PageRun` of consecutive verified pages from `first_page` (possibly
        empty). Never raises: failures are misses."""
        keys = self.keys(namespace, tokens, first_page, num_pages)
        t = self.page_tokens
        toks = np.ascontiguousarray(tokens[:(first_page + len(keys)) * t], dtype=np.int32)
        return self._reader.submit(self._fetch, keys, toks, first_page)

    def _fetch(self, keys: list[bytes], toks: np.ndarray, first_page: int) -> PageRun:
        t0 = time.perf_counter()
        try:
            values = self.store.get_many(keys)
        except StoreError as exc:
            self._failed(exc)
            with self._lock:
                self.stats.missed_pages += len(keys)
            return PageRun(first_page, [])
        self._ok()
        t = self.page_tokens
        payloads: list[bytes] = []
        got = 0
        for i, (key, value) in enumerate(zip(keys, values, strict=True)):
            if value is None:
                break
            got += len(value)
            j = first_page + i
            try:
                payload = decode_page(value, key, toks[j * t:(j + 1) * t], self.page_bytes)
            except CorruptPage as exc:
                self._count_error(f"corrupt_{exc.kind}")
                break
            payloads.append(bytes(payload))
        dt = time.perf_counter() - t0
        with self._lock:
            s = self.stats
            s.fetched_pages += len(payloads)
            s.missed_pages += len(keys) - len(payloads)
            s.bytes_read += got
            s.fetch_seconds += dt
            s.fetch_latency[next((i for i, b in enumerate(LATENCY_BUCKETS) if dt <= b),
                                 len(LATENCY_BUCKETS))] += 1
            if got and dt > 0:
                bw = got / dt
                self._bw = bw if self._bw is None else 0.8 * self._bw + 0.2 * bw
            for key in keys[:len(payloads)]:
                self._remember(key)
        return PageRun(first_page, payloads)

    def load(self, slots: torch.Tensor, payloads: list[bytes]) -> None:
        """Write fetched pages (in order) into `slots` ([len(payloads) * page_tokens])."""
        t = self.page_tokens
        dev = self.pool.device
        idx = slots.to(dev)
        offset = 0
        buffers = self.pool.slot_buffers()
        for b, row in zip(buffers, self._row_bytes, strict=True):
            n = row * t
            data = b"".join(p[offset:offset + n] for p in payloads)
            src = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(b.dtype)
            b[idx] = src.view(len(payloads) * t, *b.shape[1:]).to(dev)
            offset += n

    # ---- health -----------------------------------------------------------------------------
    def _failed(self, exc: StoreError) -> None:
        self._count_error(exc.kind)
        with self._lock:
            first = self._healthy
            self._healthy = False
            self._known.clear()  # the store may have lost what we wrote
        if first:
            log.warning("KV store %s failed (%s): serving by recomputing until it answers "
                        "again", self.store.url, exc)

    def _ok(self) -> None:
        with self._lock:
            back = not self._healthy
            self._healthy = True
        if back:
            log.warning("KV store %s answers again", self.store.url)

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1

    def snapshot(self) -> dict[str, object]:
        """Counters for `cache_stats()` / `/metrics` (prefixed `tier_`)."""
        with self._lock:
            s = self.stats
            return {
                "tier_store": self.store.url, "tier_page_tokens": self.page_tokens,
                "tier_hit_tokens": s.hit_tokens, "tier_fetched_pages": s.fetched_pages,
                "tier_missed_pages": s.missed_pages, "tier_written_pages": s.written_pages,
                "tier_dropped_writes": s.dropped_writes, "tier_bytes_read": s.bytes_read,
                "tier_bytes_written": s.bytes_written, "tier_errors": dict(s.errors),
                "tier_fetch_latency_buckets": list(zip((*LATENCY_BUCKETS, float("inf")),
                                                       s.fetch_latency, strict=True)),
                "tier_fetch_seconds": s.fetch_seconds, "tier_healthy": self._healthy,
            }

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (at most `timeout` s) until queued writes are stored; False if some remain."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._queued == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Flush within `timeout`, stop the threads, close the store."""
        self.flush(timeout)
        self._writes.put(None)
        self._writer.join(timeout)
        self._reader.shutdown(wait=False, cancel_futures=True)
        self.store.close()
