"""The evaluation protocol of each benchmark: which splits, leave-one-out, which k's (method.md section 5)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from recallk.evaluation.embed import embed_dataset
from recallk.evaluation.metrics import metric_order, retrieval_metrics

# Dataset name -> test splits; each split is evaluated leave-one-out over its own images.
PROTOCOLS: dict[str, list[str]] = {
    "sop": ["test"],
    "cub": ["test"],
    "cars196": ["test"],
    "inaturalist": ["test"],
    "vehicleid": ["test_small", "test_medium", "test_large"],
    "kanji": ["test"],
    "folder": ["test"],
}

FALLBACK_KS = (1, 2, 4, 8)


def default_ks(dataset_name: str) -> tuple[int, ...]:
    """The benchmark's evaluation k's (``recallk.data.DEFAULT_EVAL_KS``), or (1, 2, 4, 8) if it lists none."""
    from recallk.data import DEFAULT_EVAL_KS

    return tuple(DEFAULT_EVAL_KS.get(dataset_name, FALLBACK_KS))


def evaluate_protocol(
    model: torch.nn.Module,
    dataset_name: str,
    root: str | os.PathLike | None,
    transform: Callable | None,
    ks: Sequence[int] | None = None,
    splits: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    num_workers: int = 0,
    amp: bool | str | None = None,
    progress: bool = True,
    **dataset_options: Any,
) -> dict[str, dict[str, float | int]]:
    """Embed each test split of ``dataset_name`` with ``model`` and compute its leave-one-out metrics.

    Args:
        model: image batch -> (B, d) embeddings (see ``embed_dataset``).
        dataset_name: a key of ``PROTOCOLS``.
        root: the dataset's folder, passed to ``recallk.data.build_dataset``.
        transform: the test transform (image -> tensor).
        ks: the k's of recall@k; None = the benchmark's defaults (``default_ks``).
        splits: the splits to evaluate; None = ``PROTOCOLS[dataset_name]``.
        batch_size, device, num_workers, amp, progress: see ``embed_dataset``; the search also runs on
            ``device``.
        dataset_options: extra options of ``build_dataset`` (e.g. ``skip_bad_images``).

    Returns:
        ``{split: retrieval_metrics(...) result}``, in the order of ``splits``.

    Raises:
        ValueError: unknown dataset name, empty ``splits``, or any error of ``build_dataset`` /
            ``embed_dataset`` / ``retrieval_metrics`` (missing files, a split without positives, ...).
    """
    if dataset_name not in PROTOCOLS:
        raise ValueError(f"no evaluation protocol for dataset {dataset_name!r}; choose from {sorted(PROTOCOLS)}")
    from recallk.data import build_dataset

    splits = list(PROTOCOLS[dataset_name] if splits is None else splits)
    if not splits:
        raise ValueError("splits is empty: give at least one split, or None for the protocol's splits")
    ks = tuple(ks) if ks is not None else default_ks(dataset_name)
    results: dict[str, dict[str, float | int]] = {}
    for split in splits:
        dataset = build_dataset(dataset_name, root, split, transform, **dataset_options)
        embeddings, labels = embed_dataset(
            model,
            dataset,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            amp=amp,
            progress=progress,
        )
        results[split] = retrieval_metrics(embeddings, labels, ks, device=device)
    return results


def format_metrics_table(results: Mapping[str, Mapping[str, float | int]]) -> str:
    """A plain aligned text table: one row per metric, one column per split.

    Fractions are printed as percentages with two decimals, counts as integers, a metric a split lacks as "-".
    ``results`` maps split name -> metrics dict (``evaluate_protocol``'s output).
    """
    splits = list(results)
    names = sorted({name for metrics in results.values() for name in metrics}, key=metric_order)

    def cell(value: float | int | None) -> str:
        if value is None:
            return "-"
        if isinstance(value, (int,)) and not isinstance(value, bool):
            return str(value)
        return f"{100.0 * float(value):.2f}"

    header = ["metric (%)", *splits]
    rows = [[name, *(cell(results[s].get(name)) for s in splits)] for name in names]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for j, row in enumerate([header, *rows]):
        first = row[0].ljust(widths[0])
        rest = [text.rjust(width) for text, width in zip(row[1:], widths[1:])]
        lines.append("  ".join([first, *rest]).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
