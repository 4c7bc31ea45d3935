"""A real redis-server on a free loopback port, started per test module and always stopped.

`.ci/run` installs Debian's redis-server; elsewhere the tests that need it are skipped with a
reason (in CI a missing server fails them instead).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from radixkv.serving.launcher import free_port  # noqa: F401  (re-exported to tests)
from radixkv.serving.redis_server import RedisServer

REDIS = shutil.which("redis-server")


class RedisProcess(RedisServer):
    """The serving layer's RedisServer with the DEBUG command on (fault injection);
    `kill()` and `start()` simulate outages on the same port."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        super().__init__(port or 0, extra_args=("--enable-debug-command", "yes", *extra))

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def need_redis() -> None:
    if REDIS is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run installs it (apt-get install "
                        "redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    need_redis()
    server = RedisProcess().start()
    try:
        yield server
    finally:
        server.kill()
