"""Class-balanced batches: B / per_class distinct classes x per_class items each (method.md section 4)."""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batch sampler of the authors' epoch: every batch holds ``batch_size / per_class`` distinct classes with
    ``per_class`` items each.

    One epoch (deterministic given ``seed`` and the epoch number): shuffle each class's items and the class
    list; build each batch by going through the shuffled class list from its start and taking the next
    ``per_class`` unused items of each class that still has at least ``per_class`` unused items, until the
    batch has ``batch_size / per_class`` classes; stop when no full batch can be formed; shuffle the order of the
    batches. No item appears twice in an epoch; leftover items (fewer than ``per_class`` in a class, or too few
    classes left) are not used in that epoch.

    Args:
        labels: class id of every dataset item, (N,) integers, in dataset order.
        batch_size: global batch size B (all ranks together).
        per_class: items per class in a batch.
        seed: base seed; epoch ``e`` uses the generator seeded with (seed, e).
        rank, world_size: with several processes each rank receives the contiguous slice
            ``[rank * B / world_size, (rank + 1) * B / world_size)`` of every global batch.
        drop_last: must stay True with several processes. With False, a last smaller batch made of the
            remaining classes that still have ``per_class`` unused items is yielded, if there are any.

    Yields lists of dataset indices (ints). ``len(sampler)`` is the number of batches per epoch.

    Warns once (UserWarning, at construction) with the number of classes smaller than ``per_class``, which are
    never sampled.

    Raises:
        ValueError (before any training): ``batch_size`` not divisible by ``per_class`` or by ``world_size``,
            fewer than ``batch_size / per_class`` classes with at least ``per_class`` items, bad rank.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        per_class: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (one class id per item), got shape {labels.shape}")
        if per_class < 1 or batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) and per_class ({per_class}) must be positive")
        if batch_size % per_class:
            raise ValueError(f"batch_size {batch_size} is not divisible by per_class {per_class}; choose a "
                             f"multiple of {per_class} such as {max(per_class, batch_size // per_class * per_class)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank {rank}, "
                             f"world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the number of processes {world_size}; "
                             "each process needs an equal slice of the global batch")
        if world_size > 1 and not drop_last:
            raise ValueError("drop_last=False is not supported with several processes (a smaller last batch "
                             "could not be split evenly); use drop_last=True")
        self.batch_size = batch_size
        self.per_class = per_class
        self.classes_per_batch = batch_size // per_class
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded
        classes, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        groups = np.split(order, bounds)
        self._items = [group for group in groups if len(group) >= per_class]
        small = len(groups) - len(self._items)
        if small and rank == 0:
            warnings.warn(
                f"{small} of the {len(classes)} classes have fewer than per_class={per_class} items and will never "
                f"be sampled ({sum(len(g) for g in groups if len(g) < per_class)} items unused); lower per_class "
                "or remove those classes to use them",
                UserWarning,
                stacklevel=2,
            )
        if len(self._items) < self.classes_per_batch:
            raise ValueError(
                f"a batch of {batch_size} with {per_class} items per class needs {self.classes_per_batch} classes "
                f"with at least {per_class} items, but only {len(self._items)} of the {len(classes)} classes "
                f"have that many; lower batch_size to at most {len(self._items) * per_class} or lower per_class")
        self._cache: tuple[int, list[list[int]]] | None = None

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        pools = [rng.permutation(items).tolist() for items in self._items]
        used = [0] * len(pools)
        eligible = deque(int(c) for c in rng.permutation(len(pools)))
        batches: list[list[int]] = []
        while eligible:
            take = min(self.classes_per_batch, len(eligible))
            if take < self.classes_per_batch and self.drop_last:
                break
            head = [eligible.popleft() for _ in range(take)]
            batch: list[int] = []
            for c in head:
                batch.extend(pools[c][used[c]: used[c] + self.per_class])
                used[c] += self.per_class
            # Classes that can still give per_class items stay at the front, in list order.
            eligible.extendleft(reversed([c for c in head if len(pools[c]) - used[c] >= self.per_class]))
            batches.append(batch)
            if take < self.classes_per_batch:
                break
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    def _local(self, batch: list[int]) -> list[int]:
        if self.world_size == 1:
            return batch
        size = len(batch) // self.world_size
        return batch[self.rank * size: (self.rank + 1) * size]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield self._local(batch)
        # A finished epoch moves on to the next one, so that plain repeated iteration reshuffles.
        self.set_epoch(self.epoch + 1)

    def __len__(self) -> int:
        return len(self._epoch_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (a different shuffle per epoch) from its first batch."""
        self.epoch = int(epoch)
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch and number of batches of it already yielded (a DataLoader with workers may have fetched more
        than it handed out: a trainer resuming exactly should store its own count in ``position``)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batch yielded is batch ``state["position"]`` of its epoch."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']} but this sampler has seed "
                             f"{self.seed}; use the same seed to resume")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
