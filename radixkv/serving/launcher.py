"""Run `radixkv serve` as a child process: start it on a free loopback port, wait until it is
healthy, and always stop it (the demo, the server benchmark and the tests use this).

    with ServerProcess(["/path/to/model", "--max-total-tokens", "8192"]) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")

The server binds port 0 (the kernel picks a free port, so nothing races for it) and prints the
address it got; `ServerProcess` reads it from the child's output.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_ADDRESS = re.compile(r"radixkv serve: .* on (http://[\d.]+:\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def terminate(proc: subprocess.Popen | None, timeout: float) -> int | None:
    """SIGTERM a child (if still running), SIGKILL it after `timeout` s; its exit status (None
    when there is no process). The stop of every child this package starts."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class ServerProcess:
    """A `radixkv serve` child process on 127.0.0.1 (a context manager; `stop()` is idempotent).

    Args:
        args: the serve arguments after `radixkv serve` (MODEL and options; not --host/--port).
        startup_timeout: seconds to wait for the model load and /health.
        env: extra environment variables for the child.
        echo: copy the child's output to this process's stderr.
        port: the port to bind; 0 (default) lets the kernel pick a free one. A fixed port lets a
            restarted server come back at the same URL (a router then finds it again).
    """

    def __init__(self, args: Sequence[str] = (), startup_timeout: float = 180.0,
                 env: dict[str, str] | None = None, echo: bool = False, port: int = 0) -> None:
        self.args = list(args)
        self.port = port
        self.startup_timeout = startup_timeout
        self.env = env or {}
        self.echo = echo
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.lines: list[str] = []
        self._found = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:41234/v1."""
        return f"{self.url}/v1"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def start(self) -> ServerProcess:
        """Launch the process and wait until /health answers 200."""
        self.launch()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> ServerProcess:
        """Launch the process without waiting (several may load at once); then `start()`."""
        if self.proc is not None:
            return self
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "radixkv.cli", "serve", *self.args,
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.echo:
                sys.stderr.write(line)
            m = _ADDRESS.search(line)
            if m and not self.url:
                self.url = m.group(1)
                self._found.set()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        if self.url and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
        deadline = time.monotonic() + self.startup_timeout
        while not self._found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"radixkv serve did not start (exit {self.proc.poll()}):\n"
                                   f"{self.output[-4000:]}")
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"radixkv serve never became healthy:\n{self.output[-4000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit status once the process ends (raises subprocess.TimeoutExpired)."""
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL after `timeout`; returns the exit status."""
        if self.proc is None:
            return None
        rc = terminate(self.proc, timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
