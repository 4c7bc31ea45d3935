"""The three memory levels: radix tree (prefix cache), request-to-token map, per-token KV pool.

The names below are imported on first use (as in `radixkv/__init__.py`), so a torch-free
module of this level (`kv_size`, `tree_text`) can be imported without loading torch: the
`radixkv calc` tool sizes caches with `kv_size.kv_bytes_per_token` and starts in a fraction of
a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CacheStats": "radixkv.memory.base_cache",
    "MatchResult": "radixkv.memory.base_cache",
    "PrefixCache": "radixkv.memory.base_cache",
    "as_token_array": "radixkv.memory.base_cache",
    "TokenToKVPool": "radixkv.memory.kv_pool",
    "as_slot_array": "radixkv.memory.kv_pool",
    "kv_bytes_per_token": "radixkv.memory.kv_size",
    "NaiveCache": "radixkv.memory.naive_cache",
    "RadixCache": "radixkv.memory.radix_cache",
    "TreeNode": "radixkv.memory.radix_cache",
    "ReqToTokenPool": "radixkv.memory.req_pool",
}

__all__ = [
    "CacheStats", "MatchResult", "NaiveCache", "PrefixCache", "RadixCache", "ReqToTokenPool",
    "TokenToKVPool", "TreeNode", "as_slot_array", "as_token_array", "kv_bytes_per_token",
]

if TYPE_CHECKING:
    from radixkv.memory.base_cache import CacheStats, MatchResult, PrefixCache, as_token_array
    from radixkv.memory.kv_pool import TokenToKVPool, as_slot_array
    from radixkv.memory.kv_size import kv_bytes_per_token
    from radixkv.memory.naive_cache import NaiveCache
    from radixkv.memory.radix_cache import RadixCache, TreeNode
    from radixkv.memory.req_pool import ReqToTokenPool


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radixkv.memory' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
