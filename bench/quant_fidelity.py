"""Fidelity of the quantized paths against the float32 path on the same checkpoint.

For each mode (default: gguf = the file's Q4_1 / Q8_0 weights run packed, int8 = float weights
re-quantized to int8 groups at load), against float32 (the GGUF widened at load):
- greedy agreement on 32 prompts x 32 tokens, teacher-forced on the float32 continuation: the
  share of positions whose argmax equals float32's, with near ties (float32's top-2 margin below
  --tie logits) counted apart; and how many free-running greedy continuations are identical;
- max / mean absolute logit error over those positions;
- perplexity of a fixed English text (goal: within 1% of float32's).
Teacher-forced logits and perplexity come from one forward over whole sequences, so they use
the prefill path (the weight widened + a GEMM, in bfloat16 on CPUs with native bf16: those
modes are also run with a float32 GEMM); the free-running continuations use the packed decode
kernels. A second table repeats agreement, logit error and perplexity through decode steps
(the prompt prefilled, then one token per step in batches of 4, as the compiled decode step
runs them: the packed row kernels, on int16-quantized x where `x16` is on).
Prints a table; asserts nothing. Run: `.venv/bin/python bench/quant_fidelity.py [--quick]`.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from radixkv import LLM, SamplingParams
from radixkv.memory import TokenToKVPool
from radixkv.model import build_forward_context, forward_context, load_model, quant

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of "
    "oil and a cloth for the lens. From the gallery he could see the whole bay: the fishing "
    "boats returning with the tide, the gulls circling over the harbour wall, and the long "
    "line of the coast road where the lamps came on one by one. In winter the storms arrived "
    "from the west, and the waves broke so high against the rocks that the spray reached the "
    "lantern room. He kept a logbook in which he wrote the weather, the ships that passed and "
    "the hours the light was burning. Over thirty years the book grew into a shelf of volumes, "
    "and the village children liked to read the oldest entries, written in a careful hand, "
    "about the night the schooner ran aground and every man in the village rowed out to help. "
    "When the light was finally automated, the keeper moved to a small cottage near the school "
    "and taught the children how to read the sky: which clouds meant rain by morning, how the "
    "wind turned before a gale, and why sailors trusted the stars more than any chart."
)

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one sentence.",
    "Write a haiku about autumn.", "How many legs does a spider have?",
    "What does a compiler do?", "Give me three tips for better sleep.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish.",
    "What is 12 times 13?", "Name a famous painting by Leonardo da Vinci.",
    "How do vaccines work?", "Describe the water cycle.",
    "What is a prime number?", "Suggest a name for a pet turtle.",
    "What causes earthquakes?", "How does a rainbow form?",
    "What is the boiling point of water at sea level?", "Summarise the plot of Cinderella.",
    "What is machine learning?", "List three primary colours.",
    "Why do cats purr?", "How far is the Moon from Earth?",
    "What is the difference between weather and climate?", "Write a short limerick.",
    "What is the tallest mountain in the world?", "How do bees make honey?",
    "What is an atom made of?", "Give a synonym for happy.",
    "Why do leaves change colour in autumn?", "What is the speed of light?",
    "How do I make a cup of tea?", "What is gravity?",
]


def forward_all(lm, seqs: list[list[int]]) -> torch.Tensor:
    """One extend forward of fresh sequences; logits of every position [sum len, vocab]."""
    c = lm.config
    pool = TokenToKVPool(sum(map(len, seqs)) + 1, c.num_layers, c.num_kv_heads, c.head_dim,
                         dtype=lm.dtype)
    slots = pool.alloc(sum(map(len, seqs)))
    new, start = [], 0
    for s in seqs:
        new.append(slots[start:start + len(s)])
        start += len(s)
    ctx = build_forward_context(pool, new, None, logits="all")
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    with torch.inference_mode(), forward_context(ctx):
        return lm.model(ids)


def perplexity(lm, ids: list[int]) -> float:
    logits = forward_all(lm, [ids])  # [n, vocab]
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    nll = -logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean()
    return math.exp(float(nll))


def teacher_forced(lm, prompts: list[list[int]], conts: list[list[int]]) -> torch.Tensor:
    """Logits [B, T, vocab] that predict each continuation token given the float32 history."""
    seqs = [p + c[:-1] for p, c in zip(prompts, conts, strict=True)]
    logits = forward_all(lm, seqs)
    out, start = [], 0
    for p, c in zip(prompts, conts, strict=True):
        end = start + len(p) + len(c) - 1
        out.append(logits[end - len(c):end])
        start = end
    return torch.stack(out)


def decode_forced(lm, prefixes: list[list[int]], conts: list[list[int]],
                  batch: int = 4) -> torch.Tensor:
    """Logits [B, T, vocab] predicting each continuation token given the float32 history, the
    first from the prefix's prefill and the rest from decode steps of up to `batch` rows."""
    c = lm.config
    n = sum(len(p) + len(t) for p, t in zip(prefixes, conts, strict=True))
    pool = TokenToKVPool(n + 1, c.num_layers, c.num_kv_heads, c.head_dim, dtype=lm.dtype)
    out = []
    with torch.inference_mode():
        for b0 in range(0, len(prefixes), batch):
            ps, cs = prefixes[b0:b0 + batch], conts[b0:b0 + batch]
            slots = [pool.alloc(len(p)) for p in ps]
            ctx = build_forward_context(pool, slots, None, logits="last")
            with forward_context(ctx):
                steps = [lm.model(torch.tensor([t for p in ps for t in p]))]
            for t in range(len(cs[0]) - 1):
                new = [pool.alloc(1) for _ in ps]
                ctx = build_forward_context(pool, new, slots, logits="last")
                with forward_context(ctx):
                    steps.append(lm.model(torch.tensor([cc[t] for cc in cs])))
                slots = [torch.cat([s, x]) for s, x in zip(slots, new, strict=True)]
            out.append(torch.stack(steps, 1))  # [b, T, V]
    return torch.cat(out)


