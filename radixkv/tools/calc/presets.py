"""Built-in model presets: exact numbers from each model's public HF config.json."""

from __future__ import annotations

from radixkv.errors import ConfigError
from radixkv.tools.calc.spec import ModelSpec

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
