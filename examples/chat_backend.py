"""A chat backend pattern: per-tenant sessions, multi-turn, streamed and aborted turns, one engine.

    python examples/chat_backend.py                    # the default SmolLM2-135M-Instruct
    python examples/chat_backend.py --model path/to/model.gguf

`ChatBackend` keeps each session's messages (tenant -> session id -> messages) and sends every
turn as a request to one shared engine, so the turns of all sessions are batched together. What
it shows:

* multi-turn reuse: turn k+1's prompt is turn k's prompt + answer + the new question, so its
  cached_tokens cover nearly everything turn k left behind;
* tenant isolation: a tenant's requests run under `namespace=tenant`, so the prefix cache never
  matches one tenant's prompt against another tenant's KV, even for an identical system prompt;
* a streamed turn, during which the other sessions' queued turns keep decoding in the same steps;
* an aborted turn (a user closing the tab): its memory is released at once and the session forgets
  the question, while the turns batched with it finish normally.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass

from radixkv import LLM, SamplingParams
from radixkv.engine import Request
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
    """Chat sessions of several tenants served by one `LLM`.

    `submit` queues a turn and returns its request id; `step` advances every queued turn of every
    session by one engine step; `run` steps until none is left; `stream` yields one turn's text
    while the others keep going; `abort` drops a turn. Turns are kept in the session only once
    they finish, so an aborted question leaves no trace in the conversation.
    """

    def __init__(self, llm: LLM, params: SamplingParams, system: str) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.params = params
        self.system = system
        self.sessions: dict[str, dict[str, list[Message]]] = {}
        self.pending: dict[str, tuple[Request, str, str, str]] = {}  # rid -> req, tenant, sid, q
        self.done: list[Reply] = []

    def messages(self, tenant: str, session: str) -> list[Message]:
        """The session's conversation so far (created with the system prompt on first use)."""
        by_id = self.sessions.setdefault(tenant, {})
        return by_id.setdefault(session, [{"role": "system", "content": self.system}])

    def submit(self, tenant: str, session: str, question: str) -> str:
        """Queue the next turn of a session; returns its request id."""
        if any(t == tenant and s == session for _, t, s, _ in self.pending.values()):
            raise InvalidRequestError(f"{tenant}/{session} already has a turn in flight")
        conversation = [*self.messages(tenant, session), {"role": "user", "content": question}]
        prompt = self.llm.lm.apply_chat_template(conversation, add_generation_prompt=True)
        # namespace=tenant: this tenant's radix tree root; other tenants' KV is never matched
        req = self.engine.add_request(prompt, self.params, namespace=tenant)
        self.pending[req.rid] = (req, tenant, session, question)
        return req.rid

    def step(self) -> None:
        """One engine step for all queued turns; finished ones move to `self.done`."""
        self.engine.step()
        for rid in [rid for rid, (req, *_) in self.pending.items() if req.finished]:
            self._complete(rid)

    def run(self) -> list[Reply]:
        """Step until no turn is queued; returns (and clears) every turn finished so far."""
        while self.pending:
            if not self.engine.has_work():
                raise RuntimeError("the engine is idle but turns are still queued")
            self.step()
        replies, self.done = self.done, []
        return replies

    def stream(self, tenant: str, session: str, question: str) -> Iterator[str]:
        """Submit a turn and yield its answer in pieces as the tokens are decoded."""
        rid = self.submit(tenant, session, question)
        req = self.pending[rid][0]
        sent = ""
        try:
            while not req.finished:
                self.step()
                # a token may end inside a multi-byte character: hold the partial one back
                text = req.text if req.finished else \
                    self.engine.decode_text(req.output_ids).rstrip("\ufffd")
                if len(text) > len(sent) and text.startswith(sent):
                    yield text[len(sent):]
                    sent = text
        finally:
            if not req.finished:  # the consumer stopped early: free the turn's memory
                self.abort(rid)

    def abort(self, request_id: str) -> bool:
        """Stop a queued or running turn and release its memory; False if it already ended."""
        if request_id not in self.pending or not self.engine.abort(request_id):
            return False
        self._complete(request_id)
        return True

    def _complete(self, rid: str) -> None:
        req, tenant, session, question = self.pending.pop(rid)
        self.engine.pop_finished(rid)
        if req.finish_reason != "abort":
            self.messages(tenant, session).extend([
                {"role": "user", "content": question},
                {"role": "assistant", "content": req.text},  # as generated: it re-tokenizes alike
            ])
        end = req.finish_time if req.finish_time is not None else time.perf_counter()
        self.done.append(Reply(tenant, session, question, req.text, len(req.prompt_ids),
                               max(req.prefix_hit, 0), len(req.output_ids),
                               req.finish_reason or "abort", end - req.arrival))


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


