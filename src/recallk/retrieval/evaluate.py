"""Evaluate a query set against a gallery from two embedding files, with the evaluation's metrics."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from recallk.data import DATASET_SPECS
from recallk.evaluation import retrieval_metrics
from recallk.retrieval.embed import UNKNOWN_LABEL, read_embeddings
from recallk.retrieval.index import IndexMismatchError


def evaluate_embedding_files(
    query: str | os.PathLike, gallery: str | os.PathLike, ks: Sequence[int] | None = None, **knn: Any
) -> dict[str, float | int]:
    """``recallk.evaluation.retrieval_metrics`` of the query file's embeddings against the gallery file's
    (``ref_emb``, ``ref_labels``: nothing excluded).

    Args:
        query, gallery: embedding files (``recallk embed``), labelled.
        ks: the k's of recall@k; default: the gallery dataset's evaluation ks, else (1, 2, 4, 8).
        knn: ``device``, ``backend``, ``chunk_size`` of the kNN search.

    Raises:
        IndexMismatchError: the two files come from different models (identity or dimension).
        ValueError: unreadable files, unknown labels (an image folder embedded without classes), or anything
            ``retrieval_metrics`` rejects.
    """
    q, g = read_embeddings(query), read_embeddings(gallery)
    if q.model_id != g.model_id or q.embeddings.shape[1] != g.embeddings.shape[1]:
        raise IndexMismatchError(
            f"{query} (model {str(q.model_id)[:12]}, d={q.embeddings.shape[1]}) and {gallery} (model "
            f"{str(g.model_id)[:12]}, d={g.embeddings.shape[1]}) come from different models: embed both with one"
        )
    for name, f in ((query, q), (gallery, g)):
        if (f.labels == UNKNOWN_LABEL).any():
            raise ValueError(f"{name} has items without labels: embed a labelled dataset (--dataset, e.g. folder)")
    if q.classes and g.classes and q.classes != g.classes:
        raise ValueError(f"{query} and {gallery} number their classes differently (class lists differ); embed "
                         "them from one dataset's splits or from folders with the same class folders")
    if ks is None:
        name = (g.metadata.get("source") or {}).get("dataset")
        ks = DATASET_SPECS[name].eval_ks if name in DATASET_SPECS else (1, 2, 4, 8)
    return retrieval_metrics(q.float32(), q.labels, ks, ref_emb=g.float32(), ref_labels=g.labels, **knn)
