"""Exact retrieval metrics (Recall@k, positive recall, MAP@R, R-precision) in memory linear in N.

Definitions, for a query q, its ranked neighbours (exact inner product, ties by index, see ``knn``) and
P(q) = the reference items with q's label (q itself excluded in leave-one-out), R = |P(q)|:

- ``recall@k``: 1 if at least one of the k nearest is in P(q), else 0 (the deep-metric-learning hit rate,
  "Recall@k" of the papers).
- ``positive_recall@k``: |P(q) among the k nearest| / |P(q)|, the fraction of all of q's positives retrieved
  in the top k (at most k / |P(q)|). The RS@k loss normalises by min(k, |P(q)|) instead; this metric does not.
- ``r_precision``: |P(q) among the R nearest| / R.
- ``map@r``: (1 / R) * sum over positions i <= R holding a positive of precision@i (Musgrave et al., "A Metric
  Learning Reality Check", 2020).

Each is averaged over the queries with R >= 1; queries with no positive are excluded and counted. A k larger
than the reference set means all of it.

Memory: MAP@R needs the R nearest of each query, R up to the largest class size minus one. The search runs in
query chunks; a first pass goes to a depth chosen by a cost model (``first_pass_depth``: usually all but the
largest classes), and a second pass goes deeper only for the queries whose R exceeds it (grouped by R).
No (N, N) or (N, max R) array is ever held.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recallk.evaluation.knn import as_float32_matrix, iter_knn, resolve_backend
from recallk.utils import resolve_device

# Search cost per query ~ (1 + _DEPTH_COST * depth) full passes over the reference set, fitted to the faiss depth
# measurement of docs/benchmarks.md ("Evaluation metrics"). Used to choose the first-pass depth (first_pass_depth).
_DEPTH_COST = 3e-4
_FIRST_PASS_MAX_DEPTH: int | None = None  # optional cap (tests lower it to force the second pass)
_SECOND_PASS_BUDGET = 1 << 22  # neighbour entries per second-pass chunk


#: The query counts ``retrieval_metrics`` returns beside the metrics.
COUNT_KEYS = ("num_queries", "num_excluded_queries")


def metric_order(name: str) -> tuple[int, int, str]:
    """Sort key of metric names as every table shows them: recall@k by k, positive_recall@k by k, map@r,
    r_precision, any other name alphabetically, then the query counts."""
    for group, prefix in enumerate(("recall@", "positive_recall@")):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return group, int(name[len(prefix) :]), ""
    if name in ("map@r", "r_precision"):
        return (2 if name == "map@r" else 3), 0, ""
    return (5, COUNT_KEYS.index(name), "") if name in COUNT_KEYS else (4, 0, name)


def _labels_array(labels: np.ndarray | torch.Tensor, n: int, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"{name} must be a 1-D array of {n} class ids (one per embedding), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def count_positives(query_labels: np.ndarray, ref_labels: np.ndarray, leave_one_out: bool) -> np.ndarray:
    """|P(q)| per query: (Q,) int64 count of reference items with the query's label (minus itself if LOO)."""
    classes, counts = np.unique(ref_labels, return_counts=True)
    pos = np.searchsorted(classes, query_labels).clip(max=len(classes) - 1)
    found = classes[pos] == query_labels
    return np.where(found, counts[pos], 0).astype(np.int64) - int(leave_one_out)


def _self_index_array(
    self_index: np.ndarray, leave_one_out: bool, query_labels: np.ndarray, ref_labels: np.ndarray
) -> np.ndarray:
    if leave_one_out:
        raise ValueError("self_index needs a separate reference set (ref_emb, ref_labels); leave-one-out excludes "
                         "each query by its own row already")
    own = np.asarray(self_index).reshape(-1)
    if own.shape[0] != len(query_labels) or not np.issubdtype(own.dtype, np.integer):
        raise ValueError(f"self_index must be ({len(query_labels)},) integers, got {own.dtype} {own.shape}")
    own = own.astype(np.int64)
    if own.size and (own.min() < 0 or own.max() >= len(ref_labels)):
        raise ValueError(f"self_index must hold reference rows in [0, {len(ref_labels) - 1}]")
    if (ref_labels[own] != query_labels).any():
        raise ValueError("self_index points at reference rows whose labels differ from their queries' labels")
    return own


