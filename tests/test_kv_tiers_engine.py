"""KV tiers end to end on a tiny random Llama: disk restarts, Redis across processes, isolation,
and every store fault. The oracle is the same prompts run with the prefix cache off: outputs must
be identical whether KV came from the tree, a tier, or was recomputed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from radixkv import LLM, SamplingParams
from radixkv.errors import ConfigError
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)
from tests.redis_fixtures import RedisProcess, free_port, need_redis, redis_server  # noqa: F401

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
POOL = 600  # small enough that a filler request evicts the shared prompts


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    system = rng.integers(10, 2000, 200).tolist()
    return [system + rng.integers(10, 2000, 9).tolist() for _ in range(3)]


def filler(n: int = 560) -> list[int]:
    return np.random.default_rng(99).integers(10, 2000, n).tolist()


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):  # noqa: F811
    with LLM(str(tiny_llama_dir), max_total_tokens=4096, enable_prefix_cache=False) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY)]


def run(llm: LLM, ps: list[list[int]], namespace=None) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY, namespace=namespace)]


def warm(path, url: str, **kw) -> None:
    """Compute the prompts, then evict them (write-back), then shut down (flush)."""
    with LLM(str(path), max_total_tokens=POOL, kv_store=url, **kw) as llm:
        for p in prompts():
            run(llm, [p])
        run(llm, [filler()])
        stats = llm.cache_stats()
        assert stats["evicted_tokens"] > 0
        llm.check_no_leak()


def test_disk_tier_serves_a_restarted_engine(tiny_llama_dir, oracle, tmp_path):  # noqa: F811
    url = f"file://{tmp_path}/kv"
    warm(tiny_llama_dir, url)
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=url) as llm:
        outs = llm.generate(prompts(), GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == oracle
        stats = llm.cache_stats()
        # 200 shared tokens = 3 full 64-token pages reused from disk, counted as cached tokens
        assert stats["tier_hit_tokens"] == 192
        assert all(o.num_cached_tokens >= 192 for o in outs)  # tier tokens count as cached
        assert stats["prefill_tokens_computed"] < sum(len(p) for p in prompts()) - 192
        llm.check_no_leak()


def test_tiers_never_cross_namespaces_or_models(tiny_llama_dir, oracle, tmp_path):  # noqa: F811
    url = f"file://{tmp_path}/kv"
    warm(tiny_llama_dir, url)
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=url) as llm:
        assert run(llm, prompts(), namespace="tenant-b") == oracle
        assert llm.cache_stats()["tier_hit_tokens"] == 0
    # another model (same architecture, other weights) shares the directory but no page
    from radixkv.model import load_model

    other = load_model(str(tiny_llama_dir))
    with __import__("torch").no_grad():
        next(other.model.parameters()).add_(1.0)
    with LLM(other, max_total_tokens=POOL, kv_store=url) as llm:
        run(llm, prompts())
        assert llm.cache_stats()["tier_hit_tokens"] == 0


def test_write_through_and_config_errors(tiny_llama_dir, oracle, tmp_path):  # noqa: F811
    url = f"file://{tmp_path}/kv"
    with LLM(str(tiny_llama_dir), max_total_tokens=4096, kv_store=url,
             kv_store_write_through=True) as llm:
        run(llm, prompts()[:1])
        assert llm.loop.call(lambda e: e.tier.flush(10)).result()
        assert llm.cache_stats()["tier_written_pages"] == 3  # no eviction needed
    for bad in ({"kv_store": "ftp://x"}, {"kv_store": "host"},
                {"kv_store": url, "enable_prefix_cache": False}):
        with pytest.raises(ConfigError):
            LLM(str(tiny_llama_dir), max_total_tokens=POOL, **bad)
    from radixkv.engine import EngineConfig

    with pytest.raises(ConfigError):  # a tier page must hold whole cache pages
        EngineConfig(max_total_tokens=POOL, page_size=3, kv_store=url, kv_tier_page_tokens=64)
    assert EngineConfig(max_total_tokens=POOL, page_size=3).kv_tier_page_tokens == 63


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from radixkv import LLM, SamplingParams
    path, url = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    system = rng.integers(10, 2000, 200).tolist()
    ps = [system + rng.integers(10, 2000, 9).tolist() for _ in range(3)]
    with LLM(path, max_total_tokens=600, kv_store=url, kv_store_write_through=True) as llm:
        llm.generate(ps[:1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    print("ok")
""")


def test_redis_tier_is_shared_across_processes(tiny_llama_dir, oracle, redis_server):  # noqa: F811
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_llama_dir), redis_server.url],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    assert redis_server.client().dbsize() == 3
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=redis_server.url) as llm:
        assert run(llm, prompts()) == oracle
        stats = llm.cache_stats()
        assert stats["tier_hit_tokens"] == 192 and stats["tier_errors"] == {}
        llm.check_no_leak()


