"""A private `redis-server` child process: the shared KV tier of a fleet on one machine.

    with RedisServer() as redis:
        ...  # workers get --kv-store redis.url (redis://127.0.0.1:PORT/0)

It binds 127.0.0.1 on a free port, keeps nothing on disk (no RDB, no AOF) and is always stopped.
A fleet spanning machines uses a Redis server of its own instead (a redis:// URL).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType

from radixkv.errors import ConfigError
from radixkv.serving.launcher import free_port, terminate


def redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server at host:port answers PING."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` on 127.0.0.1 without persistence (a context manager; `stop()` is
    idempotent).

    Args:
        port: the port to bind; 0 (default) picks a free one.
        maxmemory: e.g. "256mb"; with it Redis evicts least-recently-used keys when full.
        startup_timeout: seconds to wait for the first PONG.
        extra_args: more redis-server options, as they are.

    Raises:
        ConfigError: redis-server is not installed (apt-get install redis-server).
    """

    def __init__(self, port: int = 0, maxmemory: str | None = None,
                 startup_timeout: float = 10.0, extra_args: Sequence[str] = ()) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise ConfigError("a local Redis tier needs redis-server on PATH "
                              "(apt-get install redis-server), or give a redis:// URL")
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The --kv-store URL of this server (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--protected-mode", "no"]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        cmd += self.extra_args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if redis_ping("127.0.0.1", self.port, 0.2):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}")

    def kill(self) -> None:
        """SIGKILL (an outage: what it held is gone)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        terminate(self.proc, timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
