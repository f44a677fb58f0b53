"""Slow, obviously-correct reference implementations (float64 loops) that the tests and benchmarks check against.

Not for training: they build every quantity explicitly and run in seconds where the library runs in milliseconds.
"""
