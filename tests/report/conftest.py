"""Synthetic run folders for the report tests: config, metrics, embeddings npz and a tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

NUM_CLASSES = 6
PER_CLASS = 5
DIM = 8
PALETTE = [(200, 120, 0), (0, 90, 160), (120, 0, 140), (90, 90, 90), (0, 140, 140), (160, 160, 0)]


class TinyDataset:
    """In-memory dataset with the recallk conventions: items (PIL image, label), .labels, .classes."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = [f"class-{c}" for c in range(int(self.labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        label = int(self.labels[i])
        image = Image.new("RGB", (40, 32), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        # class shown by colour and shape, item by position
        box = (4 + i % 5 * 2, 4, 28 + i % 5 * 2, 28)
        colour = PALETTE[label % len(PALETTE)]
        if label % 2:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
        return image, label


def clustered_embeddings(seed: int = 0, noise: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """(N, DIM) float32 L2-normalised embeddings around one random centre per class, and (N,) int64 labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS).astype(np.int64)
    centres = rng.normal(size=(NUM_CLASSES, DIM))
    x = centres[labels] + noise * rng.normal(size=(labels.size, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def metrics_lines(epochs: int = 3) -> list[dict]:
    """Train lines (two per epoch) and eval lines for epochs 0..epochs, with distinctive metric values."""
    lines: list[dict] = []
    step = 0
    for epoch in range(epochs + 1):
        if epoch > 0:
            for half in range(2):
                step += 5
                lines.append(
                    {
                        "kind": "train",
                        "epoch": epoch,
                        "step": step,
                        "time": 1e9 + step,
                        "loss": 0.9 - 0.1 * epoch - 0.01 * half,
                        "lr": 1e-3 * 0.5**epoch,
                        "images_per_s": 100.0,
                    }
                )
        lines.append(
            {
                "kind": "eval",
                "epoch": epoch,
                "step": step,
                "time": 1e9 + step,
                "split": "test",
                "recall@1": 0.1234 + 0.2 * epoch,
                "recall@2": 0.2345 + 0.2 * epoch,
                "recall@4": 0.3456 + 0.15 * epoch,
                "recall@8": 0.4567 + 0.1 * epoch,
                "positive_recall@1": 0.0512 + 0.1 * epoch,
                "map@r": 0.0611 + 0.2 * epoch,
                "r_precision": 0.0722 + 0.2 * epoch,
                "num_queries": 30,
                "num_excluded_queries": 0,
            }
        )
    return lines


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
