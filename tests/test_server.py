"""`radixkv serve` end to end: real server processes on 127.0.0.1 driven by the official `openai`
client (sync and async), on a tiny random Llama (an HF folder) whose greedy outputs and logprobs
are checked against transformers running the same checkpoint.

Two processes load at once when the module starts: `server` (most tests) and `guarded` (an API
key, two running sequences, no queue and a pool smaller than the context: 401 / 503 / pool limit,
then SIGTERM). Both are stopped at teardown, also when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from radixkv.serving.launcher import ServerProcess  # noqa: E402
from tests.model_fixtures import make_tiny_hf  # noqa: E402
from tests.server_fixtures import chat_ids, hf_greedy, metrics, wait_idle  # noqa: E402

CONTEXT = 8192  # the tiny model's context, raised so long streams fit
NAME = "tiny-llama"
KEY = "sekrit-key"
GUARDED_POOL = 4096  # < CONTEXT: the pool is the binding limit there
DRAIN_S = 1.5  # the guarded server's --shutdown-timeout: short enough that the long request
# (~4,000 tokens, one engine step each) cannot finish inside it on any machine


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_hf(folder, "llama", max_position_embeddings=CONTEXT)
    return folder


def _guarded_process(tiny_path: Path) -> ServerProcess:
    return ServerProcess([str(tiny_path), "--served-model-name", NAME, "--api-key", KEY,
                          "--max-running-requests", "2", "--max-queue", "0",
                          "--max-total-tokens", str(GUARDED_POOL),
                          "--shutdown-timeout", str(DRAIN_S)])


@pytest.fixture(scope="module")
def processes(tiny_path: Path) -> Any:
    """Both servers, loading at once; stopped together at the end, also when a test failed."""
    procs = {"server": ServerProcess([str(tiny_path), "--served-model-name", NAME,
                                      "--max-total-tokens", "16384"]),
             "guarded": _guarded_process(tiny_path)}
    try:
        for p in procs.values():
            p.launch()
        yield procs
    finally:
        for p in procs.values():
            p.signal(signal.SIGTERM)  # all drain in parallel
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def server(processes: dict[str, ServerProcess]) -> ServerProcess:
    return processes["server"].start()


@pytest.fixture
def guarded(processes: dict[str, ServerProcess], tiny_path: Path) -> ServerProcess:
    """The API-key server with two running sequences and no queue (the SIGTERM test ends it:
    then the next user gets a fresh one)."""
    if processes["guarded"].proc is not None and processes["guarded"].proc.poll() is not None:
        processes["guarded"] = _guarded_process(tiny_path)
    return processes["guarded"].start()


@pytest.fixture
def client(server: ServerProcess) -> Any:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def hf(tiny_path: Path) -> Any:
    """transformers' own load of the same checkpoint, and its tokenizer: the oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_path))


def unique_system() -> str:
    return (f"Session {uuid.uuid4().hex}. You are a careful assistant for a bicycle shop; you "
            "answer in one short sentence and never use lists or markdown.")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# ---- command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--port", "70000"], ["--max-queue", "-1"],
                                  ["--shutdown-timeout", "-2"], ["--api-key", ""],
                                  ["/no/such/model.gguf"]])
def test_serve_rejects_bad_options_before_serving(argv: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from radixkv.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radixkv serve: error:") and "Traceback" not in err


# ---- endpoints and shapes ----------------------------------------------------------------------
def test_health_models_and_unknown_route(server: ServerProcess, client: Any) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param",
                                                               "code"}
    for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
        info = httpx.get(f"{server.url}{path}").json()  # what sglang-router registers
        assert info["served_model_name"] == NAME and info["is_generation"] is True


