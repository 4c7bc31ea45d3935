"""KV tiers: page keys, the verified codec, the file store, and tree + tier on the real scheduler.

Oracles: hand-computed hash chains and byte layouts; and, for the state machine, KV contents that
encode the prefix they belong to, so any slot the tree holds (whether computed or fetched) can be
checked to hold the KV of exactly its own prefix.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from radixkv.engine.request import Request
from radixkv.engine.sampling_params import SamplingParams
from radixkv.engine.scheduler import Scheduler
from radixkv.errors import ConfigError
from radixkv.memory import RadixCache, ReqToTokenPool, TokenToKVPool
from radixkv.memory.tiers import (
    CorruptPage,
    FileStore,
    KVTier,
    decode_page,
    encode_page,
    open_store,
    page_keys,
)
from radixkv.memory.tiers.keys import chain_seed, namespace_bytes


# ---- keys -------------------------------------------------------------------------------------
def test_page_keys_are_a_hash_chain() -> None:
    seed = b"s" * 16
    toks = np.arange(10, dtype=np.int32)
    k0 = xxhash.xxh3_128(seed + toks[:4].tobytes()).digest()
    k1 = xxhash.xxh3_128(k0 + toks[4:8].tobytes()).digest()
    assert page_keys(seed, toks, 4) == [k0, k1]  # the partial third page has no key
    assert page_keys(seed, toks, 4, first_page=1) == [k1]
    assert page_keys(seed, toks, 4, first_page=1, prev=k0) == [k1]
    other = toks.copy()
    other[0] = 99  # an earlier token changes every later key
    assert page_keys(seed, other, 4)[1] != k1


def test_seeds_separate_models_layouts_and_namespaces() -> None:
    m1, m2, lay = b"m" * 16, b"n" * 16, b"l" * 16
    seeds = {chain_seed(m, lay, ns) for m in (m1, m2) for ns in (None, "a", "b", 1, ("a", 1))}
    assert len(seeds) == 10
    assert namespace_bytes("1") != namespace_bytes(1)
    with pytest.raises(TypeError):
        namespace_bytes(object())


# ---- codec ------------------------------------------------------------------------------------
def test_codec_round_trip_and_every_corruption_is_a_typed_miss() -> None:
    key, toks, payload = b"k" * 16, np.array([5, 6, 7], dtype=np.int32), bytes(range(24))
    value = encode_page(key, toks, payload)
    assert len(value) == 28 + 12 + 24 + 8  # header, tokens, payload, checksum
    assert bytes(decode_page(value, key, toks, 24)) == payload

    def kind(v: bytes, k: bytes = key, t: np.ndarray = toks, n: int = 24) -> str:
        with pytest.raises(CorruptPage) as info:
            decode_page(v, k, t, n)
        return info.value.kind

    flipped = bytearray(value)
    flipped[50] ^= 1
    assert kind(bytes(flipped)) == "checksum"
    assert kind(value[:-3]) == "size"
    assert kind(b"XXXX" + value[4:]) == "format"
    assert kind(value, k=b"j" * 16) == "key"
    assert kind(value, t=np.array([5, 6, 8], dtype=np.int32)) == "tokens"  # a collision
    assert kind(value, n=25) == "size"  # another layout
    assert kind(b"") == "size"
    # a value whose checksum was recomputed over altered tokens still fails on the tokens
    body = bytearray(value[:-8])
    body[28:32] = struct.pack("<i", 9)
    forged = bytes(body) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(body)))
    assert kind(forged) == "tokens"


# ---- file store -------------------------------------------------------------------------------
def test_file_store_is_bounded_lru_and_survives_restart(tmp_path) -> None:
    store = FileStore(str(tmp_path), max_bytes=350)
    keys = [bytes([i]) * 16 for i in range(5)]
    for k in keys[:3]:
        store.put_many([(k, b"x" * 100)])
    assert store.get_many([keys[0]]) == [b"x" * 100]  # 0 is now the most recent
    store.put_many([(keys[3], b"y" * 100)])  # 400 > 350: the least recent (1) goes
    assert store.get_many(keys[:4]) == [b"x" * 100, None, b"x" * 100, b"y" * 100]
    assert store.size_bytes() <= 350
    again = FileStore(str(tmp_path), max_bytes=350)  # a restarted engine sees the same pages
    assert again.get_many([keys[3], keys[1]]) == [b"y" * 100, None]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_open_store_rejects_bad_urls(tmp_path) -> None:
    for bad in ("ftp://x", "file://", 42, "mysql://h/db"):
        with pytest.raises(ConfigError):
            open_store(bad)  # type: ignore[arg-type]
    assert isinstance(open_store(f"file://{tmp_path}/kv?max_bytes=1000"), FileStore)


# ---- tree + tier on the real scheduler --------------------------------------------------------
PAGE = 4
SLOTS = 40


def prefix_value(ns: str, tokens: tuple[int, ...]) -> float:
    """The K value every layer/head stores for the last token of `tokens` (a prefix code)."""
    return float(xxhash.xxh32_intdigest(repr((ns, tokens)).encode()) % 100_000)


class TreeTierMachine(RuleBasedStateMachine):
    """Requests arrive, their prompts are computed (K = a code of the prefix) and cached,
    eviction writes pages back, and later requests fetch them through the scheduler's own path.

    Invariants: slot ownership (free + tree == pool), the tree's own invariants, and: every slot
    the tree holds stores the code of exactly the prefix it is cached under, so a fetched page
    can never be the wrong KV.
    """

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp()
        self.pool = TokenToKVPool(SLOTS, num_layers=2, num_kv_heads=1, head_dim=2)
        self.cache = RadixCache(self.pool)
        self.tier = KVTier(FileStore(self.dir), self.pool, b"model-fingerprint", PAGE)
        self.sched = Scheduler(self.cache, self.pool, ReqToTokenPool(4, 64), tier=self.tier)
        self.n = 0
        self.fetched = 0

    def teardown(self) -> None:
        self.tier.close()

    def _compute(self, ns: str, toks: np.ndarray) -> None:
        """What a prefill does to memory: match, allocate the rest, write KV, insert."""
        m = self.cache.match_prefix(toks, ns)
        n = len(toks) - m.length
        if n == 0:
            return
        self.cache.lock(m.node)
        short = n - self.pool.available_size()
        if short > 0:
            self.cache.evict(short)
        self.cache.unlock(m.node)
        if self.pool.available_size() < n:
            return
        slots = self.pool.alloc(n)
        for i, s in enumerate(slots.tolist()):
            val = prefix_value(ns, tuple(toks[:m.length + i + 1].tolist()))
            for buf in self.pool.slot_buffers():
                buf[s] = val
        already = self.cache.insert(toks, torch.cat([m.slots, slots]), ns)
        if already > m.length:
            self.pool.free(slots[:already - m.length])

    @rule(ns=st.sampled_from(["a", "b"]), base=st.integers(0, 2),
          tail=st.lists(st.integers(0, 2), max_size=6))
    def request(self, ns: str, base: int, tail: list[int]) -> None:
        toks = np.array([7, 7, 7, 7, base, base, 1, 2] + tail, dtype=np.int32)
        req = Request(f"r{self.n}", np.append(toks, 0).astype(np.int32),
                      SamplingParams(max_tokens=1), ns)
        self.n += 1
        before = self.cache.match_prefix(toks, ns, record=False).length
        if not self.sched._tier_settled(req):  # a fetch started: let it land, then install
            req.tier_lookup.result(timeout=10)
            assert self.sched._tier_settled(req)
        after = self.cache.match_prefix(toks, ns, record=False).length
        assert after >= before
        self.fetched += after - before
        self._compute(ns, toks)

    @rule(k=st.integers(1, 20))
    def evict(self, k: int) -> None:
        self.cache.evict(k)
        assert self.tier.flush(10)

    @invariant()
    def ownership_and_contents(self) -> None:
        self.cache.check_invariants()
        assert self.pool.available_size() + self.cache.total_size() == SLOTS
        for node, _ in self.cache.walk():
            path, n = [], node
            while n.parent is not None:
                path.append(n)
                n = n.parent
            toks: list[int] = [t for p in reversed(path) for t in p.tokens.tolist()]
            start = len(toks) - len(node)
            for i, s in enumerate(node.value.tolist()):
                want = prefix_value(node.namespace, tuple(toks[:start + i + 1]))
                for buf in self.pool.slot_buffers():
                    assert float(buf[s].flatten()[0]) == want


TreeTierMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("RADIXKV_STATE_EXAMPLES", "40")), stateful_step_count=25,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_tree_and_tier_state_machine = TreeTierMachine.TestCase
