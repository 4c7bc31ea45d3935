"""A chat backend pattern: per-tenant sessions, multi-turn, streamed and aborted turns, one engine.

    python examples/chat_backend.py                    # the default SmolLM2-135M-Instruct
    python examples/chat_backend.py --model path/to/model.gguf

`ChatBackend` keeps each session's messages (tenant -> session id -> messages) and serves every
turn as one asyncio task on a shared `AsyncLLM`, as a FastAPI handler would: the engine runs on
its own thread and the turns of all sessions are batched together there. The backend never
touches engine state; it only calls the public API (`generate`, `abort`, `cache_stats`,
`check_no_leak`). What it shows:

* multi-turn reuse: turn k+1's prompt is turn k's prompt + answer + the new question, so its
  cached_tokens cover nearly everything turn k left behind;
* tenant isolation: a tenant's requests run under `namespace=tenant`, so the prefix cache never
  matches one tenant's prompt against another tenant's KV, even for an identical system prompt;
* a streamed turn, during which the other sessions' turns keep decoding in the same steps;
* an aborted turn (a user closing the tab): its memory is released at the next step and the
  session forgets the question, while the turns batched with it finish normally.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from radixkv import AsyncLLM, RequestOutput, SamplingParams
from radixkv.errors import InvalidRequestError

Message = dict[str, str]

# Both tenants deploy the same assistant text: identical prompts that still must not share KV.
SYSTEM = (
    "You are the support assistant of a bicycle shop. Answer in one or two short sentences. The "
    "shop is open Tuesday to Saturday from 9:00 to 18:00. A basic service costs 45 euros and "
    "takes two days; a full service costs 90 euros and takes four days. Flat tyres are fixed "
    "while you wait for 12 euros. Rental bikes cost 20 euros per day and need a passport."
)

CONVERSATIONS = {  # tenant -> session id -> the user's questions, one per turn
    "acme": {
        "alice": ["When are you open?", "And on Monday?", "How much is a basic service?",
                  "Can I rent a bike?"],
        "bob": ["How much is a full service?", "How long does it take?",
                "Do you fix flat tyres?", "Do you sell helmets?"],
    },
    "globex": {
        "carol": ["Can I rent a bike?", "What do I need to bring?", "Is it open on Saturday?"],
    },
}


@dataclass
class Reply:
    """One finished turn."""

    tenant: str
    session: str
    question: str
    text: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    new_tokens: int
    finish_reason: str  # "stop", "length" or "abort"
    seconds: float


class ChatBackend:
    """Chat sessions of several tenants served by one `AsyncLLM`.

    `reply` serves one turn (an awaitable; run many at once with asyncio); `on_output` sees
    every cumulative output of the turn as it streams; `abort` drops a turn by its request id.
    A turn joins its session's history only once it finishes, so an aborted question leaves no
    trace in the conversation.
    """

    def __init__(self, llm: AsyncLLM, params: SamplingParams, system: str) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.sessions: dict[str, dict[str, list[Message]]] = {}
        self.in_flight: dict[tuple[str, str], str] = {}  # (tenant, session) -> request id
        self._ids = itertools.count()

    def messages(self, tenant: str, session: str) -> list[Message]:
        """The session's conversation so far (created with the system prompt on first use)."""
        by_id = self.sessions.setdefault(tenant, {})
        return by_id.setdefault(session, [{"role": "system", "content": self.system}])

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def reply(self, tenant: str, session: str, question: str, request_id: str | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None) -> Reply:
        """Serve the next turn of a session; returns it once finished (or aborted)."""
        if (tenant, session) in self.in_flight:
            raise InvalidRequestError(f"{tenant}/{session} already has a turn in flight")
        rid = request_id or self.new_request_id()
        conversation = [*self.messages(tenant, session), {"role": "user", "content": question}]
        self.in_flight[(tenant, session)] = rid
        out = None
        try:
            # namespace=tenant: this tenant's radix tree root; other tenants' KV is never matched
            async for out in self.llm.generate(messages=conversation, sampling_params=self.params,
                                               request_id=rid, namespace=tenant):
                if on_output is not None:
                    on_output(out)
        finally:
            del self.in_flight[(tenant, session)]
        assert out is not None and out.finished
        comp = out.outputs[0]
        if comp.finish_reason != "abort":
            self.messages(tenant, session).extend([
                {"role": "user", "content": question},
                {"role": "assistant", "content": comp.text},  # as generated: re-tokenizes alike
            ])
        return Reply(tenant, session, question, comp.text, len(out.prompt_token_ids),
                     out.num_cached_tokens, len(comp.token_ids), comp.finish_reason or "abort",
                     out.metrics.latency or 0.0)

    async def abort(self, request_id: str) -> bool:
        """Stop a queued or running turn (its memory is freed at the next step); False if it
        already ended."""
        return await self.llm.abort(request_id)