def test_chat_greedy_matches_transformers(client: Any, hf: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, user("hello there")]
    resp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                          temperature=0, extra_body={"ignore_eos": True})
    ids = chat_ids(hf, messages)
    want, _ = hf_greedy(hf, ids, 12)
    assert resp.object == "chat.completion" and resp.model == NAME and resp.id
    (choice,) = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == hf[1].decode(want, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == len(ids) + 12
    assert resp.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_text_and_token_prompts(client: Any, hf: Any) -> None:
    ids = hf[1].encode("the quick brown fox", add_special_tokens=False)
    want, _ = hf_greedy(hf, ids, 10)
    text = hf[1].decode(want, skip_special_tokens=True)
    for prompt in ("the quick brown fox", ids):
        resp = client.completions.create(model=NAME, prompt=prompt, max_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert resp.object == "text_completion"
        assert resp.choices[0].text == text
        assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 10
    batch = client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=10,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == text
    assert batch.usage.prompt_tokens == len(ids) + 3
    assert batch.usage.completion_tokens == 20


def test_stream_chat_with_usage(client: Any) -> None:
    messages = [user("tell me a story")]
    kw = dict(model=NAME, messages=messages, max_tokens=20, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # the same prompt again: all of it but the last token comes from the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 1


def test_async_stream_completion(server: ServerProcess) -> None:
    async def run() -> tuple[str, str, Any]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x",
                                      max_retries=0) as c:
            kw = dict(model=NAME, prompt="once upon a time", max_tokens=16, temperature=0,
                      extra_body={"ignore_eos": True})
            whole = await c.completions.create(**kw)
            stream = await c.completions.create(**kw, stream=True,
                                                stream_options={"include_usage": True})
            parts, usage = [], None
            async for chunk in stream:
                parts.extend(ch.text for ch in chunk.choices)
                usage = chunk.usage or usage
            return whole.choices[0].text, "".join(parts), usage

    whole, streamed, usage = asyncio.run(run())
    assert streamed == whole and usage.completion_tokens == 16


# ---- sampling ----------------------------------------------------------------------------------
def test_n_two_choices(client: Any) -> None:
    kw = dict(model=NAME, messages=[user("pick a number")], max_tokens=8, n=2, temperature=1.0,
              seed=3, extra_body={"ignore_eos": True})
    resp = client.chat.completions.create(**kw)  # two samples forked after one prefill
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(**kw, stream=True))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in resp.choices}  # seeded: reproducible


