"""Run folders for the retrieval tests: a real short kanji training run (module-scoped, a few seconds) and
untrained run folders (a config.yaml and a checkpoint of a freshly built model, instant)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recallk.cli.main import main
from tests.helpers.retrieval import make_untrained_run
from tests.helpers.runs import tiny_overrides


@pytest.fixture(scope="session")
def kanji_run(tmp_path_factory) -> Path:
    """``recallk train`` of a tiny kanji config (one full epoch of batches of 32); returns the run folder."""
    runs = tmp_path_factory.mktemp("runs")
    tiny = tiny_overrides("kanji", "model.embed_dim=32", "train.batch_size=32", "train.chunk_size=32",
                          drop=("train.max_steps_per_epoch", "train.tensorboard"))
    code = main(["train", "--name", "tiny", "--no-progress", f"runs_dir={runs}", *tiny])
    assert code == 0
    return runs / "tiny"


@pytest.fixture()
def untrained_run(tmp_path) -> Path:
    return make_untrained_run(tmp_path / "run")
