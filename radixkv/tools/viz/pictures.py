"""Every picture of one tree and pool written into a folder (what `radixkv viz` leaves behind)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radixkv.memory.tree_text import format_tree
from radixkv.tools.viz.dot import to_dot
from radixkv.tools.viz.memory_map import format_memory_map, memory_map
from radixkv.tools.viz.png import render_memory_map_png, render_tree_png

if TYPE_CHECKING:
    from radixkv.memory import RadixCache, TokenToKVPool


def write_pictures(cache: RadixCache, out_dir: str | Path, tokenizer: Any = None,
                   running: Mapping[str, Any] | None = None, max_depth: int | None = None,
                   pool: TokenToKVPool | None = None) -> dict[str, Path]:
    """Write tree.txt, tree.dot, tree.png, memory_map.txt and memory_map.png into `out_dir`
    (and tree.svg when Graphviz's `dot` is installed). Returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mm = memory_map(cache, pool, running)
    files = {"tree.txt": out / "tree.txt", "tree.dot": out / "tree.dot",
             "memory_map.txt": out / "memory_map.txt"}
    files["tree.txt"].write_text(format_tree(cache, tokenizer, max_depth) + "\n")
    files["tree.dot"].write_text(to_dot(cache, tokenizer, max_depth))
    files["memory_map.txt"].write_text(format_memory_map(mm) + "\n")
    files["tree.png"] = render_tree_png(cache, out / "tree.png", tokenizer, max_depth)
    files["memory_map.png"] = render_memory_map_png(mm, out / "memory_map.png")
    dot = shutil.which("dot")
    if dot:
        svg = out / "tree.svg"
        done = subprocess.run([dot, "-Tsvg", str(files["tree.dot"]), "-o", str(svg)],
                              capture_output=True, timeout=60, check=False)
        if done.returncode == 0:
            files["tree.svg"] = svg
    return files
