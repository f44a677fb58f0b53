"""The speed and memory benchmarks of recallk (not part of the installed package):

    python benchmarks/bench.py loss|engine|eval|train|distributed [ARGS]   # from the repository root
    python benchmarks/bench.py loss --help                                 # each benchmark's own options and defaults

``loss``: the RS@k loss paths against a naive (B, |P|, B) version; ``engine``: the cached two-pass step against a
plain full-batch step; ``eval``: ``retrieval_metrics`` against pytorch-metric-learning; ``train``: loader, step
and trainer images/s; ``distributed``: the sharded loss's per-rank time and memory on N processes. The code is
in ``benchmarks/recallk_bench/``; figures and commands in docs/benchmarks.md.
recallk is taken from this repository's ``src/`` when it is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # recallk_bench, also when this file is imported rather than run
    sys.path.insert(0, HERE)
try:
    import recallk  # noqa: F401
except ImportError:  # a copy of the repository without an install: use its src/
    sys.path.insert(0, os.path.join(HERE, os.pardir, "src"))

BENCHES = ("loss", "engine", "eval", "train", "distributed")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark: ``argv`` is its name then its own arguments; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="bench.py", description="Run a benchmark; arguments after the name go to it (e.g. bench.py loss --help)."
    )
    parser.add_argument("which", choices=BENCHES, help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of that benchmark")
    args = parser.parse_args(argv)
    module = importlib.import_module(f"recallk_bench.{args.which}")
    result = module.main(list(args.args))
    sys.stdout.flush()
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
