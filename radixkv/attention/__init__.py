"""Paged attention over per-token KV slots (`decode`, `extend`) and their metadata builder.

K/V are read straight from `TokenToKVPool` buffers through slot indices, so a request's KV can
sit anywhere in the pool and a shared prefix is read in place. Ragged batches use CSR form (page
size 1): request b reads the slots `kv_indices[kv_indptr[b]:kv_indptr[b+1]]`, in position
order.

Backends, chosen per call from q's device:
- CUDA: Triton kernels (`triton_backend`): split-KV decode with a log-sum-exp combine, tiled
  extend.
- CPU: fused C++ kernels (`cpu_kernels`, built once at first use) for decode and for small
  extends; large extends (compute bound) run torch's SDPA per request on K/V gathered once.
  Without a C++ compiler (or with `RADIXKV_CPU_KERNELS=0`) everything runs on `torch_backend`.

Quantized KV (int8 / fp8 e4m3 codes with a float32 scale per slot and KV head, see
`radixkv.memory.kv_quant`): pass the pool's scales as `k_scale` / `v_scale`. Every backend reads
the codes and dequantizes inside the kernel (the torch fallback, per gathered chunk); none builds
a dequantized copy of the pool.

`radixkv.attention.reference` is the naive implementation the kernels are tested against.
"""

from radixkv.attention import reference
from radixkv.attention.dispatch import check_kv_cache_support, decode, extend
from radixkv.attention.indices import build_kv_indices
from radixkv.attention.validation import AttentionInputError

__all__ = ["AttentionInputError", "build_kv_indices", "check_kv_cache_support", "decode",
           "extend", "reference"]
