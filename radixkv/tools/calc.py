"""KV cache calculator: bytes per token and per request, and how many requests fit on a GPU.

Every token a model has seen leaves one K and one V vector per layer and KV head in the cache:

    bytes per token = 2 (K and V) x layers x KV heads x head_dim x bytes per element

Llama-3-70B with grouped-query attention (8 KV heads, not 64): 2 x 80 x 8 x 128 x 2 B = 320 KiB per
token in fp16, so one 4,096-token request holds 1.25 GiB of KV. What is left of a GPU after the
weights, divided by that, is how many tokens (and so requests) can be served at once. A paged
(per-token) cache spends exactly that; a contiguous cache must reserve each request's maximum
length up front, which is what the last row of the table compares against.

Models come from built-in presets (exact numbers from the public HF config.json files), from any HF
`config.json` (or a model folder holding one) or from a GGUF file (metadata read with the `gguf`
package's `GGUFReader`). Library functions return dataclasses; `format_budget` renders the table
that `radixkv calc` prints. This module imports neither torch nor gguf at import time.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radixkv.errors import ConfigError
from radixkv.memory.kv_quant import SCALE_BYTES

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
# HF model types whose parameter count follows the Llama layout (gated SiLU MLP, q/k/v/o
# projections, two RMSNorms per layer); the weight size of other types is not guessed.
_LLAMA_LIKE_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "internlm2"}


@dataclass(frozen=True)
class ModelSpec:
    """The numbers of a model that size its KV cache and its weights.

    `num_params` / `weight_bytes` are set when the source states them (a GGUF file's tensors,
    safetensors headers); otherwise `params` computes the count from the Llama-style layout.
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    llama_like: bool = True
    max_context: int | None = None
    v_head_dim: int | None = None  # None: same as head_dim
    num_params: int | None = None
    weight_bytes: int | None = None
    weight_dtype: str | None = None
    source: str = ""
    notes: tuple[str, ...] = ()

    @property
    def params(self) -> int | None:
        """Parameter count: stated by the source, else computed (None when it cannot be)."""
        if self.num_params is not None:
            return self.num_params
        return dense_param_count(self)

    def kv_elements_per_token(self) -> int:
        """K plus V elements one token stores across all layers and KV heads."""
        v_dim = self.v_head_dim if self.v_head_dim is not None else self.head_dim
        return self.num_layers * self.num_kv_heads * (self.head_dim + v_dim)


def dense_param_count(spec: ModelSpec) -> int | None:
    """Parameters of a Llama-layout decoder (None if the layout or a dimension is unknown).

    Embedding, untied LM head, per layer q/k/v/o projections (+ biases), a gated MLP
    (gate, up, down) and two RMSNorms, plus the final norm.
    """
    h, inter, vocab, heads = (spec.hidden_size, spec.intermediate_size, spec.vocab_size,
                              spec.num_attention_heads)
    if not spec.llama_like or None in (h, inter, vocab, heads):
        return None
    hd = spec.head_dim
    vd = spec.v_head_dim if spec.v_head_dim is not None else hd
    q_out, k_out, v_out = heads * hd, spec.num_kv_heads * hd, spec.num_kv_heads * vd
    attn = h * (q_out + k_out + v_out) + heads * vd * h
    if spec.qkv_bias:
        attn += q_out + k_out + v_out
    if spec.o_bias:
        attn += h
    if spec.qk_norm:
        attn += 2 * hd
    mlp = 3 * h * inter + (2 * inter + h if spec.mlp_bias else 0)
    per_layer = attn + mlp + 2 * h
    embed = vocab * h * (1 if spec.tie_word_embeddings else 2)
    return embed + spec.num_layers * per_layer + h


