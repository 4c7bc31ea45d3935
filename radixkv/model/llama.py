"""Llama-family decoder over the paged KV pool (Llama, Llama 3, Qwen2 = Llama with q/k/v bias).

`model(input_ids)` is called inside `with forward_context(ctx):`; every attention layer writes
its new K/V into `ctx.kv_pool` at `ctx.out_slots` and then reads all of the batch's K/V back
through `radixkv.attention.decode` / `extend`, so a cached prefix is used in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import radixkv.attention as attention
from radixkv.errors import ModelLoadError
from radixkv.model import decode_kernels, linear_kernels, rope_kernels
from radixkv.model.config import ModelConfig
from radixkv.model.context import ForwardContext, get_forward_context
from radixkv.model.layers import (
    BF16W_PANEL_MIN_ROWS,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLUMLP,
    apply_rotary,
    bf16w_panel,
    linear,
    native_half_matmul,
    onednn_available,
    onednn_linear,
    onednn_pack,
)
from radixkv.model.quant import QuantEmbedding, QuantLinear, QuantTensor, Segment

TensorGetter = Callable[[str], torch.Tensor]


class LlamaAttention(nn.Module):
    """GQA self-attention with q, k and v fused into one [(Hq + 2 Hkv) * D, H] projection."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qk_width = (config.num_heads + config.num_kv_heads) * config.head_dim
        qkv_width = self.qk_width + config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, qkv_width, bias=config.attention_bias)
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size,
                             bias=config.o_proj_bias)
        self.fused_rope = True  # the in-place kernel of rope_kernels (CPU); False: torch

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:  # x [N, H] -> [N, H]
        n = x.shape[0]
        qkv = self.qkv_proj(x)  # [N, (Hq + 2 Hkv) * D]
        pool = ctx.kv_pool
        k_buf, v_buf = pool.get_kv_buffer(self.layer_id)  # [num_slots + 1, Hkv, D]
        heads = qkv.view(n, -1, self.head_dim)  # [N, Hq + 2 Hkv, D], a view
        if (self.fused_rope and not pool.quantized
                and rope_kernels.supports_store(heads, cos, ctx.out_slots, k_buf, v_buf)):
            # One call rotates q and k in place (qkv is this call's temporary) and writes the
            # new K/V into the pool: the float pool's set_kv, fused.
            rope_kernels.rotate_store_(heads, cos, sin, ctx.out_slots, k_buf, v_buf)
            q = heads[:, :self.num_heads]  # [N, Hq, D], strided: the kernels take row strides
        else:
            # q and k are rotated together: one elementwise pass instead of two.
            qk = heads[:, :self.num_heads + self.num_kv_heads]  # [N, Hq + Hkv, D], a view
            if self.fused_rope and rope_kernels.supports(qk, cos):
                rope_kernels.rotate_(qk, cos, sin)  # in place: qkv is this call's temporary
            else:
                qk = apply_rotary(qk, cos, sin)
            q = qk[:, :self.num_heads]  # [N, Hq, D]
            k = qk[:, self.num_heads:]  # [N, Hkv, D]
            v = heads[:, self.num_heads + self.num_kv_heads:]  # [N, Hkv, D]
            # Written first: extend reads the new tokens' K/V back from the pool with the prefix.
            pool.set_kv(self.layer_id, ctx.out_slots, k, v)
            q = q.to(pool.dtype)
            if q.device.type != "cpu":
                q = q.contiguous()
        # Quantized pools: int8 / fp8 codes plus scales [num_slots + 1, Hkv], else (None, None).
        k_sc, v_sc = pool.get_kv_scales(self.layer_id)
        if ctx.is_decode:
            o = attention.decode(q, k_buf, v_buf, ctx.kv_indptr, ctx.kv_indices, self.scale,
                                 k_scale=k_sc, v_scale=v_sc, shared_prefix=ctx.shared_prefix)
        else:
            o = attention.extend(q, k_buf, v_buf, ctx.qo_indptr, ctx.kv_indptr, ctx.kv_indices,
                                 self.scale, k_scale=k_sc, v_scale=v_sc)
        return self.o_proj(o.reshape(n, -1).to(x.dtype))  # [N, H]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_id)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:  # [N, H] -> [N, H]
        # In place: x is the model's own running hidden state, never a caller's tensor.
        a = self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        x += self.mlp(self.post_attention_layernorm(x, a))  # (x += a inside the norm)
        return x


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. `forward(input_ids [N]) -> logits [M, vocab]` (float32), where the
    ForwardContext supplies positions, KV slots and which M rows (`logits_indices`) to score.

    The constructor leaves the weights uninitialised: build through `build_model` / `load_model`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # An explicit (uninitialised) weight: the default normal_ init is wasted work, and on the
        # meta device it pulls in torch's decomposition tables (seconds of import time).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size), _freeze=True)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(config.hidden_size, config.vocab_size, bias=False))
        self.rotary = RotaryEmbedding(config)
        self.lm_head_upcast_rows = 0  # see configure_cpu_kernels
        self.lm_head_fast_rows = 0
        self.lm_head_packed: torch.Tensor | None = None  # oneDNN layout of the LM head
        self.cpu_kernel = "torch F.linear"  # what configure_cpu_kernels chose, for reports
        self.quant_head: QuantLinear | None = None  # the LM head when its weight is quantized
        self.decode_step: decode_kernels.DecodeStep | None = None  # see configure_cpu_kernels

    def configure_cpu_kernels(self, fast: bool = True) -> None:
        """Pick the CPU product paths for this model's dtype and this CPU (called at load).

        - With torch's oneDNN (x86 CPU builds) and `fast`: every float linear and the LM head
          run on oneDNN-prepacked weights, at every row count, for float32, and for bf16 /
          fp16 where the CPU has native half GEMMs (measured faster than `F.linear` at 1 to
          512 rows, see `layers.onednn_pack`). The tied LM head gets its own packed copy (the
          embedding table stays dense for lookups). `RADIXKV_ONEDNN=0` turns this off.
        - Otherwise few-row products (decode) on the skinny kernel of `linear_kernels`, up to
          `choose_max_rows` rows, when it builds here and `fast`.
        - On a CPU without native half GEMMs, bf16 / fp16 products of more rows in float32
          (measured on AVX2: bf16 GEMM ~8x slower than fp32 at 512 rows). The layer weights
          are upcast from 4 rows on; the vocab-sized LM head only from 64, as converting it
          costs as much as ~30 rows of native product.

        - RMSNorm rows (and the residual add before the second norm of a layer) on the fused
          kernel of `norm_kernels` and the rotary embedding in place on `rope_kernels`, where
          they build, and SwiGLU on the one-pass vectorised kernel of `swiglu_kernels`.

        `fast=False` restores the plain reference paths (dense weights, `F.linear`, torch's
        RMSNorm), which tests compare against.
        """
        p = self.norm.weight  # (the embedding may be a quantized table)
        cpu = p.device.type == "cpu"
        half = p.dtype in (torch.bfloat16, torch.float16)
        native = native_half_matmul(p.dtype) if half else True
        upcast = cpu and half and not native
        packed = (fast and cpu and native and onednn_available()
                  and os.environ.get("RADIXKV_ONEDNN", "1") != "0")
        fast_rows = (linear_kernels.choose_max_rows(p.dtype, native)
                     if fast and cpu and not packed else 0)
        # bf16 without native bf16 on AVX2 builds: the float32 panel kernel from
        # BF16W_PANEL_MIN_ROWS rows, the LM head included (it widens block by block, so the
        # head's whole-weight conversion cost that kept it off the upcast path below 64 rows
        # is gone)
        panel = fast and upcast and bf16w_panel(p.dtype)
        if panel:
            fast_rows = min(fast_rows, BF16W_PANEL_MIN_ROWS - 1)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fused = fast  # the one-pass kernel of norm_kernels (CPU only)
            if isinstance(m, LlamaAttention):
                m.fused_rope = fast  # the in-place kernel of rope_kernels (CPU only)
            if isinstance(m, SwiGLUMLP):
                m.fused = fast  # the one-pass kernel of swiglu_kernels (CPU only)
            if isinstance(m, Linear):
                if packed:
                    m.pack()
                else:
                    m.unpack()
                m.upcast_min_rows = 4 if upcast else 0
                m.fast_max_rows = fast_rows
        self.lm_head_upcast_rows = (4 if panel else 64) if upcast else 0
        self.lm_head_fast_rows = fast_rows
        self.lm_head_packed = None
        if packed and self.quant_head is None:
            # A separate head was packed in place by the loop above; a tied one needs its own
            # packed copy, the embedding table staying dense for lookups.
            self.lm_head_packed = (onednn_pack(self.embed_tokens.weight) if self.lm_head is None
                                   else self.lm_head.packed)
        # Decode batches of 1-4 rows in one compiled call over the packed weights (where their
        # layout is the one the step reads), the quantized ones or dense ones: the layered
        # forward's Python and per-call oneDNN overheads were ~20% of a batch-1 step on an
        # AVX-512 Zen, ~55% on an AVX2-only EPYC.
        self.decode_step = decode_kernels.DecodeStep.build(self) if fast and cpu else None
        self.cpu_kernel = ("oneDNN prepacked" if packed
                           else f"skinny C++ kernel for 2-{fast_rows} rows, float32 panel "
                                f"kernel on bf16 weights from {BF16W_PANEL_MIN_ROWS}"
                           if panel
                           else f"skinny C++ kernel for 2-{fast_rows} rows, else torch"
                           if fast_rows else "torch F.linear")
        if self.decode_step is not None:
            kinds = " + ".join(sorted(self.decode_step.kinds))
            self.cpu_kernel += (f"; decode of 1-{decode_kernels.MAX_ROWS} rows in one compiled "
                                f"step ({kinds} weights)")

    def configure_half_matmul(self) -> None:
        """Former name of `configure_cpu_kernels` (kept for callers)."""
        self.configure_cpu_kernels()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        if input_ids.dim() != 1 or input_ids.shape[0] != ctx.positions.shape[0]:
            raise ValueError(f"input_ids must be [N] with N == len(ctx.positions) "
                             f"({ctx.positions.shape[0]}), got shape {tuple(input_ids.shape)}")
        x = self.embed_tokens(input_ids)  # [N, H], a fresh tensor the layers update in place
        cos, sin = self.rotary(ctx.positions, x.dtype)  # [N, 1, D/2] each, shared by all layers
        step = self.decode_step
        if step is not None and step.accepts(ctx, x):
            logits = step(x, cos, sin, ctx)  # [N, vocab]: every row of a decode batch
            return logits if logits.shape[0] == ctx.logits_indices.shape[0] \
                else logits[ctx.logits_indices]
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        # RMSNorm is per row, so only the rows whose logits are wanted are normalised and scored.
        x = self.norm(x[ctx.logits_indices])  # [M, H]
        if self.quant_head is not None:
            return self.quant_head(x).float()  # [M, vocab]
        if self.lm_head_packed is not None:
            return onednn_linear(x, self.lm_head_packed, None).float()  # [M, vocab]
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, weight, None, self.lm_head_upcast_rows,
                      self.lm_head_fast_rows).float()  # [M, vocab]


