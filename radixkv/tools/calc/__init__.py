"""KV cache calculator: bytes per token and per request, and how many requests fit on a GPU.

Every token a model has seen leaves one K and one V vector per layer and KV head in the cache:

    bytes per token = 2 (K and V) x layers x KV heads x head_dim x bytes per element

Llama-3-70B with grouped-query attention (8 KV heads, not 64): 2 x 80 x 8 x 128 x 2 B = 320 KiB per
token in fp16, so one 4,096-token request holds 1.25 GiB of KV. What is left of a GPU after the
weights, divided by that, is how many tokens (and so requests) can be served at once. A paged
(per-token) cache spends exactly that; a contiguous cache must reserve each request's maximum
length up front, which is what the last row of the table compares against.

One module per concept: `spec` (`ModelSpec`, the Llama-layout parameter count), `presets`
(exact numbers from public HF config.json files), `model_files` (a spec from a config.json, a
model folder or a GGUF file, read with the model layer's readers), `capacity` (the budget, with
the memory level's `kv_bytes_per_token`) and `report` (the table `radixkv calc` prints).
"""

from radixkv.tools.calc.capacity import (
    KV_DTYPES,
    WEIGHT_DTYPE_BITS,
    GiB,
    KVBudget,
    compute_budget,
    kv_bytes_per_token,
    kv_dtype_bytes,
    kv_heads_per_gpu,
)
from radixkv.tools.calc.model_files import load_gguf, load_hf_config, load_model_spec
from radixkv.tools.calc.presets import PRESETS, get_preset, list_presets
from radixkv.tools.calc.report import format_budget, format_bytes, format_presets
from radixkv.tools.calc.spec import LLAMA_LIKE_TYPES, ModelSpec, dense_param_count

__all__ = [
    "KV_DTYPES", "LLAMA_LIKE_TYPES", "PRESETS", "WEIGHT_DTYPE_BITS", "GiB", "KVBudget",
    "ModelSpec", "compute_budget", "dense_param_count", "format_budget", "format_bytes",
    "format_presets", "get_preset", "kv_bytes_per_token", "kv_dtype_bytes", "kv_heads_per_gpu",
    "list_presets", "load_gguf", "load_hf_config", "load_model_spec",
]
