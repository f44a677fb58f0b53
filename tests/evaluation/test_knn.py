"""exact_knn against the brute-force float64 ranking, the tie rule, self exclusion and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recallk.evaluation import exact_knn
from recallk.evaluation.knn import faiss_available
from recallk.testing.retrieval import reference_knn
from tests.helpers.clusters import gaussian_clusters, integer_clusters

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_matches_reference_on_tied_data(rng, backend, exclude_self, chunk_size):
    x, _ = integer_clusters(rng, 250)
    n = len(x)
    for k in (1, 2, 5, 40, n - 2, n - 1):
        scores, indices = exact_knn(x, x, k, exclude_self=exclude_self, backend=backend, chunk_size=chunk_size)
        ref_scores, ref_indices = reference_knn(x, x, k, exclude_self=exclude_self)
        assert scores.dtype == np.float32 and indices.dtype == np.int64
        assert scores.shape == indices.shape == (n, k)
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_array_equal(scores, ref_scores)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_database_and_full_depth(rng, backend):
    db, _ = integer_clusters(rng, 120)
    queries, _ = integer_clusters(rng, 60)
    for k in (1, 3, len(db)):  # k == N: the whole database, sorted by the rule
        _, indices = exact_knn(queries, db, k, backend=backend)
        np.testing.assert_array_equal(indices, reference_knn(queries, db, k)[1])


def test_backends_agree_on_continuous_data(rng):
    if not faiss_available():
        pytest.skip("faiss is not installed")
    x, _ = gaussian_clusters(rng, 400)
    a = exact_knn(x, x, 30, exclude_self=True, backend="faiss")
    b = exact_knn(x, x, 30, exclude_self=True, backend="torch", chunk_size=33)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_rule_on_duplicates(backend):
    # Items 0..5 identical, 6 orthogonal to them, 7 half of them. For a query among 0..5 the scores are
    # 1 (items 0..5, itself included), 0.5 (item 7), 0 (item 6).
    x = np.array([[1, 0]] * 6 + [[0, 1], [0.5, 0]], dtype=np.float32)
    _, idx = exact_knn(x[3:4], x, 8, backend=backend)
    np.testing.assert_array_equal(idx[0], [0, 1, 2, 3, 4, 5, 7, 6])  # equal scores by increasing index
    _, idx = exact_knn(x[3:4], x, 2, backend=backend)
    np.testing.assert_array_equal(idx[0], [0, 1])  # a tie across the k boundary: the smallest indices win
    # Self exclusion by index: query 3, k=4 takes 0..4 and drops its own index 3, wherever it sits.
    _, idx = exact_knn(x, x, 4, exclude_self=True, backend=backend)
    np.testing.assert_array_equal(idx[3], [0, 1, 2, 4])
    # Query 5, k=2: its 3 best are 0, 1, 2 and it is not among them: the last is dropped, not the first.
    _, idx = exact_knn(x, x, 2, exclude_self=True, backend=backend)
    np.testing.assert_array_equal(idx[5], [0, 1])
    # Query 7 scores 0.5 with 0..5, 0.25 with itself, 0 with 6.
    np.testing.assert_array_equal(idx[7], [0, 1])


def test_accepts_torch_tensors(rng):
    x, _ = integer_clusters(rng, 80)
    a = exact_knn(torch.from_numpy(x), torch.from_numpy(x), 4, exclude_self=True, backend="torch")
    b = exact_knn(x, x, 4, exclude_self=True, backend="torch")
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 10}, "k must be"),  # 10 items, self excluded: at most 9
        ({"k": 2, "backend": "annoy"}, "unknown kNN backend"),
    ],
)
def test_bad_arguments(kwargs, message):
    x = np.eye(10, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        exact_knn(x, x, exclude_self=True, **kwargs)


def test_bad_inputs():
    x = np.eye(10, dtype=np.float32)
    with pytest.raises(ValueError, match="dimension"):
        exact_knn(x, x[:, :5], 2)
    with pytest.raises(ValueError, match="NaN"):
        exact_knn(np.full((3, 2), np.nan, np.float32), x[:, :2], 2)
    with pytest.raises(ValueError, match="exclude_self"):
        exact_knn(x[:4], x, 2, exclude_self=True)
    with pytest.raises(ValueError, match="2-D"):
        exact_knn(x[0], x, 2)
