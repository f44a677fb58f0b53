"""Retrieval examples for the report: leave-one-out neighbours, query selection and framed thumbnails."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from recallk.evaluation.knn import iter_knn, resolve_backend

HIT_RGB = (34, 139, 34)  # neighbour of the query's class
MISS_RGB = (220, 20, 60)  # neighbour of another class
QUERY_RGB = (40, 90, 200)
# Above this many items the hardest failures are looked for among a seeded random subset of queries, so the
# report costs O(MAX_CANDIDATE_QUERIES * N * d) instead of O(N^2 * d).
MAX_CANDIDATE_QUERIES = 2048


@dataclass(frozen=True)
class Example:
    """One query row of the grid: dataset indices and scores of its neighbours, best first."""

    query: int
    neighbours: tuple[int, ...]
    scores: tuple[float, ...]
    hits: tuple[bool, ...]
    kind: str  # "random" or "hard"


def leave_one_out_knn(
    embeddings: np.ndarray, queries: np.ndarray, k: int, chunk_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product k nearest neighbours of ``embeddings[queries]``, the query itself excluded.

    Args:
        embeddings: (N, d) float array.
        queries: (Q,) int array of row indices into ``embeddings``.
        k: neighbours per query, 1 <= k <= N - 1.
        chunk_size: queries per search chunk; None picks one from a memory budget.

    Returns:
        (indices (Q, k) int64, scores (Q, k) float32), ordered by decreasing score; equal scores are ordered
        by increasing index, so the result is deterministic. The query's own row is excluded by index.
        The search is ``recallk.evaluation.knn.iter_knn`` on the CPU, the one the metrics use.

    Raises:
        ValueError: k out of range or a query index out of range.
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.int64).reshape(-1)
    n = emb.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    if queries.size and (queries.min() < 0 or queries.max() >= n):
        raise ValueError(f"query indices must be in [0, {n - 1}]")
    out_idx = np.empty((queries.size, k), dtype=np.int64)
    out_score = np.empty((queries.size, k), dtype=np.float32)
    backend = resolve_backend(None, torch.device("cpu"))
    for start, scores, indices in iter_knn(emb, queries, emb, k, True, backend, chunk_size=chunk_size):
        out_idx[start : start + len(indices)] = indices
        out_score[start : start + len(scores)] = scores
    return out_idx, out_score


def select_queries(
    embeddings: np.ndarray, labels: np.ndarray, num_queries: int, top: int, seed: int = 0
) -> list[Example]:
    """Pick the queries shown in the report and their ``top`` neighbours.

    ``num_queries // 2`` are the hardest failures: queries whose first neighbour has another label, highest
    first-neighbour score first (the most confident mistakes). The rest are drawn at random (seeded) from the
    other queries; when there are too few failures, random queries fill the gap. Queries whose class has no
    other item are never shown (they cannot be answered, and the metrics exclude them too) unless no query has
    a positive at all. With N > MAX_CANDIDATE_QUERIES, failures are looked for among a seeded random subset.

    Args:
        embeddings: (N, d) float array; labels: (N,) int array.

    Returns:
        Examples, hard ones first (kind "hard"), then random ones (kind "random").

    Raises:
        ValueError: shapes disagree, N < 2, or num_queries / top < 1.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != labels.shape[0]:
        raise ValueError(f"embeddings must be (N, d) and labels (N,), got {emb.shape} and {labels.shape}")
    n = emb.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings for retrieval examples, got {n}")
    if num_queries < 1 or top < 1:
        raise ValueError(f"num_queries and top must be >= 1, got {num_queries} and {top}")
    top = min(top, n - 1)
    rng = np.random.default_rng(seed)

    eligible = answerable(labels)
    candidates = eligible
    if candidates.size > MAX_CANDIDATE_QUERIES:
        candidates = np.sort(rng.choice(candidates, MAX_CANDIDATE_QUERIES, replace=False))

    first_idx, first_score = leave_one_out_knn(emb, candidates, 1)
    wrong = labels[first_idx[:, 0]] != labels[candidates]
    failures, failure_scores = candidates[wrong], first_score[wrong, 0]
    order = np.lexsort((failures, -failure_scores))  # highest score first, ties by index
    hard = failures[order][: num_queries // 2]

    rest = np.setdiff1d(eligible, hard)
    n_random = min(num_queries - hard.size, rest.size)
    random = rng.choice(rest, n_random, replace=False) if n_random else np.empty(0, dtype=np.int64)

    chosen = np.concatenate([hard, random]).astype(np.int64)
    kinds = ["hard"] * hard.size + ["random"] * random.size
    idx, scores = leave_one_out_knn(emb, chosen, top)
    return [
        Example(
            query=int(q),
            neighbours=tuple(int(j) for j in idx[i]),
            scores=tuple(float(s) for s in scores[i]),
            hits=tuple(bool(labels[j] == labels[q]) for j in idx[i]),
            kind=kind,
        )
        for i, (q, kind) in enumerate(zip(chosen, kinds))
    ]


def answerable(labels: np.ndarray) -> np.ndarray:
    """Indices of the items whose class has another item (all items when no class has two), int64 (M,)."""
    labels = np.asarray(labels).reshape(-1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts[inverse] > 1)
    return eligible if eligible.size else np.arange(labels.size)


def to_pil(image: Any) -> Image.Image:
    """Convert a dataset image (PIL image, or HxW / HxWxC uint8 array) to an RGB PIL image.

    Raises:
        ValueError: anything else (e.g. a normalised tensor: pass the dataset without a transform).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image) if isinstance(image, np.ndarray) else None
    if (
        array is not None
        and array.dtype == np.uint8
        and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)))
    ):
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).convert("RGB")
    raise ValueError(
        f"dataset images must be PIL images or uint8 arrays, got {type(image).__name__}; "
        "build the dataset with transform=None for the report"
    )


def thumbnail_png(image: Any, size: int, frame_rgb: tuple[int, int, int], frame: int = 5) -> bytes:
    """PNG bytes of ``image`` fitted (aspect kept) in a white ``size`` x ``size`` square inside a solid frame.

    The result is (size + 2 * frame) pixels square; the frame has colour ``frame_rgb``.
    """
    picture = ImageOps.pad(to_pil(image), (size, size), color=(255, 255, 255))
    framed = ImageOps.expand(picture, border=frame, fill=frame_rgb)
    buffer = io.BytesIO()
    framed.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def class_name(label: int, classes: Sequence[str] | None) -> str:
    """``classes[label]`` when available, else the label number."""
    if classes is not None and 0 <= label < len(classes):
        return str(classes[label])
    return str(label)
