"""`python -m bench [--quick] [--workload NAME ...] [--seed N] [--out DIR]`: the prefix-sharing
benchmark suite (see `bench/suite/run.py` for every option)."""

from __future__ import annotations

import sys

from bench.suite.run import main

if __name__ == "__main__":
    sys.exit(main())