def decode_perplexity(lm, ids: list[int]) -> float:
    logits = decode_forced(lm, [ids[:1]], [ids[1:]])[0]  # predicting ids[1:]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return math.exp(float(-logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--modes", default="gguf,int8")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--tie", type=float, default=0.1, help="near-tie margin (logits)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.tokens = 8, 16
    torch.set_num_threads(args.threads)
    print(f"# {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    base = load_model(args.model)
    tok = base.tokenizer
    prompts = [base.apply_chat_template([{"role": "user", "content": q}])
               for q in (QUESTIONS * 2)[:args.prompts]]
    text_ids = tok.encode(TEXT)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    t = time.perf_counter()
    ref_llm = LLM(base, max_total_tokens=16384)
    conts = [o.outputs[0].token_ids for o in ref_llm.generate(prompts, greedy)]
    ref_llm.shutdown()
    ref = teacher_forced(base, prompts, conts)  # [B, T, V]
    top2 = ref.topk(2, dim=-1).values
    tie = (top2[..., 0] - top2[..., 1]) < args.tie  # [B, T]
    ppl_ref = perplexity(base, text_ids)
    print(f"# float32 reference: {time.perf_counter() - t:.0f} s; {len(text_ids)} text tokens; "
          f"{int(tie.sum())} of {tie.numel()} positions are near ties (margin < {args.tie})")
    rows = [("float32", "-", "-", "-", "-", "-", f"{ppl_ref:.4f}", "-")]
    ppl_dec_ref = decode_perplexity(base, text_ids)
    drows = [decode_row("float32", base, prompts, conts, ref, tie, ppl_dec_ref, ppl_dec_ref)]
    # each mode as LLM(quantization=mode) runs it (dtype "auto": bf16 activations where the CPU
    # has native bf16), and there also in float32 with the float32 prefill GEMM, for scale
    variants: list[tuple[str, torch.dtype | None, str]] = [
        (m, None, "auto") for m in args.modes.split(",")]
    if quant.default_gemm_dtype() != torch.float32:
        variants += [(m, torch.float32, "float32") for m in args.modes.split(",")]
    for mode, gemm, dtype in variants:
        quant._gemm_dtype = gemm  # None: this CPU's default
        lm = load_model(args.model, quantization=mode, dtype=dtype)
        quant._gemm_dtype = None
        info = lm.kernel_info()
        name = f"{mode} ({info['model_dtype']}, {info['gemm_dtype']} GEMM)"
        logits = teacher_forced(lm, prompts, conts)
        agree = logits.argmax(-1) == ref.argmax(-1)
        err = (logits - ref).abs()
        llm = LLM(lm, max_total_tokens=16384)
        own = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        llm.shutdown()
        same = sum(a == b for a, b in zip(own, conts, strict=True))
        ppl = perplexity(lm, text_ids)
        rows.append((name, f"{float(agree[~tie].float().mean()):.4f}",
                     f"{int(agree[tie].sum())}/{int(tie.sum())}",
                     f"{same}/{len(prompts)}", f"{float(err.max()):.4f}",
                     f"{float(err.mean()):.5f}", f"{ppl:.4f}",
                     f"{(ppl / ppl_ref - 1) * 100:+.2f}%"))
        drows.append(decode_row(name, lm, prompts, conts, ref, tie,
                                decode_perplexity(lm, text_ids), ppl_dec_ref))
        print(f"# {name}: weight bytes {lm.kernel_info()['weight_bytes'] / 1e6:.1f} MB vs "
              f"float32 {base.kernel_info()['weight_bytes'] / 1e6:.1f} MB", flush=True)
    head = ("mode", "agree(non-tie)", "agree(ties)", "same seqs", "max |dlogit|",
            "mean |dlogit|", "perplexity", "ppl vs fp32")
    table(head, rows)
    print("# through decode steps (batches of 4; the float32 row: its decode path against its "
          "prefill path)")
    table(("mode", "decode kernel", "agree(non-tie)", "agree(ties)", "max |dlogit|",
           "mean |dlogit|", "perplexity", "ppl vs fp32 decode"), drows)


def decode_row(name: str, lm, prompts, conts, ref: torch.Tensor, tie: torch.Tensor,
               ppl: float, ppl_ref: float) -> tuple[str, ...]:
    logits = decode_forced(lm, prompts, conts)[:, 1:]  # the decode steps' predictions
    r, t = ref[:, 1:], tie[:, 1:]
    agree = logits.argmax(-1) == r.argmax(-1)
    err = (logits - r).abs()
    kernel = lm.model.decode_step.kinds if lm.model.decode_step is not None else {"layered"}
    x16 = any(getattr(m, "x16", False) for m in lm.model.modules())
    return (name, "+".join(sorted(kernel)) + (" (x16)" if x16 else ""),
            f"{float(agree[~t].float().mean()):.4f}", f"{int(agree[t].sum())}/{int(t.sum())}",
            f"{float(err.max()):.4f}", f"{float(err.mean()):.5f}", f"{ppl:.4f}",
            f"{(ppl / ppl_ref - 1) * 100:+.2f}%")


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
