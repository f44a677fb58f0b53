"""Float64 brute force of the revisited Oxford/Paris metrics, written from the definition (revisitop's compute_map:
junk removed from the ranking, trapezoid AP, mP@k with k cut at the last positive), and the comparison of two metric
dicts (NaN where a protocol has no query)."""

from __future__ import annotations

import numpy as np
import pytest


def brute_force_query(ranking, positives, junk, ks):
    """Walk the junk-free ranking once, in float64: (AP, [precision@k])."""
    junk, positives = set(int(i) for i in junk), set(int(i) for i in positives)
    kept = [int(i) for i in ranking if int(i) not in junk]
    n = len(positives)
    ap, hits, ranks = 0.0, 0, []
    for r, item in enumerate(kept):
        if item in positives:
            before = 1.0 if r == 0 else hits / r
            hits += 1
            after = hits / (r + 1)
            ap += (before + after) / 2.0 / n
            ranks.append(r + 1)
    precisions = []
    for k in ks:
        cut = min(max(ranks), k)
        precisions.append(sum(1 for r in ranks if r <= cut) / cut)
    return ap, precisions


def brute_force(rankings, ground_truth, ks):
    """Every protocol's means over its queries with a positive, by the protocol table of the paper."""
    out = {}
    for protocol in ("easy", "medium", "hard"):
        aps, precisions = [], []
        for ranking, g in zip(rankings, ground_truth):
            easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g["junk"])
            positives, ignored = {
                "easy": (easy, junk + hard),
                "medium": (easy + hard, junk),
                "hard": (hard, junk + easy),
            }[protocol]
            if not positives:
                continue
            ap, p = brute_force_query(ranking, positives, ignored, ks)
            aps.append(ap)
            precisions.append(p)
        out[f"map_{protocol}"] = float(np.mean(aps)) if aps else float("nan")
        for j, k in enumerate(ks):
            out[f"mp@{k}_{protocol}"] = float(np.mean([p[j] for p in precisions])) if aps else float("nan")
        out[f"num_skipped_{protocol}"] = len(ground_truth) - len(aps)
    out["num_queries"] = len(ground_truth)
    return out


def assert_same(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        if isinstance(value, float) and np.isnan(value):
            assert np.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, abs=1e-9, rel=0), name
