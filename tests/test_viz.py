"""Visualiser: text tree, DOT, PNGs and the KV pool memory map of a hand-built radix tree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_no_leak, png_size

from radixkv.cli import main
from radixkv.errors import ConfigError, InvalidSlotError
from radixkv.memory import RadixCache, TokenToKVPool
from radixkv.tools.viz import (
    EVICTABLE,
    INNER,
    LOCKED,
    OWNER_CONFLICT,
    OWNER_FREE,
    OWNER_RESERVED,
    OWNER_UNOWNED,
    WordTokenizer,
    build_demo,
    format_memory_map,
    format_tree,
    load_demo_tokenizer,
    memory_map,
    render_memory_map_png,
    render_tree_png,
    slot_runs,
    to_dot,
    write_pictures,
)


class Letters:
    """Token id i decodes to the i-th letter ('a' = 1)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(96 + i) for i in ids)


def small_tree() -> tuple[RadixCache, TokenToKVPool, dict[str, torch.Tensor]]:
    """[1,2,3,4,5] then [1,2,3,9,9] (splits after 3) then [7,8]; a request reading
    [1,2,3,4,5] locks that path and owns 3 more slots. The pool hands out 1, 2, 3, ... in order."""
    pool = TokenToKVPool(32, num_layers=1, num_kv_heads=1, head_dim=1)
    cache = RadixCache(pool)
    cache.insert([1, 2, 3, 4, 5], pool.alloc(5))  # slots 1-5
    m = cache.match_prefix([1, 2, 3, 9, 9])  # splits [1..5] into [1,2,3] + [4,5]
    cache.insert([1, 2, 3, 9, 9], torch.cat([m.slots, pool.alloc(2)]))  # slots 6-7
    cache.insert([7, 8], pool.alloc(2))  # slots 8-9
    m2 = cache.match_prefix([1, 2, 3, 4, 5])
    cache.lock(m2.node)
    own = pool.alloc(3)  # slots 10-12
    return cache, pool, {"req": torch.cat([m2.slots, own])}


def lasts(cache: RadixCache) -> list[int]:
    return [node.last_access for node, _ in cache.walk()]


def test_format_tree_hand_built() -> None:
    cache, _, _ = small_tree()
    a1, a2, a3, a4 = lasts(cache)
    # Hits: [1,2,3] was matched twice, [4,5] once (the second match), the rest never.
    expected = "\n".join([
        "RadixCache: 4 nodes, 9 tokens cached (evictable 4, protected 5), page_size 1, lru",
        "root",
        f"├─ n1 [1, 2, 3]  len 3 · lock 1 · last {a1} · hits 2 · slots 1-3",
        f"│  ├─ n2 [4, 5]  len 2 · lock 1 · last {a2} · hits 1 · slots 4-5",
        f"│  └─ n3 [9, 9]  len 2 · lock 0 · last {a3} · hits 0 · slots 6-7",
        f"└─ n4 [7, 8]  len 2 · lock 0 · last {a4} · hits 0 · slots 8-9",
    ])
    assert format_tree(cache) == expected
    assert cache.pretty() == expected
    # The second match touched n1 and n2 after n4 was inserted.
    assert a4 < a1 < a2


def test_format_tree_decodes_and_cuts_depth() -> None:
    cache, _, _ = small_tree()
    text = cache.pretty(tokenizer=Letters(), max_depth=1)
    lines = text.splitlines()
    assert lines[2].startswith('├─ n1 "abc"  len 3 · lock 1')
    assert lines[3] == "│  └─ … 2 more nodes below"
    assert lines[4].startswith('└─ n4 "gh"  len 2')
    assert len(lines) == 5
    with pytest.raises(ConfigError):
        cache.pretty(max_depth=0)
    with pytest.raises(ConfigError):
        cache.pretty(tokenizer=object())


def test_format_tree_namespaces_long_nodes_and_empty() -> None:
    pool = TokenToKVPool(64, num_layers=1, num_kv_heads=1, head_dim=1)
    cache = RadixCache(pool)
    assert format_tree(cache).splitlines()[1] == "root (empty)"
    cache.insert(list(range(1, 21)), pool.alloc(20))
    cache.insert([5, 6], pool.alloc(2), namespace="t2")
    lines = format_tree(cache).splitlines()
    assert lines[1] == "root"
    assert lines[2].startswith("└─ n1 [1, 2, 3, 4, 5, 6, … +14]  len 20")
    assert lines[3] == "root (namespace 't2')"
    assert lines[4].startswith("└─ n2 [5, 6]  len 2")


