"""Teaching tools that run on radixkv's real data structures.

- `radixkv.tools.calc`: KV cache bytes per token / per request and concurrency capacity.
- `radixkv.tools.simulate`: contiguous (max-length reservation, first-fit) vs per-token paged
  allocation replayed on one request trace, with the real `TokenToKVPool` as the paged side.
- `radixkv.tools.viz`: text, Graphviz DOT and PNG drawings of a `RadixCache` and a map of which
  KV slots belong to which node or running request; its demo tree is built by the real
  `Scheduler` (the one place tools reach into the engine level).

Each tool is a package with a module per concept; its `__init__` only re-exports. Tools import
the memory and model levels (and the viz demo the scheduler), and only `radixkv.cli` imports
tools. The packages are imported on demand (nothing heavy is imported here), so `radixkv calc`
starts without loading matplotlib or the gguf reader.
"""

from __future__ import annotations

__all__ = ["calc", "simulate", "viz"]
