"""``python -m benchmarks.quality_bench``: the same as ``python benchmarks/quality.py``."""

import sys

from benchmarks.quality_bench.cli import main

sys.exit(main())
