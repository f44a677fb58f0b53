"""The evaluation protocol of each benchmark: which splits, leave-one-out or query/gallery or revisited, which k's
(method.md section 5; ``DatasetSpec.eval_protocol``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from recallk.data import DATASET_SPECS, build_dataset, dataset_spec
from recallk.evaluation.embed import embed_dataset
from recallk.evaluation.metrics import metric_order, retrieval_metrics
from recallk.evaluation.revisited import revisited_metric_names, revisited_metrics


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
    """Embed each test split of ``dataset_name`` with ``model`` and compute its metrics by the dataset's protocol.

    ``dataset_spec(dataset_name).eval_protocol``: ``"leave_one_out"``: ``retrieval_metrics`` of the split alone;
    ``"query_gallery"``: the split's items query the spec's ``gallery_split`` (``query_gallery_metrics``, classes
    matched by name); ``"revisited"``: ``revisited_metrics`` against ``gallery_split`` with the query dataset's
    ``.ground_truth`` (``ks`` are then the k's of mP@k). The gallery is embedded once.

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
        ``{split: metrics}`` (``retrieval_metrics`` or ``revisited_metrics`` keys), in the order of ``splits``.

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
    device = embed_options.get("device", "auto")
    results: dict[str, dict[str, float | int]] = {}
    gallery: tuple[Any, np.ndarray] | None = None
    for split in splits:
        dataset = build_dataset(dataset_name, root, split, transform, **(dataset_options or {}))
        embeddings, labels = embed_dataset(model, dataset, **embed_options)
        if spec.eval_protocol == "leave_one_out":
            results[split] = retrieval_metrics(embeddings, labels, ks, device=device)
            continue
        if gallery is None:
            gallery_set = build_dataset(dataset_name, root, spec.gallery_split, transform, **(dataset_options or {}))
            gallery = (gallery_set, embed_dataset(model, gallery_set, **embed_options)[0])
        if spec.eval_protocol == "revisited":
            results[split] = revisited_metrics(embeddings, gallery[1], dataset.ground_truth, ks, device=device)
        else:
            results[split] = query_gallery_metrics(embeddings, dataset, gallery[1], gallery[0], ks, device=device)
    return results


def class_names_of(dataset: Any) -> np.ndarray:
    """(N,) array of the class name of each item of a dataset with ``.labels`` and ``.classes``."""
    return np.asarray(dataset.classes, dtype=object)[np.asarray(dataset.labels)]


def query_gallery_metrics(
    query_emb: np.ndarray,
    query_set: Any,
    gallery_emb: np.ndarray,
    gallery_set: Any,
    ks: Sequence[int],
    *,
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """``retrieval_metrics`` of queries searching a separate gallery, classes matched by name.

    Two datasets number their classes each on their own; here a query's positives are the gallery items whose
    class *name* (``classes[label]``) equals the query's. A query whose class is absent from the gallery has no
    positive: it is excluded and counted in ``num_excluded_queries``.

    Args:
        query_emb: (Q, d) float32 embeddings of ``query_set``'s items; gallery_emb: (G, d) of ``gallery_set``'s.
        query_set, gallery_set: datasets with ``.labels`` and ``.classes``.
        ks: the k's of recall@k.
        device: where the kNN search runs.

    Raises:
        ValueError: as ``retrieval_metrics`` (e.g. no query's class is in the gallery).
    """
    labels, ref_labels = labels_by_class_name(query_set, gallery_set)
    return retrieval_metrics(query_emb, labels, ks, ref_emb=gallery_emb, ref_labels=ref_labels, device=device)


def labels_by_class_name(query_set: Any, gallery_set: Any) -> tuple[np.ndarray, np.ndarray]:
    """The labels ``(query_labels (Q,), gallery_labels (G,))`` int64 of two datasets numbered alike by class name
    (the gallery's class names in order of first appearance; a query class absent from the gallery: one id no
    gallery item has), as :func:`query_gallery_metrics` matches them."""
    gallery_names = class_names_of(gallery_set)
    index = {name: i for i, name in enumerate(dict.fromkeys(gallery_names.tolist()))}
    ref_labels = np.fromiter((index[n] for n in gallery_names), dtype=np.int64, count=len(gallery_names))
    unseen = len(index)  # one id no gallery item has
    labels = np.fromiter((index.get(n, unseen) for n in class_names_of(query_set)), dtype=np.int64,
                         count=len(query_set.labels))
    return labels, ref_labels


_REVISITED_ORDER = {name: i for i, name in enumerate(revisited_metric_names(range(1, 1001)))}


def _table_order(name: str) -> tuple[int, tuple]:
    """Rows of a table: revisited mAP and mP@k in their order, the others by ``metric_order`` (counts last), then
    the revisited skip counts."""
    if name in _REVISITED_ORDER and name != "num_queries":
        return (2 if name.startswith("num_skipped_") else 0), (_REVISITED_ORDER[name],)
    return 1, metric_order(name)


def format_metrics_table(results: Mapping[str, Mapping[str, float | int]]) -> str:
    """A plain aligned text table: one row per metric, one column per split.

    Fractions are printed as percentages with two decimals, counts as integers, a metric a split lacks as "-".
    ``results`` maps split name -> metrics dict (``evaluate_protocol``'s output).
    """
    splits = list(results)
    names = sorted({name for metrics in results.values() for name in metrics}, key=_table_order)

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