def build_model(config: ModelConfig, get: TensorGetter, dtype: torch.dtype,
                device: torch.device, workers: int = 1) -> LlamaForCausalLM:
    """Build the model from tensors named as in Hugging Face checkpoints (`model.layers.0.
    self_attn.q_proj.weight`, ...). `get(name)` returns a tensor or raises ModelLoadError.

    q/k/v and gate/up are fused here; every tensor is shape-checked, cast and moved once.
    With `workers > 1`, `get` runs on a thread pool (it must then be thread-safe): GGUF
    dequantization is numpy work that releases the GIL.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = dict(model.named_parameters())

    plan: list[tuple[str, tuple[str, ...]]] = [
        ("embed_tokens.weight", ("model.embed_tokens.weight",)),
        ("norm.weight", ("model.norm.weight",)),
    ]
    if not config.tie_word_embeddings:
        plan.append(("lm_head.weight", ("lm_head.weight",)))
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        qkv = [f"{src}self_attn.{p}_proj" for p in ("q", "k", "v")]
        plan.append((f"{dst}self_attn.qkv_proj.weight", tuple(f"{p}.weight" for p in qkv)))
        if config.attention_bias:
            plan.append((f"{dst}self_attn.qkv_proj.bias", tuple(f"{p}.bias" for p in qkv)))
        plan.append((f"{dst}self_attn.o_proj.weight", (f"{src}self_attn.o_proj.weight",)))
        if config.o_proj_bias:
            plan.append((f"{dst}self_attn.o_proj.bias", (f"{src}self_attn.o_proj.bias",)))
        plan += [
            (f"{dst}mlp.gate_up_proj.weight",
             (f"{src}mlp.gate_proj.weight", f"{src}mlp.up_proj.weight")),
            (f"{dst}mlp.down_proj.weight", (f"{src}mlp.down_proj.weight",)),
            (f"{dst}input_layernorm.weight", (f"{src}input_layernorm.weight",)),
            (f"{dst}post_attention_layernorm.weight", (f"{src}post_attention_layernorm.weight",)),
        ]

    quantized: dict[str, list[Segment]] = {}

    def assemble(name: str, sources: tuple[str, ...], parts: list[torch.Tensor]) -> None:
        if any(isinstance(p, QuantTensor) for p in parts):  # `get` returned packed weights
            shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
            if shape != tuple(expected[name].shape):
                raise ModelLoadError(f"weight {' + '.join(sources)}: shape {shape}, "
                                     f"expected {tuple(expected[name].shape)}")
            quantized[name] = _segments(parts, device)
            return
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        want = expected[name].shape
        if tensor.shape != want:
            raise ModelLoadError(f"weight {' + '.join(sources)}: shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(want)}")
        state[name] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)

    state: dict[str, torch.Tensor] = {}
    if workers <= 1:
        for name, sources in plan:
            assemble(name, sources, [get(s) for s in sources])
    else:
        with ThreadPoolExecutor(workers) as pool:
            futures = {s: pool.submit(get, s) for _, sources in plan for s in sources}
            try:
                for name, sources in plan:  # consumed in order: finished tensors are freed early
                    assemble(name, sources, [futures.pop(s).result() for s in sources])
            finally:
                for f in futures.values():
                    f.cancel()
    _install_quantized(model, quantized, state, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.configure_cpu_kernels()
    return model.eval()


def _segments(parts: list[torch.Tensor | QuantTensor], device: torch.device) -> list[Segment]:
    """Fused parts as QuantLinear segments: neighbours of one packed format are concatenated,
    float parts (types a GGUF stores unquantized) become float32 segments."""
    out: list[Segment] = []
    for p in parts:
        if isinstance(p, QuantTensor):
            p = QuantTensor(p.fmt, p.qs.to(device), p.scales.to(device), p.source)
            if out and isinstance(out[-1], QuantTensor) and out[-1].fmt == p.fmt:
                out[-1] = QuantTensor.cat([out[-1], p])
            else:
                out.append(p)
        else:
            p = p.to(device=device, dtype=torch.float32)
            if out and isinstance(out[-1], torch.Tensor):
                out[-1] = torch.cat([out[-1], p])
            else:
                out.append(p)
    return out


def _install_quantized(model: LlamaForCausalLM, quantized: dict[str, list[Segment]],
                       state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Swap the modules whose weights came packed for QuantLinear / QuantEmbedding (their
    float biases move along out of `state`)."""
    for name, segments in quantized.items():
        path = name.removesuffix(".weight")
        if path == "embed_tokens":
            (table,) = segments
            assert isinstance(table, QuantTensor), "a quantized embedding has one packed part"
            model.embed_tokens = QuantEmbedding(table, dtype)
            if model.config.tie_word_embeddings:
                model.quant_head = QuantLinear([table])
            continue
        bias = state.pop(f"{path}.bias", None)
        layer = QuantLinear(segments, bias)
        # Callers that take the GEMM's bf16 result as is (SwiGLUMLP; the residual add after
        # o_proj): two conversions fewer per prefill product.
        layer.gemm_out = path.endswith(("mlp.gate_up_proj", "self_attn.o_proj"))
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, layer)
        if path == "lm_head":
            model.quant_head = layer
