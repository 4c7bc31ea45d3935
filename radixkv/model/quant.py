"""Weight-only group quantization: packed int4 / int8 weights, the layers that run them, and the
`quantization=` setting of `load_model`.

Formats (groups of GROUP = 32 consecutive weights along `in`, one scale each):
  int4: w = d * q + m, q in 0..15; `qs` uint8 [N, K/32, 16] (byte j holds element j in its low
        nibble and element j + 16 in its high one: GGUF's Q4_0 / Q4_1 order), `scales` float16
        [N, K/32, 2] = (d, m). Q4_1 maps as is; Q4_0 (w = d * (q - 8)) as m = -8 d, exact in fp16.
  int8: w = d * q, q in -127..127; `qs` int8 [N, K/32, 32], `scales` float16 [N, K/32]: Q8_0.

Modes: None (float weights, the default), "gguf" (a GGUF file's Q4_0 / Q4_1 / Q8_0 tensors kept
at their stored precision, other types widened), "int4" / "int8" (float weights quantized
group-wise at load; the embedding and LM head go to int8 under "int4", as llama.cpp's Q4 files
do, and the error is reported).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from radixkv.errors import ConfigError
from radixkv.model import quant_kernels
from radixkv.model.layers import native_half_matmul

GROUP = 32
QUANTIZATION_MODES = ("int4", "int8", "gguf")

# Kernel choice by the number of rows M of x (tokens in the forward), measured with
# `bench/quant_kernels.py --threads 2` (best of 5-7, paths interleaved) on this repo's 2-core
# AMD EPYC with AVX-512 + AVX512-BF16 (the kernels built with their 16-float vectors; torch's
# bf16 GEMM native), load average ~2, ms per product:
#
#   shape (int4)  path                  M=1    8      16     24     32     64     128    512
#   960x576       rows (packed)         0.020  0.044  0.084  0.242  0.326  0.714  1.416  6.670
#                 blocked (packed)      0.025  0.067  0.118  0.150  0.119  0.268  0.835  2.197
#                 widen fp32 + GEMM     0.069  0.173  0.222  0.250  0.297  0.531  0.969  3.509
#                 widen bf16 + GEMM     0.106  0.112  0.124  0.134  0.147  0.263  0.455  1.077
#   3072x576      rows                  0.060  0.152  0.308  0.819  1.084  2.426  4.854  22.42
#                 blocked               0.066  0.184  0.342  0.301  0.388  0.894  1.719  7.423
#                 widen fp32            0.265  0.717  0.902  1.095  1.126  2.150  3.469  11.39
#                 widen bf16            0.285  0.414  0.459  0.563  0.511  0.771  1.077  3.029
#   576x1536      rows                  0.028  0.075  0.242  0.397  0.569  1.055  1.724  9.673
#                 blocked               0.036  0.098  0.132  0.188  0.315  0.361  0.726  3.426
#                 widen bf16            0.148  0.167  0.303  0.223  0.255  0.414  0.547  1.614
#   49152x576     rows                  0.930  2.474  4.281  12.82  17.50  35.24  71.17
#   (LM head)     blocked               0.960  2.662  3.843  5.727  6.725  12.82  22.94
#                 widen bf16 (tiles)    4.442  5.993  5.404  6.630  6.716  10.20  14.88
#
# The row kernel widens each group of 32 weights in registers once per 8 rows of x and needs one
# load of x per FMA; past ~16 rows x no longer stays in L1 and it falls off. The blocked kernel
# widens a block of W into L1 once for all rows (register tile 4 x 6): it takes over at ~16 rows
# and, against a float32 GEMM on the widened weight, wins at every M up to 512 here. Where the
# CPU has native bf16 GEMMs, widening to bf16 + torch's GEMM is level with it at ~28-48 rows and
# 2-3x faster at prefill sizes (activations rounded to bf16 there; see bench/quant_fidelity.py).
# So: rows kernel below 16 rows, blocked kernel below 32 (bf16 GEMM from 32 on) with native
# bf16, else the blocked kernel at every M.
#
# Builds without AVX-512 (AVX2 only) run the float32 panel kernel (csrc/qgemv.cpp
# `panel32_product`: x in K-major panels of 16 rows, 16 x 6 outer-product tiles) in the blocked
# kernel's place. Measured on a 2-core Zen 3 (EPYC, AVX2, no AVX-512) with the same bench, ms:
#
#   shape (int4)  path                  M=8    10     12     16     32     64     128    512
#   960x576       rows                  0.107  0.158  0.149  0.183  0.410  0.847  1.838  9.443
#                 panel                 0.168  0.181  0.156  0.150  0.227  0.461  0.785  3.076
#                 widen fp32 + GEMM     0.522  0.414  0.465  0.455  0.537  0.771  1.071  3.489
#                 fp32 F.linear         0.373  0.301  0.342  0.325  0.400  0.611  1.010  3.624
#   3072x576      rows                  0.274  0.399  0.438  0.572  1.347  2.682  5.676  30.30
#                 panel                 0.402  0.476  0.431  0.410  0.709  1.312  2.518  9.773
#                 widen fp32 + GEMM     0.991  1.044  1.160  1.311  1.921  2.458  3.812  11.20
#   576x1536      rows                  0.160  0.222  0.242  0.320  0.636  1.353  3.383  14.41
#                 panel                 0.225  0.217  0.210  0.206  0.359  0.661  1.274  5.000
#                 widen fp32 + GEMM     0.539  0.526  0.519  0.573  0.721  1.029  1.657  5.447
#   49152x576     rows                  4.302  7.106  7.029  8.728  20.48  41.12  97.26
#   (LM head)     panel                 6.367  6.323  6.265  6.327  11.02  20.62  39.98
#
# The panel kernel pads M to a multiple of 16 rows, so the row kernel keeps up to ~12 rows; from
# there the panel wins at every M, against widening + torch's float32 GEMM and even against the
# unquantized model's F.linear (it runs at the FMA peak when the widening is left out). So on
# AVX2 builds: rows below 12, the panel kernel from 12 rows on, at every M.
BLOCKED_MIN_ROWS = 16
BLOCKED_MIN_ROWS_AVX2 = 12  # the panel kernel, AVX2 builds
GEMV_MAX_ROWS_BF16 = 32  # with native bf16 GEMMs
GEMV_MAX_ROWS_AVX2 = 1 << 62  # AVX2 builds and a float32 GEMM: the panel kernel at every M
GEMV_MAX_ROWS = GEMV_MAX_ROWS_AVX2  # (former name)
# Widened tiles of at most this many elements (4 MiB as float32) for weights larger than
# WIDEN_MAX_ELEMS (the LM head): large enough for the GEMM to run at speed, small enough that no
# float32 copy of the vocab matrix ever exists. Smaller weights (every layer matrix: at most
# 3072 x 576 here) are widened whole into one reused per-thread buffer and take one GEMM.
TILE_ELEMS = 1 << 20
WIDEN_MAX_ELEMS = 1 << 22


# bfloat16 x (a bf16 model) on CPUs with AVX512-BF16: the blocked kernel's vdpbf16ps variant
# (csrc/qgemv.cpp `micro_bf16`) runs from 5 rows to below 32, the panel kernel (`micro_panel`:
# outer-product tiles on x repacked into K-pairs, no horizontal sums) from 32 rows on, at every
# M (it also takes float32 x rounded to bf16 where gemm_dtype is bf16, in place of widening the
# whole weight for torch's GEMM). Measured on a 2-core Zen 4 with `bench/quant_kernels.py
# --threads 2` (30 layers of SmolLM2's four int4 products, ms): vs the row kernel on x widened
# to float32, 1 row 6.3 vs 5.4, 2: 7.4 vs 7.0, 4: 7.8 vs 9.1, 8: 9.8 vs 14.9; vs the float32
# blocked kernel 16 rows 14.0 vs 31.6, 20: 15.8 vs 34.2. Blocked vs panel (the panel pads M to
# a multiple of 16 rows): 16 rows 15.3 vs 16.1, 24: 19.7 vs 23.8, 32: 24.8 vs 24.3, 64: 45.4 vs
# 44.5, 128: 85.7 vs 82.2, 512: 344 vs 337; widening to bf16 + torch's GEMM took 373 at 512, and
# oneDNN's GEMM on a prepacked bf16 weight (the unquantized bf16 model) 277-297, level with the
# panel's 295-337 (one core of the panel kernel: 79-88% of the vdpbf16ps peak). The bf16
# kernels start at 5 rows, not 4: up to 4 rows decode runs in the compiled step
# (radixkv/model/decode_kernels.py) on the row kernel, and the layered forward must give the
# same numbers for those batches (the bf16 kernels round the widened weight to bf16).
BF16X_BLOCKED_MIN_ROWS = 5
BF16X_GEMV_MAX_ROWS = 32  # from here: the panel kernel

# AVX2-only CPUs: up to X16_MAX_ROWS rows the row kernel runs on x quantized to int16 per group
# of 32 (csrc/qgemv.cpp `tile_x16`: integer dot products, vpmaddwd), where the float32 row
# kernel is bound by widening nibbles to floats, not by bytes. Measured on a 2-core Zen 3 (EPYC,
# AVX2, no AVX-512) with `bench/quant_kernels.py --decode --threads 2`: 30 layers of SmolLM2's
# four int4 products (66 MB, distinct per layer) + the int8 LM head, ms, row kernel vs x16:
#   rows   1            2            3            4            5            8
#   layers 8.49 / 6.34  10.03 / 8.64  9.92 / 9.30  10.66 / 10.60  11.80 / 14.88  21.1 / 24.4
#   head   1.57 / 1.33  1.95 / 1.74   2.47 / 1.82  2.66 / 1.92    2.84 / 2.69    4.71 / 3.69
# and end to end a batch-1 gguf decode step at context 650 took 9.2 ms against 11.7-13.4. So
# 1-4 rows: the compiled decode step's whole range, which the layered forward must match. x
# rounded to 8 bits instead (llama.cpp's Q8 activations; vpmaddubsw, ~8% faster) moved SmolLM2's
# decode-path perplexity +2.4% (`bench/quant_fidelity.py`: its activations have 30x outliers
# within a group of 32); 16 bits keep it at float32's. AVX-512 builds keep the float32 row
# kernel (an 8-bit variant measured 1.0-1.3x at one row on a Zen 4, slower from two rows).
# `RADIXKV_QUANT_X16=0` turns it off, `=1` on (any SIMD build).
X16_MAX_ROWS = 4


def blocked_min_rows_for(n: int, k: int) -> int:
    """From how many rows of x a [n, k] weight takes the blocked kernel, or on AVX2 builds the
    float32 panel kernel in its place (see the tables)."""
    return BLOCKED_MIN_ROWS_AVX2 if quant_kernels.width() == 8 else BLOCKED_MIN_ROWS


def gemv_max_rows_for(gemm_dtype: torch.dtype) -> int:
    """Below how many rows of x the packed kernels run (else widen + GEMM; see the table)."""
    if gemm_dtype == torch.bfloat16:
        return GEMV_MAX_ROWS_BF16
    return 1 << 62 if quant_kernels.width() >= 16 else GEMV_MAX_ROWS_AVX2


_gemm_dtype: torch.dtype | None = None


def default_x16() -> bool:
    """Whether decode-sized products (up to X16_MAX_ROWS rows) quantize x to int16 by default:
    `RADIXKV_QUANT_X16` ("0" off, "1" on wherever the SIMD kernels are built), else where
    measured faster (`quant_kernels.x16_preferred`: AVX2 builds without AVX-512)."""
    env = os.environ.get("RADIXKV_QUANT_X16", "")
    if env in ("0", "1"):
        return env == "1" and quant_kernels.simd()
    return quant_kernels.x16_preferred()


def default_gemm_dtype() -> torch.dtype:
    """bfloat16 where this CPU has native bf16 GEMMs (AVX512-BF16 / AMX), else float32: the
    dtype prefill-sized products run in after widening (activations rounded to it too)."""
    global _gemm_dtype
    if _gemm_dtype is None:
        _gemm_dtype = torch.bfloat16 if native_half_matmul(torch.bfloat16) else torch.float32
    return _gemm_dtype


def validate_quantization(value: object, config: Any = None, kind: str | None = None
                          ) -> str | None:
    """The `quantization` setting checked: None, "int4", "int8" or "gguf" (case-insensitive).

    With a ModelConfig (and the checkpoint `kind`, "gguf" or "hf"), also checks that the model
    can be quantized: every matrix's input width divides GROUP, and "gguf" needs a GGUF file.
    Raises ConfigError; changes nothing.
    """
    if value is None:
        return None
    if not isinstance(value, str) or value.strip().lower() not in QUANTIZATION_MODES:
        raise ConfigError(f"quantization must be None or one of {', '.join(QUANTIZATION_MODES)}; "
                          f"got {value!r}")
    mode = value.strip().lower()
    if kind is not None and mode == "gguf" and kind != "gguf":
        raise ConfigError('quantization="gguf" keeps a GGUF file\'s stored types; this model is '
                          'a Hugging Face folder: use "int4" or "int8"')
    if config is not None:
        widths = {"hidden_size": config.hidden_size,
                  "intermediate_size": config.intermediate_size,
                  "num_heads * head_dim": config.num_heads * config.head_dim}
        bad = {k: v for k, v in widths.items() if v % GROUP}
        if bad and mode in ("int4", "int8"):
            raise ConfigError(f"quantization={mode!r} needs input widths divisible by the group "
                              f"size {GROUP}; this model has {bad}")
    return mode


@dataclass(slots=True)
class QuantTensor:
    """A group-quantized weight [N, K] (see the module docstring for the formats)."""

    fmt: str  # "int4" | "int8"
    qs: torch.Tensor
    scales: torch.Tensor
    source: str  # where it came from: "Q4_1", "Q8_0", "int4 at load", ...

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.scales.nbytes

    def dequantize(self) -> torch.Tensor:
        """The weight widened to float32 [N, K]: the pure torch reference of the kernels."""
        n, k = self.shape
        if self.fmt == "int4":
            q = torch.cat([self.qs & 0x0F, self.qs >> 4], dim=-1).float()  # [N, G, 32]
            d, m = self.scales.float().unbind(-1)  # [N, G] each
            return (d.unsqueeze(-1) * q + m.unsqueeze(-1)).reshape(n, k)
        return (self.scales.float().unsqueeze(-1) * self.qs.float()).reshape(n, k)

    def rows(self, index: torch.Tensor) -> QuantTensor:
        """The rows `index` of the weight (e.g. embedding lookups), still quantized."""
        return QuantTensor(self.fmt, self.qs[index], self.scales[index], self.source)

    @staticmethod
    def cat(parts: list[QuantTensor]) -> QuantTensor:
        """Row-wise concatenation of weights in one format (fused q/k/v, gate/up)."""
        fmts = {p.fmt for p in parts}
        assert len(fmts) == 1, f"cannot concatenate formats {fmts}"
        sources = "+".join(sorted({p.source for p in parts}))
        return QuantTensor(parts[0].fmt, torch.cat([p.qs for p in parts]),
                           torch.cat([p.scales for p in parts]), sources)

    def permute_rows(self, fn: Any) -> QuantTensor:
        """Rows reordered by `fn` (a numpy row permutation such as the GGUF q/k un-permute):
        groups lie along `in`, so whole rows move with their scales."""
        return QuantTensor(self.fmt, torch.from_numpy(np.ascontiguousarray(fn(self.qs.numpy()))),
                           torch.from_numpy(np.ascontiguousarray(fn(self.scales.numpy()))),
                           self.source)


# ---- from GGUF blocks -------------------------------------------------------------------------
def from_gguf_blocks(raw: np.ndarray, qtype_name: str, shape: tuple[int, int]
                     ) -> QuantTensor | None:
    """A Q4_0 / Q4_1 / Q8_0 tensor's raw bytes as a QuantTensor (copied out of the file map);
    None for other types (they are widened by the caller)."""
    n, k = shape
    if k % GROUP:
        return None
    groups = k // GROUP
    if qtype_name == "Q4_0":  # [d fp16][16 B nibbles]
        blocks = raw.reshape(n, groups, 18)
        d = blocks[..., 0:2].copy().view(np.float16)  # [N, G, 1]
        m = (d.astype(np.float32) * -8.0).astype(np.float16)  # exact unless |d| > 8188
        if not np.isfinite(m).all():
            return None
        scales = np.concatenate([d, m], axis=-1)
        qs = blocks[..., 2:].copy()
        return QuantTensor("int4", torch.from_numpy(qs), torch.from_numpy(scales), "Q4_0")
    if qtype_name == "Q4_1":  # [d fp16][m fp16][16 B nibbles]
        blocks = raw.reshape(n, groups, 20)
        scales = blocks[..., 0:4].copy().view(np.float16)  # [N, G, 2]
        qs = blocks[..., 4:].copy()
        return QuantTensor("int4", torch.from_numpy(qs), torch.from_numpy(scales), "Q4_1")
    if qtype_name == "Q8_0":  # [d fp16][32 x int8]
        blocks = raw.reshape(n, groups, 34)
        scales = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [N, G]
        qs = blocks[..., 2:].copy().view(np.int8)
        return QuantTensor("int8", torch.from_numpy(qs), torch.from_numpy(scales), "Q8_0")
    return None


# ---- from float weights ----------------------------------------------------------------------
def quantize(w: torch.Tensor, fmt: str) -> QuantTensor:
    """Group-wise quantization of a float weight [N, K] (K divisible by GROUP).

    int4: asymmetric per group, d = (max - min) / 15, m = min (Q4_1's rule); int8: symmetric,
    d = max|w| / 127 (Q8_0's rule). Codes are rounded against the float16-rounded scales, so the
    stored (d, m, q) reproduce the weight as closely as the format allows.
    """
    n, k = w.shape
    if k % GROUP:
        raise ConfigError(f"cannot quantize a weight of shape {(n, k)}: {k} is not a multiple "
                          f"of the group size {GROUP}")
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    if fmt == "int4":
        lo, hi = g.amin(-1), g.amax(-1)  # [N, G]
        d = ((hi - lo) / 15).half()
        m = lo.half()
        inv = torch.where(d == 0, 0.0, 1.0 / d.float())
        q = ((g - m.float().unsqueeze(-1)) * inv.unsqueeze(-1)).round().clamp_(0, 15)
        q = q.to(torch.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)
        return QuantTensor("int4", qs.contiguous(), torch.stack([d, m], -1).contiguous(),
                           "int4 at load")
    if fmt == "int8":
        d = (g.abs().amax(-1) / 127).half()
        inv = torch.where(d == 0, 0.0, 1.0 / d.float())
        q = (g * inv.unsqueeze(-1)).round().clamp_(-127, 127).to(torch.int8)
        return QuantTensor("int8", q.contiguous(), d.contiguous(), "int8 at load")
    raise ConfigError(f"unknown quantized format {fmt!r}")


def relative_error(w: torch.Tensor, qt: QuantTensor) -> float:
    """||w - dequantize(qt)|| / ||w|| (Frobenius)."""
    w = w.detach().float()
    denom = float(torch.linalg.vector_norm(w))
    return float(torch.linalg.vector_norm(w - qt.dequantize())) / denom if denom else 0.0


# ---- layers -----------------------------------------------------------------------------------
_scratch = threading.local()


def _tile_buffer(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reused buffer of at least `numel` elements of `dtype` (one per thread and dtype)."""
    key = f"buf_{str(dtype).replace('torch.', '')}"
    buf = getattr(_scratch, key, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, key, buf)
    return buf[:numel]


Segment = QuantTensor | torch.Tensor  # a float segment is a float32 [n, K] tensor


class QuantLinear(nn.Module):
    """y = x @ W.T (+ b) with W stored as row segments, each packed (int4 / int8) or float32 (a
    fused q/k/v whose parts a GGUF stores in different types).

    The kernel is picked by the rows M of x at run time (see `kernel_for`; the limits are
    measured, module constants): M < `blocked_min_rows` runs the packed C++ row kernel (with
    `x16`, for M <= X16_MAX_ROWS, on x quantized to int16 per group of 32), M < `gemv_max_rows`
    the packed blocked kernel (both widen weights in registers / L1 only);
    larger M runs in `gemm_dtype` (bfloat16 where the CPU has native bf16 GEMMs, else float32):
    on CPUs with AVX512-BF16 the packed panel kernel (`panel`: x rounded to bf16, W widened to
    bf16 block by block in L2), else the weight widened (whole, or tile by tile for the
    vocab-sized LM head) into a reused buffer and torch's GEMM on it. The row and blocked
    kernels take float32 activations (bf16 / fp16 inputs are upcast and the result rounded
    back), except bfloat16 x on CPUs with AVX512-BF16, which has its own limits (`limits`): the
    blocked kernel's vdpbf16ps variant takes it as it is from BF16X_BLOCKED_MIN_ROWS rows, the
    panel kernel from BF16X_GEMV_MAX_ROWS. Without the compiled kernels, every M uses the torch
    reference (dequantize, then float32 matmul).
    """

    def __init__(self, segments: list[Segment], bias: torch.Tensor | None = None,
                 gemv_max_rows: int | None = None, blocked_min_rows: int | None = None,
                 gemm_dtype: torch.dtype | None = None, panel: bool | None = None,
                 x16: bool | None = None) -> None:
        super().__init__()
        ks = {s.shape[1] for s in segments}
        if len(ks) != 1:
            raise ValueError(f"segments disagree on in_features: {ks}")
        self.in_features = ks.pop()
        self.out_features = sum(s.shape[0] for s in segments)
        self.gemm_dtype = gemm_dtype if gemm_dtype is not None else default_gemm_dtype()
        self.gemv_max_rows = (gemv_max_rows if gemv_max_rows is not None
                              else gemv_max_rows_for(self.gemm_dtype))
        self.blocked_min_rows = (blocked_min_rows if blocked_min_rows is not None
                                 else blocked_min_rows_for(self.out_features, self.in_features))
        # the limits for bfloat16 x: explicit limits hold for every dtype; by default the
        # measured ones of the bf16 blocked kernel where it is built
        bf16_ok = quant_kernels.bf16_blocked() and self.gemm_dtype == torch.bfloat16
        # products of gemv_max_rows rows or more: the panel kernel, where built (else widening
        # + torch's GEMM; panel=False forces that, for A/B runs)
        self.panel = bf16_ok if panel is None else bool(panel) and bf16_ok
        # products of 1 .. X16_MAX_ROWS rows on the int16-activation row kernel (AVX2 builds)
        self.x16 = default_x16() if x16 is None else bool(x16) and quant_kernels.simd()
        self.gemv_max_rows_bf16 = (gemv_max_rows if gemv_max_rows is not None
                                   else BF16X_GEMV_MAX_ROWS if bf16_ok else self.gemv_max_rows)
        self.blocked_min_rows_bf16 = (blocked_min_rows if blocked_min_rows is not None
                                      else BF16X_BLOCKED_MIN_ROWS if bf16_ok
                                      else self.blocked_min_rows)
        self.formats: list[str] = []
        self.sources: list[str] = []
        self._rows: list[int] = []
        for i, s in enumerate(segments):
            if isinstance(s, QuantTensor):
                self.register_buffer(f"qs{i}", s.qs, persistent=False)
                self.register_buffer(f"scales{i}", s.scales, persistent=False)
                self.formats.append(s.fmt)
                self.sources.append(s.source)
            else:
                self.register_buffer(f"w{i}", s.float().contiguous(), persistent=False)
                self.formats.append("float32")
                self.sources.append(str(s.dtype).replace("torch.", ""))
            self._rows.append(s.shape[0])
        self.register_buffer("bias", None if bias is None else bias.float().contiguous(),
                             persistent=False)
        self._segs: list[Segment] | None = None  # segment views, rebuilt after .to() / _apply
        # True: widened-GEMM products come back in gemm_dtype, not x's dtype, for a caller that
        # takes either (the MLP's gate/up: its activation feeds down_proj's bf16 GEMM, so two
        # conversions of [M, 2I] / [M, I] are skipped; o_proj: added into the float32
        # residual). Set by the model builder.
        self.gemm_out = False

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        out = super()._apply(fn, recurse)
        self._segs = None
        return out

    def segments(self) -> list[Segment]:
        """The row segments in order (QuantTensor or float32 tensor), views of the buffers."""
        if self._segs is None:
            self._segs = [self.segment(i) for i in range(len(self.formats))]
        return self._segs

    def segment(self, i: int) -> Segment:
        if self.formats[i] == "float32":
            return getattr(self, f"w{i}")
        return QuantTensor(self.formats[i], getattr(self, f"qs{i}"),
                           getattr(self, f"scales{i}"), self.sources[i])

    def limits(self, dtype: torch.dtype) -> tuple[int, int]:
        """(blocked_min_rows, gemv_max_rows) for x of `dtype`: bfloat16 x has its own (the
        bf16 blocked kernel, where built), every other dtype the float32 ones."""
        if dtype == torch.bfloat16 and quant_kernels.bf16_blocked():
            return self.blocked_min_rows_bf16, self.gemv_max_rows_bf16
        return self.blocked_min_rows, self.gemv_max_rows

    def kernel_for(self, m: int, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> str:
        """Which path a product with `m` rows of x in `dtype` takes: "packed-gemv" (the row
        kernel), "packed-gemv-x16" (the row kernel on x quantized to int16), "packed-blocked"
        (for bf16 x where built: its vdpbf16ps variant),
        "packed-panel" (bf16 GEMM-sized products where built), "widen+gemm-float32" /
        "widen+gemm-bfloat16", or "reference" (no compiled kernels, or not on the CPU)."""
        dev = device if device is not None else next(iter(self.buffers())).device
        if dev.type != "cpu" or not quant_kernels.available():
            return "reference"
        lo, hi = self.limits(dtype)
        if m < hi:
            if m >= lo:
                return "packed-blocked"
            return "packed-gemv-x16" if self.x16 and m <= X16_MAX_ROWS else "packed-gemv"
        if self.panel:
            return "packed-panel"
        return f"widen+gemm-{str(self.gemm_dtype).replace('torch.', '')}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N]
        m = x.shape[0]
        segs = self.segments()
        if x.device.type != "cpu" or not quant_kernels.available():
            w = torch.cat([s if isinstance(s, torch.Tensor) else s.dequantize() for s in segs])
            return F.linear(x.float(), w, self.bias).to(x.dtype)
        lo, hi = self.limits(x.dtype)
        if m >= hi:
            return self._panel(x, segs) if self.panel else self._gemm(x, segs)
        blocked = m >= lo
        x16 = not blocked and self.x16 and m <= X16_MAX_ROWS
        # bf16 x feeds the bf16 blocked kernel as it is (vdpbf16ps), else widened to float32
        keep16 = blocked and x.dtype == torch.bfloat16 and quant_kernels.bf16_blocked()
        x32 = x if x.dtype == torch.float32 or keep16 else x.float()
        if x32.stride(-1) != 1:
            x32 = x32.contiguous()
        out = torch.empty(m, self.out_features, dtype=torch.float32)
        if m:
            for seg, dst, bias in self._parts(segs, out):
                if isinstance(seg, torch.Tensor):
                    dst.copy_(F.linear(x32.float(), seg, bias))
                else:
                    quant_kernels.qgemm(seg.fmt, x32, seg.qs, seg.scales, bias, dst, blocked,
                                        x16=x16)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def _parts(self, segs: list[Segment], out: torch.Tensor
               ) -> Iterator[tuple[Segment, torch.Tensor, torch.Tensor | None]]:
        """Each segment with its column slice of `out` [M, N] and of the bias (None without
        one): where its product goes."""
        off = 0
        for seg, rows in zip(segs, self._rows, strict=True):
            whole = len(segs) == 1
            dst = out if whole else out[:, off:off + rows]
            bias = (None if self.bias is None
                    else self.bias if whole else self.bias[off:off + rows])
            yield seg, dst, bias
            off += rows

    def _panel(self, x: torch.Tensor, segs: list[Segment]) -> torch.Tensor:
        """GEMM-sized products on the panel kernel: x rounded to bf16 (as the widened GEMM rounds
        it), the result written by the kernel in x's dtype (bf16 with `gemm_out`), float
        segments through F.linear."""
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if xb.stride(-1) != 1:
            xb = xb.contiguous()
        want = torch.bfloat16 if self.gemm_out else x.dtype
        out_dt = want if want in (torch.float32, torch.bfloat16) else torch.float32
        out = torch.empty(x.shape[0], self.out_features, dtype=out_dt)
        for seg, dst, bias in self._parts(segs, out):
            if isinstance(seg, torch.Tensor):
                dst.copy_(F.linear(xb.float(), seg, bias))
            else:
                quant_kernels.qgemm(seg.fmt, xb, seg.qs, seg.scales, bias, dst, panel=True)
        return out if out.dtype == want else out.to(want)

    def _gemm(self, x: torch.Tensor, segs: list[Segment]) -> torch.Tensor:
        """Prefill-sized products: the weight widened to `gemm_dtype` into the per-thread
        scratch buffer (whole when it has at most WIDEN_MAX_ELEMS elements, else tile by tile),
        one torch GEMM per widened piece; the bias is added in float32."""
        dt = self.gemm_dtype
        xg = x if x.dtype == dt else x.to(dt)
        if xg.stride(-1) != 1:
            xg = xg.contiguous()
        n, k = self.out_features, self.in_features
        if n * k <= WIDEN_MAX_ELEMS:  # every layer matrix: one GEMM, no result copy
            w = _tile_buffer(n * k, dt).view(n, k)
            self._widen_rows(segs, 0, n, w)
            y = F.linear(xg, w)  # (measured: torch.mm(xg, w.t()) was 3x slower at 960 x 576)
            if self.bias is not None:
                y = y.float().add_(self.bias)
            return y if y.dtype == x.dtype or self.gemm_out else y.to(x.dtype)
        step = max(1, TILE_ELEMS // k)
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        for a in range(0, n, step):
            b = min(n, a + step)
            w = _tile_buffer((b - a) * k, dt).view(b - a, k)
            self._widen_rows(segs, a, b, w)
            part = F.linear(xg, w)
            if self.bias is not None:
                part = part.float().add_(self.bias[a:b])
            out[:, a:b] = part
        return out

    def _widen_rows(self, segs: list[Segment], a: int, b: int, w: torch.Tensor) -> None:
        """Rows a .. b of the whole weight widened into `w` [b - a, K] (w's dtype)."""
        off = 0
        for seg, rows in zip(segs, self._rows, strict=True):
            lo, hi = max(a, off), min(b, off + rows)
            if lo < hi:
                dst = w[lo - a:hi - a]
                if isinstance(seg, torch.Tensor):
                    dst.copy_(seg[lo - off:hi - off])
                else:
                    quant_kernels.dequantize(seg.fmt, seg.qs[lo - off:hi - off],
                                             seg.scales[lo - off:hi - off], self.in_features,
                                             out=dst)
            off += rows

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"formats={self.formats}, sources={self.sources}")


class QuantEmbedding(nn.Module):
    """Embedding lookup from a quantized table: only the looked-up rows are widened."""

    def __init__(self, table: QuantTensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.fmt = table.fmt
        self.source = table.source
        self.dtype = dtype
        self.register_buffer("qs", table.qs, persistent=False)
        self.register_buffer("scales", table.scales, persistent=False)

    @property
    def table(self) -> QuantTensor:
        return QuantTensor(self.fmt, self.qs, self.scales, self.source)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, H]
        rows = self.table.rows(ids)
        if ids.device.type == "cpu" and quant_kernels.available() and ids.numel():
            out = quant_kernels.dequantize(self.fmt, rows.qs, rows.scales, rows.shape[1])
        else:
            out = rows.dequantize()
        return out if self.dtype == torch.float32 else out.to(self.dtype)
