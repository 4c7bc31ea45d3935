"""The KV budget: bytes per token and per request, what is left of a GPU after the weights, and how
many tokens and requests fit with a paged cache vs a contiguous max-length reservation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radixkv.errors import ConfigError
from radixkv.memory.kv_size import kv_bytes_per_token as _kv_bytes
from radixkv.tools.calc.model_files import load_model_spec
from radixkv.tools.calc.spec import ModelSpec

GiB = 1 << 30

# Bytes per element of the KV cache. fp8 covers both e4m3 and e5m2; int8 is a quantised cache.
KV_DTYPES: dict[str, tuple[str, int]] = {
    "fp32": ("fp32", 4), "float32": ("fp32", 4),
    "fp16": ("fp16", 2), "float16": ("fp16", 2), "half": ("fp16", 2),
    "bf16": ("bf16", 2), "bfloat16": ("bf16", 2),
    "fp8": ("fp8", 1), "fp8_e4m3": ("fp8", 1), "fp8_e5m2": ("fp8", 1),
    "int8": ("int8", 1),
}
# Bits per weight, for sizing weights from a parameter count (int4: 4-bit quantised weights).
WEIGHT_DTYPE_BITS: dict[str, int] = {
    "fp32": 32, "float32": 32, "fp16": 16, "float16": 16, "half": 16, "bf16": 16,
    "bfloat16": 16, "fp8": 8, "fp8_e4m3": 8, "fp8_e5m2": 8, "int8": 8, "int4": 4,
}


def kv_dtype_bytes(dtype: str) -> tuple[str, int]:
    """(canonical name, bytes per element) of a KV cache dtype; `ConfigError` if unknown."""
    entry = KV_DTYPES.get(str(dtype).strip().lower())
    if entry is None:
        raise ConfigError(f"unknown KV dtype {dtype!r}; use fp32, fp16, bf16, fp8 or int8")
    return entry


def kv_heads_per_gpu(num_kv_heads: int, tp: int) -> int:
    """KV heads each tensor-parallel rank stores.

    Heads are split evenly when tp divides them; with more ranks than heads each head is
    replicated on tp / heads ranks (so every rank still holds one). Any other combination
    cannot be sharded and raises `ConfigError`.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    if tp <= num_kv_heads:
        if num_kv_heads % tp:
            raise ConfigError(f"{num_kv_heads} KV heads cannot be split evenly over {tp} GPUs")
        return num_kv_heads // tp
    if tp % num_kv_heads:
        raise ConfigError(f"{tp} GPUs cannot replicate {num_kv_heads} KV heads evenly")
    return 1


def kv_bytes_per_token(spec: ModelSpec, dtype: str = "fp16") -> int:
    """KV bytes of one token across every layer and KV head (one copy of each head), by the
    memory level's own formula (`radixkv.memory.kv_size.kv_bytes_per_token`)."""
    return _kv_bytes(spec.num_layers, spec.num_kv_heads, spec.head_dim, kv_dtype_bytes(dtype)[1],
                     v_head_dim=spec.v_head_dim)


@dataclass(frozen=True)
class KVBudget:
    """What `compute_budget` found. Byte counts are exact integers; `None` = unknown weights.

    Per-GPU figures apply to every tensor-parallel rank; `tokens_fit` is the number of tokens the
    whole TP group can cache (each rank holds its share of every token's KV heads).
    """

    model: ModelSpec
    kv_dtype: str
    kv_dtype_bytes: int
    context_len: int
    max_len: int
    tp: int
    page_size: int
    kv_heads_per_gpu: int
    bytes_per_token: int  # whole model, one copy of every KV head
    bytes_per_token_per_gpu: int
    bytes_per_request: int  # context_len tokens, whole model
    gpu_mem_bytes: int  # per GPU
    mem_fraction: float
    usable_bytes_per_gpu: int
    weight_bytes: int | None  # whole model
    weight_bytes_per_gpu: int | None
    weight_source: str
    kv_pool_bytes_per_gpu: int | None
    tokens_fit: int | None
    concurrent_requests: int | None  # paged, context_len tokens each
    contiguous_requests: int | None  # contiguous, a max_len reservation each
    notes: tuple[str, ...] = field(default_factory=tuple)


