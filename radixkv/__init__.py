"""radixkv: RadixAttention prefix caching for LLM inference.

Three memory levels: `RadixCache` (a radix tree of token runs holding KV slot indices),
`ReqToTokenPool` ((request, position) -> slot) and `TokenToKVPool` (per-layer K/V, one slot per
token). Paged attention reads K/V straight from the slots, so requests sharing a prefix share KV.
"""

from radixkv import errors
from radixkv.memory import (
    CacheStats,
    MatchResult,
    NaiveCache,
    RadixCache,
    ReqToTokenPool,
    TokenToKVPool,
)

__version__ = "0.1.0"

__all__ = [
    "CacheStats", "MatchResult", "NaiveCache", "RadixCache", "ReqToTokenPool", "TokenToKVPool",
    "errors", "__version__",
]