def test_redis_down_at_start_then_back(tiny_llama_dir, oracle):  # noqa: F811
    need_redis()
    server = RedisProcess(free_port())  # nothing listens yet
    try:
        with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=server.url,
                 kv_store_write_through=True) as llm:
            t0 = time.monotonic()
            assert run(llm, prompts()) == oracle
            assert time.monotonic() - t0 < 60
            llm.loop.call(lambda e: e.tier.flush(10)).result()
            errs = llm.cache_stats()["tier_errors"]
            assert errs.get("connection", 0) >= 1
            server.start()  # the store comes back: writes land without restarting the engine
            run(llm, [prompts(1)[0]])
            llm.loop.call(lambda e: e.tier.flush(10)).result()
            stats = llm.cache_stats()
            assert stats["tier_healthy"] and server.client().dbsize() >= 3
            llm.check_no_leak()
    finally:
        server.kill()


def test_redis_killed_mid_run_keeps_serving(tiny_llama_dir, oracle, redis_server):  # noqa: F811
    warm(tiny_llama_dir, redis_server.url)
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=redis_server.url) as llm:
        redis_server.kill()
        assert run(llm, prompts()) == oracle  # every fetch fails: recomputed
        stats = llm.cache_stats()
        assert stats["tier_hit_tokens"] == 0 and stats["tier_errors"].get("connection", 0) >= 1
        llm.check_no_leak()


def test_slow_redis_is_a_bounded_miss(tiny_llama_dir, oracle, redis_server):  # noqa: F811
    warm(tiny_llama_dir, redis_server.url)
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=redis_server.url) as llm:
        sleeper = threading.Thread(
            target=lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "3"))
        sleeper.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        assert run(llm, prompts()) == oracle
        assert time.monotonic() - t0 < 30  # the 1 s store timeout bounds the wait
        sleeper.join()
        assert llm.cache_stats()["tier_errors"].get("timeout", 0) >= 1
        llm.check_no_leak()


def test_full_redis_drops_writes_and_keeps_serving(tiny_llama_dir, oracle, redis_server):  # noqa: F811
    c = redis_server.client()
    c.set("ballast", b"x" * (2 << 20))
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", "1mb")  # already over the limit: every write is refused
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=redis_server.url,
             kv_store_write_through=True) as llm:
        assert run(llm, prompts()) == oracle
        llm.loop.call(lambda e: e.tier.flush(10)).result()
        stats = llm.cache_stats()
        assert stats["tier_errors"].get("full", 0) >= 1 and stats["tier_written_pages"] == 0
        llm.check_no_leak()


def test_corrupted_value_is_never_used(tiny_llama_dir, oracle, redis_server):  # noqa: F811
    warm(tiny_llama_dir, redis_server.url)
    c = redis_server.client()
    keys = c.keys()
    assert len(keys) == 3
    for k in keys:  # flip a byte in the middle of every stored page
        v = bytearray(c.get(k))
        v[len(v) // 2] ^= 0xFF
        c.set(k, bytes(v))
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=redis_server.url) as llm:
        assert run(llm, prompts()) == oracle
        stats = llm.cache_stats()
        assert stats["tier_hit_tokens"] == 0
        assert stats["tier_errors"].get("corrupt_checksum", 0) >= 1
        llm.check_no_leak()


def test_connection_reset_mid_run_keeps_serving(tiny_llama_dir, oracle, redis_server):  # noqa: F811
    warm(tiny_llama_dir, redis_server.url)
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=redis_server.url,
             kv_store_write_through=True) as llm:
        run(llm, [filler(100)])  # the engine's connection is open
        redis_server.client().client_kill_filter(_type="normal", skipme=True)  # reset it
        assert run(llm, prompts()) == oracle  # a retry or a counted miss, never wrong KV
        llm.check_no_leak()


def test_disk_tier_stores_quantized_kv_with_its_scales(tiny_llama_dir, tmp_path):  # noqa: F811
    url = f"file://{tmp_path}/kv"
    with LLM(str(tiny_llama_dir), max_total_tokens=4096, enable_prefix_cache=False,
             kv_cache_dtype="int8") as llm:
        want = run(llm, prompts())
    warm(tiny_llama_dir, url, kv_cache_dtype="int8")
    with LLM(str(tiny_llama_dir), max_total_tokens=POOL, kv_store=url,
             kv_cache_dtype="int8") as llm:
        assert run(llm, prompts()) == want  # codes and scales came back byte for byte
        assert llm.cache_stats()["tier_hit_tokens"] == 192
        llm.check_no_leak()


def test_serve_with_a_disk_tier_reports_tier_metrics(tiny_llama_dir, tmp_path):  # noqa: F811
    """`radixkv serve --kv-store`: a restarted server reuses the first one's pages, and
    /metrics counts the tier's hits by the tokens it served."""
    openai = pytest.importorskip("openai")
    from radixkv.serving.launcher import ServerProcess
    from tests.server_fixtures import metrics

    url = f"file://{tmp_path}/kv"
    args = [str(tiny_llama_dir), "--max-total-tokens", str(POOL), "--kv-store", url,
            "--kv-store-write-through"]
    prompt = prompts()[0]
    texts = []
    for _ in range(2):  # the second server starts with an empty tree
        with ServerProcess(args) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="none")
            out = client.completions.create(model=client.models.list().data[0].id,
                                            prompt=prompt, max_tokens=4, temperature=0.0)
            texts.append(out.choices[0].text)
            m = metrics(srv)
    assert texts[0] == texts[1]
    assert out.usage.prompt_tokens_details.cached_tokens == 192
    assert m["radixkv_kv_tier_hits_tokens_total"] == 192
    assert m["radixkv_kv_tier_fetch_seconds_count"] >= 1
