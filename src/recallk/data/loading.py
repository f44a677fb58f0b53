"""Sample-parallel loading of large batches: all workers load chunk-sized pieces of the same batch at once.

A DataLoader given a class-balanced *batch* sampler makes one worker build a whole batch (4,000 images in the
presets) while the model waits. :class:`ChunkedBatchLoader` keeps the batch sampler (it still decides which
items form a batch) but hands the workers chunk-sized index lists, in order: with W workers, W chunks of the
same batch load at once, the first chunk of a batch is ready after about one chunk's loading time, and the
chunks of the next batch load while the current step runs (prefetch). Workers persist across epochs.

Each item's augmentation randomness is a function of ``(seed, epoch, item)`` (:func:`item_seed`,
:class:`SeededItems`), so the images do not depend on the number of workers or on where a run was resumed.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch`` of a run seeded ``seed`` (a 63-bit int from
    ``numpy.random.SeedSequence([seed, epoch, index])``): the same in every worker, process and resumed run."""
    return int(np.random.SeedSequence([seed % 2**63, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class SeededItems(Dataset):
    """``dataset[index]`` run with the torch, NumPy and Python random generators seeded from the item's seed
    (restored afterwards): augmentation randomness is a function of (seed, epoch, item), whatever worker or
    process loads the item and wherever the run was resumed. Keys are ``(index, seed)`` pairs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _ChunkSampler(Sampler[list[tuple[int, int]]]):
    """Batches ``start..stop-1`` of one epoch of ``batches``, cut into chunk-sized lists of ``(index, seed)``;
    the number of chunks of each batch is appended to ``counts`` as its first chunk is handed out (the
    DataLoader draws indices in the main process, ahead of the consumer)."""

    def __init__(self, batches: Any, chunk_size: int, seed: int) -> None:
        self.batches, self.chunk_size, self.seed = batches, chunk_size, seed
        self.epoch, self.start, self.stop, self._length = 0, 0, 0, 0
        self.counts: deque[int] = deque()

    def plan(self, epoch: int, start: int, stop: int) -> None:
        self.epoch, self.start, self.stop = epoch, start, stop
        self.counts.clear()
        self._length = sum(-(-len(batch) // self.chunk_size) for batch in self._batches())

    def _batches(self) -> Iterator[list[int]]:
        self.batches.load_state_dict({"epoch": self.epoch, "position": self.start, "seed": self.batches.seed})
        for number, batch in enumerate(self.batches, start=self.start):
            if number >= self.stop:
                break
            yield batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self._batches():
            chunks = [batch[i: i + self.chunk_size] for i in range(0, len(batch), self.chunk_size)]
            self.counts.append(len(chunks))
            for chunk in chunks:
                yield [(int(i), item_seed(self.seed, self.epoch, int(i))) for i in chunk]

    def __len__(self) -> int:
        return self._length  # chunks of the planned batches


class ChunkedBatchLoader:
    """Loads the batches of a batch sampler as ordered chunks, every worker on pieces of the same batch.

    Args:
        dataset: items ``(image, label)``; for compact transfer its transform should end with
            ``PILToTensor`` (uint8, see :func:`recallk.data.transforms.split_device_normalize`).
        batch_sampler: yields lists of dataset indices per batch and has ``load_state_dict({"epoch",
            "position", "seed"})`` and ``.seed`` (:class:`recallk.data.ClassBalancedBatchSampler`).
        chunk_size: images per chunk (the cached step's forward pass).
        seed: the run's seed; item ``i`` of epoch ``e`` is augmented with :func:`item_seed` ``(seed, e, i)``.
        num_workers: worker processes (0: load in the calling thread). Workers persist across epochs.
        pin_memory: pin the chunks (CUDA: non-blocking host-to-device copies).
        prefetch_factor: chunks loaded ahead per worker (ignored without workers).

    Raises:
        ValueError: ``chunk_size < 1``, ``num_workers < 0`` or ``prefetch_factor < 1``.
    """

    def __init__(self, dataset: Dataset, batch_sampler: Any, chunk_size: int, *, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
        self.sampler = _ChunkSampler(batch_sampler, chunk_size, seed)
        # A private generator: creating the loader's iterator must not draw from the global RNG (exact resume).
        generator = torch.Generator().manual_seed(seed * 100_003 + 7)
        self.loader = DataLoader(SeededItems(dataset), batch_sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=pin_memory, generator=generator, persistent_workers=num_workers > 0,
                                 prefetch_factor=prefetch_factor if num_workers else None)  # fmt: skip
        #: seconds the consumer waited for each batch's first chunk, and for all chunks, since the last reset.
        self.first_chunk_waits: list[float] = []
        self.wait_s = 0.0

    def epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[Iterator[tuple[torch.Tensor,
                                                                                                   torch.Tensor]]]:
        """Batches ``start`` to ``stop - 1`` (default: to the epoch's end) of ``epoch``, each as an iterator over its
        chunks ``(images (n, ...), labels (n,) int64)`` in batch order. A batch left unfinished is drained before
        the next one is handed out."""
        self.sampler.plan(epoch, start, stop if stop is not None else 1 << 62)
        stream = iter(self.loader)
        counts = self.sampler.counts
        while True:
            started = time.perf_counter()
            try:
                first = next(stream)
            except StopIteration:
                return
            waited = time.perf_counter() - started
            self.first_chunk_waits.append(waited)
            self.wait_s += waited
            chunks = self._batch(first, stream, counts.popleft())
            yield chunks
            for _ in chunks:  # drain what the consumer left
                pass

    def _batch(self, first: Any, stream: Iterator[Any], count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield _as_pair(first)
        for _ in range(count - 1):
            started = time.perf_counter()
            chunk = next(stream)
            self.wait_s += time.perf_counter() - started
            yield _as_pair(chunk)

    def reset_timing(self) -> None:
        """Forget the recorded waits."""
        self.first_chunk_waits, self.wait_s = [], 0.0

    def close(self) -> None:
        """Stop the persistent workers (they also stop when the loader is garbage-collected)."""
        self.loader = None  # type: ignore[assignment]  # drops the DataLoader and its iterator: workers shut down


def _as_pair(chunk: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = chunk
    return images, torch.as_tensor(labels, dtype=torch.int64)
