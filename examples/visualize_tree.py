"""Radix tree visualiser walk-through on a real RadixCache and TokenToKVPool.

The real scheduler (scripted answers standing in for a model) serves four chat prompts that
share a system prompt (one user comes back for a second turn), then starts a fifth request that
stays running; the pool is sized so that its decode steps make the scheduler evict the least
recently used leaves. Prints the tree (decoded with the default model's tokenizer when it loads,
else a word tokenizer), the same tree as token ids, and the KV pool's memory map, and writes
tree.txt, tree.dot, tree.png, memory_map.txt and memory_map.png. Same as `radixkv viz`.

    .venv/bin/python examples/visualize_tree.py [--out DIR] [--tokenizer auto|model|word]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from radixkv.tools.viz import (
    build_demo,
    format_memory_map,
    load_demo_tokenizer,
    memory_map,
    write_pictures,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path,
                    default=Path(tempfile.gettempdir()) / "radixkv-examples" / "tree")
    ap.add_argument("--tokenizer", choices=("auto", "model", "word"), default="auto")
    args = ap.parse_args()

    tokenizer, desc = load_demo_tokenizer(args.tokenizer)
    print(f"tokenizer: {desc}\n")
    demo = build_demo(tokenizer)
    print("\n".join(demo.log))
    print("\nThe tree, decoded:")
    print(demo.cache.pretty(tokenizer=tokenizer))
    print("\nThe same tree as token ids, two levels deep:")
    print(demo.cache.pretty(max_depth=2))
    print()
    print(format_memory_map(memory_map(demo.cache, demo.pool, demo.running)))
    demo.cache.check_invariants()
    files = write_pictures(demo.cache, args.out, tokenizer, demo.running, pool=demo.pool)
    print()
    for kind, path in files.items():
        print(f"wrote {kind:<15} {path}")


if __name__ == "__main__":
    main()
