"""The evaluation benchmark's synthetic data, and a small end-to-end run (slow: it starts subprocesses)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recallk_bench import eval as bench_eval


@pytest.mark.parametrize("n", [500, 10_000, 136_093])
def test_class_sizes_are_long_tailed_like_inaturalist(n):
    sizes = bench_eval.class_sizes(n, np.random.default_rng(0))
    assert sizes.sum() == n
    assert sizes.min() >= 1 and sizes.max() <= bench_eval.MAX_CLASS_SIZE
    assert len(sizes) == max(2, round(n / bench_eval.INAT_MEAN_CLASS_SIZE))
    assert sizes.max() > 3 * np.median(sizes)  # a long tail, not equal classes


def test_embeddings_are_normalised_and_labelled():
    x, y = bench_eval.make_embeddings(700, 16, seed=3)
    assert x.shape == (700, 16) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(
        np.sort(np.bincount(y)), np.sort(bench_eval.class_sizes(700, np.random.default_rng(3)))
    )


@pytest.mark.slow
def test_small_run_agrees_with_pml(tmp_path, capsys):
    pytest.importorskip("pytorch_metric_learning")
    out = tmp_path / "runs.json"
    assert bench_eval.main(["--sizes", "800", "--dim", "32", "--json-out", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    for ours_name, pml_name in bench_eval.COMPARED:
        assert record["ours"]["metrics"][ours_name] == pytest.approx(record["pml"]["metrics"][pml_name], abs=1e-6)
    assert "| 800 |" in capsys.readouterr().out
