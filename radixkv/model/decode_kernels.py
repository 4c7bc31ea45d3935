"""A whole decode step in one call on the CPU (csrc/decode_step.cpp), for 1-4 rows.

    step = DecodeStep.build(model)        # None where it does not apply (see `build`)
    if step is not None and step.accepts(ctx, x):
        logits = step(x, cos, sin, ctx)   # [M, vocab] float32, the layered forward's result

Why: at batch 1 a decode step is ~121 matrix-vector products and ~300 small ops. Dispatching
them from Python, with oneDNN's ~12 us fixed cost per prepacked linear call, took 3-4 ms of a
15-18 ms float32 step (measured on a 2-core Zen 5, SmolLM2-135M). The compiled step reads each
weight from oneDNN's own prepacked buffer (`torch.ops.mkldnn.data_ptr`), so there is no second
copy of the weights, and does the rest (norms, rotary, K/V store, SwiGLU, residuals) in a few
microseconds a layer; attention is the fused decode kernel of `radixkv.attention`. Quantized
layers run on `quant_kernels`' packed row kernel (called from inside the step) and dense
weights (bfloat16 on CPUs without native bf16 GEMMs, where nothing is packed) on the step's own
row kernel, which widens bf16 in registers. On a 2-core AVX2-only EPYC the float32 step took a
batch-1 decode from 81 to 34 ms, the weight-bandwidth limit there.

oneDNN's blocked layout is not a public contract, so `build` checks it byte for byte for every
distinct weight shape against the dense weight (64 x 64 tiles: float32 [k][o], bfloat16 VNNI
pairs [k/2][o][2]) and returns None when it differs (other CPUs / oneDNN versions: the layered
path, which is also the reference the tests compare against). `RADIXKV_DECODE_STEP=0` turns it
off.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from radixkv.attention import cpu_kernels
from radixkv.errors import InvalidSlotError
from radixkv.model import quant_kernels, swiglu_kernels
from radixkv.model.quant import X16_MAX_ROWS, QuantLinear, QuantTensor
from radixkv.native_build import RECORD, LazyLibrary

if TYPE_CHECKING:
    from radixkv.memory import TokenToKVPool
    from radixkv.model.context import ForwardContext
    from radixkv.model.llama import LlamaForCausalLM

_SRC = Path(__file__).with_name("csrc") / "decode_step.cpp"
_FLAG_SETS = (("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),)
_LIB = LazyLibrary(_SRC, what="the CPU decode step", fallback="using the layered forward",
                   switch="RADIXKV_DECODE_STEP",
                   signatures={"rkv_decode_step": RECORD,
                               "rkv_step_supported": (ctypes.c_int64, ctypes.c_int64)},
                   flag_sets=_FLAG_SETS)

MAX_ROWS = 4  # rows (requests) per step the kernel handles; more go to the layered forward
# the step's quantized products take the x16 row kernel for all its rows, as the layered one does
assert X16_MAX_ROWS >= MAX_ROWS
_CODE = {torch.float32: 0, torch.bfloat16: 1}
_LIN = "8q"  # struct Lin: weight, bias, O, K, kind, fmt, qs, scales
_TILES, _QGEMM, _DENSE = 0, 1, 2  # Lin.kind
_KIND_NAMES = {_TILES: "oneDNN-packed", _QGEMM: "low-bit packed", _DENSE: "dense"}
_LAYER = struct.Struct("<" + _LIN * 4 + "4q")  # struct Layer
_STEP = struct.Struct("<8q q 4q q 3q q" + _LIN + "q 2d 4q")  # struct Step


def available(dtype: torch.dtype, tiles: bool = False) -> bool:
    """Whether the step is built here for `dtype` (AVX-512 or AVX2 + FMA), and with `tiles`
    whether it also reads oneDNN-packed weights of that dtype (bfloat16: AVX512-BF16)."""
    lib = _LIB.get()
    return (lib is not None and dtype in _CODE
            and bool(lib.rkv_step_supported(_CODE[dtype], int(tiles))))


def _raw(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of a oneDNN-prepacked tensor as a flat tensor (a view, no copy)."""
    nbytes = int(torch.ops.mkldnn._nbytes(packed))
    buf = (ctypes.c_char * nbytes).from_address(int(torch.ops.mkldnn.data_ptr(packed)))
    return torch.frombuffer(buf, dtype=dtype)


