"""A `ModelSpec` from a preset name, an HF `config.json` (or a model folder) or a GGUF file.

The files are read with the model layer's own readers: `radixkv.model.hf_loader.read_json` for
config.json and index files, `radixkv.model.gguf_loader.GGUFFile` for a GGUF header, and
`radixkv.model.resolve_model` tells a GGUF file from an HF folder exactly as `LLM(model)` does.
The fields are interpreted here, more leniently than the loader does: the calculator sizes any
decoder (Mistral, MoE, multimodal text configs), the loader only accepts what it can run.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from radixkv.errors import ConfigError, ModelLoadError
from radixkv.tools.calc.presets import get_preset
from radixkv.tools.calc.spec import LLAMA_LIKE_TYPES, ModelSpec


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
        from radixkv.model.hf_loader import read_json

        try:
            total = read_json(index).get("metadata", {}).get("total_size")
        except ModelLoadError:
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
    from radixkv.model.hf_loader import read_json

    try:
        cfg = read_json(cfg_path)
    except ModelLoadError as exc:  # "cannot read ..." / "... expected a JSON object"
        raise ConfigError(str(exc)) from exc
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
    llama_like = model_type in LLAMA_LIKE_TYPES and not moe
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


def load_gguf(path: str | Path) -> ModelSpec:
    """A `ModelSpec` from a GGUF file's header, read by the loader's `GGUFFile`.

    The parameter count and weight bytes are summed over the file's tensors, so a quantised file
    reports the bytes it really stores. Raises `ConfigError` for a missing/unreadable file or
    missing metadata.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no GGUF file at {p}")
    try:
        from radixkv.model.gguf_loader import GGUFFile

        header = GGUFFile(str(p))
    except ImportError as exc:
        raise ConfigError("reading GGUF needs the gguf package (pip install gguf)") from exc
    except ModelLoadError as exc:
        raise ConfigError(f"cannot read GGUF {p}: {exc}") from exc
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not arch:
        raise ConfigError(f"{p}: no general.architecture in the GGUF metadata")
    where = str(p)

    def get(key: str) -> Any:
        return meta.get(f"{arch}.{key}")

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
    if vocab is None and isinstance(meta.get("tokenizer.ggml.tokens"), list):
        vocab = len(meta["tokenizer.ggml.tokens"])
    tensors = header.tensors.values()
    num_params = sum(math.prod(t.shape) for t in tensors)
    weight_bytes = sum(t.nbytes for t in tensors)
    ffn = get("feed_forward_length")
    return ModelSpec(
        name=str(meta.get("general.name") or p.stem),
        num_layers=layers, num_kv_heads=kv, head_dim=int(head_dim), num_attention_heads=heads,
        hidden_size=hidden, intermediate_size=int(ffn) if isinstance(ffn, int) else None,
        vocab_size=int(vocab) if vocab is not None else None,
        tie_word_embeddings="output.weight" not in header.tensors,
        llama_like=arch in LLAMA_LIKE_TYPES,
        max_context=get("context_length"),
        v_head_dim=int(v_dim) if v_dim is not None and v_dim != head_dim else None,
        num_params=num_params or None, weight_bytes=weight_bytes or None,
        weight_dtype="gguf", source=f"GGUF: {p.name} ({arch})",
    )


def load_model_spec(name_or_path: str | Path) -> ModelSpec:
    """A preset name, a `.gguf` file, an HF `config.json` or a model folder -> `ModelSpec`.

    A path that exists (or ends in .gguf) is classified by `radixkv.model.resolve_model`, the
    loader's own rule (a folder with config.json is HF, a folder with one .gguf or a file with
    the GGUF magic is GGUF), so the calculator accepts what `LLM(model)` accepts, plus a bare
    config.json file. Anything else names a preset. Errors are `ConfigError`.
    """
    text = str(name_or_path)
    p = Path(text)
    if p.suffix.lower() == ".json":
        return load_hf_config(p)
    if not p.exists() and p.suffix.lower() != ".gguf":
        return get_preset(text)
    from radixkv.model import resolve_model

    try:
        kind, found = resolve_model(p)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from exc
    return load_gguf(found) if kind == "gguf" else load_hf_config(found)
