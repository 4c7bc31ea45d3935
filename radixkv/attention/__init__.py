"""Paged attention over per-token KV slots (`decode`, `extend`) and their metadata builders.

Ragged batches use CSR form: request b reads slots kv_indices[kv_indptr[b]:kv_indptr[b+1]].
`radixkv.attention.reference` holds the naive implementation the fast kernels are tested against.
"""

from radixkv.attention import reference
from radixkv.attention.reference import decode, extend

__all__ = ["decode", "extend", "reference"]