def first_pass_depth(r: np.ndarray, min_depth: int, available: int) -> int:
    """The first-pass depth d minimising the modelled search cost, at least ``min_depth`` (capped by available).

    Cost model, in full passes over the reference set: every query is searched to depth d, costing
    1 + _DEPTH_COST * d; each query with R > d is searched again to about its own R, costing 1 + _DEPTH_COST * R.
    A deep first pass makes every query pay for the largest classes; a shallow one re-reads the reference set for
    many queries. ``r`` holds R (>= 1) per used query.
    """
    low = min(min_depth, available)
    candidates = np.unique(np.clip(r, low, available))
    if _FIRST_PASS_MAX_DEPTH is not None:
        candidates = np.unique(np.minimum(candidates, max(low, _FIRST_PASS_MAX_DEPTH)))
    sorted_r = np.sort(r)
    redo_cost = np.cumsum((1.0 + _DEPTH_COST * sorted_r)[::-1])[::-1]  # cost of redoing sorted_r[i:]
    first_deeper = np.searchsorted(sorted_r, candidates, side="right")
    redo = np.append(redo_cost, 0.0)[first_deeper]
    total = len(r) * (1.0 + _DEPTH_COST * candidates) + redo
    return int(candidates[np.argmin(total)])


class _Totals:
    """Running sums of per-query metrics (float64), filled chunk by chunk."""

    def __init__(self, ks: tuple[int, ...]) -> None:
        self.ks = ks
        self.sums = dict.fromkeys(
            [f"recall@{k}" for k in ks] + [f"positive_recall@{k}" for k in ks] + ["map@r", "r_precision"], 0.0
        )

    def add_recalls(self, relevant: np.ndarray, r: np.ndarray) -> None:
        """``relevant`` (c, K) bool: neighbour j of query i is a positive; ``r`` (c,) positives per query."""
        hits = np.cumsum(relevant, axis=1)
        for k in self.ks:
            found = hits[:, min(k, relevant.shape[1]) - 1]
            self.sums[f"recall@{k}"] += float(np.count_nonzero(found))
            self.sums[f"positive_recall@{k}"] += float(np.sum(found / r))

    def add_map_at_r(self, relevant: np.ndarray, r: np.ndarray) -> None:
        """As ``add_recalls``; needs K >= max(r). Positions past a query's own R do not count."""
        position = np.arange(1, relevant.shape[1] + 1)
        relevant = relevant & (position <= r[:, None])
        hits = np.cumsum(relevant, axis=1)
        precision_sum = np.sum(np.where(relevant, hits / position, 0.0), axis=1)
        self.sums["map@r"] += float(np.sum(precision_sum / r))
        self.sums["r_precision"] += float(np.sum(hits[:, -1] / r))