def _check_number(value: Any, what: str, *, integer: bool, minimum: float,
                  strict: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or (
            value <= minimum if strict else value < minimum):
        kind = "an integer" if integer else "a number"
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigError(f"{what} must be {kind} {bound}, got {value!r}")


def compute_budget(
    model: ModelSpec | str | Path,
    context_len: int,
    dtype: str = "fp16",
    gpu_mem_gib: float = 80.0,
    mem_fraction: float = 0.9,
    tp: int = 1,
    weight_dtype: str | None = None,
    weights_gib: float | None = None,
    max_len: int | None = None,
    page_size: int = 1,
) -> KVBudget:
    """KV bytes per token / per request and how many tokens and requests fit.

    Args:
        model: a `ModelSpec` or anything `load_model_spec` accepts (preset name, config, GGUF).
        context_len: tokens per request (prompt + output) for the per-request and paged rows.
        dtype: KV cache dtype: fp32, fp16/bf16, fp8 or int8.
        gpu_mem_gib: memory of one GPU in GiB.
        mem_fraction: share of it the server may use (the rest: activations, CUDA context).
        tp: tensor-parallel size; KV heads and weights are split over the ranks.
        weight_dtype: size weights as params x this dtype (default: the file's own bytes for GGUF
            and safetensors, else fp16/bf16).
        weights_gib: the weights' total size, overriding any computation.
        max_len: the contiguous reservation per request (default: the model's maximum context).
        page_size: tokens per page of the paged cache (radixkv: 1).

    Raises `ConfigError` for any invalid input, before computing anything.
    """
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model)
    _check_number(context_len, "context length", integer=True, minimum=1)
    _check_number(gpu_mem_gib, "GPU memory (GiB)", integer=False, minimum=0, strict=True)
    _check_number(mem_fraction, "memory fraction", integer=False, minimum=0, strict=True)
    if mem_fraction > 1:
        raise ConfigError(f"memory fraction must be at most 1, got {mem_fraction!r}")
    _check_number(page_size, "page size", integer=True, minimum=1)
    if weights_gib is not None:
        _check_number(weights_gib, "weights (GiB)", integer=False, minimum=0)
    if weight_dtype is not None and str(weight_dtype).lower() not in WEIGHT_DTYPE_BITS:
        raise ConfigError(f"unknown weight dtype {weight_dtype!r}; use one of "
                          f"{', '.join(sorted(set(WEIGHT_DTYPE_BITS)))}")
    kv_name, elem = kv_dtype_bytes(dtype)
    per_gpu_heads = kv_heads_per_gpu(spec.num_kv_heads, tp)
    notes = list(spec.notes)
    if max_len is None:
        max_len = spec.max_context or context_len
        if spec.max_context is None:
            notes.append("the model states no maximum context: the contiguous reservation "
                         "is the context length itself")
    _check_number(max_len, "max length", integer=True, minimum=1)
    if max_len < context_len:
        raise ConfigError(f"max length {max_len} is shorter than the context length "
                          f"{context_len}: a contiguous reservation could not hold the request")
    if spec.max_context is not None and context_len > spec.max_context:
        notes.append(f"context {context_len:,} exceeds the model's maximum "
                     f"{spec.max_context:,} positions")
    if tp > spec.num_kv_heads:
        notes.append(f"tp {tp} > {spec.num_kv_heads} KV heads: each KV head is replicated on "
                     f"{tp // spec.num_kv_heads} GPUs, so the group stores {tp} head copies")

    bpt = kv_bytes_per_token(spec, kv_name)
    bpt_gpu = bpt * per_gpu_heads // spec.num_kv_heads
    gpu_bytes = int(round(gpu_mem_gib * GiB))
    usable = int(gpu_bytes * mem_fraction)

    params = spec.params
    if weights_gib is not None:
        weight_bytes: int | None = int(round(weights_gib * GiB))
        weight_source = "given"
    elif weight_dtype is not None and params is not None:
        bits = WEIGHT_DTYPE_BITS[str(weight_dtype).lower()]
        weight_bytes = params * bits // 8
        weight_source = f"{params / 1e9:.2f}B params x {bits / 8:g} B, {weight_dtype}"
    elif spec.weight_bytes is not None:
        weight_bytes = spec.weight_bytes
        weight_source = ("tensor bytes stored in the GGUF file" if spec.weight_dtype == "gguf"
                         else "tensor bytes in the safetensors files")
    elif params is not None:
        weight_bytes = params * 2
        weight_source = f"{params / 1e9:.2f}B params x 2 B, fp16/bf16"
    else:
        weight_bytes = None
        weight_source = "unknown (pass weights_gib / --weights-gib)"

    weights_gpu = pool = tokens = paged = contiguous = None
    if weight_bytes is not None:
        weights_gpu = -(-weight_bytes // tp)  # ceil: embeddings and norms do not shrink below it
        pool = max(0, usable - weights_gpu)
        if usable <= weights_gpu:
            notes.append("the weights do not fit in the usable GPU memory: add GPUs (tp), "
                         "quantise the weights or use a larger GPU")
        tokens = pool // bpt_gpu // page_size * page_size
        paged = tokens // (-(-context_len // page_size) * page_size)
        contiguous = tokens // max_len
    return KVBudget(
        model=spec, kv_dtype=kv_name, kv_dtype_bytes=elem, context_len=context_len,
        max_len=max_len, tp=tp, page_size=page_size, kv_heads_per_gpu=per_gpu_heads,
        bytes_per_token=bpt, bytes_per_token_per_gpu=bpt_gpu,
        bytes_per_request=bpt * context_len, gpu_mem_bytes=gpu_bytes,
        mem_fraction=float(mem_fraction), usable_bytes_per_gpu=usable,
        weight_bytes=weight_bytes, weight_bytes_per_gpu=weights_gpu,
        weight_source=weight_source, kv_pool_bytes_per_gpu=pool, tokens_fit=tokens,
        concurrent_requests=paged, contiguous_requests=contiguous, notes=tuple(notes),
    )
