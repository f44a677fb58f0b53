"""The table `recallk train` prints: trained model first, then raw pixels, the gain over them, then untrained."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from recallk.cli.run import GAIN_COLUMN, comparison_rows
from recallk.config import load_config
from tests.helpers.image_folders import write_image_folder


@pytest.fixture
def tiny_run(tmp_path):
    root = write_image_folder(tmp_path / "images", {"test": range(3)}, per_class=3, grid=4, cell=(4, 4),
                              channels=None, noise=0.3, class_name="class{}")
    run = tmp_path / "run"
    run.mkdir()
    evals = [{"kind": "eval", "epoch": e, "step": e, "time": 0.0, "split": "test", "recall@1": r1, "recall@2": 0.9,
              "map@r": m, "r_precision": 0.5, "positive_recall@1": 0.1, "num_queries": 9}
             for e, r1, m in ((0, 0.25, 0.125), (2, 0.875, 0.625))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    config = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.image_size=16",
                                "eval.pixel_baseline=true", "eval.ks=[1, 2]"])
    return run, root, config


def brute_pixel_recall_at_1(root) -> float:
    """float64 leave-one-out recall@1 of the grey pixels, L2-normalised, written independently of recallk."""
    files = sorted(root.glob("test/*/*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float64).ravel() for f in files])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([f.parent.name for f in files])
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(labels[sim.argmax(1)] == labels))


def test_columns_lead_with_the_trained_model_and_the_gain_over_raw_pixels(tiny_run):
    run, root, config = tiny_run
    rows = comparison_rows(config, run)
    assert list(rows) == ["after training (epoch 2)", "raw pixels", GAIN_COLUMN, "before training"]
    raw = rows["raw pixels"]
    assert raw["recall@1"] == pytest.approx(brute_pixel_recall_at_1(root))
    for key in ("recall@1", "recall@2", "map@r", "r_precision"):
        assert rows[GAIN_COLUMN][key] == pytest.approx(rows["after training (epoch 2)"][key] - raw[key])
    assert "positive_recall@1" not in rows[GAIN_COLUMN] and "num_queries" not in rows["raw pixels"]
    saved = np.load(run / "embeddings" / "raw_pixels" / "test.npz")
    assert saved["embeddings"].shape == (9, 16 * 16) and saved["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not list((run / "embeddings" / "raw_pixels").glob("*.tmp*"))


def test_without_pixel_baseline_no_raw_or_gain_column(tiny_run):
    run, _, config = tiny_run
    config["eval"]["pixel_baseline"] = False
    assert list(comparison_rows(config, run)) == ["after training (epoch 2)", "before training"]
    assert not (run / "embeddings").exists()