def retrieval_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    ref_emb: np.ndarray | torch.Tensor | None = None,
    ref_labels: np.ndarray | torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
    self_index: np.ndarray | None = None,
) -> dict[str, float | int]:
    """Exact retrieval metrics of ``embeddings`` as queries (definitions in the module docstring).

    Args:
        embeddings: (N, d) float query embeddings (numpy or torch); neighbours are ranked by inner product, so
            pass L2-normalised embeddings for cosine similarity.
        labels: (N,) integer class ids.
        ks: the k's of ``recall@k`` and ``positive_recall@k``.
        ref_emb, ref_labels: an optional separate reference set (M, d) / (M,). Without it the metrics are
            leave-one-out: every query searches all the other embeddings (itself excluded by index). With it,
            queries search the reference set and nothing is excluded (unless ``self_index``).
        device: where the kNN search runs (None: CPU; "auto": a GPU when present).
        backend: kNN backend, "faiss", "torch" or None/"auto" (see ``exact_knn``).
        chunk_size: queries per search chunk (memory knob); None picks one from a memory budget.
        self_index: with ``ref_emb``, (N,) int: the reference row that is query q itself (a query set whose items
            are also in the reference set); that row is left out of q's neighbours and positives, as in
            leave-one-out. Its label must be q's.

    Returns:
        ``{"recall@k": float, "positive_recall@k": float (for each k), "map@r": float, "r_precision": float,
        "num_queries": int, "num_excluded_queries": int}``; metrics are fractions in [0, 1].

    Raises:
        ValueError: shapes or dtypes that do not fit, NaN/inf embeddings, only one of ref_emb/ref_labels
            given, bad ks, no query with a positive (nothing to average), or a ``self_index`` without ``ref_emb``,
            out of range, or pointing at a row of another label.
    """
    ks = _validate_ks(ks)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("give both ref_emb and ref_labels for a separate reference set, or neither for leave-one-out")
    queries = as_float32_matrix(embeddings, "embeddings")
    query_labels = _labels_array(labels, len(queries), "labels")
    leave_one_out = ref_emb is None
    if leave_one_out:
        reference, ref_labels = queries, query_labels
    else:
        reference = as_float32_matrix(ref_emb, "ref_emb")
        ref_labels = _labels_array(ref_labels, len(reference), "ref_labels")
        if reference.shape[1] != queries.shape[1]:
            raise ValueError(f"embeddings have dimension {queries.shape[1]} but ref_emb has {reference.shape[1]}")
    if self_index is not None:
        self_index = _self_index_array(self_index, leave_one_out, query_labels, ref_labels)
    exclude = leave_one_out or self_index is not None  # each query's own row is left out
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    backend = resolve_backend(backend, dev)

    positives = count_positives(query_labels, ref_labels, exclude)
    rows = np.flatnonzero(positives > 0)
    if len(rows) == 0:
        raise ValueError(
            "no query has a positive (every class has a single item, or no query label is in the reference "
            "set): the metrics are undefined"
        )
    available = len(reference) - int(exclude)  # neighbours a query can have
    r = positives[rows]
    depth = first_pass_depth(r, ks[-1], available)
    totals = _Totals(ks)

    def relevance(start: int, indices: np.ndarray, subset: np.ndarray) -> np.ndarray:
        return ref_labels[indices] == query_labels[subset[start : start + len(indices)], None]

    # Pass 1: every query, to `depth`; MAP@R for the queries whose R fits.
    for start, _, indices in iter_knn(queries, rows, reference, depth, exclude, backend, dev, chunk_size, self_index):
        relevant = relevance(start, indices, rows)
        r_chunk = r[start : start + len(indices)]
        totals.add_recalls(relevant, r_chunk)
        fits = r_chunk <= depth
        totals.add_map_at_r(relevant[fits], r_chunk[fits])

    # Pass 2: the queries with R > depth, largest R first, in groups searched to their own largest R.
    deep = np.flatnonzero(r > depth)
    deep = deep[np.argsort(-r[deep], kind="stable")]
    start = 0
    while start < len(deep):
        group_depth = int(r[deep[start]])
        group = deep[start : start + max(1, _SECOND_PASS_BUDGET // group_depth)]
        group_rows = rows[group]
        for s, _, indices in iter_knn(
            queries, group_rows, reference, group_depth, exclude, backend, dev, chunk_size, self_index
        ):
            totals.add_map_at_r(relevance(s, indices, group_rows), r[group[s : s + len(indices)]])
        start += len(group)

    used = len(rows)
    result: dict[str, float | int] = {name: value / used for name, value in totals.sums.items()}
    result["num_queries"] = int(used)
    result["num_excluded_queries"] = int(len(queries) - used)
    return result
