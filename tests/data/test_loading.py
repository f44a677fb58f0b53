"""Sample-parallel loading (issue 18): chunks of one batch in order, the same images with any number of workers,
workers that persist across epochs, and uint8 loading that equals ToTensor + Normalize bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from recallk.data import ClassBalancedBatchSampler, build_transforms
from recallk.data.loading import ChunkedBatchLoader, SeededItems, item_seed
from recallk.data.transforms import DeviceNormalize, split_device_normalize, with_device_normalize


class PhotoSet(Dataset):
    """Random RGB PIL images of varied sizes, 4 per class, through ``transform``."""

    def __init__(self, n: int = 24, transform=None) -> None:
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (30 + i % 5, 40 - i % 3, 3), dtype=np.uint8))
                       for i in range(n)]
        self.labels = np.arange(n, dtype=np.int64) // 4
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class PidSet(PhotoSet):
    def __getitem__(self, index: int):
        return torch.full((1,), index), os.getpid()


def load_epochs(dataset, workers: int, epochs=(1, 2), start: int = 0, chunk: int = 5):
    sampler = ClassBalancedBatchSampler(dataset.labels, 8, per_class=2, seed=4)
    loader = ChunkedBatchLoader(dataset, sampler, chunk, seed=4, num_workers=workers)
    out = {}
    for epoch in epochs:
        out[epoch] = [[(x.clone(), y.clone()) for x, y in batch] for batch in loader.epoch(epoch, start)]
    return out, sampler, loader


def test_chunks_come_in_batch_order_with_the_sampler_batches():
    dataset = PidSet()
    out, sampler, _ = load_epochs(dataset, workers=2)
    for epoch, batches in out.items():
        expected = sampler._epoch_batches(epoch)
        assert len(batches) == len(expected) >= 2
        for got, want in zip(batches, expected):
            assert [len(x) for x, _ in got] == [5, 3]  # batch 8 in chunks of 5
            assert torch.cat([x for x, _ in got]).flatten().tolist() == want


def test_workers_persist_across_epochs():
    out, _, loader = load_epochs(PidSet(), workers=2, epochs=(1, 2, 3))
    pids = {epoch: {int(p) for batch in batches for _, labels in batch for p in labels}
            for epoch, batches in out.items()}
    assert len(pids[1]) == 2 and pids[1] == pids[2] == pids[3] and os.getpid() not in pids[1]
    loader.close()


def test_same_augmented_images_whatever_the_number_of_workers_and_start():
    host, _ = with_device_normalize(PhotoSet(transform=build_transforms("train", 16)))
    one, _, _ = load_epochs(host, workers=0)
    two, _, _ = load_epochs(host, workers=2)
    assert one[1][0][0][0].dtype == torch.uint8
    for epoch in one:
        for a, b in zip(one[epoch], two[epoch], strict=True):
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(one[1][0][0][0], one[2][0][0][0])  # a new epoch draws new augmentations
    resumed, _, _ = load_epochs(host, workers=2, epochs=(1,), start=1)
    for a, b in zip(resumed[1], one[1][1:], strict=True):
        assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b, strict=True))


def test_uint8_then_device_normalize_equals_the_float_transform_bit_for_bit():
    tf = build_transforms("train", 16)
    dataset = PhotoSet(transform=tf)
    host, normalize = with_device_normalize(dataset)
    assert dataset.transform is tf and host.transform is not tf  # the dataset passed in is unchanged
    seeded_float, seeded_host = SeededItems(dataset), SeededItems(host)
    for index in range(6):
        key = (index, item_seed(1, 2, index))
        reference = seeded_float[key][0]
        assert torch.equal(normalize(seeded_host[key][0][None])[0], reference)


def test_split_device_normalize_declines_other_transforms():
    assert split_device_normalize(None) is None
    assert split_device_normalize(lambda image: image) is None
    dataset = PhotoSet(transform=lambda image: torch.zeros(3, 2, 2))
    assert with_device_normalize(dataset) == (dataset, None)
    floats = torch.rand(2, 3, 4, 4)
    assert DeviceNormalize((0, 0, 0), (1, 1, 1))(floats) is floats or torch.equal(
        DeviceNormalize((0, 0, 0), (1, 1, 1))(floats), floats)


def test_bad_loader_arguments_are_named():
    sampler = ClassBalancedBatchSampler(np.arange(8) // 2, 4, per_class=2)
    for kwargs, word in (({"num_workers": -1}, "num_workers"), ({"prefetch_factor": 0}, "prefetch_factor")):
        with pytest.raises(ValueError, match=word):
            ChunkedBatchLoader(PidSet(8), sampler, 2, seed=0, **kwargs)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedBatchLoader(PidSet(8), sampler, 0, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        DeviceNormalize((0, 0, 0), (1, 1, 1))(torch.zeros(3, 4, 4, dtype=torch.uint8))