def busy_slots(llm: LLM) -> int:
    """KV slots that cannot be reclaimed now: owned or locked by running requests."""
    stats = llm.cache_stats()
    return stats["pool_used"] - stats["evictable_tokens"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="a .gguf file, a folder holding one, or a Hugging Face folder "
                         "(default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer at most")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    llm = LLM(args.model, max_total_tokens=8192)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s\n")
    backend = ChatBackend(llm, SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                          SYSTEM)
    history: dict[tuple[str, str], int] = {}
    sessions = [(t, s) for t, by_id in CONVERSATIONS.items() for s in by_id]

    for turn in range(2):  # every session's turn `turn`, all in one batch
        print(f"--- turn {turn + 1}: {len(sessions)} sessions of {len(CONVERSATIONS)} tenants "
              "batched together")
        for t, s in sessions:
            backend.submit(t, s, CONVERSATIONS[t][s][turn])
        show(backend.run(), history)
        print()

    print("--- turn 3: acme's sessions queued, globex/carol's answer streamed meanwhile")
    backend.submit("acme", "alice", CONVERSATIONS["acme"]["alice"][2])
    backend.submit("acme", "bob", CONVERSATIONS["acme"]["bob"][2])
    print("[globex/carol] (streamed) ", end="", flush=True)
    pieces = 0
    for piece in backend.stream("globex", "carol", CONVERSATIONS["globex"]["carol"][2]):
        print(piece, end="", flush=True)
        pieces += 1
    print(f"\n    ({pieces} pieces)")
    show(backend.run(), history)
    print()

    print("--- turn 4: bob closes the tab while his answer is being generated")
    backend.submit("acme", "alice", CONVERSATIONS["acme"]["alice"][3])
    bob = backend.submit("acme", "bob", CONVERSATIONS["acme"]["bob"][3])
    for _ in range(3):  # prefill, then two decode steps
        backend.step()
    before = busy_slots(llm)
    print(f"abort({bob}) -> {backend.abort(bob)}; KV slots held by running requests: "
          f"{before} before, {busy_slots(llm)} after (bob's KV stays in the tree, evictable)")
    show(backend.run(), history)
    bob_turns = sum(m["role"] == "user" for m in backend.messages("acme", "bob"))
    print(f"acme/bob's session keeps {bob_turns} finished turns; the aborted question is dropped")
    print()

    stats = llm.cache_stats()
    print("--- cache stats")
    print(f"  requests {stats['requests']}, prompt tokens {stats['prompt_tokens']}, cached "
          f"{stats['cached_tokens']} (hit_rate {stats['hit_rate']:.1%})")
    print(f"  prefill tokens computed {stats['prefill_tokens_computed']}, decode tokens "
          f"{stats['decode_tokens']}, tree {stats['tree_nodes']} nodes / {stats['tree_tokens']} "
          f"tokens, pool {stats['pool_used']} of {stats['pool_size']} slots used")
    per_tenant: dict[str, int] = {}
    for node, _ in llm.engine.cache.walk():  # radix tree nodes, each under one tenant's root
        per_tenant[node.namespace] = per_tenant.get(node.namespace, 0) + len(node.value)
    print("  cached tokens per tenant: " +
          ", ".join(f"{t} {n}" for t, n in sorted(per_tenant.items())))
    llm.engine.check_no_leak()
    print("  check_no_leak: every KV slot is free or held by the tree")


if __name__ == "__main__":
    main()
