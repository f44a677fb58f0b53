"""Time and peak memory of choosing the report's retrieval examples (random + hardest failures).

Usage: python benchmarks/bench_report_examples.py N D   (e.g. 136093 512, the iNaturalist test size)
"""

import resource
import sys
import time

import numpy as np

from recallk.report.examples import select_queries


def main(argv: list[str]) -> None:
    n, d = int(argv[0]), int(argv[1])
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n // 5, n)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    start = time.perf_counter()
    select_queries(emb, labels, 16, 8)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"N={n} d={d}: select_queries {seconds:.2f} s, peak RSS {peak:.0f} MiB "
          f"(embeddings {emb.nbytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
