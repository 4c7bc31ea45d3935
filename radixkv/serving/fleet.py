"""A fleet on one machine: N `radixkv serve` workers on free loopback ports, optionally a
private redis-server as their shared KV tier, and sglang-router in front (cache-aware routing).

    with Fleet(["/path/to/model", "--max-total-tokens", "8192"], workers=2) as fleet:
        client = openai.OpenAI(base_url=fleet.base_url, api_key="none")
        fleet.kill_worker(0)     # the router stops routing to it after its health checks
        fleet.restart_worker(0)  # same URL: the router's health checks bring it back

Start order: Redis, then every worker launched at once (they load in parallel) and waited for,
then the router, which is ready once it lists every worker as healthy. Stop order is the
reverse (router, workers, Redis), on `stop()`, on leaving the `with` block and when starting
fails halfway, so no child outlives the fleet. Every child runs in a session of its own: a
Ctrl-C in a terminal reaches only the fleet's process, which then stops them in order.

Each worker gets `threads` OpenMP / torch threads (OMP_NUM_THREADS, MKL_NUM_THREADS): workers
sharing a machine should split its cores rather than each take all of them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from types import TracebackType

from radixkv.errors import ConfigError
from radixkv.serving.launcher import ServerProcess
from radixkv.serving.redis_server import RedisServer
from radixkv.serving.router_process import RouterProcess

LOCAL_REDIS = "local-redis"  # kv_store value: start a private redis-server for this fleet
_FLEET_OWNED = ("--host", "--port", "--kv-store")  # serve options the fleet sets itself


def default_threads(workers: int) -> int:
    """This machine's cores split evenly over `workers` (at least 1 each)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class Fleet:
    """N `radixkv serve` workers behind sglang-router (a context manager; `stop()` is
    idempotent).

    Args:
        serve_args: what follows `radixkv serve` for every worker: MODEL (or nothing for the
            default model) and serve options (--max-total-tokens, --dtype, ...); not --host,
            --port or --kv-store, which the fleet sets.
        workers: how many workers, >= 1.
        policy: the router's policy: cache_aware (default), round_robin, power_of_two, random.
        kv_store: None (no shared tier), "local-redis" (start a private redis-server on a free
            loopback port, stopped with the fleet) or a URL every worker gets as --kv-store
            (redis://host:port/db for a Redis server that already runs).
        router_port: the router's port (0: a free one).
        router_host: the address the router binds (workers always bind 127.0.0.1).
        threads: OpenMP / torch threads per worker (default: the cores split over the workers).
        router_args: more sglang_router.launch_router options, as they are.
        health_check_interval: seconds between the router's health checks of each worker.
        startup_timeout: seconds each worker may take to load and answer /health.
        redis_maxmemory: the local Redis server's memory limit (e.g. "256mb"; LRU eviction).
        echo: copy the children's output to stderr.

    Raises:
        ConfigError: bad arguments (before anything starts).
    """

    def __init__(self, serve_args: Sequence[str] = (), workers: int = 2,
                 policy: str = "cache_aware", kv_store: str | None = None,
                 router_port: int = 0, router_host: str = "127.0.0.1",
                 threads: int | None = None,
                 router_args: Sequence[str] = (), health_check_interval: int = 1,
                 startup_timeout: float = 300.0, redis_maxmemory: str | None = None,
                 echo: bool = False) -> None:
        if workers < 1:
            raise ConfigError(f"a fleet needs at least 1 worker, got {workers}")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads per worker must be >= 1, got {threads}")
        if not 0 <= router_port <= 65535:
            raise ConfigError(f"router port must be in [0, 65535], got {router_port}")
        owned = [a for a in serve_args if a.split("=", 1)[0] in _FLEET_OWNED]
        if owned:
            raise ConfigError(f"the fleet sets {', '.join(_FLEET_OWNED)} itself; do not pass "
                              f"{owned[0]} among the worker options")
        self.serve_args = list(serve_args)
        self.n_workers = workers
        self.kv_store = kv_store
        self.threads = threads or default_threads(workers)
        self.startup_timeout = startup_timeout
        self.echo = echo
        self.redis = RedisServer(maxmemory=redis_maxmemory) if kv_store == LOCAL_REDIS else None
        self.router = RouterProcess([], policy=policy, port=router_port, host=router_host,
                                    health_check_interval=health_check_interval,
                                    extra_args=router_args, echo=echo)
        self.workers: list[ServerProcess] = []
        self._started = False

    # ---- addresses ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT of the router."""
        return self.router.url

    @property
    def base_url(self) -> str:
        """The OpenAI base URL clients use (the router's /v1)."""
        return self.router.base_url

    @property
    def worker_urls(self) -> list[str]:
        return [w.url for w in self.workers]

    @property
    def kv_store_url(self) -> str | None:
        """The --kv-store URL every worker got (None without a shared tier)."""
        if self.redis is not None:
            return self.redis.url
        return self.kv_store

    def pids(self) -> list[int]:
        """Process ids of everything this fleet started (running or not)."""
        procs = [self.router.proc, *(w.proc for w in self.workers),
                 None if self.redis is None else self.redis.proc]
        return [p.pid for p in procs if p is not None]

    def describe(self) -> str:
        """The URLs, one per line (what `radixkv fleet` prints)."""
        lines = [f"router   {self.url}  (OpenAI base URL {self.base_url}; policy "
                 f"{self.router.policy}; metrics {self.router.metrics_url})"]
        lines += [f"worker {i} {w.url}" for i, w in enumerate(self.workers)]
        tier = self.kv_store_url
        lines.append(f"kv tier  {tier}" + (" (local redis-server)" if self.redis else "")
                     if tier else "kv tier  none (each worker's pool only)")
        return "\n".join(lines)

    # ---- lifecycle ----------------------------------------------------------------------------
    def _worker(self, port: int = 0) -> ServerProcess:
        args = list(self.serve_args)
        if self.kv_store_url:
            args += ["--kv-store", self.kv_store_url]
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        return ServerProcess(args, startup_timeout=self.startup_timeout, env=env,
                             echo=self.echo, port=port)

    def start(self) -> Fleet:
        """Start Redis (if local), every worker, then the router; wait until the router routes
        to every worker. On any failure, stops what it started and re-raises."""
        if self._started:
            return self
        self._started = True
        try:
            if self.redis is not None:
                self.redis.start()
            self.workers = [self._worker() for _ in range(self.n_workers)]
            for w in self.workers:
                w.launch()
            for w in self.workers:
                w.start()
            self.router.worker_urls = self.worker_urls
            self.router.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the router, then the workers (they drain in parallel), then Redis."""
        try:
            self.router.stop()
        finally:
            try:
                for w in self.workers:
                    w.signal(signal.SIGTERM)
                for w in self.workers:
                    w.stop()
            finally:
                if self.redis is not None:
                    self.redis.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- faults (tests, drills) ---------------------------------------------------------------
    def _index(self, i: int) -> ServerProcess:
        if not 0 <= i < len(self.workers):
            raise ConfigError(f"no worker {i}: the fleet has {len(self.workers)}")
        return self.workers[i]

    def kill_worker(self, i: int, wait_router: bool = True, timeout: float = 30.0) -> None:
        """SIGKILL worker i (a crash: its in-flight requests fail); with `wait_router`, return
        once the router has taken it out of rotation."""
        w = self._index(i)
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.wait(10)
        if wait_router:
            self.router.wait_workers([], timeout, unhealthy=[w.url])

    def stop_worker(self, i: int) -> int | None:
        """SIGTERM worker i: it drains (its /health answers 503, so the router stops sending),
        finishes what it runs and exits; returns its exit status."""
        return self._index(i).stop()

    def restart_worker(self, i: int, timeout: float = 60.0) -> None:
        """Start worker i again at its old URL (stopping it first if it still runs) and wait
        until the router routes to it again (its health checks find it)."""
        old = self._index(i)
        old.stop()
        port = int(old.url.rsplit(":", 1)[1])
        new = self._worker(port)
        self.workers[i] = new
        new.start()
        self.router.wait_workers([new.url], timeout)

    def kill_redis(self) -> None:
        """SIGKILL the local Redis server (an outage; workers keep serving from their pools)."""
        if self.redis is None:
            raise ConfigError("this fleet has no local Redis server")
        self.redis.kill()
