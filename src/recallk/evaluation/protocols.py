"""The evaluation protocol of each benchmark: which splits, leave-one-out, which k's (method.md section 5)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from recallk.data import DATASET_SPECS, build_dataset, dataset_spec
from recallk.evaluation.embed import embed_dataset
from recallk.evaluation.metrics import metric_order, retrieval_metrics


def __getattr__(name: str) -> Any:
    if name == "PROTOCOLS":  # deprecated: the protocol lives in each dataset's DatasetSpec
        warnings.warn("PROTOCOLS is deprecated: use recallk.data.dataset_spec(name).eval_splits", DeprecationWarning,
                      stacklevel=2)
        return {name: list(spec.eval_splits) for name, spec in DATASET_SPECS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate_protocol(
    model: torch.nn.Module,
    dataset_name: str,
    root: str | os.PathLike | None,
    transform: Callable | None,
    ks: Sequence[int] | None = None,
    splits: Sequence[str] | None = None,
    *,
    dataset_options: Mapping[str, Any] | None = None,
    **embed_options: Any,
) -> dict[str, dict[str, float | int]]:
    """Embed each test split of ``dataset_name`` with ``model`` and compute its leave-one-out metrics.

    Args:
        model: image batch -> (B, d) embeddings (see ``embed_dataset``).
        dataset_name: a registered dataset (``recallk.data.dataset_spec``); its spec gives the protocol.
        root: the dataset's folder, passed to ``recallk.data.build_dataset``.
        transform: the test transform (image -> tensor).
        ks: the k's of recall@k; None = the benchmark's (``dataset_spec(dataset_name).eval_ks``).
        splits: the splits to evaluate; None = the protocol's (``dataset_spec(dataset_name).eval_splits``).
        dataset_options: extra options of ``build_dataset`` (e.g. ``{"skip_bad_images": True}``).
        embed_options: ``batch_size``, ``device``, ``num_workers``, ``amp``, ``progress`` of ``embed_dataset``;
            the search also runs on ``device``.

    Returns:
        ``{split: retrieval_metrics(...) result}``, in the order of ``splits``.

    Raises:
        ValueError: unknown dataset name, empty ``splits``, or any error of ``build_dataset`` /
            ``embed_dataset`` / ``retrieval_metrics`` (missing files, a split without positives, ...).
    """
    if dataset_name not in DATASET_SPECS:
        raise ValueError(f"no evaluation protocol for dataset {dataset_name!r}; choose from {sorted(DATASET_SPECS)}")
    spec = dataset_spec(dataset_name)
    splits = list(spec.eval_splits if splits is None else splits)
    if not splits:
        raise ValueError("splits is empty: give at least one split, or None for the protocol's splits")
    ks = tuple(ks) if ks is not None else spec.eval_ks
    results: dict[str, dict[str, float | int]] = {}
    for split in splits:
        dataset = build_dataset(dataset_name, root, split, transform, **(dataset_options or {}))
        embeddings, labels = embed_dataset(model, dataset, **embed_options)
        results[split] = retrieval_metrics(embeddings, labels, ks, device=embed_options.get("device", "auto"))
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
