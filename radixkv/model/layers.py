"""Building blocks of a Llama-family decoder: RMSNorm, rotary position embedding, SwiGLU MLP.

Every op works on flat token rows ([N, ...], all requests of a batch concatenated), so a ragged
batch needs no padding and no per-request loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixkv.model import linear_kernels, norm_kernels, quant_kernels, swiglu_kernels
from radixkv.model.config import ModelConfig, rope_inv_freq


def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU has a fast GEMM for `dtype` (bf16: AVX512-BF16 / AMX; fp16: AVX512-FP16
    / AMX-FP16). Without one (e.g. AVX2 only), torch's half GEMM is several times slower than
    float32."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
    return True


# bf16 weights on AVX2 CPUs without native bf16 GEMMs: from this many rows the float32 panel
# kernel (quant_kernels.gemm_bf16w: W widened block by block) beats the skinny kernel
# (linear_kernels). Measured on a 2-core Zen 3, 30 layers of SmolLM2's four products, 2
# threads, ms, skinny / panel / F.linear on upcast copies: 4 rows 25.6 / 38.3 / 57.8, 8: 43.9 /
# 38.6 / 81.9, 16: 68.6 / 51.9 / 106.4, 32: 74.5 / 48.2 / 90.5, 64: 171 / 87.1 / 129.5.
BF16W_PANEL_MIN_ROWS = 8


def bf16w_panel(dtype: torch.dtype) -> bool:
    """Whether `linear`'s upcast range runs on the float32 panel kernel for `dtype` weights."""
    return dtype == torch.bfloat16 and quant_kernels.bf16w_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           upcast_min_rows: int = 0, fast_max_rows: int = 0) -> torch.Tensor:
    """x [M, in] @ weight[out, in].T (+ bias) -> [M, out] in x's dtype.

    With 2 to `fast_max_rows` rows (> 0 only for CPU operands that `linear_kernels.supports`),
    the product runs on the skinny CPU kernel (`radixkv.model.linear_kernels`), which reads
    each weight row once for all rows. One row stays on torch: its GEMV is as fast.
    Else, with `upcast_min_rows` > 0 and at least that many rows, the product runs in float32
    on upcast copies and is rounded back: the same numbers as a half GEMM with float32
    accumulation, but fast on CPUs without native half GEMMs. Otherwise `F.linear` (the
    reference path).
    """
    if 1 < x.shape[0] <= fast_max_rows:
        return linear_kernels.linear(x, weight, bias)
    if upcast_min_rows and x.shape[0] >= upcast_min_rows:
        b = None if bias is None else bias.float()
        if (bf16w_panel(weight.dtype) and x.device.type == "cpu"
                and weight.is_contiguous() and weight.shape[1] % 8 == 0):
            # the float32 panel kernel widening W block by block (AVX2 builds): the same
            # float32 products without a float32 copy of the weight per call
            out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
            x32 = x.float()
            if x32.stride(-1) != 1:
                x32 = x32.contiguous()
            return quant_kernels.gemm_bf16w(x32, weight, b, out).to(x.dtype)
        return F.linear(x.float(), weight.float(), b).to(x.dtype)
    return F.linear(x, weight, bias)


