"""Smoke tests: the engine examples (quickstart, chat backend, parallel questions) run as
subprocesses, exit 0 and print their key results.

They run on the tiny random Llama (fast); the cached-token counts they print are checked against
an oracle computed here from the prompts' token ids: a prompt can only reuse the longest prefix it
shares with what the same namespace computed before. The `slow` runs use the default model.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from radixkv.model import load_tokenizer
from radixkv.model.tokenizer import chat_ids
from tests.engine_fixtures import needs_default_model, tiny_llama_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: float = 600) -> str:
    cmd = [sys.executable, f"examples/{name}.py", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def load_example(name: str) -> ModuleType:
    """The example as a module (its constants; `main` is not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / f"examples/{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_ids(tokenizer: Any, system: str, question: str) -> list[int]:
    return chat_ids(tokenizer, [{"role": "system", "content": system},
                                {"role": "user", "content": question}], True)


# ---- quickstart ----------------------------------------------------------------------------
def check_quickstart(out: str, tokenizer: Any) -> None:
    for section in ("== generate", "== chat", "== stream", "== cache stats"):
        assert section in out
    assert re.search(r"\(\d+ pieces\)", out)
    ex = load_example("quickstart")
    hits = [(int(a), int(b)) for a, b in re.findall(r"cached_tokens=(\d+) of (\d+)", out)]
    first = prompt_ids(tokenizer, ex.SYSTEM, "What is the capital of Italy?")
    second = prompt_ids(tokenizer, ex.SYSTEM, "How many legs does a spider have?")
    # the second chat reuses exactly the prefix it shares with the first (system prompt + more)
    assert hits == [(0, len(first)), (common_prefix(first, second), len(second))]
    assert hits[1][0] > 0
    stats = re.search(r"requests (\d+), prompt tokens (\d+), of which cached (\d+)", out)
    assert stats is not None
    assert int(stats[1]) == 5 and int(stats[3]) >= hits[1][0]


def test_quickstart(tiny_llama_dir):  # noqa: F811
    out = run_example("quickstart", "--model", str(tiny_llama_dir), "--max-tokens", "8")
    check_quickstart(out, load_tokenizer(str(tiny_llama_dir)))


# ---- chat backend ----------------------------------------------------------------------------
TURN_RE = re.compile(r"^\[(\w+)/(\w+)\] (?!\(streamed\))(.*)$")
CACHED_RE = re.compile(r"cached (\d+) of (\d+) prompt tokens \((?:previous turn left (\d+)|"
                       r"first turn of the session)\); (\d+) new tokens, (\w+),")


def parse_turns(out: str) -> list[dict[str, Any]]:
    """Every turn the backend printed: session, question, cached/prompt/new tokens, finish."""
    turns: list[dict[str, Any]] = []
    for line in out.splitlines():
        head = TURN_RE.match(line)
        if head:
            turns.append({"tenant": head[1], "session": head[2], "question": head[3]})
            continue
        m = CACHED_RE.search(line)
        if m:
            turns[-1].update(cached=int(m[1]), prompt=int(m[2]),
                             left=int(m[3]) if m[3] else None, new=int(m[4]), finish=m[5])
    return turns


def check_chat_backend(out: str, tokenizer: Any, exact_reuse: bool) -> None:
    ex = load_example("chat_backend")
    turns = parse_turns(out)
    sessions = {(t, s): qs for t, by_id in ex.CONVERSATIONS.items() for s, qs in by_id.items()}
    assert len(turns) == sum(len(qs) for qs in sessions.values())  # the abort is reported too
    assert all("cached" in t for t in turns)

    # turn 1: alice computes the system prompt; bob (same tenant) reuses what he shares with her;
    # carol has the identical system prompt but another tenant, so nothing is reused
    first = {(t["tenant"], t["session"]): t for t in turns[:3]}
    ids = {k: prompt_ids(tokenizer, ex.SYSTEM, qs[0]) for k, qs in sessions.items()}
    alice, bob, carol = ("acme", "alice"), ("acme", "bob"), ("globex", "carol")
    assert first[alice]["cached"] == 0 and first[carol]["cached"] == 0
    assert first[bob]["cached"] == common_prefix(ids[alice], ids[bob]) > 0
    for key, turn in first.items():
        assert turn["prompt"] == len(ids[key])

    # later turns extend the previous turn's prompt + answer, all of which is cached but the
    # last sampled token (it has no KV yet); a random model's answer may re-tokenize
    # differently, which leaves at least the previous prompt but its last token
    prompts: dict[tuple[str, str], int] = {}
    for t in turns:
        key = (t["tenant"], t["session"])
        if key in prompts:
            assert t["left"] is not None
            if exact_reuse:
                assert t["cached"] == t["left"] - 1, t
            else:
                assert prompts[key] - 1 <= t["cached"] <= t["left"] - 1, t
        prompts[key] = t["prompt"]

    aborted = [t for t in turns if t["finish"] == "abort"]
    assert [(t["tenant"], t["session"]) for t in aborted] == [bob]
    assert re.search(r"abort\(req-\d+\) -> True", out)
    assert "acme/bob's session keeps 3 finished turns" in out
    assert "(streamed)" in out and re.search(r"\(\d+ pieces\)", out)

    tree = re.search(r"tree \d+ nodes / (\d+) tokens", out)
    split = re.search(r"cached tokens per tenant: acme (\d+), globex (\d+)", out)
    assert tree is not None and split is not None
    assert int(split[1]) + int(split[2]) == int(tree[1])
    assert "check_no_leak: every KV slot is free or held by the tree" in out


def test_chat_backend(tiny_llama_dir):  # noqa: F811
    out = run_example("chat_backend", "--model", str(tiny_llama_dir), "--max-tokens", "8")
    check_chat_backend(out, load_tokenizer(str(tiny_llama_dir)), exact_reuse=False)


# ---- parallel questions ----------------------------------------------------------------------
def check_parallel_questions(out: str, tokenizer: Any, n: int) -> None:
    ex = load_example("parallel_questions")
    prompts = [chat_ids(tokenizer, conv, True) for conv in ex.conversations(n)]
    hits = [(int(a), int(b)) for a, b in re.findall(r"cached (\d+) of (\d+) prompt tokens", out)]
    # the first question computes the shared prompt; the others, admitted one step later, each
    # reuse the prefix they share with it
    expected = [0] + [common_prefix(prompts[0], p) for p in prompts[1:]]
    assert hits == [(e, len(p)) for e, p in zip(expected, prompts, strict=True)]
    assert min(expected[1:], default=1) > len(prompts[0]) // 2

    total = sum(len(p) for p in prompts)
    row = re.search(r"prompt tokens\s+(\d+)\s+(\d+)", out)
    computed = re.search(r"prefill tokens computed\s+(\d+)\s+(\d+)", out)
    assert row is not None and computed is not None
    assert int(row[1]) == int(row[2]) == total
    assert int(computed[1]) == total - sum(expected)  # cache on: each prompt minus its hit
    assert int(computed[2]) == total  # cache off: every prompt in full
    assert re.search(r"prefill speedup [\d.]+x, end-to-end speedup [\d.]+x", out)
    same = re.search(r"identical answers with and without the cache: (\d+) of (\d+)", out)
    assert same is not None and same[1] == same[2] == str(n)


def test_parallel_questions(tiny_llama_dir):  # noqa: F811
    out = run_example("parallel_questions", "--model", str(tiny_llama_dir), "--questions", "4",
                      "--max-tokens", "6")
    check_parallel_questions(out, load_tokenizer(str(tiny_llama_dir)), 4)


# ---- the default model -----------------------------------------------------------------------
@pytest.mark.slow
@needs_default_model
def test_quickstart_default_model():
    out = run_example("quickstart", "--max-tokens", "8")
    check_quickstart(out, load_tokenizer(None))


@pytest.mark.slow
@needs_default_model
def test_chat_backend_default_model():
    # a real model's answers re-tokenize to the tokens it generated: turn k+1 reuses all of
    # turn k but its last token
    out = run_example("chat_backend", "--max-tokens", "12")
    check_chat_backend(out, load_tokenizer(None), exact_reuse=True)
