"""SGLang 0.5.23's RadixCache on bench/tree_ops.py's trace; run by tree_ops.py in SGLang's venv.

`python bench/tree_ops_sglang.py TRACE.npy [--clock cpu] CAPACITY...` prints one JSON line per
capacity (capacities are read from stdin, one a line, when none are given). The
trace file holds the requests as rows of int32 tokens (tree_ops.py writes it, so both sides run
the identical trace). Only numpy, torch and `pip install --no-deps sglang==0.5.23` are needed:
the few modules `sglang.srt.mem_cache.radix_cache` imports for serving (metrics, KV events, the
cache's init parameters) are replaced by the minimal stand-ins below, before it is imported. The
tree and the token allocator (`TokenToKVPoolAllocator`) are SGLang's own code, unchanged.

Each request runs the life tree_ops.py gives it: match -> read the matched slots -> lock ->
evict if short -> alloc -> insert -> free duplicates -> unlock.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
import types
from array import array
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install_stubs() -> None:
    """Stand-ins for what radix_cache.py imports beyond the tree itself."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("sglang is not installed in this interpreter")
    root = Path(list(spec.submodule_search_locations)[0])
    # Packages without running their __init__ (sglang/__init__.py imports the whole server).
    for name, sub in (("sglang", ""), ("sglang.srt", "srt"), ("sglang.srt.mem_cache",
                      "srt/mem_cache"), ("sglang.srt.utils", "srt/utils"),
                      ("sglang.srt.mem_cache.allocator", "srt/mem_cache/allocator")):
        _module(name, __path__=[str(root / sub)])

    @dataclasses.dataclass
    class CacheInitParams:
        disable: bool
        req_to_token_pool: Any
        token_to_kv_pool_allocator: Any
        page_size: int
        is_eagle: bool = False
        eviction_policy: str = "lru"
        eviction_policy_config: Any = None
        enable_metrics: bool = False
        enable_kv_cache_events: bool = False
        dynamo_kv_event_format: bool = False
        kv_event_lora_names: Any = None

    @dataclasses.dataclass
    class MatchPrefixParams:
        key: Any
        cow_mamba: bool = False
        req: Any = None

    @dataclasses.dataclass
    class InsertParams:
        key: Any = None
        value: Any = None
        priority: int = 0
        inserted_len: int = 0

    @dataclasses.dataclass
    class InsertResult:
        prefix_len: int
        total_len: int = 0
        last_device_node: Any = None

    @dataclasses.dataclass
    class EvictParams:
        num_tokens: int = 0

    @dataclasses.dataclass
    class EvictResult:
        num_tokens_evicted: int = 0

    @dataclasses.dataclass
    class IncLockRefResult:
        delta: int | None = None

    @dataclasses.dataclass
    class DecLockRefParams:
        node_id: int | None = None

    @dataclasses.dataclass
    class DecLockRefResult:
        delta: int | None = None

    class MatchResult(NamedTuple):
        device_prefix_len: int
        last_device_node: Any
        last_host_node: Any
        best_match_node: Any = None

    class BasePrefixCache:
        metrics_collector = None

        def init_metrics_collector(self) -> None:
            pass

        def update_eviction_metrics(self, num_evicted: int, start_time: float) -> None:
            pass

    class KVCacheEventRecorder:  # KV events disabled: every record is a no-op
        def __init__(self, **kwargs: Any) -> None:
            pass

        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    _module("sglang.srt.mem_cache.cache_init_params", CacheInitParams=CacheInitParams)
    _module("sglang.srt.mem_cache.base_prefix_cache", BasePrefixCache=BasePrefixCache,
            MatchPrefixParams=MatchPrefixParams, InsertParams=InsertParams,
            InsertResult=InsertResult, EvictParams=EvictParams, EvictResult=EvictResult,
            IncLockRefResult=IncLockRefResult, DecLockRefParams=DecLockRefParams,
            DecLockRefResult=DecLockRefResult, MatchResult=MatchResult)
    _module("sglang.srt.mem_cache.events", KVCacheEventRecorder=KVCacheEventRecorder,
            LoRANameTable=object)
    from sglang.srt.mem_cache import evict_policy  # SGLang's own, imports nothing else

    def get_eviction_strategy(policy: str, config: Any = None) -> Any:
        return {"lru": evict_policy.LRUStrategy, "lfu": evict_policy.LFUStrategy}[policy]()

    def split_node_hash_value(h: Any, split_len: int, page_size: int) -> tuple[Any, Any]:
        assert h is None  # hashes are only computed for KV events, which are off
        return None, None

    _module("sglang.srt.mem_cache.utils", get_eviction_strategy=get_eviction_strategy,
            split_node_hash_value=split_node_hash_value)
    _module("sglang.srt.utils.common", ceil_align=lambda x, y: -(-x // y) * y)


def run_trace(reqs: list[array], capacity: int, clock: Any = time.perf_counter
              ) -> dict[str, float]:
    from sglang.srt.mem_cache import base_prefix_cache as bpc
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    alloc = TokenToKVPoolAllocator(capacity, torch.float32, "cpu", None, need_sort=False)
    cache = RadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                       token_to_kv_pool_allocator=alloc, page_size=1))
    query = hit = 0
    start = clock()
    for tokens in reqs:
        m = cache.match_prefix(bpc.MatchPrefixParams(key=RadixKey(tokens)))
        node, m_len = m.last_device_node, m.device_prefix_len
        prefix = cache.path_device_indices(node)
        query += len(tokens)
        hit += m_len
        cache.inc_lock_ref(node)
        need = len(tokens) - m_len
        short = need - alloc.available_size()
        if short > 0:
            cache.evict(bpc.EvictParams(num_tokens=short))
        new = alloc.alloc(need)
        slots = torch.cat([prefix, new])
        res = cache.insert(bpc.InsertParams(key=RadixKey(tokens), value=slots))
        if res.prefix_len > m_len:  # cached meanwhile by another request: ours are extra
            alloc.free(slots[m_len:res.prefix_len])
        cache.dec_lock_ref(node)
    elapsed = clock() - start
    cached = cache.total_size()
    assert alloc.available_size() + cached == capacity, "slots leaked"
    return {"req_s": len(reqs) / elapsed, "hit_rate": hit / query, "cached": cached}


def main() -> None:
    """argv: TRACE.npy [--clock cpu|wall] [CAPACITY...]; without capacities, one per stdin line."""
    install_stubs()
    args = sys.argv[1:]
    rows = np.load(args.pop(0))
    clock = time.perf_counter
    if args[:1] == ["--clock"]:
        clock = time.process_time if args[1] == "cpu" else time.perf_counter
        args = args[2:]
    # SGLang's RadixKey holds token ids as array('q'); converted before the clock starts, as
    # tree_ops.py hands radixkv its int32 arrays ready-made.
    reqs = [array("q", row.tolist()) for row in rows]
    for cap in args or sys.stdin:
        print(json.dumps({"capacity": int(cap), **run_trace(reqs, int(cap), clock)}), flush=True)


if __name__ == "__main__":
    main()
