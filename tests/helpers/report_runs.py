"""Synthetic run folders for the report tests: clustered embeddings, metrics.jsonl lines with distinctive values,
an in-memory dataset, and a small project (a folder dataset of solid images and a run whose config names it by a
relative root)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from recallk.data import build_dataset

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


COLOURS = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 200, 30)]
OMITTED = "Retrieval examples omitted"


def write_split(folder: Path, per_class: int) -> None:
    """``folder/class<c>/<i>.png``: ``per_class`` solid images of each colour of ``COLOURS``, of slightly
    different sizes."""
    for c, colour in enumerate(COLOURS):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 16), colour).save(folder / f"class{c}" / f"{i}.png")


def make_project(tmp_path: Path) -> tuple[Path, Path]:
    """``proj/data/photos/test/<class>/<i>.png`` (4 classes x 3 solid images) and ``proj/runs/c`` whose config has
    the relative ``data.root: data/photos``, with embeddings of the test split (one cluster per class)."""
    proj = tmp_path / "proj"
    write_split(proj / "data" / "photos" / "test", 3)
    labels = np.asarray(build_dataset("folder", proj / "data" / "photos", "test", transform=None).labels)
    rng = np.random.default_rng(0)
    emb = np.eye(8)[labels] + 0.3 * rng.normal(size=(labels.size, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    run = proj / "runs" / "c"
    (run / "embeddings").mkdir(parents=True)
    np.savez(run / "embeddings" / "test.npz", embeddings=emb.astype(np.float32), labels=labels)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"name": "c", "data": {"dataset": "folder", "root": "data/photos", "test_split": "test", "options": {}}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_lines(1)))
    return proj, run