def test_slot_runs() -> None:
    assert slot_runs(np.array([3, 4, 5, 9, 12, 13])) == "3-5,9,12-13"
    assert slot_runs(np.array([], dtype=np.int64)) == "-"
    assert slot_runs(np.arange(0, 20, 2), max_runs=2) == "0,2,… (+8 runs)"


def _dot_nodes(dot: str) -> dict[str, tuple[str, str]]:
    """name -> (label, fillcolor) for every node statement, unescaping the DOT label."""
    out = {}
    for m in re.finditer(r'^\s+(\w+) \[label="((?:[^"\\]|\\.)*)", fillcolor="([^"]+)"\];$', dot,
                         re.M):
        out[m.group(1)] = (m.group(2), m.group(3))
    return out


def test_dot_export() -> None:
    cache, _, _ = small_tree()
    dot = to_dot(cache)
    assert dot.startswith("digraph radix_cache {") and dot.rstrip().endswith("}")
    nodes = _dot_nodes(dot)
    assert set(nodes) == {"root0", "n1", "n2", "n3", "n4"}
    assert [nodes[n][1] for n in ("n1", "n2", "n3", "n4")] == [LOCKED, LOCKED, EVICTABLE,
                                                               EVICTABLE]
    edges = re.findall(r"^\s+(\w+) -> (\w+);$", dot, re.M)
    assert sorted(edges) == [("n1", "n2"), ("n1", "n3"), ("root0", "n1"), ("root0", "n4")]
    assert "len 3 | lock 1 | hits 2" in nodes["n1"][0]
    cut = to_dot(cache, max_depth=1)
    assert 'n1_more [label="… 2 more"' in cut and "n2 [" not in cut


def test_dot_escapes_quotes_and_backslashes() -> None:
    class Nasty:
        def decode(self, ids: list[int]) -> str:
            return 'say "hi"\\ now'

    cache, _, _ = small_tree()
    nodes = _dot_nodes(to_dot(cache, tokenizer=Nasty()))
    assert len(nodes) == 5  # every label parsed back as one well-formed quoted string
    label = nodes["n1"][0]
    # json.dumps quoted the text, then DOT escaping doubled its backslashes and quotes.
    assert label.startswith('n1  \\"say \\\\\\"hi\\\\\\"\\\\\\\\ now\\"')


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot not installed")
def test_dot_renders_with_graphviz(tmp_path: Path) -> None:
    cache, _, _ = small_tree()
    src = tmp_path / "tree.dot"
    src.write_text(to_dot(cache, tokenizer=Letters()))
    subprocess.run(["dot", "-Tpng", str(src), "-o", str(tmp_path / "t.png")], check=True)
    png_size(tmp_path / "t.png")


def test_inner_node_colour() -> None:
    cache, _, _ = small_tree()
    m = cache.match_prefix([1, 2, 3, 4, 5])
    cache.unlock(m.node)  # drop the small_tree request's lock: n1 is now an unlocked inner node
    nodes = _dot_nodes(to_dot(cache))
    assert nodes["n1"][1] == INNER and nodes["n2"][1] == EVICTABLE


def test_memory_map_owners() -> None:
    cache, pool, running = small_tree()
    mm = memory_map(cache, pool, running)
    assert mm.labels == ["n1", "n2", "n3", "n4", "req"]
    assert mm.owner[0] == OWNER_RESERVED
    assert mm.slots_of("n1").tolist() == [1, 2, 3]
    assert mm.slots_of("n2").tolist() == [4, 5]
    assert mm.slots_of("n3").tolist() == [6, 7]
    assert mm.slots_of("n4").tolist() == [8, 9]
    assert mm.slots_of("req").tolist() == [10, 11, 12]
    assert mm.count(OWNER_FREE) == 32 - 12 == pool.available_size()
    assert np.flatnonzero(mm.shared).tolist() == [1, 2, 3, 4, 5]  # its cached prefix
    assert mm.reads == {"req": 5}
    assert mm.count(OWNER_UNOWNED) == mm.count(OWNER_CONFLICT) == 0
    text = format_memory_map(mm, width=16).splitlines()
    assert text[0].startswith("KV pool: 32 slots: 9 in the tree (4 nodes), 3 owned by running "
                              "requests, 20 free, 0 unowned, 0 conflicting")
    assert text[2] == "   0 #aaabbccdd000..."  # slot 0, n1 1-3, n2 4-5, n3 6-7, n4 8-9, req
    assert text[3] == "  16 " + "." * 16
    assert text[4] == "  32 ."
    assert "a=n1 (3)" in text[5] and "0=req (3 own + 5 read from the tree)" in text[5]


