"""Retrieval examples: exact leave-one-out kNN of chosen queries (``exact_knn(..., exclude_self=True, rows=...)``)
and query selection, against brute-force Python loops."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from recallk.evaluation import exact_knn
from recallk.report import examples
from recallk.report.examples import (
    HIT_RGB,
    MISS_RGB,
    select_queries,
    thumbnail_png,
    to_pil,
)
from tests.helpers.report_runs import clustered_embeddings


def brute_knn(emb: np.ndarray, q: int, k: int) -> list[tuple[int, float]]:
    """All other items sorted by (-score, index) in float64, first k."""
    x = emb.astype(np.float64)
    others = [(j, float(x[q] @ x[j])) for j in range(len(x)) if j != q]
    return sorted(others, key=lambda t: (-t[1], t[0]))[:k]


def brute_first_neighbour(emb: np.ndarray, q: int) -> tuple[int, float]:
    return brute_knn(emb, q, 1)[0]


@pytest.mark.parametrize("k", [1, 3, 7, 29])
def test_knn_with_ties_matches_brute_force(k):
    # entries in {-1, 0, 1}: dot products are small integers, so float32 is exact and ties are everywhere
    rng = np.random.default_rng(1)
    emb = rng.integers(-1, 2, size=(30, 4)).astype(np.float32)
    queries = np.array([0, 5, 29, 5, 13])
    scores, idx = exact_knn(emb, emb, k, exclude_self=True, rows=queries)
    assert idx.shape == scores.shape == (queries.size, k)
    for row, q in enumerate(queries):
        expected = brute_knn(emb, int(q), k)
        assert idx[row].tolist() == [j for j, _ in expected]
        assert scores[row].tolist() == [s for _, s in expected]
        assert q not in idx[row]


def test_knn_random_floats_and_chunking():
    emb, _ = clustered_embeddings(seed=3)
    queries = np.arange(len(emb))
    scores, idx = exact_knn(emb, emb, 5, exclude_self=True, rows=queries, chunk_size=7)  # last chunk partial
    for q in queries:
        expected = brute_knn(emb, int(q), 5)
        assert idx[q].tolist() == [j for j, _ in expected]
        np.testing.assert_allclose(scores[q], [s for _, s in expected], rtol=0, atol=1e-6)


def test_knn_rejects_bad_k():
    emb = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="k must be"):
        exact_knn(emb, emb, 4, exclude_self=True, rows=np.array([0]))
    with pytest.raises(ValueError, match="query indices"):
        exact_knn(emb, emb, 1, exclude_self=True, rows=np.array([4]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_queries_are_the_most_confident_mistakes(seed):
    emb, labels = clustered_embeddings(seed=seed, noise=1.2)
    chosen = select_queries(emb, labels, num_queries=10, top=4, seed=seed)
    firsts = {q: brute_first_neighbour(emb, q) for q in range(len(emb))}
    failures = [q for q, (j, _) in firsts.items() if labels[j] != labels[q]]
    expected_hard = sorted(failures, key=lambda q: (-firsts[q][1], q))[:5]
    assert len(failures) >= 5, "test data must have enough mistakes to be meaningful"
    assert [e.query for e in chosen if e.kind == "hard"] == expected_hard
    random = [e.query for e in chosen if e.kind == "random"]
    assert len(random) == 5 and not set(random) & set(expected_hard) and len(set(random)) == 5
    for e in chosen:
        ref = brute_knn(emb, e.query, 4)
        assert list(e.neighbours) == [j for j, _ in ref]
        assert list(e.hits) == [bool(labels[j] == labels[e.query]) for j, _ in ref]
        np.testing.assert_allclose(e.scores, [s for _, s in ref], atol=1e-6)


def test_random_queries_fill_in_when_few_failures_and_are_seeded():
    emb, labels = clustered_embeddings(seed=0, noise=0.05)  # tight clusters: no mistakes
    chosen = select_queries(emb, labels, num_queries=6, top=3, seed=7)
    assert [e.kind for e in chosen] == ["random"] * 6
    assert all(all(e.hits) for e in chosen)
    again = select_queries(emb, labels, num_queries=6, top=3, seed=7)
    other = select_queries(emb, labels, num_queries=6, top=3, seed=8)
    assert [e.query for e in again] == [e.query for e in chosen]
    assert [e.query for e in other] != [e.query for e in chosen]


def test_singleton_classes_are_never_shown():
    emb, labels = clustered_embeddings(seed=0, noise=1.5)
    labels = labels.copy()
    labels[:4] = [100, 101, 102, 103]  # four classes of one item: their queries cannot be answered
    chosen = select_queries(emb, labels, num_queries=len(labels), top=3)
    shown = {e.query for e in chosen}
    # item 4 is now the only one left of class 0: unanswerable too
    answerable = {q for q in range(len(labels)) if sum(labels == labels[q]) > 1}
    assert 4 not in answerable
    assert shown == answerable


def test_candidate_subset_for_large_n(monkeypatch):
    monkeypatch.setattr(examples, "MAX_CANDIDATE_QUERIES", 10)
    emb, labels = clustered_embeddings(seed=2, noise=1.5)
    chosen = select_queries(emb, labels, num_queries=8, top=2, seed=0)
    hard = [e for e in chosen if e.kind == "hard"]
    assert hard, "some of 10 candidates must be mistakes at this noise level"
    for e in hard:
        assert not e.hits[0]
    scores = [e.scores[0] for e in hard]
    assert scores == sorted(scores, reverse=True)


def test_select_queries_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        select_queries(np.ones((1, 3)), np.zeros(1), 4, 2)
    with pytest.raises(ValueError, match="labels"):
        select_queries(np.ones((3, 3)), np.zeros(2), 4, 2)
    with pytest.raises(ValueError, match=">= 1"):
        select_queries(np.ones((3, 3)), np.zeros(3), 0, 2)


def test_thumbnail_frame_and_size():
    image = Image.new("L", (50, 20), 0)  # black, wide, grey-scale
    png = thumbnail_png(image, 40, MISS_RGB, frame=3)
    thumb = Image.open(io.BytesIO(png)).convert("RGB")
    assert thumb.size == (46, 46)
    for xy in [(0, 0), (45, 45), (1, 20), (20, 44)]:
        assert thumb.getpixel(xy) == MISS_RGB
    assert thumb.getpixel((23, 23)) == (0, 0, 0)  # the picture, centred
    assert thumb.getpixel((23, 4)) == (255, 255, 255)  # padding above the wide picture
    hit = Image.open(io.BytesIO(thumbnail_png(image, 40, HIT_RGB))).convert("RGB")
    assert hit.getpixel((0, 0)) == HIT_RGB


def test_to_pil_accepts_arrays_and_rejects_tensors():
    assert to_pil(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert to_pil(np.zeros((5, 6, 1), np.uint8)).mode == "RGB"
    with pytest.raises(ValueError, match="transform=None"):
        to_pil(np.zeros((3, 5, 6), np.float32))
