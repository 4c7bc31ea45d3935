"""Fragmentation simulator walk-through: contiguous max-length reservation vs per-token slots.

First the 100-block seed scenario (A takes 40, B takes 40, C needs 30 but would reserve 50), with
its event log and the layout at the moment C is refused although 60 blocks are free; then a seeded
random trace of 200 chat requests on 1,024 blocks. Both write a PNG plot. The paged side is
radixkv's real TokenToKVPool allocator. The same output comes from `radixkv simulate`.

    .venv/bin/python examples/fragmentation.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from radixkv.tools.simulate import (
    compare,
    format_report,
    plot_comparison,
    random_trace,
    seed_trace,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "radixkv-examples",
                    help="folder for the PNG plots")
    ap.add_argument("--requests", type=int, default=200, help="requests in the random trace")
    args = ap.parse_args()

    seed = compare(seed_trace(), 100)
    title = "Seed scenario: 100 blocks; A takes 40, B takes 40, C needs 30 (reserves 50)"
    print(format_report(seed, events=True, title=title))
    print(f"plot: {plot_comparison(seed, args.out / 'fragmentation_seed.png', title=title)}\n")

    trace = random_trace(args.requests, seed=0)
    rand = compare(trace, 1024)
    title = f"Random trace: {len(trace)} requests on 1,024 blocks"
    print(format_report(rand, events=False, title=title))
    c, p = rand.contiguous, rand.paged
    print(f"\npaged served the trace in {p.makespan:,} ticks vs {c.makespan:,} contiguous; "
          f"peak concurrency {p.running.max()} vs {c.running.max()}")
    print(f"plot: {plot_comparison(rand, args.out / 'fragmentation_random.png', title=title)}")


if __name__ == "__main__":
    main()
