"""`ModelConfig`: the architecture numbers of a Llama-family decoder, from config.json or GGUF.

Supported: Llama (incl. Llama 3 `rope_scaling`, linear scaling, and GGUF `rope_freqs` factors)
and Qwen2 (bias on the q/k/v projections). Anything else raises `ModelLoadError` up front.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from radixkv.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Rope scaling kinds the rotary embedding implements. "freq_factors" is what llama.cpp stores for
# Llama 3 (a `rope_freqs` tensor of per-frequency divisors) instead of the HF parameters.
SUPPORTED_ROPE_TYPES = ("linear", "llama3", "freq_factors")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (see module docstring for what is supported).

    `rope_scaling` is None or a dict with "rope_type" in SUPPORTED_ROPE_TYPES plus its parameters
    (HF names: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings; or
    "factors", a tuple of head_dim // 2 divisors for "freq_factors").
    `attention_bias` means bias on q/k/v; the output projection has one too only for Llama with
    attention_bias (HF's convention; Qwen2 has none).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rope_scaling: dict | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"unsupported architecture {self.architecture!r} "
                                 f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ModelLoadError(f"model config: {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"model config: num_heads ({self.num_heads}) is not a multiple of "
                                 f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim must be even for RoPE, "
                                 f"got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ModelLoadError(f"unsupported rope scaling {kind!r} "
                                     f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def o_proj_bias(self) -> bool:
        """Whether the attention output projection has a bias (Llama with attention_bias only)."""
        return self.architecture == "llama" and self.attention_bias


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name ("float32", "bf16", ...) or a torch.dtype, else ModelLoadError."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ModelLoadError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable):
        return [int(v) for v in value if v is not None]
    raise ModelLoadError(f"token id must be an int or a list of ints, got {value!r}")


def merge_eos(*groups: Iterable[int] | int | None) -> tuple[int, ...]:
    """Union of token ids in first-seen order."""
    out: list[int] = []
    for group in groups:
        for i in _ids(group):
            if i not in out:
                out.append(i)
    return tuple(out)


def _normalize_rope_scaling(raw: Mapping[str, Any] | None) -> dict | None:
    """HF rope_scaling / rope_parameters -> our dict, or None for plain RoPE."""
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    out = {k: v for k, v in raw.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = kind
    if kind == "linear":
        out["factor"] = float(raw["factor"])
    elif kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"):
            if key not in raw:
                raise ModelLoadError(f"llama3 rope_scaling lacks {key!r}")
    return out


def config_from_hf(cfg: Mapping[str, Any], generation_cfg: Mapping[str, Any] | None = None
                   ) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (and generation_config.json if any)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = cfg.get("architectures")
        raise ModelLoadError(f"unsupported model_type {model_type!r} (architectures {archs}); "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if cfg.get("mlp_bias"):
        raise ModelLoadError("config.json: mlp_bias=true is not supported")
    if model_type == "qwen2" and cfg.get("use_sliding_window"):
        raise ModelLoadError("config.json: Qwen2 use_sliding_window=true is not supported")
    if any(t != "full_attention" for t in cfg.get("layer_types") or ()):
        raise ModelLoadError("config.json: sliding-window layers (layer_types) are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"config.json: hidden_act {cfg.get('hidden_act')!r} is not supported")
    try:
        # transformers 5 keeps theta and scaling in `rope_parameters`; older files use top level.
        rope_params = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = _normalize_rope_scaling(cfg.get("rope_scaling") or rope_params)
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        partial = cfg.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ModelLoadError("config.json: partial_rotary_factor != 1 is not supported")
        gen = generation_cfg or {}
        return ModelConfig(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(cfg["intermediate_size"]),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias (its config has no flag for it).
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id", gen.get("bos_token_id")),
            eos_token_ids=merge_eos(cfg.get("eos_token_id"), gen.get("eos_token_id")),
        )
    except KeyError as exc:
        raise ModelLoadError(f"config.json lacks {exc.args[0]!r}") from None


def config_from_gguf(meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
                     ) -> ModelConfig:
    """ModelConfig from GGUF metadata (`meta`: key -> value) and tensor shapes (torch order).

    A `rope_freqs.weight` tensor's values must be put in by the caller (see gguf_loader); here
    its presence only selects the "freq_factors" scaling.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def get(key: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return value

    def one_int(key: str, default: Any = KeyError) -> int:
        value = get(key, default)
        if isinstance(value, (list, tuple)):  # per-layer arrays: only uniform ones are supported
            if len(set(value)) != 1:
                raise ModelLoadError(f"GGUF {arch}.{key} varies per layer: not supported")
            value = value[0]
        return int(value)

    if "token_embd.weight" not in tensor_shapes:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor")
    hidden = one_int("embedding_length")
    heads = one_int("attention.head_count")
    head_dim = one_int("attention.key_length", hidden // heads)
    rope_dim = one_int("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(f"GGUF rope.dimension_count {rope_dim} != head_dim {head_dim}: "
                             "partial rotary embeddings are not supported")
    scaling: dict | None = None
    kind = get("rope.scaling.type", None)
    if kind not in (None, "none"):
        if kind != "linear":
            raise ModelLoadError(f"GGUF rope scaling {kind!r} is not supported")
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if "rope_freqs.weight" in tensor_shapes:
        if scaling is not None:
            raise ModelLoadError("GGUF has both rope_freqs and rope.scaling.type: not supported")
        scaling = {"rope_type": "freq_factors"}
    vocab = tensor_shapes["token_embd.weight"][0]
    eos_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id")
    bias = "blk.0.attn_q.bias" in tensor_shapes
    if arch == "qwen2" and not bias:
        raise ModelLoadError("qwen2 GGUF without attn_q.bias")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=one_int("block_count"),
        num_heads=heads,
        num_kv_heads=one_int("attention.head_count_kv", heads),
        head_dim=head_dim,
        intermediate_size=one_int("feed_forward_length"),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias=bias,
        max_position_embeddings=one_int("context_length", 2048),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=merge_eos(*(meta.get(k) for k in eos_keys)),
    )


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float64) with the config's scaling applied."""
    dim = config.head_dim
    # Explicitly on the CPU: the model may be built under `torch.device("meta")`.
    exps = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
    inv = 1.0 / config.rope_theta ** exps
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    kind = scaling["rope_type"]
    if kind == "linear":
        # Positions divided by the factor == frequencies divided by it.
        return inv / scaling["factor"]
    if kind == "freq_factors":
        factors = torch.tensor(scaling["factors"], dtype=torch.float64, device="cpu")
        if factors.shape != inv.shape:
            raise ModelLoadError(f"rope_freqs has {factors.numel()} values, expected {inv.numel()}")
        return inv / factors
    # llama3: long wavelengths (beyond original context / low_freq_factor) are slowed down by
    # `factor`, short ones (below original context / high_freq_factor) are kept, and the band
    # between is blended linearly in (original context / wavelength); the clamp makes the blend
    # weight 0 or 1 outside the band.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    orig = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    blend = ((orig / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return inv * (blend + (1.0 - blend) / factor)