def test_completion_logprobs_match_transformers(client: Any, hf: Any) -> None:
    ids = hf[1].encode("hello world", add_special_tokens=False)
    want, rows = hf_greedy(hf, ids, 6)
    resp = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0,
                                     logprobs=3, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    tok = hf[1]
    assert lp.tokens == [tok.decode([t]) for t in want]
    for i, t in enumerate(want):
        assert lp.token_logprobs[i] == pytest.approx(float(rows[i, t]), abs=2e-3)
        top = torch.topk(rows[i], 3)
        want_top: dict[str, float] = {}
        for v, t_id in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            want_top.setdefault(tok.decode([t_id]), v)  # ids that decode alike share a key
        assert lp.top_logprobs[i] == pytest.approx(want_top, abs=2e-3)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_stream_and_whole(client: Any) -> None:
    kw = dict(model=NAME, messages=[user("hi")], max_tokens=5, temperature=0, logprobs=True,
              top_logprobs=2, extra_body={"ignore_eos": True})
    resp = client.chat.completions.create(**kw)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the top
        assert entry.bytes == list(entry.token.encode())
    streamed = [e for ch in client.chat.completions.create(**kw, stream=True) for c in ch.choices
                if c.logprobs for e in c.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == \
        [(e.token, round(e.logprob, 4)) for e in content]


def test_stop_string_cuts_text(client: Any) -> None:
    kw = dict(model=NAME, prompt="stop here please", max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = next((ch for ch in full[3:] if ch.isascii() and ch.isprintable() and ch != " "),
                None)
    assert stop is not None, f"no printable stop candidate in {full!r}"
    want = full[:full.find(stop)]
    resp = client.completions.create(**kw, stop=[stop])
    assert resp.choices[0].text == want and resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.text for ch in client.completions.create(**kw, stop=stop, stream=True)
                       for c in ch.choices)
    assert streamed == want  # nothing of the stop string was streamed and taken back


def test_seed_reproducible(client: Any) -> None:
    kw = dict(model=NAME, prompt="random words:", max_tokens=16, temperature=1.0,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw, seed=11).choices[0].text
    b = client.completions.create(**kw, seed=11).choices[0].text
    c = client.completions.create(**kw, seed=12).choices[0].text
    assert a == b
    assert a != c


# ---- prefix cache and tenants ------------------------------------------------------------------
def test_cached_tokens_and_cache_salt(client: Any, hf: Any) -> None:
    system = {"role": "system", "content": unique_system()}
    def common(q1: str, q2: str) -> int:  # the oracle: shared prompt tokens, page size 1
        a, b = chat_ids(hf, [system, user(q1)]), chat_ids(hf, [system, user(q2)])
        return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)

    salt_a, salt_b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"  # fresh namespaces

    def ask(question: str, salt: str | None) -> int:
        extra: dict[str, Any] = {"ignore_eos": True}
        if salt is not None:
            extra["cache_salt"] = salt
        r = client.chat.completions.create(model=NAME, messages=[system, user(question)],
                                           max_tokens=2, temperature=0, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens

    shared = common("what are your hours?", "how much is a service?")
    assert shared > 100  # the whole system turn
    assert ask("what are your hours?", salt_a) == 0  # a new namespace starts empty
    assert ask("how much is a service?", salt_a) == shared  # shares the system prompt
    assert ask("how much is a service?", salt_b) == 0  # the same request, another tenant
    assert ask("is it open on monday?", salt_b) == common("how much is a service?",
                                                          "is it open on monday?")
    # no salt is a namespace of its own: at most the template's opening is cached there
    assert ask("how much is a service?", None) < shared // 2


# ---- errors ------------------------------------------------------------------------------------
def _assert_error(exc: Any, status: int, type_: str, param: str | None = None) -> None:
    assert exc.value.status_code == status
    body = exc.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == type_
    assert "Traceback" not in body["message"]
    if param is not None:
        assert body["param"] == param or param in body["message"]


def test_errors_are_openai_json_and_server_keeps_serving(server: ServerProcess,
                                                         client: Any) -> None:
    msgs = [user("hi")]
    bad: list[tuple[dict[str, Any], type, int, str, str | None]] = [
        (dict(model="gpt-4o"), openai.NotFoundError, 404, "not_found_error", "model"),
        (dict(temperature=-1.0), openai.BadRequestError, 400, "invalid_request_error", None),
        (dict(max_tokens=CONTEXT), openai.BadRequestError, 400, "invalid_request_error",
         "max_tokens"),
        (dict(n=0), openai.BadRequestError, 400, "invalid_request_error", "n"),
        (dict(logprobs=True, top_logprobs=99), openai.BadRequestError, 400,
         "invalid_request_error", "top_logprobs"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
         openai.BadRequestError, 400, "invalid_request_error", "tools"),
        (dict(response_format={"type": "json_object"}), openai.BadRequestError, 400,
         "invalid_request_error", "response_format"),
        (dict(extra_body={"top_k": 0}), openai.BadRequestError, 400, "invalid_request_error",
         None),
        (dict(extra_body={"frobnicate": 1}), openai.BadRequestError, 400,
         "invalid_request_error", "frobnicate"),
    ]
    for kwargs, err, status, type_, param in bad:
        kw: dict[str, Any] = dict(model=NAME, messages=msgs, max_tokens=2)
        kw.update(kwargs)
        with pytest.raises(err) as exc:
            client.chat.completions.create(**kw)
        _assert_error(exc, status, type_, param)
        ok = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=NAME, messages=[user("x" * (CONTEXT + 10))],
                                       max_tokens=2)
    _assert_error(exc, 400, "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt=[10**6], max_tokens=2)
    _assert_error(exc, 400, "invalid_request_error")
    for raw in (b"{not json", b"[1, 2]", json.dumps({"model": NAME}).encode(),
                json.dumps({"messages": "hi"}).encode()):
        r = httpx.post(f"{server.base_url}/chat/completions", content=raw,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, raw
        assert r.json()["error"]["type"] == "invalid_request_error"
    m = metrics(server)
    assert m["radixkv_request_errors_total{status=400,type=invalid_request_error}"] >= 12
    assert m["radixkv_request_errors_total{status=404,type=not_found_error}"] >= 1
    wait_idle(server)


def test_api_key_backpressure_and_pool_limit(guarded: ServerProcess) -> None:
    url = guarded.base_url
    with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as exc:
            bad.chat.completions.create(model=NAME, messages=[user("hi")], max_tokens=2)
        _assert_error(exc, 401, "authentication_error")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.post(f"{url}/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # health needs no key
    with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120) as c:
        assert c.models.list().data[0].id == NAME
        with pytest.raises(openai.BadRequestError) as exc:  # fits the context, not the pool
            c.completions.create(model=NAME, prompt="hello", max_tokens=GUARDED_POOL + 100)
        _assert_error(exc, 400, "invalid_request_error", "max_tokens")
        long = dict(model=NAME, prompt="a long answer", max_tokens=GUARDED_POOL - 50,
                    stream=True, extra_body={"ignore_eos": True})
        s1, s2 = c.completions.create(**long), c.completions.create(**long)
        try:
            next(iter(s1)), next(iter(s2))  # both admitted and running
            with pytest.raises(openai.APIStatusError) as exc:
                c.completions.create(model=NAME, prompt="one more", max_tokens=2)
            _assert_error(exc, 503, "service_unavailable_error")
            assert int(exc.value.response.headers["retry-after"]) >= 1
        finally:
            s1.close()
            s2.close()
        wait_idle(guarded)
        ok = c.completions.create(model=NAME, prompt="one more", max_tokens=2)
        assert ok.usage.completion_tokens >= 1
    m = metrics(guarded)
    assert m["radixkv_request_errors_total{status=503,type=service_unavailable_error}"] == 1
    assert m["radixkv_request_errors_total{status=401,type=authentication_error}"] >= 3


# ---- disconnects and load ----------------------------------------------------------------------
def test_disconnect_mid_stream_frees_memory(server: ServerProcess, client: Any) -> None:
    before = wait_idle(server)
    aborted0 = before.get("radixkv_request_finished_total{finish_reason=abort}", 0.0)
    stream = client.completions.create(model=NAME, prompt="go on forever", max_tokens=3000,
                                       stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.close()  # the client hangs up
    after = wait_idle(server)  # running 0, nothing admitted, free + cached == pool
    assert after["radixkv_request_finished_total{finish_reason=abort}"] == aborted0 + 1
    generated = after["radixkv_generation_tokens_total"] - before["radixkv_generation_tokens_total"]
    assert 3 <= generated < 3000


def test_disconnect_while_waiting_for_a_whole_answer(server: ServerProcess) -> None:
    before = wait_idle(server)
    aborted0 = before.get("radixkv_request_finished_total{finish_reason=abort}", 0.0)
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                       timeout=1.5) as impatient, pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=NAME, prompt="a very long essay", max_tokens=3000,
                                     extra_body={"ignore_eos": True})
    after = wait_idle(server)  # the timed-out client closed the connection: aborted
    assert after["radixkv_request_finished_total{finish_reason=abort}"] == aborted0 + 1


def test_64_concurrent_streams_complete(server: ServerProcess, client: Any) -> None:
    system = unique_system()
    questions = [f"question number {i}" for i in range(8)]
    want = {q: client.chat.completions.create(
        model=NAME, messages=[{"role": "system", "content": system}, user(q)], max_tokens=12,
        temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
        for q in questions}

    async def one(c: Any, q: str) -> tuple[str, str, int, int]:
        stream = await c.chat.completions.create(
            model=NAME, messages=[{"role": "system", "content": system}, user(q)],
            max_tokens=12, temperature=0, logprobs=True, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, tokens, usage = "", 0, None
        async for chunk in stream:
            for ch in chunk.choices:
                text += ch.delta.content or ""
                tokens += len(ch.logprobs.content) if ch.logprobs else 0
            usage = chunk.usage or usage
        return q, text, tokens, usage.completion_tokens

    async def run() -> list[tuple[str, str, int, int]]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                                      timeout=120) as c:
            jobs = [one(c, questions[i % len(questions)]) for i in range(64)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=150)

    results = asyncio.run(run())
    assert len(results) == 64
    for q, text, tokens, completion in results:
        assert tokens == completion == 12  # every token arrived
        assert text == want[q]
    wait_idle(server)


def test_serve_demo_against_the_server(server: ServerProcess) -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "examples/serve_demo.py", "--url", server.url,
                           "--users", "2", "--turns", "2", "--max-tokens", "4"], cwd=root,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    turns = {(int(t), u): (int(c), int(p)) for t, u, c, p in re.findall(
        r"turn (\d) (\w+): .*?\n.*?\n\s+cached (\d+)/(\d+) prompt tokens", done.stdout)}
    users = {u for _, u in turns}
    assert len(users) == 2 and len(turns) == 4, done.stdout
    for u in users:  # turn 2's prompt starts with all of turn 1's
        assert turns[(2, u)][0] >= turns[(1, u)][1]
    assert "hit rate" in done.stdout


# ---- shutdown ----------------------------------------------------------------------------------
def test_sigterm_drains_then_exits_zero(guarded: ServerProcess) -> None:
    srv = guarded
    with openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=60) as c:
        short = c.completions.create(model=NAME, prompt="short", max_tokens=20, stream=True,
                                     extra_body={"ignore_eos": True})
        long = c.completions.create(model=NAME, prompt="long", max_tokens=GUARDED_POOL - 100,
                                    stream=True, extra_body={"ignore_eos": True})
        short_it, long_it = iter(short), iter(long)
        first = [next(short_it), next(long_it)]
        srv.signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(openai.APIStatusError) as exc:  # no longer accepting
            c.completions.create(model=NAME, prompt="late", max_tokens=2)
        _assert_error(exc, 503, "service_unavailable_error")
        assert exc.value.body["code"] == "shutting_down"
        assert httpx.get(f"{srv.url}/health").status_code == 503
        short_chunks = [*first[:1], *short_it]
        long_chunks = [*first[1:], *long_it]
    assert short_chunks[-1].choices[0].finish_reason == "length"  # finished within the timeout
    assert sum(1 for ch in short_chunks for c in ch.choices if c.text) >= 1
    assert long_chunks[-1].choices[0].finish_reason == "abort"  # cut at the timeout
    assert srv.wait(timeout=60) == 0
