"""Protocols: evaluate_protocol on a tiny image folder, the text table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from recallk.evaluation import evaluate_protocol, format_metrics_table
from recallk.testing.retrieval import reference_retrieval_metrics


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def write_folder(root, rng) -> tuple[list[np.ndarray], list[int]]:
    """root/test/<class>/<i>.png with 3 classes of uneven sizes; returns the pixels and class ids written."""
    pixels, labels = [], []
    for class_id, (name, count) in enumerate([("apple", 4), ("banana", 2), ("cherry", 5)]):
        folder = root / "test" / name
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, size=3)
        for i in range(count):
            image = np.clip(base + rng.integers(-60, 61, size=(6, 6, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{i}.png")
            pixels.append(image)
            labels.append(class_id)
    return pixels, labels


def test_evaluate_protocol_on_a_folder(tmp_path, rng):
    pytest.importorskip("recallk.data", reason="recallk.data is not written yet")
    pixels, labels = write_folder(tmp_path, rng)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 8))
    results = evaluate_protocol(model, "folder", tmp_path, to_tensor, ks=(1, 2), device="cpu", progress=False)
    assert list(results) == ["test"]
    with torch.no_grad():
        embeddings = model(torch.stack([to_tensor(Image.fromarray(p)) for p in pixels])).numpy()
    expected = reference_retrieval_metrics(embeddings, np.array(labels), (1, 2))
    assert set(results["test"]) == set(expected)
    for name, value in expected.items():
        assert results["test"][name] == pytest.approx(value, abs=1e-9), name
    assert results["test"]["num_queries"] == 11


def test_unknown_dataset():
    with pytest.raises(ValueError, match="no evaluation protocol"):
        evaluate_protocol(nn.Identity(), "imagenet", "/nowhere", None)


def test_metrics_table_layout():
    results = {
        "test_small": {"recall@1": 0.5, "recall@10": 0.75, "map@r": 0.123456, "num_queries": 800},
        "test_large": {"recall@1": 0.25, "recall@10": 1.0, "map@r": 0.5, "num_queries": 2400},
    }
    lines = format_metrics_table(results).splitlines()
    assert lines[0].split() == ["metric", "(%)", "test_small", "test_large"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == ["recall@1", "recall@10", "map@r", "num_queries"]  # recall@10 after recall@1
    assert rows["recall@1"] == ["50.00", "25.00"]
    assert rows["map@r"] == ["12.35", "50.00"]
    assert rows["num_queries"] == ["800", "2400"]
    assert len({len(line) for line in lines[2:]}) == 1  # right-aligned columns end together
