"""The streaming cached step fed by the sample-parallel loader (issue 18): the gradient equals one full-batch
backward on the images pass 1 saw, with workers; pass 2 reuses the kept uint8 chunks (no reload); the trainer
gives the same run with any number of workers on the uint8 path. The in-memory comparisons run on
``RECALLK_TEST_DEVICE`` (default the CPU); the loader and trainer runs stay on the CPU."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from recallk.data import ClassBalancedBatchSampler, build_transforms
from recallk.data.loading import ChunkedBatchLoader, SeededItems, item_seed
from recallk.data.transforms import with_device_normalize
from recallk.engine import Trainer, cached_backward, cached_backward_stream, freeze_batchnorm
from tests.helpers.device_settings import TEST_DEVICE
from tests.helpers.engine import contrastive_loss, grads, make_batch, make_net


class PhotoSet(Dataset):
    """Random RGB PIL images (a few sizes), ``per_class`` per class, through ``transform``."""

    def __init__(self, classes: int = 6, per_class: int = 4, transform=None) -> None:
        rng = np.random.default_rng(1)
        n = classes * per_class
        self.images = [Image.fromarray(rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8)) for i in range(n)]
        self.labels = np.arange(n, dtype=np.int64) // per_class
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.labels[index])


class Recorder:
    """A prepare function that records what it was given and what it returned (pass 1 and pass 2)."""

    def __init__(self, normalize) -> None:
        self.normalize, self.seen, self.out = normalize, [], []

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        self.seen.append(chunk.clone())
        self.out.append(self.normalize(chunk))
        return self.out[-1]


def test_streamed_step_with_workers_equals_one_full_batch_backward_on_the_pass1_images():
    dataset = PhotoSet(transform=build_transforms("train", 12))
    host, normalize = with_device_normalize(dataset)
    sampler = ClassBalancedBatchSampler(dataset.labels, 8, per_class=2, seed=5)
    loader = ChunkedBatchLoader(host, sampler, 3, seed=5, num_workers=2)
    model = freeze_batchnorm(make_net(dropout=0.0, dtype=torch.float32))
    reference_model = copy.deepcopy(model).double()
    recorder = Recorder(normalize)
    batch = next(iter(loader.epoch(2)))
    loss = cached_backward_stream(model, batch, contrastive_loss, prepare=recorder)
    loader.close()

    # The batch loaded in this process, without workers, through the float transform (ToTensor + Normalize).
    indices = sampler._epoch_batches(2)[0]
    items = [SeededItems(dataset)[(i, item_seed(5, 2, i))] for i in indices]
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([y for _, y in items])
    assert all(chunk.dtype == torch.uint8 for chunk in recorder.seen)  # kept and re-sent as uint8
    assert [len(c) for c in recorder.seen] == [3, 3, 2] * 2  # pass 1, then pass 2 on the kept chunks
    pass1, pass2 = torch.cat(recorder.out[:3]), torch.cat(recorder.out[3:])
    assert torch.equal(pass1, images) and torch.equal(pass2, images)  # exactly the pass-1 inputs, bit for bit

    full = contrastive_loss(reference_model(images.double()), labels)
    full.backward()
    assert float(loss) == pytest.approx(float(full.detach()), abs=1e-5)
    got, want = grads(model), grads(reference_model)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_stream_equals_cached_backward_on_in_memory_images():
    images, labels = (t.to(TEST_DEVICE) for t in make_batch(batch=10))
    model_a, model_b = make_net(dropout=0.3).to(TEST_DEVICE), make_net(dropout=0.3).to(TEST_DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ghost-batch BatchNorm notice
        torch.manual_seed(4)
        loss_a = cached_backward(model_a, images, labels, contrastive_loss, 4)
        torch.manual_seed(4)
        stream = zip(torch.split(images, [4, 4, 2]), torch.split(labels, [4, 4, 2]))
        loss_b = cached_backward_stream(model_b, stream, contrastive_loss)
    assert torch.equal(loss_a, loss_b)
    for name, grad in grads(model_a).items():
        assert torch.equal(grad, grads(model_b)[name]), name


def test_stream_errors_are_named():
    model = make_net().to(TEST_DEVICE)
    with pytest.raises(ValueError, match="empty batch"):
        cached_backward_stream(model, iter(()), contrastive_loss)
    images, labels = (t.to(TEST_DEVICE) for t in make_batch(batch=6))
    with pytest.raises(ValueError, match="3 labels"):
        cached_backward_stream(model, [(images, labels[:3])], contrastive_loss)


def train(tmp_path, name: str, **overrides):
    dataset = PhotoSet(transform=build_transforms("train", 12))
    torch.manual_seed(0)
    model = freeze_batchnorm(make_net(dropout=0.2, dtype=torch.float32))
    settings = dict(batch_size=8, chunk_size=3, per_class=2, epochs=2, lr=1e-2, device="cpu", seed=3,
                    progress=False, tensorboard=False)
    trainer = Trainer(model, contrastive_loss, dataset, tmp_path / name, **{**settings, **overrides})
    trainer.fit()
    return trainer


def test_trainer_on_uint8_chunks_gives_the_same_run_with_any_workers_and_logs_data_wait(tmp_path):
    plain = train(tmp_path, "float", device_normalize=False)  # float32 images from the loader, as before
    uint8 = train(tmp_path, "uint8")
    workers = train(tmp_path, "workers", num_workers=2)
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, uint8.model.state_dict()[name]), name
        assert torch.equal(value, workers.model.state_dict()[name]), name
    lines = [json.loads(line) for line in (tmp_path / "workers" / "metrics.jsonl").read_text().splitlines()]
    intervals = [r for r in lines if r["kind"] == "train" and r["scope"] == "interval"]
    assert intervals and all(r["data_wait_s"] >= 0 for r in intervals)


def test_channels_last_setting_puts_the_model_in_that_layout(tmp_path):
    trainer = train(tmp_path, "cl", channels_last=True, epochs=1)
    assert trainer.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.prepare is not None
    assert trainer.prepare(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)).is_contiguous(
        memory_format=torch.channels_last)
    assert np.isfinite(trainer.last_train_loss)
