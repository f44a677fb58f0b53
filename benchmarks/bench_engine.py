"""Cached two-pass step vs a plain full-batch step: time ratio and peak memory. See recallk.bench.engine."""

from recallk.bench.engine import main

if __name__ == "__main__":
    raise SystemExit(main())
