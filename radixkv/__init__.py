"""radixkv: RadixAttention prefix caching for LLM inference.

Three memory levels: `RadixCache` (a radix tree of token runs holding KV slot indices),
`ReqToTokenPool` ((request, position) -> slot) and `TokenToKVPool` (per-layer K/V, one slot per
token). Paged attention reads K/V straight from the slots, so requests sharing a prefix share KV.

The names below are imported on first use, so `import radixkv` (and the `radixkv` CLI) stays fast
and does not load torch or the model stack until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "radixkv.serving.llm",
    "AsyncLLM": "radixkv.serving.async_llm",
    "SamplingParams": "radixkv.engine.sampling_params",
    "BeamSearchParams": "radixkv.engine.beam_search",
    "BeamSearchOutput": "radixkv.engine.beam_search",
    "BeamSearchSequence": "radixkv.engine.beam_search",
    "RequestOutput": "radixkv.engine.outputs",
    "CompletionOutput": "radixkv.engine.outputs",
    "RequestMetrics": "radixkv.engine.outputs",
    "CacheStats": "radixkv.memory.base_cache",
    "MatchResult": "radixkv.memory.base_cache",
    "NaiveCache": "radixkv.memory.naive_cache",
    "RadixCache": "radixkv.memory.radix_cache",
    "ReqToTokenPool": "radixkv.memory.req_pool",
    "TokenToKVPool": "radixkv.memory.kv_pool",
    "errors": "radixkv.errors",
}

__all__ = [
    "LLM", "AsyncLLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence",
    "CacheStats", "CompletionOutput", "MatchResult", "NaiveCache",
    "RadixCache", "ReqToTokenPool", "RequestMetrics", "RequestOutput", "SamplingParams",
    "TokenToKVPool", "__version__", "errors",
]

if TYPE_CHECKING:
    from radixkv import errors
    from radixkv.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
    from radixkv.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from radixkv.engine.sampling_params import SamplingParams
    from radixkv.memory.base_cache import CacheStats, MatchResult
    from radixkv.memory.kv_pool import TokenToKVPool
    from radixkv.memory.naive_cache import NaiveCache
    from radixkv.memory.radix_cache import RadixCache
    from radixkv.memory.req_pool import ReqToTokenPool
    from radixkv.serving.async_llm import AsyncLLM
    from radixkv.serving.llm import LLM


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radixkv' has no attribute {name!r}")
    value = importlib.import_module(module)
    value = value if name == "errors" else getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
