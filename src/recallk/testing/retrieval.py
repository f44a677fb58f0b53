"""Slow, obviously-correct float64 versions of the retrieval metrics, for tests only.

Every query's whole database is sorted (decreasing float64 inner product, equal scores by increasing index),
the query's own index is removed in leave-one-out mode, and each metric is computed from its definition with
plain Python loops. Memory and time are O(Q * N): keep Q and N to a few thousand.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _to_numpy(x: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def reference_ranking(
    queries: np.ndarray | torch.Tensor, database: np.ndarray | torch.Tensor, exclude_self: bool
) -> list[np.ndarray]:
    """For each query the full list of database indices, best first (equal scores: smaller index first).

    With ``exclude_self`` (queries are the database) query i's own index i is removed from its list.
    """
    q = _to_numpy(queries, np.float64)
    db = _to_numpy(database, np.float64)
    rankings = []
    for i in range(len(q)):
        scores = db @ q[i]
        order = np.lexsort((np.arange(len(db)), -scores))  # last key is primary: score, then index
        if exclude_self:
            order = order[order != i]
        rankings.append(order)
    return rankings


def reference_knn(
    queries: np.ndarray | torch.Tensor,
    database: np.ndarray | torch.Tensor,
    k: int,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (Q, k) float64, indices (Q, k) int64)``: the first k entries of ``reference_ranking``."""
    q = _to_numpy(queries, np.float64)
    db = _to_numpy(database, np.float64)
    indices = np.stack([r[:k] for r in reference_ranking(q, db, exclude_self)]).astype(np.int64)
    scores = np.stack([db[idx] @ q[i] for i, idx in enumerate(indices)])
    return scores, indices


def reference_retrieval_metrics(
    embeddings: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    ref_emb: np.ndarray | torch.Tensor | None = None,
    ref_labels: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float | int]:
    """The metrics of ``recallk.evaluation.retrieval_metrics``, computed from their definitions.

    For a query q with ranked database labels l_1, l_2, ... and P(q) its positives (same label, q excluded),
    R = |P(q)|; queries with R = 0 are excluded. Then recall@k = [some l_i == label(q), i <= k];
    positive_recall@k = #{i <= k: l_i == label(q)} / R; r_precision = #{i <= R: l_i == label(q)} / R;
    map@r = (1/R) * sum_{i <= R, l_i == label(q)} precision@i, precision@i = #{j <= i: l_j == label(q)} / i.
    A k larger than the database means the whole database.
    """
    q_labels = _to_numpy(labels, np.int64)
    leave_one_out = ref_emb is None
    db = embeddings if leave_one_out else ref_emb
    db_labels = q_labels if leave_one_out else _to_numpy(ref_labels, np.int64)
    rankings = reference_ranking(embeddings, db, exclude_self=leave_one_out)

    totals: dict[str, float] = {f"recall@{k}": 0.0 for k in ks}
    totals.update({f"positive_recall@{k}": 0.0 for k in ks})
    totals.update({"map@r": 0.0, "r_precision": 0.0})
    used = excluded = 0
    for i, ranking in enumerate(rankings):
        relevant = [int(db_labels[j] == q_labels[i]) for j in ranking]
        r = sum(relevant)
        if r == 0:
            excluded += 1
            continue
        used += 1
        for k in ks:
            totals[f"recall@{k}"] += float(any(relevant[:k]))
            totals[f"positive_recall@{k}"] += sum(relevant[:k]) / r
        totals["r_precision"] += sum(relevant[:r]) / r
        average_precision = 0.0
        for position in range(1, r + 1):
            if relevant[position - 1]:
                average_precision += sum(relevant[:position]) / position
        totals["map@r"] += average_precision / r
    result: dict[str, float | int] = {name: value / used for name, value in totals.items()}
    result["num_queries"] = used
    result["num_excluded_queries"] = excluded
    return result
