"""sglang-router (the `fleet` extra, sglang-router==0.3.2) as a child process in front of
`radixkv serve` workers.

    with RouterProcess(["http://127.0.0.1:41001", "http://127.0.0.1:41002"]) as router:
        client = openai.OpenAI(base_url=router.base_url, api_key="none")

The router runs in its default backend (`--backend sglang`, the router's "regular" HTTP mode):
it registers each worker through /get_server_info and /get_model_info, so its /v1/models lists
the workers' served_model_name, and it forwards /v1/chat/completions and /v1/completions as
they are. (Its `--backend openai` mode only asks a worker's /v1/models when it holds an API key
for it and otherwise logs "No API key provided for URL - using wildcard mode (accepts any
model)" and lists the model as "unknown"; it also answers /v1/completions with 501.)

The router's health checks decide where requests go: a worker whose /health fails
`health_failure_threshold` times in a row gets no new requests, and one that answers again
`health_success_threshold` times is routed to again, so a worker restarted at the same URL
rejoins by itself. A new URL joins through `add_worker` (the router's POST /workers).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from radixkv.errors import ConfigError
from radixkv.serving.launcher import free_port, terminate

POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def router_available() -> bool:
    """True when sglang_router can be imported (pip install 'radixkv[fleet]')."""
    import importlib.util

    return importlib.util.find_spec("sglang_router") is not None


class RouterProcess:
    """`python -m sglang_router.launch_router` on `host` (a context manager; `stop()` is
    idempotent).

    Args:
        worker_urls: the workers it starts with, e.g. ["http://127.0.0.1:41001"].
        policy: cache_aware (default), round_robin, power_of_two or random.
        port: the router's port; 0 (default) picks a free one.
        host: the address to bind, default 127.0.0.1.
        health_check_interval: seconds between the router's worker health checks (the router's
            own default is 60; a fleet wants to notice a dead worker within seconds).
        health_failure_threshold / health_success_threshold: consecutive failed / passed checks
            before a worker is taken out of / put back into rotation.
        extra_args: more launch_router options, passed as they are.
        startup_timeout: seconds to wait until the router lists every worker as healthy.
        echo: copy the router's log to this process's stderr.

    Raises:
        ConfigError: an unknown policy, or sglang_router is not installed.
    """

    def __init__(self, worker_urls: Sequence[str], policy: str = "cache_aware", port: int = 0,
                 host: str = "127.0.0.1", health_check_interval: int = 1,
                 health_failure_threshold: int = 2, health_success_threshold: int = 1,
                 extra_args: Sequence[str] = (), startup_timeout: float = 60.0,
                 log_level: str = "warn", echo: bool = False) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"router policy must be one of {', '.join(POLICIES)}, "
                              f"got {policy!r}")
        for name, v in (("health_check_interval", health_check_interval),
                        ("health_failure_threshold", health_failure_threshold),
                        ("health_success_threshold", health_success_threshold)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if not router_available():
            raise ConfigError("the router needs the fleet extra (sglang_router is missing): "
                              "pip install 'radixkv[fleet]'")
        self.worker_urls = list(worker_urls)
        self.policy = policy
        self.host = host
        self.port = port or free_port(host)
        self.metrics_port = free_port(host)
        self.health_args = ["--health-check-interval-secs", str(health_check_interval),
                            "--health-failure-threshold", str(health_failure_threshold),
                            "--health-success-threshold", str(health_success_threshold)]
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.echo = echo
        self.proc: subprocess.Popen[str] | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None

    # ---- addresses ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """http://HOST:PORT of the router."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of the router."""
        return f"{self.url}/v1"

    @property
    def metrics_url(self) -> str:
        """The router's own Prometheus endpoint."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    # ---- lifecycle ----------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The launch_router command line this process runs."""
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", self.host,
               "--port", str(self.port), "--policy", self.policy,
               "--prometheus-host", self.host, "--prometheus-port", str(self.metrics_port),
               "--log-level", self.log_level, "--shutdown-grace-period-secs", "10",
               *self.health_args, *self.extra_args]
        if self.worker_urls:
            cmd += ["--worker-urls", *self.worker_urls]
        return cmd

    def start(self) -> RouterProcess:
        """Launch the router and wait until it lists every worker as healthy."""
        if self.proc is None or self.proc.poll() is not None:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, env=env,
                                         start_new_session=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        try:
            self.wait_workers(self.worker_urls, self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = _ANSI.sub("", line)
            self.lines.append(line)
            if self.echo:
                sys.stderr.write(line)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (the router's graceful shutdown), SIGKILL after `timeout`; the exit status."""
        if self.proc is None:
            return None
        rc = terminate(self.proc, timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- the router's worker registry ---------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def workers(self) -> dict[str, bool]:
        """{worker URL: healthy} as the router sees it now (its GET /workers)."""
        listing = self._request("GET", "/workers")
        return {w["url"]: bool(w["is_healthy"]) for w in listing.get("workers", [])}

    def wait_workers(self, healthy: Sequence[str], timeout: float = 30.0,
                     unhealthy: Sequence[str] = ()) -> dict[str, bool]:
        """Wait until the router lists every URL in `healthy` as healthy and every URL in
        `unhealthy` as unhealthy or gone; returns its view (raises RuntimeError on timeout or
        when the router exits)."""
        deadline = time.monotonic() + timeout
        seen: dict[str, bool] = {}
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"sglang-router exited (status {code}):\n"
                                   f"{self.output[-4000:]}")
            try:
                seen = self.workers()
                if all(seen.get(u) for u in healthy) and not any(seen.get(u) for u in unhealthy):
                    return seen
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sglang-router at {self.url} did not reach healthy="
                                   f"{list(healthy)} unhealthy={list(unhealthy)} in {timeout} s "
                                   f"(it sees {seen}):\n{self.output[-4000:]}")
            time.sleep(0.1)

    def add_worker(self, url: str, timeout: float = 30.0) -> None:
        """Register a worker at a new URL (the router's POST /workers) and wait until it is
        routed to."""
        self._request("POST", "/workers", {"url": url})
        self.wait_workers([url], timeout)
