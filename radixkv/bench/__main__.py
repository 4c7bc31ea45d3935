"""`python -m radixkv.bench [options]`: the same as `radixkv bench [options]`."""

from __future__ import annotations

import sys

from radixkv.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
