"""Evaluate a query set against a gallery from two embedding files, with the evaluation's metrics."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from recallk.data import DATASET_SPECS
from recallk.evaluation import retrieval_metrics
from recallk.evaluation.metrics import COUNT_KEYS, count_positives
from recallk.retrieval.embed import UNKNOWN_LABEL, EmbeddingFile, read_embeddings
from recallk.retrieval.index import IndexMismatchError


def _has_paths(f: EmbeddingFile) -> bool:
    """Whether the file names its items (``read_embeddings`` fills ``#i`` in when it has no ``paths`` array)."""
    return not all(str(p) == f"#{i}" for i, p in enumerate(f.paths))


def queries_in_gallery(query: EmbeddingFile, gallery: EmbeddingFile) -> tuple[np.ndarray, str]:
    """The gallery row of each query's own copy, ``(Q,)`` int64 (-1: not in the gallery), and how copies were
    found: ``"path"`` (both files name their items: the same path) or ``"bytes"`` (else: the same embedding row,
    byte for byte, with the same label). The first gallery copy counts when the gallery holds an item twice.

    Raises:
        ValueError: a query whose path is in the gallery under another label (its copy cannot be excluded as
            itself: the files disagree on its class).
    """
    own = np.full(len(query.labels), -1, np.int64)
    if _has_paths(query) and _has_paths(gallery):
        rows: dict[str, int] = {}
        for j, p in enumerate(gallery.paths):
            rows.setdefault(str(p), j)
        for i, p in enumerate(query.paths):
            own[i] = rows.get(str(p), -1)
        found = own >= 0
        differ = np.flatnonzero(found)[gallery.labels[own[found]] != query.labels[found]]
        if differ.size:
            i = int(differ[0])
            raise ValueError(
                f"{differ.size} queries are in the gallery under another label (e.g. {query.paths[i]}: label "
                f"{query.labels[i]} in the query file, {gallery.labels[own[i]]} in the gallery file), so their "
                "copies cannot be left out as themselves: embed both files from one dataset (same classes)"
            )
        return own, "path"
    g = np.ascontiguousarray(gallery.embeddings)
    q = np.ascontiguousarray(query.embeddings)
    if g.dtype != q.dtype:
        return own, "bytes"  # float16 and float32 rows are never the same bytes
    keys: dict[tuple[int, bytes], int] = {}
    for j in range(len(g)):
        keys.setdefault((int(gallery.labels[j]), g[j].tobytes()), j)
    for i in range(len(q)):
        own[i] = keys.get((int(query.labels[i]), q[i].tobytes()), -1)
    return own, "bytes"


def _combine(parts: list[dict[str, float | int]]) -> dict[str, float | int]:
    """Metrics of two query groups as one: each metric weighted by its group's ``num_queries``."""
    used = sum(int(p["num_queries"]) for p in parts)
    result: dict[str, float | int] = {
        key: sum(float(p[key]) * int(p["num_queries"]) for p in parts) / used
        for key in parts[0] if key not in COUNT_KEYS
    }
    result.update({key: sum(int(p[key]) for p in parts) for key in COUNT_KEYS})
    return result


def evaluate_embedding_files(
    query: str | os.PathLike,
    gallery: str | os.PathLike,
    ks: Sequence[int] | None = None,
    notice: Callable[[str], None] | None = None,
    **knn: Any,
) -> dict[str, float | int]:
    """``recallk.evaluation.retrieval_metrics`` of the query file's embeddings against the gallery file's
    (``ref_emb``, ``ref_labels``).

    A query that is also in the gallery (:func:`queries_in_gallery`: the same path, or the same embedding row and
    label when the files name no paths; e.g. one file given as both) would find itself first: its own gallery
    copy is left out of its neighbours and positives, as in leave-one-out (``retrieval_metrics``'s
    ``self_index``), and one line says so through ``notice`` (None: ``warnings.warn``). The same file as queries
    and gallery so gives the leave-one-out metrics of that file.

    Args:
        query, gallery: embedding files (``recallk embed``), labelled.
        ks: the k's of recall@k; default: the gallery dataset's evaluation ks, else (1, 2, 4, 8).
        notice: called with the one line about queries found in the gallery.
        knn: ``device``, ``backend``, ``chunk_size`` of the kNN search.

    Raises:
        IndexMismatchError: the two files come from different models (identity or dimension).
        ValueError: unreadable files, unknown labels (an image folder embedded without classes), a query in the
            gallery under another label, or anything ``retrieval_metrics`` rejects.
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
    # functools.partial adds no frame: the warning points at this function's caller, as before
    return evaluate_query_gallery(q, g, ks, notice or partial(warnings.warn, stacklevel=3), **knn)


def evaluate_query_gallery(
    query: EmbeddingFile,
    gallery: EmbeddingFile,
    ks: Sequence[int],
    notice: Callable[[str], None] | None = None,
    **knn: Any,
) -> dict[str, float | int]:
    """``recallk.evaluation.retrieval_metrics`` of ``query``'s embeddings against ``gallery``'s (``ref_emb``,
    ``ref_labels``), each query found in the gallery (:func:`queries_in_gallery`) leaving its own gallery copy out
    of its neighbours and positives, as in leave-one-out, with one line about them through ``notice`` (None:
    ``warnings.warn``); nothing found: plain ``retrieval_metrics``, no line. The rule of both ``recallk eval``
    query/gallery paths: two embedding files (:func:`evaluate_embedding_files`) and two image folders
    (``recallk eval --checkpoint --query --gallery``, items named by their resolved file paths).

    Args:
        query, gallery: labelled items (labels numbered alike in both), their ``paths`` naming them.
        ks: the k's of recall@k.
        notice: called with the one line about queries found in the gallery.
        knn: ``device``, ``backend``, ``chunk_size`` of the kNN search.

    Raises:
        ValueError: a query in the gallery under another label, or anything ``retrieval_metrics`` rejects.
    """
    q, g = query, gallery
    own, how = queries_in_gallery(q, g)
    inside = own >= 0
    if not inside.any():
        return retrieval_metrics(q.float32(), q.labels, ks, ref_emb=g.float32(), ref_labels=g.labels, **knn)
    line = (f"{int(inside.sum())} of {len(own)} queries are also in the gallery (same "
            f"{'path' if how == 'path' else 'embedding and label'}): each one's own gallery copy is left out of its "
            "neighbours and positives, as in leave-one-out")
    if notice is None:
        warnings.warn(line, stacklevel=2)
    else:
        notice(line)
    emb, ref = q.float32(), g.float32()
    parts = []
    for group, self_index in ((np.flatnonzero(inside), own[inside]), (np.flatnonzero(~inside), None)):
        positives = count_positives(q.labels[group], g.labels, self_index is not None)
        if (positives > 0).any():  # a group without a query with a positive adds nothing (counted below)
            parts.append(retrieval_metrics(emb[group], q.labels[group], ks, ref_emb=ref, ref_labels=g.labels,
                                           self_index=self_index, **knn))
        elif len(group):
            parts.append({"num_queries": 0, "num_excluded_queries": len(group)})
    if not any(p["num_queries"] for p in parts):
        return retrieval_metrics(emb[inside], q.labels[inside], ks, ref_emb=ref, ref_labels=g.labels,
                                 self_index=own[inside], **knn)  # raises: no query has a positive
    if len(parts) == 1:
        return parts[0]
    return _combine([p for p in parts if p["num_queries"]]) | {
        key: sum(int(p[key]) for p in parts) for key in COUNT_KEYS}