def show(replies: list[Reply], history: dict[tuple[str, str], int]) -> None:
    """Print each reply with its cache reuse; `history` holds what each session's previous turn
    left in the cache (prompt + answer tokens), updated here."""
    for r in sorted(replies, key=lambda r: (r.tenant, r.session)):
        key = (r.tenant, r.session)
        before = history.get(key)
        reuse = f"previous turn left {before}" if before else "first turn of the session"
        print(f"[{r.tenant}/{r.session}] {r.question}")
        print(f"    -> {r.text.strip()!r}" if r.finish_reason != "abort" else
              f"    -> aborted after {r.new_tokens} tokens: {r.text.strip()!r}")
        print(f"       cached {r.cached_tokens} of {r.prompt_tokens} prompt tokens ({reuse}); "
              f"{r.new_tokens} new tokens, {r.finish_reason}, {r.seconds:.2f} s")
        if r.finish_reason != "abort":
            history[key] = r.prompt_tokens + r.new_tokens


async def busy_slots(llm: AsyncLLM) -> int:
    """KV slots that cannot be reclaimed now: owned or locked by running requests."""
    stats = await llm.get_cache_stats()
    return stats["pool_used"] - stats["evictable_tokens"]


async def run(llm: AsyncLLM, backend: ChatBackend) -> None:
    history: dict[tuple[str, str], int] = {}
    sessions = [(t, s) for t, by_id in CONVERSATIONS.items() for s in by_id]

    for turn in range(2):  # every session's turn `turn`, all in one batch
        print(f"--- turn {turn + 1}: {len(sessions)} sessions of {len(CONVERSATIONS)} tenants "
              "batched together")
        show(await asyncio.gather(*(backend.reply(t, s, CONVERSATIONS[t][s][turn])
                                    for t, s in sessions)), history)
        print()

    print("--- turn 3: acme's sessions queued, globex/carol's answer streamed meanwhile")
    queued = [asyncio.create_task(backend.reply("acme", s, CONVERSATIONS["acme"][s][2]))
              for s in ("alice", "bob")]
    print("[globex/carol] (streamed) ", end="", flush=True)
    sent, pieces = 0, 0

    def print_piece(out: RequestOutput) -> None:
        nonlocal sent, pieces
        text = out.outputs[0].text  # cumulative; never ends inside a character or a stop string
        if len(text) > sent:
            print(text[sent:], end="", flush=True)
            sent, pieces = len(text), pieces + 1

    carol = await backend.reply("globex", "carol", CONVERSATIONS["globex"]["carol"][2],
                                on_output=print_piece)
    print(f"\n    ({pieces} pieces)")
    show([carol, *await asyncio.gather(*queued)], history)
    print()

    print("--- turn 4: bob closes the tab while his answer is being generated")
    alice = asyncio.create_task(backend.reply("acme", "alice", CONVERSATIONS["acme"]["alice"][3]))
    bob_id = backend.new_request_id()
    started = asyncio.Event()
    outputs = 0

    def count(out: RequestOutput) -> None:
        nonlocal outputs
        outputs += 1
        if outputs == 2:  # prefill, then a decode step
            started.set()

    bob = asyncio.create_task(backend.reply("acme", "bob", CONVERSATIONS["acme"]["bob"][3],
                                            request_id=bob_id, on_output=count))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([waiter, bob], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    before = await busy_slots(llm)
    aborted = await backend.abort(bob_id)
    print(f"abort({bob_id}) -> {aborted}; KV slots held by running requests: "
          f"{before} before, {await busy_slots(llm)} after (bob's KV stays in the tree, "
          "evictable)")
    show(list(await asyncio.gather(alice, bob)), history)
    bob_turns = sum(m["role"] == "user" for m in backend.messages("acme", "bob"))
    print(f"acme/bob's session keeps {bob_turns} finished turns; the aborted question is dropped")
    print()

    stats = await llm.get_cache_stats()
    print("--- cache stats")
    print(f"  requests {stats['requests']}, prompt tokens {stats['prompt_tokens']}, cached "
          f"{stats['cached_tokens']} (hit_rate {stats['hit_rate']:.1%})")
    print(f"  prefill tokens computed {stats['prefill_tokens_computed']}, decode tokens "
          f"{stats['decode_tokens']}, tree {stats['tree_nodes']} nodes / {stats['tree_tokens']} "
          f"tokens, pool {stats['pool_used']} of {stats['pool_size']} slots used")
    per_tenant = stats["tree_tokens_by_namespace"]  # radix tree tokens under each tenant's root
    print("  cached tokens per tenant: " +
          ", ".join(f"{t} {n}" for t, n in sorted(per_tenant.items(), key=str)))
    llm.check_no_leak()
    print("  check_no_leak: every KV slot is free or held by the tree")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a .gguf file, a folder holding one, or a Hugging Face folder "
                         "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer at most")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy (the default: answers re-tokenize to the generated tokens, "
                         "so turn k+1 reuses all of turn k)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    llm = AsyncLLM(args.model, max_total_tokens=8192)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s\n")
    # a mild repetition penalty keeps the small default model from looping
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            repetition_penalty=1.15, seed=0)
    try:
        asyncio.run(run(llm, ChatBackend(llm, params, SYSTEM)))
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
