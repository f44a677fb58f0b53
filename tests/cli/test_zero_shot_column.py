"""A training run from pretrained weights shows a "pretrained, zero-shot" column (the network as it is: its own
embedding, no head, no training) in the table ``recallk train`` prints and in report.html; a run from random weights
shows none. The column's numbers are checked against timm's own forward of the weights file and the float64
metrics of recallk.testing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import timm
import torch

from recallk.cli.main import main
from recallk.cli.run import ZERO_SHOT_COLUMN
from recallk.data import build_dataset
from recallk.data.transforms import transforms_for_model
from recallk.evaluation import pretrained_embedding_model
from recallk.run_folder import RunFolder, read_embeddings_npz
from recallk.testing.retrieval import reference_retrieval_metrics
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides
from tests.helpers.weight_files import save_timm_weights

KS = (1, 2)
TINY = tiny_overrides("folder", "train.epochs=1", "train.max_steps_per_epoch=2", "train.tensorboard=false")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``train/`` of 8 classes and ``test/`` of 4 other classes, 4 noisy images each."""
    return write_image_folder(tmp_path_factory.mktemp("data"), {"train": range(8), "test": range(8, 12)},
                              per_class=4, noise=0.6)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A resnet10t's weights (random, with its classifier) in a timm checkpoint file: the run's "pretrained" start."""
    return save_timm_weights(tmp_path_factory.mktemp("weights"), "resnet10t", num_classes=5, seed=1)


def train(capsys, runs, data, *changes):
    assert main(["train", "--name", "r", f"runs_dir={runs}", f"data.root={data}", *TINY, *changes]) == 0
    out = capsys.readouterr().out
    return out, runs / "r"


def table_columns(out: str) -> list[str]:
    """The column names of the final table (its header line: ``metric (%)`` then names separated by 2+ spaces)."""
    header = next(line for line in out.splitlines() if line.startswith("metric (%)"))
    return re.split(r"\s{2,}", header.strip())[1:]


def test_a_pretrained_start_shows_the_zero_shot_column_in_the_table_and_the_report(tmp_path, data, weights, capsys):
    out, run = train(capsys, tmp_path / "runs", data, f"model.pretrained={weights}")
    columns = table_columns(out)
    assert ZERO_SHOT_COLUMN in columns and columns.index(ZERO_SHOT_COLUMN) == columns.index("before training") - 1
    assert "zero-shot    the pretrained network as it is" in (run / "train.log").read_text()

    # the file: the network as it is on the test split, with the run's test transform
    embeddings, labels = read_embeddings_npz(RunFolder(run).zero_shot("test"))
    reference = timm.create_model("resnet10t", num_classes=0)  # timm's own pooled features, no head of ours
    reference.load_state_dict({k: v for k, v in torch.load(weights).items() if not k.startswith("fc.")})
    tf = transforms_for_model(pretrained_embedding_model("resnet10t", False, image_size=32), "test",
                              dataset="folder", image_size=32)
    test_set = build_dataset("folder", data, "test", tf)
    with torch.no_grad():
        expected = reference.eval()(torch.stack([test_set[i][0] for i in range(len(test_set))])).double()
    expected = (expected / expected.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    assert labels.tolist() == test_set.labels.tolist()

    # the printed column: the float64 metrics of those embeddings
    metrics = reference_retrieval_metrics(expected, test_set.labels, KS)
    row = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("recall@", "map@r"))}
    at = columns.index(ZERO_SHOT_COLUMN)
    for key in ("recall@1", "recall@2", "map@r"):
        assert float(row[key][at]) == pytest.approx(100 * metrics[key], abs=0.006), key
    assert 0 < metrics["map@r"] < 1  # not a trivial set: the column could be wrong

    # report.html: the same column
    page = (run / "report.html").read_text()
    assert "vs the pretrained network (zero-shot)" in page and f"<th>{ZERO_SHOT_COLUMN}</th>" in page
    assert f"<td>{100 * metrics['map@r']:.2f}</td>" in page


def test_a_random_start_has_no_zero_shot_column_or_file(tmp_path, data, capsys):
    out, run = train(capsys, tmp_path / "runs", data, "model.pretrained=false")
    assert ZERO_SHOT_COLUMN not in table_columns(out)
    assert not RunFolder(run).zero_shot("test").exists()
    assert ZERO_SHOT_COLUMN not in (run / "report.html").read_text()
    assert json.loads(out.strip().splitlines()[-1])["run_dir"] == str(run)
