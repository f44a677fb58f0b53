"""Fixture of the report tests: ``make_run``, a synthetic run folder (config, metrics, embeddings npz and a tiny
dataset; its makers are in tests/helpers/report_runs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers.report_runs import TinyDataset, clustered_embeddings, metrics_lines


@pytest.fixture
def make_run(tmp_path: Path):
    """Factory: make_run(embeddings=, config=, metrics=, name=) -> (run_dir, dataset, embeddings, labels);
    ``metrics`` may be a list of records to write instead of ``metrics_lines()``."""

    def make(embeddings: bool = True, config: bool | dict = True, metrics: bool | list = True, seed: int = 0,
             name: str = "tiny-run"):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        emb, labels = clustered_embeddings(seed)
        if config:
            cfg = (
                config
                if isinstance(config, dict)
                else {
                    "name": name,
                    "data": {
                        "dataset": "no-such-dataset",
                        "root": str(tmp_path / "data"),
                        "test_split": "test",
                        "options": {},
                    },
                    "loss": {"name": "rsk", "ks": [1, 2, 4, 8, 16]},
                }
            )
            (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        if metrics:
            lines = metrics if isinstance(metrics, list) else metrics_lines()
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        if embeddings:
            (run / "embeddings").mkdir()
            np.savez(run / "embeddings" / "test.npz", embeddings=emb, labels=labels)
        return run, TinyDataset(labels), emb, labels

    return make
