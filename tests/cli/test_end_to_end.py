"""recallk train -> eval -> report through the real CLI on a tiny image folder written by the test."""

import json

import numpy as np
import pytest
import yaml

from recallk.cli.main import main
from tests.helpers.image_folders import write_image_folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    # each class: a coarse colour pattern, items: noisy copies
    return write_image_folder(tmp_path_factory.mktemp("images"), {"train": range(8), "test": range(8, 12)})


def test_train_eval_report(image_folder, tmp_path, capsys):
    args = ["train", "--name", "tiny", "--no-progress", f"runs_dir={tmp_path}", "data.dataset=folder",
            f"data.root={image_folder}", "data.image_size=32", "model.name=resnet10t", "model.embed_dim=16",
            "model.freeze_bn=false", "train.epochs=1", "train.batch_size=16", "train.chunk_size=8",
            "train.device=cpu", "train.lr=1e-3", "eval.pixel_baseline=true", "eval.ks=[1, 2]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "tiny"
    assert "raw pixels" in out and "before training" in out and "after training (epoch 1)" in out
    final = json.loads(out.strip().splitlines()[-1])

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["embed_dim"] == 16 and config["data"]["root"] == str(image_folder)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1]
    assert evals[-1]["recall@1"] == pytest.approx(final["recall@1"])
    stored = np.load(run / "embeddings" / "test.npz")
    assert stored["embeddings"].shape == (16, 16)
    assert np.allclose(np.linalg.norm(stored["embeddings"], axis=1), 1, atol=1e-5)
    assert (run / "report.html").stat().st_size > 10_000

    # eval of the last checkpoint reproduces the run's final evaluation
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test"]["recall@1"] == pytest.approx(final["recall@1"])
    assert result["test"]["map@r"] == pytest.approx(final["map@r"])

    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
