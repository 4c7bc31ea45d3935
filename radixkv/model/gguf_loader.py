"""Load a llama.cpp GGUF file: metadata -> ModelConfig, tensors dequantized to float at load.

The header (a simple sequence of length-prefixed records, see the GGUF spec in the ggml repo) is
parsed here directly because `gguf.GGUFReader` builds numpy views per metadata item and takes
seconds on a 49k-token vocabulary; tensor data is then read through a memory map and dequantized
with `gguf.quants.dequantize`, which handles Q4_0, Q4_1, Q8_0, F16, F32 (and the other types the
`gguf` package knows).

llama.cpp stores the q/k projections of the `llama` architecture with each head's rows
interleaved for its rotate-pairs-(2i, 2i+1) RoPE; `_unpermute` restores Hugging Face's half-split
order so one RoPE convention serves both formats. Qwen2 GGUFs are stored unpermuted.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radixkv.errors import ModelLoadError
from radixkv.model.config import ModelConfig, config_from_gguf

if TYPE_CHECKING:
    from radixkv.model.quant import QuantTensor

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> (struct format, size); 8 = string, 9 = array.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY: dict[int, str] = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                          7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    """Where one tensor lives: `shape` in torch order (GGUF lists dims innermost first)."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Little-endian reader over a buffer."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: Any, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def scalar(self, fmt: str, size: int) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        return self.scalar("<I", 4)

    def u64(self) -> int:
        return self.scalar("<Q", 8)

    def string(self) -> str:
        n = self.u64()
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if etype in _NUMPY:
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            return [self.value(etype) for _ in range(count)]  # arrays of arrays
        raise ModelLoadError(f"GGUF: unknown metadata value type {vtype}")


class GGUFFile:
    """Metadata and tensor index of a GGUF file (v2 / v3, little-endian), data memory-mapped."""

    def __init__(self, path: str) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        try:
            self._mm = np.memmap(path, mode="r", dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
        if self._mm[:4].tobytes() != GGUF_MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic)")
        try:
            cur = _Cursor(self._mm, 4)
            version = cur.u32()
            if version not in (2, 3):
                hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
                raise ModelLoadError(f"{path}: unsupported GGUF version {version}{hint}")
            n_tensors, n_kv = cur.u64(), cur.u64()
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                self.metadata[key] = cur.value(cur.u32())
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.u64() for _ in range(cur.u32())]
                qtype, offset = cur.u32(), cur.u64()
                infos.append((name, dims, qtype, offset))
        except (struct.error, ValueError, IndexError) as exc:
            raise ModelLoadError(f"{path}: truncated or corrupt GGUF header ({exc})") from exc
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, qtype, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise ModelLoadError(f"{path}: tensor {name} has unknown type {qtype}") from None
            n_elems = int(np.prod(dims)) if dims else 1
            nbytes = n_elems // block * type_size
            start = data_start + offset
            if start + nbytes > self._mm.size:
                raise ModelLoadError(f"{path}: tensor {name} runs past the end of the file")
            self.tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, start, nbytes)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape in torch order."""
        return {name: info.shape for name, info in self.tensors.items()}

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as a float32 array of its torch-order shape (a new, writable array)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        info = self.tensors.get(name)
        if info is None:
            raise ModelLoadError(f"{self.path}: GGUF has no tensor {name!r}")
        qtype = GGMLQuantizationType(info.qtype)
        raw = self._mm[info.offset:info.offset + info.nbytes]
        try:
            byte_shape = quant_shape_to_byte_shape(info.shape or (1,), qtype)
            out = dequantize(raw.reshape(byte_shape), qtype)
        except (NotImplementedError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: cannot dequantize {name} ({qtype.name}): "
                                 f"{exc}") from exc
        out = out.reshape(info.shape)
        # F32 comes back as a read-only view of the map; everything else is already a new array.
        if out.dtype != np.float32 or not out.flags.writeable:
            out = out.astype(np.float32)
        return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (2i, 2i+1) -> (i, i + d/2).
    Works for weights [out, in] and biases [out]."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


# Hugging Face parameter name (per layer, after "model.layers.{i}.") -> GGUF name after "blk.{i}."
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """GGUF tensor name of a Hugging Face Llama/Qwen2 parameter name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if hf_name.startswith("model.layers."):
        layer, _, rest = hf_name[len("model.layers."):].partition(".")
        if rest in _LAYER_NAMES:
            return f"blk.{layer}.{_LAYER_NAMES[rest]}"
    raise ModelLoadError(f"no GGUF name for parameter {hf_name!r}")


class GGUFCheckpoint:
    """A GGUF model: `config` plus `get(hf_name) -> torch.Tensor` (float32, HF layout)."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ModelLoadError(f"GGUF file not found: {path}")
        self.file = GGUFFile(path)
        config = config_from_gguf(self.file.metadata, self.file.shapes())
        if config.rope_scaling is not None and config.rope_scaling["rope_type"] == "freq_factors":
            factors = self.file.dequantize("rope_freqs.weight").reshape(-1)
            config = dataclasses.replace(
                config, rope_scaling={"rope_type": "freq_factors",
                                      "factors": tuple(float(f) for f in factors)})
        self.config: ModelConfig = config
        # Only the llama architecture's q/k are stored permuted (llama.cpp's "normal" RoPE).
        self._permuted = config.architecture == "llama"

    def get(self, hf_name: str) -> torch.Tensor:
        """Dequantized tensor for a Hugging Face parameter name; ModelLoadError if absent."""
        w = self.file.dequantize(gguf_name(hf_name))
        if self._permuted and ".self_attn.q_proj." in hf_name:
            w = _unpermute(w, self.config.num_heads)
        elif self._permuted and ".self_attn.k_proj." in hf_name:
            w = _unpermute(w, self.config.num_kv_heads)
        return torch.from_numpy(np.ascontiguousarray(w))

    def get_quant(self, hf_name: str) -> QuantTensor | None:
        """The tensor at its stored precision when it is Q4_0 / Q4_1 / Q8_0 (a QuantTensor in HF
        layout, copied out of the map, never widened); None for other types."""
        from gguf import GGMLQuantizationType

        from radixkv.model.quant import from_gguf_blocks

        info = self.file.tensors.get(gguf_name(hf_name))
        if info is None or len(info.shape) != 2:
            return None
        raw = self.file._mm[info.offset:info.offset + info.nbytes]
        qt = from_gguf_blocks(np.asarray(raw), GGMLQuantizationType(info.qtype).name,
                              (info.shape[0], info.shape[1]))
        if qt is None:
            return None
        if self._permuted and ".self_attn.q_proj." in hf_name:
            qt = qt.permute_rows(lambda a: _unpermute(a, self.config.num_heads))
        elif self._permuted and ".self_attn.k_proj." in hf_name:
            qt = qt.permute_rows(lambda a: _unpermute(a, self.config.num_kv_heads))
        return qt
