"""Quality benchmark: accuracy of every compression policy at every budget, on the live server.

The entry point (``python benchmarks/quality.py`` or ``python -m benchmarks.quality``, from a
checkout); the benchmark lives in :mod:`benchmarks.quality_bench`, its documentation and flags
in :mod:`benchmarks.quality_bench.cli` (``--help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality_bench.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
