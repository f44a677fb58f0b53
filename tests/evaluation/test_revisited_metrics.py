"""Revisited Oxford/Paris metrics against a float64 brute force written from the definition (revisitop's
compute_map: junk removed from the ranking, trapezoid AP, mP@k with k cut at the last positive)."""

from __future__ import annotations

import numpy as np
import pytest

from recallk.evaluation import revisited_map, revisited_metrics
from recallk.evaluation.revisited import revisited_metric_names
from recallk.testing.retrieval import reference_ranking
from tests.helpers.revisited import assert_same, brute_force

KS = (1, 5, 10)


def random_ground_truth(rng, n_queries, n_database, empty_every=4):
    gnd = []
    for q in range(n_queries):
        ids = rng.permutation(n_database)
        sizes = rng.integers(1, 8, size=3)
        easy, hard, junk = np.split(ids[: sizes.sum()], np.cumsum(sizes)[:2])
        if q % empty_every == 1:
            hard = hard[:0]  # no hard positive: skipped in Hard
        if q % empty_every == 2:
            easy = easy[:0]  # no easy positive: in Easy its positives (the hard ones) are all junk, skipped
        gnd.append({"easy": easy, "hard": hard, "junk": junk})
    return gnd


def test_hand_made_rankings_with_known_answers():
    # database 0..5; query 0: easy {0, 2}, nothing else; ranking 0, 1, 2, ...
    # AP = 1/2 * (1 + 1)/2 + 1/2 * (1/2 + 2/3)/2 = 19/24; mP@1 = 1; mP@5: k cut to the last positive's rank 3: 2/3.
    # query 1: easy {4}, junk {5}, hard {}; ranking 5, 3, 4, ...: junk-free 3, 4: AP = (0/1 + 1/2)/2 = 1/4,
    # mP@1 = 0, mP@5 = mP@10 = 1/2 (k cut to 2). Hard: no positive, skipped.
    # query 2: hard {1}, easy {}, junk {0}: Easy skipped (its only positive is junk there); ranking 0, 1: Medium
    # and Hard AP = 1 (the junk 0 is removed), mP@k = 1.
    ranks = np.array([[0, 1, 2, 3, 4, 5], [5, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    gnd = [
        {"easy": [0, 2], "hard": [], "junk": []},
        {"easy": [4], "hard": [], "junk": [5]},
        {"easy": [], "hard": [1], "junk": [0]},
    ]
    got = revisited_map(ranks, gnd, KS)
    assert got["map_easy"] == pytest.approx((19 / 24 + 1 / 4) / 2, abs=1e-12)
    assert got["map_medium"] == pytest.approx((19 / 24 + 1 / 4 + 1) / 3, abs=1e-12)
    assert got["map_hard"] == pytest.approx(1.0, abs=1e-12)
    assert got["mp@1_medium"] == pytest.approx(2 / 3, abs=1e-12)
    assert got["mp@5_medium"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3, abs=1e-12)
    assert (got["num_skipped_easy"], got["num_skipped_medium"], got["num_skipped_hard"]) == (1, 0, 2)
    assert_same(got, brute_force(ranks, gnd, KS))


def test_random_rankings_match_the_brute_force(rng):
    n_queries, n_database = 24, 60
    gnd = random_ground_truth(rng, n_queries, n_database)
    ranks = np.stack([rng.permutation(n_database) for _ in range(n_queries)])
    expected = brute_force(ranks, gnd, KS)
    assert expected["num_skipped_easy"] > 0 and expected["num_skipped_hard"] > 0
    assert_same(revisited_map(ranks, gnd, KS), expected)


def test_a_protocol_without_any_positive_is_nan():
    gnd = [{"easy": [1], "hard": [], "junk": [0]}]
    got = revisited_map(np.array([[0, 1, 2]]), gnd, (1,))
    assert np.isnan(got["map_hard"]) and got["num_skipped_hard"] == 1
    assert got["map_easy"] == 1.0 and got["mp@1_easy"] == 1.0


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_embeddings_rank_as_the_float64_reference(rng, chunk_size):
    n_queries, n_database, dim = 12, 50, 8
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    database = rng.standard_normal((n_database, dim)).astype(np.float32)
    gnd = random_ground_truth(rng, n_queries, n_database - 10)  # the last 10 rows are distractors
    rankings = reference_ranking(queries, database, exclude_self=False)
    expected = brute_force(rankings, gnd, KS)
    assert_same(revisited_metrics(queries, database, gnd, KS, chunk_size=chunk_size), expected)
    assert_same(revisited_map(np.stack(rankings), gnd, KS), expected)


def test_equal_scores_rank_by_database_index(rng):
    # small integers: every score is exact in float32, and many are equal
    queries = rng.integers(0, 2, size=(10, 4)).astype(np.float32)
    database = rng.integers(0, 2, size=(40, 4)).astype(np.float32)
    gnd = random_ground_truth(rng, 10, 40)
    rankings = reference_ranking(queries, database, exclude_self=False)  # ties: smaller index first
    expected = brute_force(rankings, gnd, KS)
    for chunk_size in (None, 6):
        assert_same(revisited_metrics(queries, database, gnd, KS, chunk_size=chunk_size), expected)


def test_metric_names_and_order():
    names = revisited_metric_names((1, 5))
    assert names[:3] == ("map_easy", "map_medium", "map_hard")
    assert names[3:5] == ("mp@1_easy", "mp@5_easy") and names[-1] == "num_skipped_hard"


def test_bad_input_is_refused():
    gnd = [{"easy": [0], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match="permutation"):
        revisited_map(np.array([[0, 0, 1]]), gnd)
    with pytest.raises(ValueError, match="entries but there are 2 queries"):
        revisited_map(np.array([[0, 1, 2], [2, 1, 0]]), gnd)
    with pytest.raises(ValueError, match=r"indices in \[0, 2\]"):
        revisited_map(np.array([[0, 1, 2]]), [{"easy": [3], "hard": [], "junk": []}])
    with pytest.raises(ValueError, match="lacks 'junk'"):
        revisited_map(np.array([[0, 1, 2]]), [{"easy": [0], "hard": []}])
    with pytest.raises(ValueError, match="ks"):
        revisited_map(np.array([[0, 1, 2]]), gnd, ks=(0,))
    with pytest.raises(ValueError, match="dimension"):
        revisited_metrics(np.ones((1, 3)), np.ones((3, 4)), gnd)
    with pytest.raises(ValueError, match="NaN"):
        revisited_metrics(np.full((1, 3), np.nan), np.ones((3, 3)), gnd)
