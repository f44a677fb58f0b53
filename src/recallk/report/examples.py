"""Retrieval examples for the report: leave-one-out neighbours, query selection and framed thumbnails."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from recallk.evaluation.knn import exact_knn

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

    first_score, first_idx = exact_knn(emb, emb, 1, exclude_self=True, rows=candidates)
    wrong = labels[first_idx[:, 0]] != labels[candidates]
    failures, failure_scores = candidates[wrong], first_score[wrong, 0]
    order = np.lexsort((failures, -failure_scores))  # highest score first, ties by index
    hard = failures[order][: num_queries // 2]

    rest = np.setdiff1d(eligible, hard)
    n_random = min(num_queries - hard.size, rest.size)
    random = rng.choice(rest, n_random, replace=False) if n_random else np.empty(0, dtype=np.int64)

    chosen = np.concatenate([hard, random]).astype(np.int64)
    kinds = ["hard"] * hard.size + ["random"] * random.size
    scores, idx = exact_knn(emb, emb, top, exclude_self=True, rows=chosen)
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


# Above this many answerable items the model-vs-baseline comparison uses a seeded random subset of queries.
MAX_COMPARE_QUERIES = 10_000


@dataclass(frozen=True)
class Comparison:
    """First-neighbour outcome (leave-one-out) of the same queries under two embeddings of the same items.

    Attributes:
        queries: (M,) int64 item indices compared (all answerable items, or a seeded sample of them).
        model_hit, baseline_hit: (M,) bool, whether the nearest other item has the query's class.
        sampled: True when ``queries`` is a random subset of the answerable items.
    """

    queries: np.ndarray
    model_hit: np.ndarray
    baseline_hit: np.ndarray
    sampled: bool

    @property
    def fixed(self) -> np.ndarray:
        """Queries the baseline got wrong and the model got right, (K,) int64."""
        return self.queries[self.model_hit & ~self.baseline_hit]

    @property
    def broken(self) -> np.ndarray:
        """Queries the baseline got right and the model got wrong, (K,) int64."""
        return self.queries[~self.model_hit & self.baseline_hit]

    def counts(self) -> dict[str, int]:
        """``{"queries", "both right", "fixed", "broken", "both wrong"}`` query counts."""
        m, b = self.model_hit, self.baseline_hit
        return {"queries": int(m.size), "both right": int((m & b).sum()), "fixed": int((m & ~b).sum()),
                "broken": int((~m & b).sum()), "both wrong": int((~m & ~b).sum())}


def compare_first_neighbours(
    model_embeddings: np.ndarray, baseline_embeddings: np.ndarray, labels: np.ndarray, seed: int = 0,
    max_queries: int = MAX_COMPARE_QUERIES,
) -> Comparison:
    """Which queries each embedding answers right at rank 1 (exact inner-product kNN, the query left out).

    Used by the report to show what training changed against a baseline (raw pixels): the fraction of
    ``model_hit`` over all answerable queries is the model's recall@1 (``recallk.evaluation.retrieval_metrics``
    up to ties of the first-neighbour score).

    Args:
        model_embeddings: (N, d1) float array; baseline_embeddings: (N, d2) float array of the same N items;
        labels: (N,) int array. The dimensions may differ.
        seed: draws the query subset when more than ``max_queries`` items are answerable.

    Raises:
        ValueError: row counts disagree, N < 2, or ``max_queries < 1``.
    """
    labels = np.asarray(labels).reshape(-1)
    model = np.ascontiguousarray(model_embeddings, dtype=np.float32)
    base = np.ascontiguousarray(baseline_embeddings, dtype=np.float32)
    if model.ndim != 2 or base.ndim != 2 or not model.shape[0] == base.shape[0] == labels.shape[0]:
        raise ValueError(f"model embeddings (N, d1), baseline embeddings (N, d2) and labels (N,) must have the same "
                         f"N, got {model.shape}, {base.shape} and {labels.shape}")
    if labels.shape[0] < 2:
        raise ValueError(f"need at least 2 items to compare first neighbours, got {labels.shape[0]}")
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    queries = answerable(labels)
    sampled = queries.size > max_queries
    if sampled:
        queries = np.sort(np.random.default_rng(seed).choice(queries, max_queries, replace=False))
    hits = []
    for emb in (model, base):
        _, idx = exact_knn(emb, emb, 1, exclude_self=True, rows=queries)
        hits.append(labels[idx[:, 0]] == labels[queries])
    return Comparison(queries.astype(np.int64), hits[0], hits[1], sampled)


def changed_examples(
    model_embeddings: np.ndarray, baseline_embeddings: np.ndarray, labels: np.ndarray, queries: np.ndarray,
    num: int, top: int, seed: int = 0, kind: str = "changed",
) -> list[tuple[Example, Example]]:
    """Up to ``num`` of ``queries`` drawn at random (seeded), each with its ``top`` neighbours under the model
    and under the baseline: ``[(model example, baseline example)]`` in query order.

    Raises:
        ValueError: num or top < 1, or row counts disagree.
    """
    if num < 1 or top < 1:
        raise ValueError(f"num and top must be >= 1, got {num} and {top}")
    labels = np.asarray(labels).reshape(-1)
    queries = np.asarray(queries, dtype=np.int64).reshape(-1)
    if queries.size > num:
        queries = np.sort(np.random.default_rng(seed).choice(queries, num, replace=False))
    if queries.size == 0:
        return []
    pairs = []
    for emb in (model_embeddings, baseline_embeddings):
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.shape[0] != labels.shape[0]:
            raise ValueError(f"embeddings have {emb.shape[0]} rows but labels {labels.shape[0]}")
        k = min(top, emb.shape[0] - 1)
        scores, idx = exact_knn(emb, emb, k, exclude_self=True, rows=queries)
        pairs.append([
            Example(query=int(q), neighbours=tuple(int(j) for j in idx[i]), scores=tuple(float(s) for s in scores[i]),
                    hits=tuple(bool(labels[j] == labels[q]) for j in idx[i]), kind=kind)
            for i, q in enumerate(queries)
        ])
    return list(zip(pairs[0], pairs[1]))
