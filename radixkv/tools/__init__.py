"""Teaching tools that run on radixkv's real data structures.

- `radixkv.tools.calc`: KV cache bytes per token / per request and concurrency capacity.
- `radixkv.tools.simulate`: contiguous (max-length reservation, first-fit) vs per-token paged
  allocation replayed on one request trace, with the real `TokenToKVPool` as the paged side.
- `radixkv.tools.viz`: text, Graphviz DOT and PNG drawings of a `RadixCache` and a map of which
  KV slots belong to which node or running request.

The submodules are imported on demand (nothing heavy is imported here), so `radixkv calc` starts
without loading matplotlib or the gguf reader.
"""

from __future__ import annotations

__all__ = ["calc", "simulate", "viz"]