# Presets: exact numbers from each model's public HF config.json (model card "Files" tab).
PRESETS: dict[str, ModelSpec] = {
    # meta-llama/Llama-2-7b-hf config.json: hidden 4096, intermediate 11008, 32 layers,
    # 32 attention heads = 32 KV heads (no GQA), vocab 32000, max_position_embeddings 4096.
    "llama-2-7b": ModelSpec(
        "Llama-2-7B", num_layers=32, num_kv_heads=32, head_dim=128, num_attention_heads=32,
        hidden_size=4096, intermediate_size=11008, vocab_size=32000, max_context=4096,
        source="preset: meta-llama/Llama-2-7b-hf config.json"),
    # meta-llama/Meta-Llama-3-8B config.json: hidden 4096, intermediate 14336, 32 layers,
    # 32 heads, 8 KV heads (GQA), vocab 128256, max_position_embeddings 8192, untied.
    "llama-3-8b": ModelSpec(
        "Llama-3-8B", num_layers=32, num_kv_heads=8, head_dim=128, num_attention_heads=32,
        hidden_size=4096, intermediate_size=14336, vocab_size=128256, max_context=8192,
        source="preset: meta-llama/Meta-Llama-3-8B config.json"),
    # meta-llama/Meta-Llama-3-70B config.json: hidden 8192, intermediate 28672, 80 layers,
    # 64 heads, 8 KV heads (GQA), vocab 128256, max_position_embeddings 8192, untied.
    "llama-3-70b": ModelSpec(
        "Llama-3-70B", num_layers=80, num_kv_heads=8, head_dim=128, num_attention_heads=64,
        hidden_size=8192, intermediate_size=28672, vocab_size=128256, max_context=8192,
        source="preset: meta-llama/Meta-Llama-3-70B config.json"),
    # mistralai/Mistral-7B-v0.1 config.json: hidden 4096, intermediate 14336, 32 layers,
    # 32 heads, 8 KV heads, vocab 32000, max_position_embeddings 32768, sliding_window 4096.
    "mistral-7b": ModelSpec(
        "Mistral-7B-v0.1", num_layers=32, num_kv_heads=8, head_dim=128, num_attention_heads=32,
        hidden_size=4096, intermediate_size=14336, vocab_size=32000, max_context=32768,
        source="preset: mistralai/Mistral-7B-v0.1 config.json",
        notes=("Mistral-7B-v0.1 attends over a 4,096-token sliding window; a rolling-buffer cache "
               "could stop at 4,096 tokens per request, radixkv keeps every token's KV.",)),
    # Qwen/Qwen2-7B-Instruct config.json: hidden 3584, intermediate 18944, 28 layers, 28 heads,
    # 4 KV heads, vocab 152064, bias on q/k/v, untied, max_position_embeddings 32768.
    "qwen2-7b": ModelSpec(
        "Qwen2-7B-Instruct", num_layers=28, num_kv_heads=4, head_dim=128, num_attention_heads=28,
        hidden_size=3584, intermediate_size=18944, vocab_size=152064, qkv_bias=True,
        max_context=32768, source="preset: Qwen/Qwen2-7B-Instruct config.json"),
    # HuggingFaceTB/SmolLM2-135M config.json: hidden 576, intermediate 1536, 30 layers, 9 heads,
    # 3 KV heads (head_dim 64), vocab 49152, tied embeddings, max_position_embeddings 8192.
    # (The default model's GGUF file states the same numbers.)
    "smollm2-135m": ModelSpec(
        "SmolLM2-135M", num_layers=30, num_kv_heads=3, head_dim=64, num_attention_heads=9,
        hidden_size=576, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        max_context=8192, source="preset: HuggingFaceTB/SmolLM2-135M config.json"),
}
_ALIASES = {
    "llama2-7b": "llama-2-7b", "llama3-8b": "llama-3-8b", "llama3-70b": "llama-3-70b",
    "mistral-7b-v0.1": "mistral-7b", "qwen2-7b-instruct": "qwen2-7b",
    "smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m",
}


