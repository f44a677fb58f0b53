"""embed_dataset on a tiny model and an in-memory dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from recallk.evaluation import embed_dataset


class TinyImages(Dataset):
    """Items (3x4x4 image tensor, int label)."""

    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 4, 4, generator=generator)
        self.labels = np.arange(n, dtype=np.int64) % 3

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class TinyEmbedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(48, 5)
        self.dropout = nn.Dropout(0.5)  # changes the output in train mode: eval mode must be used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.dropout(self.linear(x.flatten(1))), dim=1)


def test_embeddings_and_labels_in_item_order():
    dataset, model = TinyImages(23), TinyEmbedder()
    model.train()
    embeddings, labels = embed_dataset(model, dataset, batch_size=5, device="cpu", progress=False)
    assert embeddings.dtype == np.float32 and embeddings.shape == (23, 5)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, dataset.labels)
    model.eval()
    with torch.no_grad():
        expected = model(dataset.images).numpy()
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)


def test_restores_training_mode_and_disables_grad():
    model = TinyEmbedder().train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    embed_dataset(model, TinyImages(4), batch_size=2, device="cpu", progress=False)
    assert seen == [(False, False), (False, False)]
    assert model.training


def test_bad_model_output_and_arguments():
    flat = nn.Flatten(0)  # returns a 1-D tensor per batch
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        embed_dataset(flat, TinyImages(4), device="cpu", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        embed_dataset(TinyEmbedder(), TinyImages(4), batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="amp"):
        embed_dataset(TinyEmbedder(), TinyImages(4), device="cpu", amp="int8")
    with pytest.raises(ValueError, match="empty"):
        embed_dataset(TinyEmbedder(), TinyImages(0), device="cpu")
