"""embed_dataset on uint8 images normalised on the device (issue 18): the same embeddings as the float path,
with workers and across the grouped copies to the host."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from recallk.data import build_transforms
from recallk.evaluation import embed as embed_module
from recallk.evaluation import embed_dataset


class Photos(torch.utils.data.Dataset):
    def __init__(self, n: int = 37) -> None:
        rng = np.random.default_rng(3)
        self.images = [Image.fromarray(rng.integers(0, 256, (18 + i % 4, 21, 3), dtype=np.uint8)) for i in range(n)]
        self.labels = np.arange(n) % 5
        self.transform = build_transforms("test", 16)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.labels[index])


def test_uint8_path_with_workers_gives_the_float_path_embeddings(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    dataset = Photos()
    reference, ref_labels = embed_dataset(model, dataset, batch_size=4, device="cpu", progress=False,
                                          device_normalize=False)
    monkeypatch.setattr(embed_module, "_FLUSH_EVERY", 3)  # several grouped copies plus a partial last one
    got, labels = embed_dataset(model, dataset, batch_size=4, device="cpu", num_workers=2, progress=False)
    assert dataset.transform.transforms[-1].__class__.__name__ == "Normalize"  # the dataset is left as it was
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(got, reference)
    direct = model(torch.stack([dataset[i][0] for i in range(len(dataset))])).detach().numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
