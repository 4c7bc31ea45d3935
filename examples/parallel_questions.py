"""Parallel questions about one long document: the document's KV is computed once and shared.

    python examples/parallel_questions.py                    # the default SmolLM2-135M-Instruct
    python examples/parallel_questions.py --questions 8 --model path/to/model.gguf

Every prompt is the same long system message (instructions + document) followed by a different
question, and all of them are submitted in one `chat()` call. With the prefix cache, the first
request computes the document and the others, held back one step, find it in the radix tree:
each of them computes only its question. The same batch then runs on an `LLM` built with
`enable_prefix_cache=False`, which computes the document once per question; the two runs are
compared on prefill tokens computed, time to first token and wall time.
"""

from __future__ import annotations

import argparse
import time

from radixkv import LLM, RequestOutput, SamplingParams

DOCUMENT = """\
Field notes: the Millbrook community orchard, season report.

The orchard sits on a south-facing slope behind the old railway station and covers about two
hectares. It was planted eleven years ago by the neighbourhood association on land leased from the
town for a symbolic rent of one euro per year; the lease runs until 2041. There are 148 trees:
61 apple, 34 pear, 27 plum, 16 cherry and 10 quince. The oldest apple trees are of the Boskoop and
Reinette varieties, chosen because they keep well through the winter in the cellar of the station.

Work is done by volunteers. About forty people come regularly, organised in four teams: pruning in
February and March, mowing between May and September, harvest from late July to October, and the
cellar team that stores and sells the fruit. Every team has a coordinator; this year the pruning
team is led by Ines, the mowing team by Pavel, the harvest team by Grace and the cellar team by
Omar. New volunteers attend a two-hour safety session on the first Saturday of each month before
they may use ladders or the motor scythe.

This season was difficult at first. A late frost on the night of 14 April destroyed most cherry
blossoms, so the cherry harvest was only about 40 kilograms, against 300 kilograms last year. The
apples did much better: the harvest team picked 5.2 tonnes, a record, mostly because the new drip
irrigation installed in June kept the young trees alive during the dry August. Plums gave 900
kilograms, pears 1.1 tonnes and quinces 150 kilograms.

Fruit is sold at the Saturday market and from the station cellar on Wednesday evenings. Apples
cost 1.50 euros per kilogram, pears 2 euros and quinces 3 euros. The income this year was 9,400
euros. Half of it pays for the irrigation loan, a quarter goes to the tree nursery fund, and the
rest buys tools and pays the insurance. Surplus fruit that cannot be sold within a week is given
to the food bank on Canal Street, which received about 800 kilograms this season.

Plans for next year: replace six old plum trees that suffer from silver leaf disease, build a
second compost bay near the gate, and add a beehive in cooperation with the school. The annual
meeting, where the coordinators are elected, is on the second Sunday of January at the station.
"""

QUESTIONS = [
    "How many trees are in the orchard?",
    "Why was the cherry harvest so small?",
    "Who leads the harvest team?",
    "How much do pears cost?",
    "What happens to fruit that cannot be sold?",
    "When is the annual meeting?",
    "How many kilograms of apples were picked?",
    "What must new volunteers do before using ladders?",
]


def conversations(n: int) -> list[list[dict[str, str]]]:
    system = ("Answer the question about the report below in one short sentence, using only "
              "facts from the report.\n\n" + DOCUMENT)
    return [[{"role": "system", "content": system}, {"role": "user", "content": q}]
            for q in QUESTIONS[:n]]


def timed_batch(llm: LLM, convs: list[list[dict[str, str]]],
                params: SamplingParams) -> tuple[list[RequestOutput], float, int]:
    """Run the batch; returns the outputs, wall seconds and prefill tokens the engine computed."""
    # warm-up on an unrelated prompt (in its own namespace), so neither run pays first-use costs
    llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=2), namespace="warm-up")
    computed = llm.cache_stats()["prefill_tokens_computed"]
    start = time.perf_counter()
    outs = llm.chat(convs, params)
    wall = time.perf_counter() - start
    llm.check_no_leak()
    return outs, wall, llm.cache_stats()["prefill_tokens_computed"] - computed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a .gguf file, a folder holding one, or a Hugging Face folder "
                         "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--questions", type=int, default=6, choices=range(1, len(QUESTIONS) + 1),
                    metavar=f"1..{len(QUESTIONS)}", help="questions asked together")
    ap.add_argument("--max-tokens", type=int, default=24, help="new tokens per answer at most")
    args = ap.parse_args(argv)

    # greedy (both runs must give the same answers), with a mild repetition penalty: the small
    # default model loops without one
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, repetition_penalty=1.15)
    convs = conversations(args.questions)
    runs = {}
    for label, cache in (("cache on", True), ("cache off", False)):
        t0 = time.perf_counter()
        llm = LLM(args.model, max_total_tokens=8192, enable_prefix_cache=cache)
        print(f"{label}: model loaded in {time.perf_counter() - t0:.1f} s")
        runs[label] = timed_batch(llm, convs, params)
        llm.shutdown()
        del llm  # one model in memory at a time
    on, wall_on, computed_on = runs["cache on"]
    off, wall_off, computed_off = runs["cache off"]

    prompt_tokens = sum(len(o.prompt_token_ids) for o in on)
    print(f"\n{len(convs)} questions about a {len(on[0].prompt_token_ids)}-token prompt "
          f"(shared system message + document), submitted together; greedy, at most "
          f"{args.max_tokens} new tokens each\n")
    for q, o, b in zip(QUESTIONS, on, off, strict=False):
        print(f"Q: {q}\nA: {o.outputs[0].text.strip()!r}")
        print(f"   cached {o.num_cached_tokens} of {len(o.prompt_token_ids)} prompt tokens; "
              f"ttft {1000 * o.metrics.ttft:.0f} ms (cache off: {1000 * b.metrics.ttft:.0f} ms)")
    same = sum(o.outputs[0].token_ids == b.outputs[0].token_ids
               for o, b in zip(on, off, strict=True))

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "n/a"

    ttft_on = max(o.metrics.ttft for o in on)
    ttft_off = max(o.metrics.ttft for o in off)
    print(f"\n{'':<30}{'cache on':>12}{'cache off':>12}{'off / on':>10}")
    print(f"{'prompt tokens':<30}{prompt_tokens:>12}{prompt_tokens:>12}")
    print(f"{'prefill tokens computed':<30}{computed_on:>12}{computed_off:>12}"
          f"{ratio(computed_off, computed_on):>10}")
    print(f"{'all first tokens (ms)':<30}{1000 * ttft_on:>12.0f}{1000 * ttft_off:>12.0f}"
          f"{ratio(ttft_off, ttft_on):>10}")
    print(f"{'batch wall time (s)':<30}{wall_on:>12.2f}{wall_off:>12.2f}"
          f"{ratio(wall_off, wall_on):>10}")
    print(f"\nprefill speedup {ratio(ttft_off, ttft_on)}, end-to-end speedup "
          f"{ratio(wall_off, wall_on)} (decoding costs the same with and without the cache)")
    print(f"identical answers with and without the cache: {same} of {len(convs)}")


if __name__ == "__main__":
    main()
