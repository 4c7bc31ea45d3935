"""`make demo`: a multi-turn chat for a few users sharing one system prompt, on the default model.

Each turn prints the answer, how many prompt tokens came from the prefix cache and the timings;
the cache stats close the run. Turn k+1 of a user extends turn k's prompt and answer, so from the
second turn on nearly the whole conversation is a cache hit, and every user shares the system
prompt from the first turn on.
"""

from __future__ import annotations

import time

from radixkv import LLM, SamplingParams

SYSTEM = (
    "You are Ada, the help desk assistant of the Lakeside public library. You answer in one or "
    "two short sentences, in plain English, without lists. Opening hours: Monday to Friday 9:00 "
    "to 20:00, Saturday 10:00 to 16:00, closed on Sunday. Members may borrow up to 12 items for "
    "three weeks and renew them twice online unless someone reserved them. Late items cost 20 "
    "cents per day. The reading room on the first floor is quiet; the maker space in the "
    "basement has two 3D printers that must be booked a day ahead. Library cards are free for "
    "residents and need a proof of address."
)

USERS = {
    "maria": ["When are you open on Saturday?", "And can I come on Sunday?",
              "How long may I keep a book?"],
    "tom": ["How much is a late fee?", "I am five days late. What do I owe?",
            "Can I renew online instead?"],
    "lee": ["How do I get a library card?", "Is it free?", "Can I print in 3D there?"],
}


def main() -> None:
    t0 = time.perf_counter()
    llm = LLM()
    print(f"loaded the default model in {time.perf_counter() - t0:.1f} s "
          f"(KV pool: {llm.pool_size} token slots)\n")
    # The small model loops under plain greedy decoding: sample at a moderate temperature with a
    # repetition penalty, seeded so every run prints the same answers.
    params = SamplingParams(temperature=0.6, top_p=0.9, repetition_penalty=1.2, max_tokens=48,
                            seed=7)
    chats = {user: [{"role": "system", "content": SYSTEM}] for user in USERS}
    turns = max(len(q) for q in USERS.values())
    for turn in range(turns):
        users = [u for u in USERS if turn < len(USERS[u])]
        for u in users:
            chats[u].append({"role": "user", "content": USERS[u][turn]})
        start = time.perf_counter()
        outs = llm.chat([chats[u] for u in users], params)  # one batch: all users of this turn
        wall = time.perf_counter() - start
        print(f"--- turn {turn + 1}: {len(users)} users in one batch, {wall:.2f} s")
        for u, out in zip(users, outs, strict=True):
            comp = out.outputs[0]
            answer = comp.text.strip()
            chats[u].append({"role": "assistant", "content": answer})
            print(f"[{u}] {USERS[u][turn]}")
            print(f"  -> {answer}")
            print(f"     prompt {len(out.prompt_token_ids)} tokens, cached "
                  f"{out.num_cached_tokens}, ttft {1000 * out.metrics.ttft:.0f} ms, "
                  f"{len(comp.token_ids)} new tokens in {out.metrics.latency:.2f} s")
        print()
    stats = llm.cache_stats()
    print("--- cache stats")
    for key in ("requests", "prompt_tokens", "cached_tokens", "hit_rate",
                "prefill_tokens_computed", "decode_tokens", "tree_nodes", "tree_tokens",
                "evicted_tokens", "pool_size", "pool_used", "preemptions"):
        value = stats[key]
        print(f"  {key:<24} {value:.3f}" if isinstance(value, float) else
              f"  {key:<24} {value}")
    llm.check_no_leak()
    llm.shutdown()


if __name__ == "__main__":
    main()
