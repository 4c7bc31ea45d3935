"""radixkv: RadixAttention prefix caching for LLM inference.

Three memory levels: `RadixCache` (a radix tree of token runs holding KV slot indices),
`ReqToTokenPool` ((request, position) -> slot) and `TokenToKVPool` (per-layer K/V, one slot per
token). Paged attention reads K/V straight from the slots, so requests sharing a prefix share KV.
"""

from radixkv import errors
from radixkv.engine.sampling_params import SamplingParams
from radixkv.memory import (
    CacheStats,
    MatchResult,
    NaiveCache,
    RadixCache,
    ReqToTokenPool,
    TokenToKVPool,
)

__version__ = "0.1.0"


def __getattr__(name: str):  # LLM pulls in the model stack; import it only when asked for
    if name == "LLM":
        from radixkv.llm import LLM

        return LLM
    raise AttributeError(f"module 'radixkv' has no attribute {name!r}")


__all__ = [
    "LLM", "SamplingParams", "CacheStats", "MatchResult", "NaiveCache", "RadixCache",
    "ReqToTokenPool", "TokenToKVPool",
    "errors", "__version__",
]