def test_memory_map_flags_leaks_and_conflicts() -> None:
    cache, pool, running = small_tree()
    leaked = pool.alloc(2)  # allocated, listed nowhere
    free_slot = int(np.flatnonzero(pool.is_free(np.arange(1, 33)))[0]) + 1
    bad = {"req": running["req"], "other": torch.tensor([10, free_slot])}
    mm = memory_map(cache, pool, bad)
    assert mm.count(OWNER_UNOWNED) == 2 and (mm.owner[leaked.numpy()] == OWNER_UNOWNED).all()
    # slot 10 is claimed by both requests, free_slot is free in the pool: both are conflicts.
    assert mm.owner[10] == OWNER_CONFLICT and mm.owner[free_slot] == OWNER_CONFLICT
    with pytest.raises(InvalidSlotError):
        memory_map(cache, pool, {"x": [0]})
    with pytest.raises(InvalidSlotError):
        memory_map(cache, pool, {"x": [33]})


def test_pngs(tmp_path: Path) -> None:
    cache, pool, running = small_tree()
    tree = render_tree_png(cache, tmp_path / "tree.png", tokenizer=Letters())
    w, h = png_size(tree)
    assert w >= 600 and h >= 300 and tree.stat().st_size > 10_000
    mm_png = render_memory_map_png(memory_map(cache, pool, running), tmp_path / "mm.png")
    w, h = png_size(mm_png)
    assert w >= 600 and h >= 250 and mm_png.stat().st_size > 5_000
    cut = render_tree_png(cache, tmp_path / "cut.png", max_depth=1, max_nodes=2)
    png_size(cut)


def test_word_tokenizer_roundtrip() -> None:
    tok = WordTokenizer()
    text = "Hello,  world!\nWhat's a radix tree?"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("Hello, world") == ids[:2] + [tok.encode(" world")[0]]
    with pytest.raises(ConfigError):
        tok.decode([10_000])


def test_demo_tree_with_word_tokenizer(tmp_path: Path) -> None:
    tok, desc = load_demo_tokenizer("word")
    demo = build_demo(tok)
    cache, pool = demo.cache, demo.pool
    cache.check_invariants()
    [(name, slots)] = demo.running.items()
    matched = cache.protected_size()
    assert name == "req:dave" and matched > 0  # dave's cached prefix is locked
    own = slots[matched:]
    assert_no_leak(pool, cache, held=own)
    assert any("evicted" in line for line in demo.log)  # the pool was sized to force it
    mm = memory_map(cache, pool, demo.running)
    assert mm.count(OWNER_UNOWNED) == mm.count(OWNER_CONFLICT) == 0
    assert mm.reads[name] == matched and mm.count(name) == len(own)
    files = write_pictures(cache, tmp_path, tok, demo.running)
    for kind in ("tree.txt", "tree.dot", "memory_map.txt"):
        assert files[kind].read_text()
    for kind in ("tree.png", "memory_map.png"):
        png_size(files[kind])
    assert "system: You are a helpful assistant." in files["tree.txt"].read_text()


def test_cli_viz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["viz", "--out", str(tmp_path), "--tokenizer", "word", "--max-depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "RadixCache:" in out and "KV pool:" in out and "more node" in out
    for name in ("tree.txt", "tree.dot", "tree.png", "memory_map.txt", "memory_map.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.slow
def test_demo_with_default_model_tokenizer(tmp_path: Path) -> None:
    try:
        tok, _ = load_demo_tokenizer("model")
    except ConfigError as exc:
        pytest.skip(f"default model tokenizer unavailable: {exc}")
    demo = build_demo(tok)
    demo.cache.check_invariants()
    text = format_tree(demo.cache, tok)
    assert "<|im_start|>system" in text  # decoded with the model's own chat template
    png_size(render_tree_png(demo.cache, tmp_path / "t.png", tokenizer=tok))
