"""The benchmarks are not part of the installed package: their code (``benchmarks/bench.py`` and the
``recallk_bench`` package beside it) is imported from the repository's ``benchmarks/`` folder."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
