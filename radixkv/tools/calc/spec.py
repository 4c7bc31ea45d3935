"""`ModelSpec`: the numbers of a model that size its KV cache and its weights, and the
parameter count of a Llama-layout decoder computed from them."""

from __future__ import annotations

from dataclasses import dataclass

# HF model types whose parameter count follows the Llama layout (gated SiLU MLP, q/k/v/o
# projections, two RMSNorms per layer); the weight size of other types is not guessed.
LLAMA_LIKE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2", "granite",
                              "internlm2"})


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