def tiles_of(dense: torch.Tensor) -> torch.Tensor:
    """dense [O, K] rearranged into the tile order decode_step.cpp reads (the reference for
    the layout check): float32 [O/64, K/64, 64 k, 64 o], bfloat16 [O/64, K/64, 32, 64 o, 2]."""
    o, k = dense.shape
    if dense.dtype == torch.float32:
        return dense.view(o // 64, 64, k // 64, 64).permute(0, 2, 3, 1)
    return dense.view(o // 64, 64, k // 64, 32, 2).permute(0, 2, 3, 1, 4)


def layout_matches(packed: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether `packed` (from `layers.onednn_pack`) holds the tiles `tiles_of` describes."""
    o, k = shape
    if dtype not in _CODE or o % 64 or k % 64:
        return False
    try:
        raw = _raw(packed, dtype)
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return False
    if raw.numel() != o * k:
        return False
    want = tiles_of(packed.to_dense())
    return torch.equal(raw.view(want.shape), want)


class DecodeStep:
    """The compiled decode step bound to one model's weights (pointers into its packed
    buffers: rebuild it whenever the model's kernels are reconfigured)."""

    def __init__(self, model: LlamaForCausalLM, lins: list[tuple[int, ...]],
                 norms: list[tuple[int, int]], head: tuple[int, ...]) -> None:
        c = model.config
        self.model = model
        self.dtype = model.norm.weight.dtype
        self._lins, self._norms, self._head = lins, norms, head
        self._dims = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                      c.head_dim, c.num_layers)
        self.eps = float(model.norm.eps)
        self.sm_scale = c.head_dim ** -0.5
        self.vocab = head[2]
        self._pool_key: tuple[int, ...] | None = None
        self._layers: ctypes.Array[ctypes.c_char] | None = None
        lib = _LIB.get()
        assert lib is not None
        self._lib = lib
        self._attn = cpu_kernels.decode_function()
        self._keep: list[torch.Tensor] = []
        self.kinds: set[str] = set()  # how its products read weights (see `_KIND_NAMES`)
        self._qgemm = 0  # rkv_qgemm or rkv_qgemm_x16 (quant_kernels.qgemm_function)

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> DecodeStep | None:
        """The step for `model`, or None unless: CPU float32 / bfloat16 weights, every linear
        (and the LM head) either oneDNN-packed in the layout checked here with shapes multiples
        of 64, or a QuantLinear of one packed segment (int4 / int8, run by quant_kernels'
        row kernel), or dense in the model dtype with in_features a multiple of 8 (what
        bfloat16 keeps on CPUs without native bf16 GEMMs), and the step and the fused attention
        kernels built for this CPU."""
        dtype = model.norm.weight.dtype
        if (model.norm.weight.device.type != "cpu" or not available(dtype)
                or not cpu_kernels.available() or cpu_kernels.decode_function() == 0
                or swiglu_kernels.function() == 0):
            return None
        checked: dict[tuple[int, int], bool] = {}
        keep: list[torch.Tensor] = []  # float32 biases of quantized layers, kept alive

        def packed(w: torch.Tensor | None, bias: torch.Tensor | None,
                   shape: tuple[int, int]) -> tuple[int, ...] | None:
            if w is None or (bias is not None and bias.dtype != dtype):
                return None
            if shape not in checked:
                checked[shape] = available(dtype, tiles=True) and layout_matches(w, shape, dtype)
            if not checked[shape]:
                return None
            return (int(torch.ops.mkldnn.data_ptr(w)), 0 if bias is None else bias.data_ptr(),
                    shape[0], shape[1], _TILES, 0, 0, 0)

        x16s: set[bool] = set()  # the step calls one row kernel for every quantized product

        def quant(m: QuantLinear) -> tuple[int, ...] | None:
            segs = m.segments()
            if (len(segs) != 1 or not isinstance(segs[0], QuantTensor)
                    or quant_kernels.qgemm_function(m.x16) == 0):
                return None
            x16s.add(m.x16)
            seg = segs[0]
            bias = 0
            if m.bias is not None:
                keep.append(m.bias.float().contiguous())
                bias = keep[-1].data_ptr()
            return (0, bias, m.out_features, m.in_features, _QGEMM,
                    quant_kernels.FORMATS[seg.fmt], seg.qs.data_ptr(), seg.scales.data_ptr())

        def dense(w: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, ...] | None:
            if (w.dtype != dtype or w.device.type != "cpu" or not w.is_contiguous()
                    or w.shape[1] % 8
                    or (bias is not None and (bias.dtype != dtype or not bias.is_contiguous()))):
                return None
            return (w.data_ptr(), 0 if bias is None else bias.data_ptr(), w.shape[0],
                    w.shape[1], _DENSE, 0, 0, 0)

        def lin(m: torch.nn.Module) -> tuple[int, ...] | None:
            if isinstance(m, QuantLinear):
                return quant(m)
            if getattr(m, "packed", None) is None:
                return dense(m.weight, m.bias)
            return packed(m.packed, m.bias, (m.out_features, m.in_features))

        lins: list[tuple[int, ...]] = []
        norms: list[tuple[int, int]] = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                got = lin(m)
                if got is None:
                    return None
                lins.append(got)
            w1, w2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            if w1.dtype != dtype or w2.dtype != dtype:
                return None
            norms.append((w1.data_ptr(), w2.data_ptr()))
        c = model.config
        if model.quant_head is not None:
            head = quant(model.quant_head)
        elif model.lm_head_packed is not None:
            head = packed(model.lm_head_packed, None, (c.vocab_size, c.hidden_size))
        else:
            head = dense(model.embed_tokens.weight if model.lm_head is None
                         else model.lm_head.weight, None)
        if head is None or len(x16s) > 1:
            return None
        step = cls(model, lins, norms, head)
        # every product with 1-4 rows here, as the layered forward's (X16_MAX_ROWS >= MAX_ROWS)
        step._qgemm = quant_kernels.qgemm_function(x16s.pop() if x16s else False)
        step._keep = keep
        step.kinds = {_KIND_NAMES[f[4]] for f in (*lins, head)}
        return step

    def accepts(self, ctx: ForwardContext, x: torch.Tensor) -> bool:
        """Whether this forward can run here: a decode batch of 1 to MAX_ROWS rows in the
        model's dtype over a float pool of that dtype, on the CPU."""
        pool = ctx.kv_pool
        return (ctx.is_decode and 1 <= x.shape[0] <= MAX_ROWS and x.dtype == self.dtype
                and not pool.quantized and pool.kv_dtype == self.dtype
                and pool.device.type == "cpu" and ctx.kv_indices.dtype == torch.int64
                and ctx.kv_indptr.dtype == torch.int64)

    def _layers_for(self, pool: TokenToKVPool) -> ctypes.Array[ctypes.c_char]:
        key = tuple(b.data_ptr() for b in (*pool.k_buffers, *pool.v_buffers))
        if self._pool_key != key:
            parts = []
            for i in range(self._dims[5]):
                lins = [f for j in range(4) for f in self._lins[4 * i + j]]
                n1, n2 = self._norms[i]
                parts.append(_LAYER.pack(*lins, n1, n2, pool.k_buffers[i].data_ptr(),
                                         pool.v_buffers[i].data_ptr()))
            self._layers = ctypes.create_string_buffer(b"".join(parts))
            self._pool_key = key
        assert self._layers is not None
        return self._layers

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 ctx: ForwardContext) -> torch.Tensor:
        """Run every layer and the LM head on x [M, H] (the embedded tokens, updated in place):
        float32 logits [M, vocab]. Raises `InvalidSlotError`, before writing anything, on a slot
        outside the pool or a malformed kv_indptr."""
        h, inter, hq, hkv, d, n_layers = self._dims
        m = x.shape[0]
        pool = ctx.kv_pool
        layers = self._layers_for(pool)
        x = x.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()  # [M, 1, D/2]
        slots = ctx.out_slots.to(torch.int64).contiguous()
        indptr, indices = ctx.kv_indptr.contiguous(), ctx.kv_indices.contiguous()
        logits = torch.empty((m, self.vocab), dtype=torch.float32)
        args = _STEP.pack(
            m, h, inter, hq, hkv, d, n_layers, _CODE[self.dtype], ctypes.addressof(layers),
            x.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
            pool.k_buffers[0].shape[0], indptr.data_ptr(), indices.data_ptr(),
            indices.shape[0], self.model.norm.weight.data_ptr(), *self._head,
            logits.data_ptr(), self.eps, self.sm_scale, torch.get_num_threads(), self._attn,
            self._qgemm, swiglu_kernels.function())
        code = self._lib.rkv_decode_step(args)
        if code in (2, 3):
            raise InvalidSlotError("decode step: "
                                   + ("a slot is outside the K/V buffers" if code == 2 else
                                      "kv_indptr must start at >= 0, be non-decreasing and end "
                                      "at <= len(kv_indices)"))
        if code:
            raise RuntimeError(f"decode step kernel failed with code {code}")
        return logits
