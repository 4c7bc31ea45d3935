"""What a quantized model runs: the load-time report, the `quantization=` tensor getter, weight
bytes and `kernel_info` (for `cache_stats()` and the server's startup line)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from radixkv.model import quant_kernels
from radixkv.model.quant import (
    X16_MAX_ROWS,
    QuantEmbedding,
    QuantLinear,
    QuantTensor,
    quantize,
    relative_error,
)


# ---- what a loaded model runs -----------------------------------------------------------------
@dataclass
class QuantReport:
    """What load-time quantization did: per-tensor relative errors and the formats chosen."""

    mode: str
    errors: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> rel. error
    formats: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> format/source

    def summary(self) -> dict[str, Any]:
        errs = list(self.errors.values())
        out: dict[str, Any] = {"mode": self.mode, "tensors": len(self.formats)}
        if errs:
            out["rel_error_max"] = max(errs)
            out["rel_error_mean"] = sum(errs) / len(errs)
            out["rel_error_worst"] = max(self.errors, key=self.errors.__getitem__)
        return out


def _is_matrix(hf_name: str) -> bool:
    return hf_name.endswith("_proj.weight") or hf_name in ("lm_head.weight",
                                                           "model.embed_tokens.weight")


def quantizing_getter(ckpt: Any, report: QuantReport) -> Any:
    """`ckpt.get` (name -> float tensor) wrapped for `report.mode`: matrices come back as
    QuantTensors (from the GGUF's own blocks for "gguf", quantized here for "int4" / "int8"),
    everything else as before. Records formats and errors in `report` (thread-safe: one dict
    item per name)."""
    mode = report.mode

    def get(name: str) -> torch.Tensor | QuantTensor:
        if not _is_matrix(name):
            return ckpt.get(name)
        if mode == "gguf":
            qt = ckpt.get_quant(name)
            if qt is None:  # a type without a packed kernel (F16, F32, K-quants): widened
                report.formats[name] = "float32 (widened)"
                return ckpt.get(name)
            report.formats[name] = f"{qt.fmt} ({qt.source})"
            return qt
        embedding = name in ("lm_head.weight", "model.embed_tokens.weight")
        fmt = "int8" if mode == "int8" or embedding else "int4"
        w = ckpt.get(name)
        qt = quantize(w, fmt)
        report.errors[name] = relative_error(w, qt)
        report.formats[name] = fmt
        return qt

    return get


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model`, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    # oneDNN-prepacked weights (layers.Linear.packed, the LM head's copy) have no storage view.
    # An untied LM head's packed weight is both the head Linear's and the model's: count once.
    packed = {id(t): t for t in [*(getattr(m, "packed", None) for m in model.modules()),
                                 getattr(model, "lm_head_packed", None)] if t is not None}
    total += sum(t.numel() * t.element_size() for t in packed.values())
    return total


def kernel_info(model: nn.Module, report: QuantReport | None = None) -> dict[str, Any]:
    """Which kernels and dtypes a model's products use, its weight bytes, and (for load-time
    quantization) the error report: for cache_stats() and the server's startup line."""
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    formats: dict[str, int] = {}
    for lin in linears:
        for f, s in zip(lin.formats, lin.sources, strict=True):
            key = f"{f} ({s})"
            formats[key] = formats.get(key, 0) + 1
    emb = [m for m in model.modules() if isinstance(m, QuantEmbedding)]
    floats = [m for m in model.modules() if isinstance(m, nn.Linear)]
    info: dict[str, Any] = {
        "quantization": report.mode if report is not None else None,
        "weight_bytes": weight_bytes(model),
        "float_linears": len(floats),
        "quantized_linears": len(linears),
        "quantized_formats": formats,
        "embedding": f"{emb[0].fmt} ({emb[0].source})" if emb else "float",
        "float_linear_kernel": getattr(model, "cpu_kernel", "torch F.linear"),
    }
    if linears:
        ready = quant_kernels.available()
        lin = linears[0]
        gemm = str(lin.gemm_dtype).replace("torch.", "")
        isa = {16: "AVX-512", 8: "AVX2+FMA"}.get(quant_kernels.width(), "scalar")
        ref = "torch reference (dequantize + float32 matmul)"
        first = next(model.parameters(), None)
        dtype = first.dtype if first is not None else torch.float32
        model_dtype = str(dtype).replace("torch.", "")
        info["model_dtype"] = model_dtype  # norms, attention, KV and the values between products
        # the limits x of the model dtype takes (bf16 x: its own blocked kernel where built)
        lo, hi = lin.limits(dtype)
        bf16_blocked = (ready and dtype == torch.bfloat16
                        and (lo, hi) != (lin.blocked_min_rows, lin.gemv_max_rows))
        into = "between products and into the blocked kernel; float32 in the row kernel" \
            if bf16_blocked else "between products; float32 in the packed kernels"
        if lin.x16:
            into += f" (int16 per group of 32 up to {X16_MAX_ROWS} rows)"
        big = "the panel kernel" if lin.panel else "the widened GEMM"
        info["activations"] = (f"{model_dtype} {into}, {gemm} in {big}" if ready
                               else model_dtype)
        info["gemm_dtype"] = gemm if ready else "float32"
        blocked = ("packed int4/int8 blocked kernel, W widened to bf16 in L1, vdpbf16ps tiles "
                   "(C++ AVX512-BF16, OpenMP)" if bf16_blocked
                   else "packed int4/int8 panel kernel, x in K-major panels of 16 rows, W "
                        "widened to float32 in blocks, 16 x 6 outer-product tiles (C++ AVX2+FMA, "
                        "OpenMP)" if quant_kernels.width() == 8
                   else f"packed int4/int8 blocked kernel (C++ {isa}, OpenMP)")
        upper = f" < {hi}" if hi < 1 << 40 else ""
        row = f"packed int4/int8 row kernel (C++ {isa}, OpenMP)"
        if ready and lin.x16 and lo > 1:
            x16_top = min(X16_MAX_ROWS, lo - 1)
            info["kernels"] = {f"M <= {x16_top}": "packed int4/int8 row kernel on x quantized "
                                                  f"to int16 per group of 32 (C++ {isa}, OpenMP)"}
            if x16_top + 1 < lo:
                info["kernels"][f"{x16_top} < M < {lo}"] = row
        else:
            info["kernels"] = {f"M < {lo}": row if ready else ref}
        info["kernels"][f"{lo} <= M{upper}"] = blocked if ready else ref
        if hi < 1 << 40:
            info["kernels"][f"M >= {hi}"] = (
                ref if not ready
                else "packed int4/int8 panel kernel, x in bf16 K-pairs, W widened to bf16 in L2, "
                     "outer-product vdpbf16ps tiles (C++ AVX512-BF16, OpenMP)" if lin.panel
                else f"weight widened to {gemm} + torch GEMM")
    if report is not None:
        info["quant_report"] = report.summary()
    return info
