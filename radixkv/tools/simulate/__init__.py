"""Fragmentation simulator: contiguous max-length reservation vs radixkv's per-token slots.

One request trace (arrival tick, prompt length, tokens actually generated, and the
`max_new_tokens` the client asked for) is replayed on two allocators over the same number of
blocks (1 block = one token's KV):

- contiguous: each request reserves `prompt_len + max_new_tokens` adjacent blocks up front
  (it cannot know it will stop early), placed first-fit in a block array. Reserved-but-unused
  blocks are internal fragmentation; free blocks split into holes too small for the next request
  are external fragmentation.
- paged: radixkv's real `TokenToKVPool` allocator (one layer, one KV head, head_dim 1, so the
  buffers are tiny): the prompt's slots at admission, then one slot per generated token, from
  anywhere in the pool. A request that cannot grow is preempted (its slots freed, recomputed
  later), as a paged server does.

One module per concept: `trace` (requests, the seed scenario, random and JSON traces),
`allocators` (first-fit contiguous blocks), `backends` (both allocators as the replay drives
them), `replay` (the tick loop, `compare`), `results` (what a replay records), `report` (text)
and `plot` (the PNG).
"""

from radixkv.tools.simulate.allocators import ContiguousAllocator
from radixkv.tools.simulate.plot import plot_comparison
from radixkv.tools.simulate.replay import compare, simulate_contiguous, simulate_paged
from radixkv.tools.simulate.report import (
    describe_layout,
    format_report,
    format_summary,
    layout_bar,
)
from radixkv.tools.simulate.results import Comparison, Refusal, SimResult
from radixkv.tools.simulate.trace import (
    SEED_BLOCKS,
    TraceRequest,
    load_trace,
    random_trace,
    seed_trace,
    validate_trace,
)

__all__ = [
    "SEED_BLOCKS", "Comparison", "ContiguousAllocator", "Refusal", "SimResult", "TraceRequest",
    "compare", "describe_layout", "format_report", "format_summary", "layout_bar", "load_trace",
    "plot_comparison", "random_trace", "seed_trace", "simulate_contiguous", "simulate_paged",
    "validate_trace",
]
