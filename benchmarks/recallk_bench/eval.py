"""Benchmark: ``retrieval_metrics`` vs pytorch-metric-learning's ``AccuracyCalculator``, time and peak memory.

Both run leave-one-out on the same synthetic clustered embeddings (L2-normalised Gaussian clusters, class sizes
long-tailed like the iNaturalist 2018 test split: mean 55.5 images per class, at most 1000, a few singletons).
Each run is a fresh subprocess, so peak memory (the child's own ``ru_maxrss``) is not polluted by the other
library or by an earlier run; "beside the embeddings" is that peak minus the resident size just before the
metric call (interpreter, libraries, embeddings and labels already loaded).

pml is configured as its docs advise for MAP@R: ``k="max_bin_count"``, leave-one-out (``reference=None``, i.e.
``ref_includes_query=True``), a faiss flat inner-product index (``FaissKNN(index_init_fn=faiss.IndexFlatIP)``;
on L2-normalised data the same ranking as its default L2 index), on the CPU.

Usage: ``python benchmarks/bench.py eval --sizes 10000 50000 136093`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recallk_bench.arguments import (
    BENCH_SCRIPT,
    HelpFormatter,
    int_at_least,
    non_negative_int,
    positive_float,
    positive_int,
    prog,
)

INAT_TEST_SIZE = 136_093
INAT_MEAN_CLASS_SIZE = 136_093 / 2_452
MAX_CLASS_SIZE = 1000
MIN_SIZE = 4
COMPARED = (("recall@1", "precision_at_1"), ("map@r", "mean_average_precision_at_r"), ("r_precision", "r_precision"))


def class_sizes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed class sizes summing to n: log-normal, clipped to [1, 1000], mean about 55.5."""
    n_classes = max(2, round(n / INAT_MEAN_CLASS_SIZE))
    raw = np.exp(rng.normal(0.0, 1.1, size=n_classes))
    sizes = np.clip(np.round(raw / raw.sum() * n), 1, MAX_CLASS_SIZE).astype(np.int64)
    sizes[np.argmax(sizes)] = min(MAX_CLASS_SIZE, n // 4)  # one class as large as iNaturalist's largest
    while (diff := n - int(sizes.sum())) != 0:
        step = 1 if diff > 0 else -1
        room = np.flatnonzero((sizes < MAX_CLASS_SIZE) if step > 0 else (sizes > 2))
        chosen = rng.choice(room, size=min(abs(diff), len(room)), replace=False)
        sizes[chosen] += step
    return sizes


def make_embeddings(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 L2-normalised clustered embeddings and (n,) int64 labels, in shuffled order."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n, rng)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((len(sizes), dim), dtype=np.float32) / np.sqrt(dim, dtype=np.float32)
    spread = rng.uniform(2.5, 4.5, size=len(sizes)).astype(np.float32)  # per-class difficulty
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= spread[labels, None] / np.sqrt(dim, dtype=np.float32)
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return np.ascontiguousarray(x[perm]), labels[perm].astype(np.int64)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run_ours(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from recallk.evaluation import retrieval_metrics

    return retrieval_metrics(x, y, (1, 4, 16, 32))


def _run_pml(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    import faiss
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    calculator = AccuracyCalculator(
        include=tuple(name for _, name in COMPARED),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
    )
    return {k: float(v) for k, v in calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(y)).items()}


def worker(tool: str, data: str) -> None:
    """Child process: load the data, run one tool once, print a JSON line (time, memory, metrics)."""
    import torch  # noqa: F401 - both tools need it; imported before the memory baseline

    if tool == "pml":
        import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401
    else:
        import recallk.evaluation  # noqa: F401
    with np.load(data) as f:
        x, y = f["embeddings"], f["labels"]
    before = _rss_mb()
    start = time.perf_counter()
    metrics = (_run_pml if tool == "pml" else _run_ours)(x, y)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"tool": tool, "seconds": seconds, "peak_mb": peak, "before_mb": before, "metrics": metrics}))


def run_child(tool: str, data: Path, timeout: float) -> dict:
    """Run ``worker`` in a fresh interpreter; returns its JSON, or ``{"error": ...}``."""
    cmd = [sys.executable, BENCH_SCRIPT, "eval", "--worker", tool, "--data", str(data)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"tool": tool, "error": f"exit code {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(n: int, ours: dict, pml: dict) -> str:
    def cells(r: dict) -> list[str]:
        if "error" in r:
            return [r["error"], "-", "-"]
        return [f"{r['seconds']:.1f}", f"{r['peak_mb']:.0f}", f"{r['peak_mb'] - r['before_mb']:.0f}"]

    if "error" in ours or "error" in pml:
        diff, ratio = "-", "-"
    else:
        diff = f"{max(abs(ours['metrics'][a] - pml['metrics'][b]) for a, b in COMPARED):.1e}"
        ratio = f"{pml['seconds'] / ours['seconds']:.2f}"
    m = ours.get("metrics", {})
    values = " / ".join(f"{m[a]:.4f}" for a, _ in COMPARED) if m else "-"
    return " | ".join(["", str(n), *cells(ours), *cells(pml), ratio, values, diff, ""]).strip()


HEADER = (
    "| N | ours s | ours peak MB | ours beside MB | pml s | pml peak MB | pml beside MB | pml s / ours s "
    "| R@1 / MAP@R / R-prec (ours) | max abs diff |\n|" + "---|" * 10
)


def _size(text: str) -> int:
    """``--sizes``: an int >= MIN_SIZE (two classes of two items: every query has a positive)."""
    return int_at_least(text, MIN_SIZE)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bench.py eval``: sizes, dimension and timeout checked (a bad value is a one-line
    usage error, exit 2); ``--help`` shows each default."""
    parser = argparse.ArgumentParser(prog=prog("eval"), description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--sizes", type=_size, nargs="+", default=[10_000, 50_000, INAT_TEST_SIZE],
                        help=f"numbers of embeddings N (at least {MIN_SIZE}), one run of each library per N")
    parser.add_argument("--dim", type=positive_int, default=512, help="embedding dimension")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the synthetic embeddings")
    parser.add_argument("--skip-pml-above", type=non_negative_int, default=None,
                        help="run pml only for N at most this (default: pml runs at every N)")
    parser.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per child run")
    parser.add_argument("--json-out", type=Path, default=None, help="also write every run's JSON here")
    parser.add_argument("--worker", choices=["ours", "pml"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args.worker, args.data)
        return 0

    print(f"# {os.cpu_count()} CPUs, dim {args.dim}, seed {args.seed}", flush=True)
    print(HEADER, flush=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            x, y = make_embeddings(n, args.dim, args.seed)
            data = Path(tmp) / f"emb_{n}.npz"
            np.savez(data, embeddings=x, labels=y)
            del x, y
            ours = run_child("ours", data, args.timeout)
            if args.skip_pml_above is not None and n > args.skip_pml_above:
                pml = {"tool": "pml", "error": "not run"}
            else:
                pml = run_child("pml", data, args.timeout)
            records.append({"n": n, "ours": ours, "pml": pml})
            print(_row(n, ours, pml), flush=True)
            data.unlink()
    if args.json_out:
        args.json_out.write_text(json.dumps(records, indent=1))
    return 0

