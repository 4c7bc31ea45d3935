"""`python -m bench [options]` from a source checkout: a shim for `radixkv bench [options]` (the
suite lives in the package, `radixkv/bench/`)."""

from __future__ import annotations

import sys

from radixkv.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
