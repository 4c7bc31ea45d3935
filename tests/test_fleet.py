"""A fleet end to end: two `radixkv serve` workers on a tiny random Llama behind sglang-router
(the `fleet` extra), a private redis-server as their shared KV tier, driven by the official
`openai` client on 127.0.0.1.

Where each request ran is read from the workers' own /metrics (their prompt-token and request
counters), not from the router: requests are sent one at a time, so a counter that moved names
the worker. The module's fleet (cache_aware) and a second router (round_robin) over the same
workers are stopped at teardown, also when a test fails; the last fleet test stops it itself and
checks that no process it started is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from radixkv.errors import ConfigError  # noqa: E402
from radixkv.serving.fleet import LOCAL_REDIS, Fleet  # noqa: E402
from radixkv.serving.router_process import RouterProcess, router_available  # noqa: E402
from tests.model_fixtures import make_tiny_hf  # noqa: E402
from tests.redis_fixtures import REDIS  # noqa: E402
from tests.server_fixtures import metrics  # noqa: E402

if not router_available():
    if os.environ.get("CI"):
        pytest.fail("sglang_router is missing: the Makefile installs the fleet extra "
                    "(pip install -e '.[fleet]')", pytrace=False)
    pytest.skip("sglang_router is not installed (pip install 'radixkv[fleet]')",
                allow_module_level=True)

NAME = "tiny-fleet"
POOL = 8192
LONG = 6000  # tokens of the stream a worker kill interrupts (it never gets that far)
SHORT = 200  # tokens of the stream on the other worker, which completes


# ---- helpers -----------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


def counters(fleet: Fleet) -> list[tuple[float, float]]:
    """(prompt tokens, finished requests) of each worker, from its /metrics."""
    out = []
    for w in fleet.workers:
        m = metrics(w)
        out.append((m["radixkv_prompt_tokens_total"],
                    m["radixkv_e2e_request_latency_seconds_count"]))
    return out


def served_by(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> list[int]:
    """The workers whose request counter moved between two readings."""
    return [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a[1] > b[1]]


def chat(client: Any, messages: list[dict[str, str]], max_tokens: int = 4, **kw: Any) -> Any:
    return client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens,
                                          temperature=0, **kw)


def system(tenant: str) -> dict[str, str]:
    return {"role": "system", "content": f"Tenant {tenant} ({uuid.uuid4().hex}). You answer "
            "questions about the opening hours, prices and repairs of a small bicycle shop in "
            "one short and friendly sentence, and you never use lists."}


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_fleet")
    make_tiny_hf(folder, "llama", max_position_embeddings=POOL)
    return folder


def serve_args(tiny_path: Path) -> list[str]:
    return [str(tiny_path), "--served-model-name", NAME, "--max-total-tokens", str(POOL)]


@pytest.fixture(scope="module")
def fleet(tiny_path: Path) -> Iterator[Fleet]:
    f = Fleet(serve_args(tiny_path), workers=2, threads=1,
              kv_store=LOCAL_REDIS if REDIS else None)
    try:
        yield f.start()
    finally:
        f.stop()


@pytest.fixture(scope="module")
def rr_router(fleet: Fleet) -> Iterator[RouterProcess]:
    """A second router, round_robin, over the same two workers."""
    with RouterProcess(fleet.worker_urls, policy="round_robin") as router:
        yield router


@pytest.fixture
def client(fleet: Fleet) -> Iterator[Any]:
    with openai.OpenAI(base_url=fleet.base_url, api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


# ---- arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"workers": 0}, {"threads": 0}, {"router_port": 70000},
                                {"policy": "fastest"},
                                {"serve_args": ["m.gguf", "--port", "9000"]},
                                {"serve_args": ["m.gguf", "--kv-store=file:///tmp/x"]}])
def test_bad_fleet_arguments_are_config_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Fleet(**kw)


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--router-port", "-1"],
                                  ["--threads-per-worker", "0"], ["--max-total-tokens", "abc"],
                                  ["m.gguf", "--port", "9000"],
                                  ["--redis-maxmemory", "1mb"]])
def test_fleet_cli_rejects_bad_options_before_starting(argv: list[str],
                                                       capsys: pytest.CaptureFixture) -> None:
    from radixkv.cli import main

    assert main(["fleet", *argv]) == 2
    assert "radixkv fleet: error:" in capsys.readouterr().err


def test_a_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    f = Fleet([str(tmp_path / "missing.gguf")], workers=1, threads=1,
              kv_store=LOCAL_REDIS if REDIS else None, startup_timeout=60)
    with pytest.raises(RuntimeError, match="did not start"):
        f.start()
    assert f.pids() and not any(alive(p) for p in f.pids())
    if REDIS:
        assert f.redis is not None and f.redis.proc is not None


# ---- one fleet ---------------------------------------------------------------------------------
def test_router_routes_to_both_workers_under_the_served_name(fleet: Fleet, client: Any) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    assert fleet.router.workers() == {url: True for url in fleet.worker_urls}
    for w in fleet.workers:  # one thread each: they share this machine
        assert w.proc is not None
        with open(f"/proc/{w.proc.pid}/environ", "rb") as f:
            assert b"OMP_NUM_THREADS=1" in f.read().split(b"\0")
    out = client.completions.create(model=NAME, prompt="The shop opens at", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_cache_aware_keeps_each_conversation_on_the_worker_holding_it(fleet: Fleet,
                                                                      client: Any) -> None:
    convs = [[system(t), {"role": "user", "content": f"When do you open, {t}?"}]
             for t in ("ana", "bo", "cy", "dee")]
    homes: list[set[int]] = [set() for _ in convs]
    prev = [0] * len(convs)  # each conversation's last prompt length
    for turn in range(3):
        for c, msgs in enumerate(convs):  # interleaved, one request at a time
            before = counters(fleet)
            out = chat(client, msgs)
            after = counters(fleet)
            (worker,) = served_by(before, after)
            assert after[worker][0] - before[worker][0] == out.usage.prompt_tokens
            homes[c].add(worker)
            # The whole previous prompt is a prefix of this one and cached on this worker.
            assert out.usage.prompt_tokens_details.cached_tokens >= prev[c]
            prev[c] = out.usage.prompt_tokens
            msgs += [{"role": "assistant", "content": out.choices[0].message.content},
                     {"role": "user", "content": f"And question {turn + 2}?"}]
    assert all(len(h) == 1 for h in homes), homes


def test_round_robin_spreads_requests_over_both_workers(fleet: Fleet,
                                                        rr_router: RouterProcess) -> None:
    before = counters(fleet)
    with openai.OpenAI(base_url=rr_router.base_url, api_key="unused", max_retries=0,
                       timeout=120) as rr:
        for i in range(6):
            chat(rr, [{"role": "user", "content": f"Price of a bell, question {i}?"}])
    after = counters(fleet)
    assert [a[1] - b[1] for b, a in zip(before, after, strict=True)] == [3, 3]


def test_streaming_through_the_router(client: Any) -> None:
    msgs = [system("stream"), {"role": "user", "content": "Can you fix a flat tyre today?"}]
    whole = chat(client, msgs, max_tokens=12)
    chunks = list(chat(client, msgs, max_tokens=12, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 1


def test_a_killed_worker_fails_its_stream_and_rejoins_when_restarted(
        fleet: Fleet, rr_router: RouterProcess, client: Any) -> None:
    results: dict[int, Any] = {}
    started = [threading.Event(), threading.Event()]

    def stream(k: int, rr: Any, max_tokens: int) -> None:
        try:
            chunks = rr.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": f"Tell a long story {k}"}],
                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            for c in chunks:
                started[k].set()
                results[k] = c
        except (openai.APIError, httpx.HTTPError) as exc:
            results[k] = exc
        finally:
            started[k].set()

    with openai.OpenAI(base_url=rr_router.base_url, api_key="unused", max_retries=0,
                       timeout=120) as rr:
        threads = [threading.Thread(target=stream, args=(0, rr, LONG))]
        threads[0].start()
        assert started[0].wait(60)
        (doomed,) = [i for i, w in enumerate(fleet.workers)
                     if metrics(w)["radixkv_server_active_sequences"] == 1]
        threads.append(threading.Thread(target=stream, args=(1, rr, SHORT)))  # round robin:
        threads[1].start()  # on the other worker
        assert started[1].wait(60)
        fleet.kill_worker(doomed)  # returns once the router took it out of rotation
        for t in threads:
            t.join(120)
    assert isinstance(results[0], Exception), results  # failed at the client, not truncated
    assert results[1].usage.completion_tokens == SHORT  # the other one finished in full
    survivor = fleet.workers[1 - doomed]

    # The rest: new requests keep succeeding, on the remaining worker.
    before = metrics(survivor)["radixkv_e2e_request_latency_seconds_count"]
    for i in range(4):
        assert chat(client, [{"role": "user", "content": f"Still open {i}?"}]).choices
    assert metrics(survivor)["radixkv_e2e_request_latency_seconds_count"] == before + 4

    # Restarted at the same URL, it rejoins through the routers' health checks.
    old_pid = fleet.workers[doomed].proc.pid
    fleet.restart_worker(doomed)
    assert fleet.workers[doomed].proc.pid != old_pid
    rr_router.wait_workers(fleet.worker_urls, 60)
    before = counters(fleet)
    with openai.OpenAI(base_url=rr_router.base_url, api_key="unused", max_retries=0,
                       timeout=120) as rr:
        for i in range(4):
            chat(rr, [{"role": "user", "content": f"Back again {i}?"}])
    after = counters(fleet)
    assert [a[1] - b[1] for b, a in zip(before, after, strict=True)] == [2, 2]


def test_redis_down_workers_keep_serving(fleet: Fleet, client: Any) -> None:
    if fleet.redis is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    assert all(w.url for w in fleet.workers)
    fleet.kill_redis()
    msgs = [system("outage"), {"role": "user", "content": "Is the shop open on Sunday?"}]
    first = chat(client, msgs)
    again = chat(client, msgs)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert fleet.router.workers() == {url: True for url in fleet.worker_urls}


def test_stop_ends_every_process_it_started(fleet: Fleet, rr_router: RouterProcess) -> None:
    rr_router.stop()
    pids = fleet.pids()
    assert len(pids) == 3 + (fleet.redis is not None)
    fleet.stop()
    assert not [p for p in pids if alive(p)]
    assert fleet.router.proc is not None and fleet.router.proc.returncode == 0


# ---- the command line --------------------------------------------------------------------------
def test_fleet_command_serves_and_stops_in_order_on_sigterm(tiny_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "radixkv.cli", "fleet", "--workers", "1", "--router-port", "0",
           *(["--kv-store", "local-redis"] if REDIS else []), *serve_args(tiny_path),
           "--max-total-tokens", "2048"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if "ready" in line or time.monotonic() > deadline:
                break
        assert "ready" in lines[-1], "".join(lines)
        base = next(ln.split("OpenAI base URL ")[1].split(";")[0] for ln in lines
                    if ln.startswith("router"))
        kids = children_of(proc.pid)
        assert len(kids) == 2 + bool(REDIS), kids  # router, worker (, redis-server)
        with openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120) as c:
            assert chat(c, [{"role": "user", "content": "Hello?"}]).usage.completion_tokens == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        rest = proc.stdout.read()
        assert "stopped" in rest, rest
        assert not [k for k in kids if alive(k)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
