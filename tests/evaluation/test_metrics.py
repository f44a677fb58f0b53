"""retrieval_metrics against the brute-force float64 definitions and against pytorch-metric-learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recallk.evaluation import metrics as metrics_module
from recallk.evaluation import retrieval_metrics
from recallk.evaluation.knn import faiss_available
from recallk.testing.retrieval import reference_retrieval_metrics
from tests.helpers.clusters import gaussian_clusters, integer_clusters

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss"))]
KS = (1, 2, 4, 8, 16)


def assert_same_metrics(fast: dict, slow: dict) -> None:
    assert set(fast) == set(slow)
    for name, value in slow.items():
        if name.startswith("num_"):
            assert fast[name] == value, name
        else:
            assert fast[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 13])
def test_leave_one_out_matches_reference(rng, backend, chunk_size):
    x, y = integer_clusters(rng, 300, singletons=4)
    fast = retrieval_metrics(x, y, KS, backend=backend, chunk_size=chunk_size)
    slow = reference_retrieval_metrics(x, y, KS)
    assert fast["num_excluded_queries"] == 4  # the singleton classes have no positive
    assert_same_metrics(fast, slow)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_set_matches_reference(rng, backend):
    db, db_labels = integer_clusters(rng, 200, n_classes=12, singletons=0)
    queries, q_labels = integer_clusters(rng, 90, n_classes=12, singletons=0)
    q_labels[:7] = 99  # a class the database lacks: these queries have no positive
    fast = retrieval_metrics(queries, q_labels, KS, ref_emb=db, ref_labels=db_labels, backend=backend)
    slow = reference_retrieval_metrics(queries, q_labels, KS, ref_emb=db, ref_labels=db_labels)
    assert fast["num_excluded_queries"] == np.isin(q_labels, db_labels, invert=True).sum() >= 7
    assert_same_metrics(fast, slow)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_pass_for_large_classes(rng, backend, monkeypatch):
    # A shallow first pass forces MAP@R of most queries through the second, grouped pass.
    monkeypatch.setattr(metrics_module, "_FIRST_PASS_MAX_DEPTH", 3)
    monkeypatch.setattr(metrics_module, "_SECOND_PASS_BUDGET", 200)
    x, y = integer_clusters(rng, 300, n_classes=6)
    assert np.bincount(y).max() > 20
    assert_same_metrics(retrieval_metrics(x, y, (1, 2), backend=backend), reference_retrieval_metrics(x, y, (1, 2)))


def test_backends_agree(rng):
    if not faiss_available():
        pytest.skip("faiss is not installed")
    for x, y in (integer_clusters(rng, 250), gaussian_clusters(rng, 400)):
        assert retrieval_metrics(x, y, KS, backend="faiss") == retrieval_metrics(x, y, KS, backend="torch")


def test_k_beyond_database_means_whole_database(rng):
    x, y = integer_clusters(rng, 60, n_classes=5, singletons=1)
    result = retrieval_metrics(x, y, (1, 10_000))
    assert result["recall@10000"] == 1.0 and result["positive_recall@10000"] == 1.0
    assert_same_metrics(result, reference_retrieval_metrics(x, y, (1, 10_000)))


def test_hand_computed_example():
    # 1-D database 0.9 (label 1), 0.8 (label 0), 0.7 (label 0), 0.6 (label 2): a positive query ranks it in
    # this order. Queries: two of label 0 (R = 2) and one whose label 5 is not in the database (excluded).
    db = np.array([[0.9], [0.8], [0.7], [0.6]], dtype=np.float32)
    db_labels = np.array([1, 0, 0, 2])
    queries = np.array([[1.0], [0.5], [0.3]], dtype=np.float32)
    result = retrieval_metrics(queries, np.array([0, 0, 5]), (1, 2, 3), ref_emb=db, ref_labels=db_labels)
    assert result["num_queries"] == 2 and result["num_excluded_queries"] == 1
    # Ranked labels 1, 0, 0, 2: first hit at 2; positives found: 0 of 2 at k=1, 1 at k=2, 2 at k=3.
    assert result["recall@1"] == 0.0 and result["recall@2"] == 1.0 and result["recall@3"] == 1.0
    assert result["positive_recall@1"] == 0.0
    assert result["positive_recall@2"] == pytest.approx(0.5)
    assert result["positive_recall@3"] == pytest.approx(1.0)
    # R = 2: the top 2 hold one positive, at position 2 -> r_precision 1/2, map@r = (1/2) * (1/2).
    assert result["r_precision"] == pytest.approx(0.5)
    assert result["map@r"] == pytest.approx(0.25)


def test_ties_use_the_index_rule():
    # Four identical points: leave-one-out, query i ranks the other three by increasing index.
    x = np.ones((4, 3), dtype=np.float32)
    y = np.array([0, 1, 1, 0])
    result = retrieval_metrics(x, y, (1, 2, 3))
    # Query 0 ranks 1, 2, 3 -> labels 1, 1, 0: first hit at 3.  Query 3 ranks 0, 1, 2 -> hit at 1.
    # Query 1 ranks 0, 2, 3 -> labels 0, 1, 0: hit at 2.        Query 2 ranks 0, 1, 3 -> hit at 2.
    assert result["recall@1"] == pytest.approx(1 / 4)
    assert result["recall@2"] == pytest.approx(3 / 4)
    assert result["recall@3"] == pytest.approx(1.0)
    # R = 1 everywhere: r_precision = map@r = recall@1.
    assert result["map@r"] == pytest.approx(1 / 4) and result["r_precision"] == pytest.approx(1 / 4)


def test_torch_inputs_equal_numpy_inputs(rng):
    x, y = integer_clusters(rng, 100)
    assert retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), KS) == retrieval_metrics(x, y, KS)


def test_bad_inputs():
    x = np.eye(6, dtype=np.float32)
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval_metrics(x, np.arange(6))
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(x, np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(x, np.zeros(6))
    with pytest.raises(ValueError, match="ref_labels"):
        retrieval_metrics(x, np.zeros(6, dtype=np.int64), ref_emb=x)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, np.zeros(6, dtype=np.int64), ks=(0, 1))


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_agrees_with_pytorch_metric_learning(rng, leave_one_out):
    faiss = pytest.importorskip("faiss")
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    inference = pytest.importorskip("pytorch_metric_learning.utils.inference")
    x, y = gaussian_clusters(rng, 600)
    calculator = accuracy_calculator.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=inference.FaissKNN(index_init_fn=faiss.IndexFlatIP),
    )
    if leave_one_out:
        ours = retrieval_metrics(x, y, (1,))
        theirs = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    else:
        ours = retrieval_metrics(x[:200], y[:200], (1,), ref_emb=x[200:], ref_labels=y[200:])
        theirs = calculator.get_accuracy(
            torch.from_numpy(x[:200]),
            torch.from_numpy(y[:200]),
            torch.from_numpy(x[200:]),
            torch.from_numpy(y[200:]),
            ref_includes_query=False,
        )
    assert 0.05 < ours["map@r"] < 0.95  # the data is neither trivial nor hopeless
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-9)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-9)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-9)


def test_first_pass_depth_minimises_its_cost_model(rng):
    alpha = metrics_module._DEPTH_COST
    sizes = np.concatenate([rng.integers(2, 60, size=300), [400, 900, 1000]])
    r = np.repeat(sizes, sizes) - 1
    available = len(r) - 1

    def cost(d: int) -> float:  # every query to depth d, then the deeper ones again to their own R
        return len(r) * (1 + alpha * d) + float(np.sum(1 + alpha * r[r > d]))

    for min_depth in (1, 16, 500):
        depth = metrics_module.first_pass_depth(r, min_depth, available)
        best = min(cost(d) for d in range(min_depth, int(r.max()) + 1))
        assert depth >= min_depth and cost(depth) == pytest.approx(best, rel=1e-12)
    assert metrics_module.first_pass_depth(r, 20_000, available) == available  # k beyond the database