def _norm_name(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def get_preset(name: str) -> ModelSpec:
    """The preset called `name` (case-insensitive; `_` and `-` are interchangeable).

    Raises `ConfigError` naming the known presets.
    """
    key = _norm_name(name)
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def list_presets() -> list[ModelSpec]:
    """Every built-in preset, in table order."""
    return list(PRESETS.values())


# ---- HF config.json ----------------------------------------------------------------------------
def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def _positive_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def _safetensors_bytes(folder: Path) -> int | None:
    """Bytes of the tensors in a model folder's safetensors files (headers only), or None."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        except (OSError, ValueError):
            total = None
        if isinstance(total, int) and total > 0:
            return total
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with path.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                total += end - begin
    return total


def load_hf_config(path: str | Path) -> ModelSpec:
    """A `ModelSpec` from an HF `config.json` (or a model folder that holds one).

    Multimodal configs are read from their `text_config`. The weight size is taken from the
    folder's safetensors headers when present, else computed from the config for Llama-layout
    model types. Raises `ConfigError` for a missing/unreadable file, missing dimensions, or
    multi-head latent attention (whose compressed cache this formula does not describe).
    """
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise ConfigError(f"no config.json at {p}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {cfg_path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get(
            "model_type", cfg.get("model_type"))}
    where = str(cfg_path)
    if cfg.get("kv_lora_rank") is not None:
        raise ConfigError(f"{where}: multi-head latent attention (kv_lora_rank) caches a "
                          "compressed latent, not per-head K/V; not supported here")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    missing = [k for k, v in (("num_hidden_layers", layers), ("num_attention_heads", heads),
                              ("hidden_size", hidden)) if v is None]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    layers = _positive_int(layers, "num_hidden_layers", where)
    heads = _positive_int(heads, "num_attention_heads", where)
    hidden = _positive_int(hidden, "hidden_size", where)
    kv = _first(cfg, "num_key_value_heads", "num_kv_heads", "multi_query_group_num")
    if kv is None:
        kv = 1 if cfg.get("multi_query") else heads
    kv = _positive_int(kv, "num_key_value_heads", where)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{where}: hidden_size {hidden} is not a multiple of "
                              f"num_attention_heads {heads} and head_dim is not given")
        head_dim = hidden // heads
    head_dim = _positive_int(head_dim, "head_dim", where)
    def size(*keys: str) -> int | None:  # optional dimensions: absent is fine, junk is not
        value = _first(cfg, *keys)
        return None if value is None else _positive_int(value, keys[0], where)

    inter, vocab = size("intermediate_size", "n_inner"), size("vocab_size")
    max_ctx = size("max_position_embeddings", "n_positions", "seq_length")
    model_type = str(cfg.get("model_type") or "")
    notes: list[str] = []
    moe = _first(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    llama_like = model_type in _LLAMA_LIKE_TYPES and not moe
    if moe:
        notes.append(f"mixture of experts ({moe} experts): the weight size is not computed "
                     "from the config")
    elif not llama_like:
        notes.append(f"model_type {model_type or '?'!r} is not a Llama-layout type: the weight "
                     "size is not computed from the config")
    attn_bias = bool(cfg.get("attention_bias", False))
    weight_bytes = _safetensors_bytes(cfg_path.parent)
    return ModelSpec(
        name=str(cfg.get("_name_or_path") or cfg_path.parent.name or "model"),
        num_layers=layers, num_kv_heads=kv, head_dim=head_dim, num_attention_heads=heads,
        hidden_size=hidden, intermediate_size=inter, vocab_size=vocab,
        # HF's PretrainedConfig ties embeddings unless the config says otherwise.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=model_type == "qwen2" or attn_bias, o_bias=attn_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
        llama_like=llama_like,
        max_context=max_ctx,
        weight_bytes=weight_bytes,
        weight_dtype=_first(cfg, "torch_dtype", "dtype"),
        source=f"HF config: {cfg_path}" + (" + safetensors headers" if weight_bytes else ""),
        notes=tuple(notes),
    )


# ---- GGUF --------------------------------------------------------------------------------------
def _gguf_value(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except AttributeError:  # gguf < 0.11 has no contents(): decode the parts by hand
        vals = [f.parts[i] for i in f.data]
        out = [bytes(v).decode("utf-8", "replace") if v.dtype.kind == "u" and v.dtype.itemsize == 1
               else v.item() if v.size == 1 else v.tolist() for v in vals]
        return out[0] if len(out) == 1 else out


def load_gguf(path: str | Path) -> ModelSpec:
    """A `ModelSpec` from a GGUF file's metadata (via `gguf.GGUFReader`).

    The parameter count and weight bytes are summed over the file's tensors, so a quantised file
    reports the bytes it really stores. Raises `ConfigError` for a missing/unreadable file or
    missing metadata.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no GGUF file at {p}")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ConfigError("reading GGUF needs the gguf package (pip install gguf)") from exc
    try:
        reader = GGUFReader(str(p))
    except Exception as exc:  # the reader raises ValueError, struct and numpy errors alike
        raise ConfigError(f"cannot read GGUF {p}: {exc}") from exc
    arch = _gguf_value(reader, "general.architecture")
    if not arch:
        raise ConfigError(f"{p}: no general.architecture in the GGUF metadata")
    where = str(p)

    def get(key: str) -> Any:
        return _gguf_value(reader, f"{arch}.{key}")

    layers, heads = get("block_count"), get("attention.head_count")
    hidden = get("embedding_length")
    if None in (layers, heads, hidden):
        raise ConfigError(f"{where}: GGUF metadata lacks {arch}.block_count, "
                          f"{arch}.attention.head_count or {arch}.embedding_length")
    kv = get("attention.head_count_kv")
    if kv is None:
        kv = heads
    if isinstance(kv, list) or isinstance(heads, list):
        raise ConfigError(f"{where}: per-layer head counts are not supported")
    layers = _positive_int(int(layers), "block_count", where)
    heads = _positive_int(int(heads), "attention.head_count", where)
    hidden = _positive_int(int(hidden), "embedding_length", where)
    kv = _positive_int(int(kv), "attention.head_count_kv", where)
    head_dim = get("attention.key_length") or hidden // heads
    v_dim = get("attention.value_length")
    vocab = get("vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    num_params = sum(int(t.n_elements) for t in reader.tensors)
    weight_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    ffn = get("feed_forward_length")
    return ModelSpec(
        name=str(_gguf_value(reader, "general.name") or p.stem),
        num_layers=layers, num_kv_heads=kv, head_dim=int(head_dim), num_attention_heads=heads,
        hidden_size=hidden, intermediate_size=int(ffn) if isinstance(ffn, int) else None,
        vocab_size=int(vocab) if vocab is not None else None,
        tie_word_embeddings="output.weight" not in names,
        llama_like=arch in _LLAMA_LIKE_TYPES,
        max_context=get("context_length"),
        v_head_dim=int(v_dim) if v_dim is not None and v_dim != head_dim else None,
        num_params=num_params or None, weight_bytes=weight_bytes or None,
        weight_dtype="gguf", source=f"GGUF: {p.name} ({arch})",
    )


def resolve_model(name_or_path: str | Path) -> ModelSpec:
    """A preset name, a `.gguf` file, an HF `config.json` or a model folder -> `ModelSpec`."""
    text = str(name_or_path)
    p = Path(text)
    if p.suffix.lower() == ".gguf":
        return load_gguf(p)
    if p.is_dir() or p.suffix.lower() == ".json":
        return load_hf_config(p)
    if p.is_file():
        raise ConfigError(f"{p}: expected a .gguf file, a config.json or a model folder")
    return get_preset(text)


# ---- the budget --------------------------------------------------------------------------------
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


def kv_scale_bytes_per_token(spec: ModelSpec, dtype: str = "fp16") -> int:
    """Scale bytes of one token: radixkv's int8 / fp8 KV keeps one float32 scale per layer,
    KV head and K or V (`radixkv.memory.kv_quant`); float dtypes need none."""
    if kv_dtype_bytes(dtype)[0] not in ("int8", "fp8"):
        return 0
    return 2 * spec.num_layers * spec.num_kv_heads * SCALE_BYTES


def kv_bytes_per_token(spec: ModelSpec, dtype: str = "fp16") -> int:
    """KV bytes of one token across every layer and KV head (one copy of each head), scales
    of quantized dtypes included: what radixkv's `TokenToKVPool.bytes_per_token()` allocates."""
    return spec.kv_elements_per_token() * kv_dtype_bytes(dtype)[1] + \
        kv_scale_bytes_per_token(spec, dtype)


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
        model: a `ModelSpec` or anything `resolve_model` accepts (preset name, config, GGUF).
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
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
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


# ---- formatting --------------------------------------------------------------------------------
def format_bytes(n: int | float) -> str:
    """Binary units with one decimal (327680 -> '320.0 KiB'); bytes below 1 KiB as integers."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.{2 if abs(n) < 10 else 1}f} {unit}"
    raise AssertionError("unreachable")


def _table(rows: list[tuple[str, str]], headers: tuple[str, str] = ("quantity", "value")) -> str:
    w = max(len(headers[0]), *(len(r[0]) for r in rows))
    lines = [f"  {headers[0]:<{w}}  {headers[1]}", f"  {'-' * w}  {'-' * 40}"]
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


def format_budget(b: KVBudget) -> str:
    """The table `radixkv calc` prints for one budget."""
    m = b.model
    v_dim = m.v_head_dim if m.v_head_dim is not None else m.head_dim
    dims = f"{m.head_dim} head_dim" if v_dim == m.head_dim else f"{m.head_dim}+{v_dim} K+V dims"
    factor = "2 x " if v_dim == m.head_dim else ""
    head = [f"KV cache budget: {m.name}  ({m.source})",
            f"  {m.num_layers} layers x {m.num_kv_heads} KV heads x {dims}; "
            f"KV dtype {b.kv_dtype} ({b.kv_dtype_bytes} B); tensor parallel {b.tp}"
            + (f"; page size {b.page_size}" if b.page_size > 1 else ""), ""]
    elems = (f"{factor}{m.num_layers} x {m.num_kv_heads} x "
             f"{m.head_dim if v_dim == m.head_dim else m.head_dim + v_dim} x {b.kv_dtype_bytes} B")
    if kv_scale_bytes_per_token(m, b.kv_dtype):
        elems += f" + 2 x {m.num_layers} x {m.num_kv_heads} x {SCALE_BYTES} B scales"
    rows = [("KV bytes per token", f"{format_bytes(b.bytes_per_token)} "
                                   f"({b.bytes_per_token:,} B = {elems})")]
    if b.tp > 1:
        rows.append(("KV bytes per token per GPU",
                     f"{format_bytes(b.bytes_per_token_per_gpu)} "
                     f"({b.kv_heads_per_gpu} KV head{'s' * (b.kv_heads_per_gpu > 1)} per GPU)"))
    rows.append(("KV bytes per request", f"{format_bytes(b.bytes_per_request)} "
                                         f"({b.context_len:,} tokens)"))
    rows.append(("GPU memory usable", f"{format_bytes(b.usable_bytes_per_gpu)} per GPU "
                                      f"({format_bytes(b.gpu_mem_bytes)} x {b.mem_fraction:g})"))
    if b.weight_bytes is None:
        rows.append(("weights", b.weight_source))
    else:
        per = f", {format_bytes(b.weight_bytes_per_gpu)} per GPU" if b.tp > 1 else ""
        rows.append(("weights", f"{format_bytes(b.weight_bytes)}{per} ({b.weight_source})"))
    na = "n/a (weights unknown)"
    if b.kv_pool_bytes_per_gpu is None:
        rows += [("KV pool", na), ("tokens that fit", na)]
    else:
        rows.append(("KV pool", f"{format_bytes(b.kv_pool_bytes_per_gpu)} per GPU"))
        rows.append(("tokens that fit", f"{b.tokens_fit:,}"))
    ctx = f"requests of {b.context_len:,} tokens"
    rows.append(("concurrent requests (paged)",
                 na if b.concurrent_requests is None else f"{b.concurrent_requests:,} {ctx}"))
    if b.contiguous_requests is None:
        rows.append(("contiguous reservation instead", na))
    else:
        waste = 1 - b.context_len / b.max_len
        rows.append(("contiguous reservation instead",
                     f"{b.contiguous_requests:,} requests (each reserves max length "
                     f"{b.max_len:,}; {waste:.0%} of a reservation unused)"))
    out = "\n".join(head) + "\n" + _table(rows)
    if b.notes:
        out += "\n" + "\n".join(f"  note: {n}" for n in b.notes)
    return out


def format_presets(dtype: str = "fp16") -> str:
    """One line per preset: shape, parameters and KV bytes per token in `dtype`."""
    name, elem = kv_dtype_bytes(dtype)
    header = ("preset", "layers", "KV heads", "head_dim", "params", f"KV/token {name}",
              "max ctx")
    rows = []
    for key, spec in PRESETS.items():
        params = spec.params
        rows.append((key, str(spec.num_layers), str(spec.num_kv_heads), str(spec.head_dim),
                     f"{params / 1e9:.2f} B" if params else "?",
                     format_bytes(kv_bytes_per_token(spec, name)),
                     f"{spec.max_context:,}" if spec.max_context else "?"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)
