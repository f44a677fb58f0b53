"""The benchmarks run by ``python benchmarks/bench.py loss|engine|eval|train`` (one module each; ``arguments``:
the argument types and help formatter their parsers share). Not part of the installed ``recallk`` package."""
