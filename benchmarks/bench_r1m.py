"""Exact search at R1M scale: 70 queries against a 1M x 512 float32 gallery (random unit vectors, ~2 GB).

Measures, in one process, against a floor (one plain chunked float32 matmul pass over the gallery, the least any
exact search must do):
- ``exact_knn(queries, gallery, k)`` (faiss on the CPU when installed, else torch; chunked, see evaluation.knn);
- ``exact_knn(..., backend="torch")``;
- ``revisited_metrics`` (positions of every ground-truth image in the full 1M ranking: two chunked passes and a
  sort per score block), with random revisited-sized ground truth (easy/hard/junk) among the first 5k images.
Peak memory is the process's peak resident set (VmHWM) during each step, reset before it, minus the resident
set at its start: the working memory on top of the gallery.

Run: .venv/bin/python benchmarks/bench_r1m.py            (defaults: --n 1000000 --dim 512 --queries 70 --k 100)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recallk.evaluation import exact_knn, revisited_metrics
from recallk.evaluation.knn import faiss_available


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak extra resident MiB) of ``fn()``; peak = VmHWM after (reset before) - VmRSS before."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (Linux >= 4.0)
    start_rss = _status_kib("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    return result, seconds, (_status_kib("VmHWM") - start_rss) / 1024


def unit_rows(rng: np.random.Generator, n: int, dim: int, block: int = 1 << 16) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, block):
        x = rng.standard_normal((min(block, n - a), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a : a + len(x)] = x
    return out


def floor_pass(queries: np.ndarray, gallery: np.ndarray, block: int = 1 << 16) -> float:
    """One chunked matmul pass (the scores every exact search computes), keeping only each row's maximum."""
    q = torch.from_numpy(queries)
    best = torch.full((len(queries),), -float("inf"))
    with torch.inference_mode():
        for a in range(0, len(gallery), block):
            best = torch.maximum(best, (q @ torch.from_numpy(gallery[a : a + block]).T).max(dim=1).values)
    return float(best.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--k", type=int, default=100, help="neighbours of exact_knn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    gallery = unit_rows(rng, args.n, args.dim)
    queries = unit_rows(rng, args.queries, args.dim)
    made = time.perf_counter() - t0
    labelled = min(5000, args.n)
    gnd = []
    for _ in range(args.queries):
        ids = rng.permutation(labelled)
        sizes = rng.integers(10, 120, size=3)
        easy, hard, junk = np.split(ids[: sizes.sum()], np.cumsum(sizes)[:2])
        gnd.append({"easy": easy, "hard": hard, "junk": junk})

    rows: dict[str, dict[str, float]] = {}
    _, floor_s, floor_mib = measure(lambda: floor_pass(queries, gallery))
    rows["floor: one chunked matmul pass"] = {"seconds": floor_s, "peak_extra_mib": floor_mib}
    (scores, indices), s, mib = measure(lambda: exact_knn(queries, gallery, args.k))
    rows[f"exact_knn k={args.k} ({'faiss' if faiss_available() else 'torch'})"] = {"seconds": s,
                                                                                   "peak_extra_mib": mib}
    (scores_torch, indices_torch), s, mib = measure(lambda: exact_knn(queries, gallery, args.k, backend="torch"))
    rows[f"exact_knn k={args.k} (torch)"] = {"seconds": s, "peak_extra_mib": mib}
    # the two backends round the float32 inner products differently: near-equal scores may swap places
    same = float(np.mean(indices == indices_torch))
    score_gap = float(np.abs(scores.astype(np.float64) - scores_torch).max())
    metrics, s, mib = measure(lambda: revisited_metrics(queries, gallery, gnd))
    rows["revisited_metrics (full-ranking positions)"] = {"seconds": s, "peak_extra_mib": mib}

    print(f"gallery {args.n} x {args.dim} float32 ({gallery.nbytes / 2**30:.2f} GiB, made in {made:.1f} s), "
          f"{args.queries} queries, torch threads {torch.get_num_threads()}")
    print(f"{'step':<46} {'seconds':>8} {'x floor':>8} {'peak extra MiB':>15}")
    for name, row in rows.items():
        print(f"{name:<46} {row['seconds']:8.2f} {row['seconds'] / floor_s:8.2f} {row['peak_extra_mib']:15.0f}")
    print(f"faiss vs torch: {100 * same:.2f}% of neighbour entries identical, max score difference {score_gap:.2e}")
    print(json.dumps({"rows": rows, "map_medium_random": metrics["map_medium"], "same_entries": same,
                      "max_score_difference": score_gap}))


if __name__ == "__main__":
    main()
