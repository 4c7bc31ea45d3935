"""Where tier pages live: a local directory (`file://`) or a shared Redis (`redis://`).

A store maps 16-byte keys to opaque values and knows nothing of KV; verification is the codec's.
Every failure surfaces as `StoreError` with a `kind` ("connection", "timeout", "full", "io"), so
the tier can count it and keep serving by recomputing.
"""

from __future__ import annotations

import abc
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from urllib.parse import parse_qs, urlparse

from radixkv.errors import ConfigError

DEFAULT_DISK_BYTES = 8 << 30
REDIS_TIMEOUT_S = 1.0  # bounds every Redis call: a slow or dead server is a miss, not a hang


class StoreError(RuntimeError):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


class KVStore(abc.ABC):
    """Keys to values, many at a time. Thread-safe: the tier's reader and writer share it."""

    url: str

    @abc.abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values of `keys` (None where missing); `StoreError` on failure."""

    @abc.abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Store every (key, value); `StoreError` on failure."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections / handles."""


class FileStore(KVStore):
    """One file per page under a directory, size-bounded with least-recently-used deletion.

    Survives restarts: the index is rebuilt from the directory (oldest access first). Writes go to
    a temporary file renamed into place, so a crash never leaves a half-written page under a key.
    """

    def __init__(self, path: str, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        if max_bytes < 1:
            raise ConfigError(f"disk tier size must be positive, got {max_bytes}")
        self.url = f"file://{path}"
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            os.makedirs(path, exist_ok=True)
            entries = [e for e in os.scandir(path) if e.is_file() and e.name.endswith(".kv")]
        except OSError as exc:
            raise ConfigError(f"cannot use {path!r} as a KV store: {exc}") from exc
        entries.sort(key=lambda e: e.stat().st_mtime)
        self._index: OrderedDict[str, int] = OrderedDict((e.name, e.stat().st_size)
                                                         for e in entries)
        self._bytes = sum(self._index.values())

    def _file(self, key: bytes) -> str:
        return key.hex() + ".kv"

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            name = self._file(key)
            with self._lock:
                known = name in self._index
                if known:
                    self._index.move_to_end(name)
            if not known:
                out.append(None)
                continue
            full = os.path.join(self.path, name)
            try:
                with open(full, "rb") as f:
                    out.append(f.read())
                os.utime(full)  # recency survives a restart
            except FileNotFoundError:
                with self._lock:
                    self._bytes -= self._index.pop(name, 0)
                out.append(None)
            except OSError as exc:
                raise StoreError("io", f"reading {full}: {exc}") from exc
        return out

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            name = self._file(key)
            full = os.path.join(self.path, name)
            tmp = f"{full}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(value)
                os.replace(tmp, full)
            except OSError as exc:
                raise StoreError("io", f"writing {full}: {exc}") from exc
            with self._lock:
                self._bytes += len(value) - self._index.pop(name, 0)
                self._index[name] = len(value)
                victims = []
                while self._bytes > self.max_bytes and len(self._index) > 1:
                    old, size = self._index.popitem(last=False)
                    self._bytes -= size
                    victims.append(old)
            for old in victims:
                try:
                    os.remove(os.path.join(self.path, old))
                except FileNotFoundError:
                    pass

    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes


class RedisStore(KVStore):
    """A Redis database shared by every engine process pointing at it (redis-py client).

    Every call is bounded by `REDIS_TIMEOUT_S`; the client reconnects on the next call after a
    failure, so a restarted server is picked up without restarting the engine.
    """

    def __init__(self, url: str, timeout_s: float = REDIS_TIMEOUT_S) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - the tier extra installs it
            raise ConfigError("kv_store='redis://...' needs the redis package "
                              "(pip install redis)") from exc
        self.url = url
        self._redis = redis
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                            socket_connect_timeout=timeout_s,
                                            health_check_interval=0)

    def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        r = self._redis
        try:
            return fn(*args)
        except r.exceptions.TimeoutError as exc:
            raise StoreError("timeout", f"redis timed out: {exc}") from exc
        except r.exceptions.ConnectionError as exc:
            raise StoreError("connection", f"redis unreachable: {exc}") from exc
        except r.exceptions.ResponseError as exc:
            kind = "full" if "OOM" in str(exc) or "maxmemory" in str(exc) else "response"
            raise StoreError(kind, f"redis refused: {exc}") from exc
        except r.exceptions.RedisError as exc:
            raise StoreError("redis", f"redis error: {exc}") from exc

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        return list(self._call(self._client.mget, list(keys)))

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        pipe = self._client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value)
        self._call(pipe.execute)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


def open_store(url: str) -> KVStore:
    """A store from its URL: `file:///dir[?max_bytes=N]` or `redis://host:port/db`."""
    if not isinstance(url, str):
        raise ConfigError(f"kv_store must be a URL string, got {url!r}")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if not parsed.path:
            raise ConfigError(f"kv_store {url!r} names no directory (file:///path/to/dir)")
        query = parse_qs(parsed.query)
        try:
            max_bytes = int(query.get("max_bytes", [DEFAULT_DISK_BYTES])[0])
        except ValueError as exc:
            raise ConfigError(f"kv_store {url!r}: max_bytes must be an int") from exc
        return FileStore(parsed.path, max_bytes)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisStore(url)
    raise ConfigError(f"unknown kv_store {url!r}: use 'file:///dir', 'redis://host:port/db' or "
                      "'host' (CUDA only)")