def onednn_available() -> bool:
    """Whether torch's oneDNN (mkldnn) prepacked linear ops are usable on this CPU build."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """A oneDNN-prepacked copy of weight [out, in] (an opaque mkldnn tensor: only
    `onednn_linear` and `.to_dense()` read it). Packing once at load moves the layout work out
    of every product: measured on a 2-core Zen (AVX-512 BF16), 30 layers of SmolLM2-135M
    shapes, one thread, fp32: 20 ms at 1 row vs 32 ms for `F.linear`, 23 vs 63 ms at 8 rows,
    54 vs 125 ms at 32, 0.67 vs 1.6 s at 512; bf16: 13 / 13 / 30 ms / 0.34 s (native bf16).
    Limited to oneDNN's AVX2 code (ONEDNN_MAX_CPU_ISA=AVX2, MKL likewise) it still won at every
    row count (24 vs 34 ms at 1 row, 33 vs 65 at 8, 1.15 vs 1.38 s at 512)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """x [M, in] @ W.T (+ bias) with W prepacked by `onednn_pack`; x in W's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear whose products may run on a oneDNN-prepacked weight, on the skinny CPU
    kernel for few rows, or in float32 for half weights (see `linear`). The choice is made per
    model at load time by `LlamaForCausalLM.configure_cpu_kernels`; the defaults (nothing
    packed, 0 / 0) are plain `F.linear`, the reference path.

    Packed, the dense weight is dropped (`weight` becomes a shape-only meta tensor, so memory
    does not double) and `unpack()` restores it exactly. To edit weights after load, call the
    model's `configure_cpu_kernels(fast=False)` first (dense weights back) and
    `configure_cpu_kernels()` after (packed again from the edited values)."""

    upcast_min_rows: int = 0  # 0: never
    fast_max_rows: int = 0  # 0: never
    packed: torch.Tensor | None = None  # oneDNN layout of the weight, or None

    def pack(self) -> None:
        """Replace the dense weight with its oneDNN-prepacked form (CPU only)."""
        if self.packed is not None:
            return
        w = self.weight.detach()
        self.packed = onednn_pack(w)
        self.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"),
                                   requires_grad=False)

    def unpack(self) -> None:
        """Back to the dense weight (bit-identical to the one packed)."""
        if self.packed is None:
            return
        self.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
        if self.packed is not None:  # checked first: the CPU hot path
            return onednn_linear(x, self.packed, self.bias)
        if 1 < x.shape[0] <= self.fast_max_rows:
            return linear_kernels.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias, self.upcast_min_rows)


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), normalised in float32 then cast back to x's dtype
    before the weight is applied (the order Hugging Face uses, so bf16 results agree too).

    `forward(x, delta)` first adds the residual branch in place (x += delta) and normalises the
    sum: one pass instead of two. CPU float32 / bf16 rows run on the fused kernel of
    `norm_kernels` when it builds (`fused = False`: the torch reference)."""

    fused: bool = True

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None
                ) -> torch.Tensor:  # [N, H] (+ [N, H]) -> [N, H]
        if self.fused and norm_kernels.supports(x, self.weight) and (
                delta is None or (delta.dtype == x.dtype and delta.stride(-1) == 1
                                  and delta.shape == x.shape)):
            return norm_kernels.rms_norm(x, self.weight, self.eps, delta)
        if delta is not None:
            x += delta
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos / sin of each token's position, gathered from a float32 table.

    The table covers max_position_embeddings positions (angles computed in float64, so positions
    in the thousands keep full float32 accuracy). On the CPU it grows if a position goes beyond.
    The model looks cos / sin up once per forward and hands them to every layer.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq64 = rope_inv_freq(config)  # [D/2] float64, CPU
        self.max_positions = config.max_position_embeddings
        self._cos: torch.Tensor | None = None  # [L, D/2] float32
        self._sin: torch.Tensor | None = None

    def _build(self, length: int, device: torch.device) -> None:
        pos = torch.arange(length, dtype=torch.float64, device="cpu")
        angles = torch.outer(pos, self.inv_freq64)  # [L, D/2]
        self._cos = angles.cos().to(device, torch.float32)
        self._sin = angles.sin().to(device, torch.float32)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] int64 -> cos, sin [N, 1, D/2] in `dtype` (broadcast over heads)."""
        if self._cos is None or self._cos.device != positions.device:
            self._build(self.max_positions, positions.device)
        assert self._cos is not None and self._sin is not None
        if positions.device.type == "cpu" and positions.numel():
            # Grow rather than fail on the CPU (a cheap check there; on an accelerator it would
            # cost a sync per forward, so the engine keeps positions below the model's limit).
            top = int(positions.max())
            if top >= self._cos.shape[0]:
                self._build(max(top + 1, 2 * self._cos.shape[0]), positions.device)
        cos = self._cos[positions].to(dtype).unsqueeze(1)
        sin = self._sin[positions].to(dtype).unsqueeze(1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, H, D] by position (half-split convention: pairs (i, i + D/2)).

    GGUF weights were un-permuted at load from llama.cpp's interleaved layout, so one convention
    serves both formats.
    """
    x1, x2 = x.chunk(2, dim=-1)  # [N, H, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2 * I, H] matmul. CPU
    float32 / bfloat16 rows take the one-pass kernel of `swiglu_kernels` when it builds
    (`fused = False`: torch's silu_ and mul_, the reference)."""

    fused: bool = True

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H]
        gate_up = self.gate_up_proj(x)  # [N, 2I]
        if self.fused and swiglu_kernels.supports(gate_up):
            return self.down_proj(swiglu_kernels.swiglu(gate_up))  # [N, I] contiguous
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        # In place: gate_up is a temporary of this call (inference only, no autograd).
        act = F.silu(gate, inplace=True).mul_(up)  # [N, I], a strided view of gate_up
        return self.down_proj(act)
