"""Quick start: load a model, complete prompts, chat, stream, and read the prefix-cache counters.

    python examples/quickstart.py                      # the default SmolLM2-135M-Instruct
    python examples/quickstart.py --model path/to/model.gguf

The second chat below repeats the first one's system prompt, so its prompt starts with tokens the
first already computed: `cached_tokens` counts them, and their KV is read from the cache instead
of being computed again.
"""

from __future__ import annotations

import argparse
import time

from radixkv import LLM, SamplingParams

SYSTEM = ("You are a concise assistant. Answer in one short sentence. You know geography, "
          "science and cooking, and you never invent facts you are unsure of.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a .gguf file, a folder holding one, or a Hugging Face folder "
                         "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer at most")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    # max_total_tokens is the KV pool's size in tokens; leave it out to size it from free memory.
    llm = LLM(args.model, max_total_tokens=8192)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; KV pool of "
          f"{llm.pool_size} token slots, "
          f"{llm.cache_stats()['kv_bytes_per_token']} bytes of K/V per token\n")

    # Greedy, with a mild repetition penalty: the small default model loops without one.
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, repetition_penalty=1.15)

    # 1. generate(): plain completion of several prompts, run together as one batch.
    print("== generate: two prompts in one batch")
    prompts = ["The three primary colors are", "Water boils at sea level at a temperature of"]
    for prompt, out in zip(prompts, llm.generate(prompts, greedy), strict=True):
        print(f"{prompt!r}\n  -> {out.outputs[0].text!r}")
        print(f"     {len(out.prompt_token_ids)} prompt tokens, "
              f"{len(out.outputs[0].token_ids)} new, "
              f"finish_reason={out.outputs[0].finish_reason}, {out.metrics.latency:.2f} s")

    # 2. chat(): the model's chat template is applied to a list of {"role", "content"} messages.
    print("\n== chat: two conversations with the same system prompt, one after the other")
    for question in ("What is the capital of Italy?", "How many legs does a spider have?"):
        conversation = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question}]
        out = llm.chat(conversation, greedy)[0]
        print(f"user: {question}\n  assistant: {out.outputs[0].text.strip()}")
        print(f"  cached_tokens={out.num_cached_tokens} of {len(out.prompt_token_ids)} prompt "
              f"tokens, time to first token {1000 * out.metrics.ttft:.0f} ms")

    # 3. stream(): text pieces as they are decoded; temperature > 0 samples, the seed repeats it.
    print("\n== stream: a sampled answer, printed piece by piece")
    sampled = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.15,
                             max_tokens=args.max_tokens, seed=1)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Give me a tip for cooking rice."}]
    print("assistant: ", end="", flush=True)
    pieces = 0
    for piece in llm.stream(messages, sampled):
        print(piece, end="", flush=True)
        pieces += 1
    print(f"\n  ({pieces} pieces)")

    # 4. cache_stats(): what the prefix cache saved over the whole session.
    stats = llm.cache_stats()
    print("\n== cache stats")
    print(f"  requests {stats['requests']}, prompt tokens {stats['prompt_tokens']}, of which "
          f"cached {stats['cached_tokens']} (hit_rate {stats['hit_rate']:.1%})")
    print(f"  prefill tokens computed {stats['prefill_tokens_computed']}, decode tokens "
          f"{stats['decode_tokens']}, engine steps {stats['steps']}")
    print(f"  radix tree: {stats['tree_nodes']} nodes holding {stats['tree_tokens']} tokens; "
          f"pool {stats['pool_used']} of {stats['pool_size']} slots used")


if __name__ == "__main__":
    main()
