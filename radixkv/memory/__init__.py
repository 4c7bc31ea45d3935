"""The three memory levels: radix tree (prefix cache), request-to-token map, per-token KV pool."""

from radixkv.memory.base_cache import CacheStats, MatchResult, PrefixCache, as_token_array
from radixkv.memory.kv_pool import TokenToKVPool, as_slot_array
from radixkv.memory.naive_cache import NaiveCache
from radixkv.memory.radix_cache import RadixCache, TreeNode
from radixkv.memory.req_pool import ReqToTokenPool

__all__ = [
    "CacheStats", "MatchResult", "NaiveCache", "PrefixCache", "RadixCache", "ReqToTokenPool",
    "TokenToKVPool", "TreeNode", "as_slot_array", "as_token_array",
]
