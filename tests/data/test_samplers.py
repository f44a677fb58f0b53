"""ClassBalancedBatchSampler: batch composition, the authors' epoch, ranks, resume, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recallk.data.samplers import ClassBalancedBatchSampler


def authors_epoch(labels, batch_size, per_class, seed, epoch):
    """Straightforward re-statement of the authors' reshuffle loop, drawing the same shuffles: every batch is
    one pass over the whole shuffled class list, taking per_class items from each class that still has enough
    until the batch is full; stop at the first pass that cannot fill a batch; shuffle the batches."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, epoch])
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= per_class]
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    order = list(rng.permutation(len(pools)))
    batches = []
    while True:
        batch = []
        for c in order:
            if len(pools[c]) >= per_class and len(batch) < batch_size // per_class:
                batch.append(pools[c][:per_class])
                pools[c] = pools[c][per_class:]
        if len(batch) < batch_size // per_class:
            break
        batches.append([int(i) for group in batch for i in group])
    return [batches[i] for i in rng.permutation(len(batches))]


def random_labels(seed, classes=30, low=1, high=15):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(low, high, size=classes)
    labels = np.repeat(rng.permutation(1000)[:classes], sizes)
    return labels[rng.permutation(len(labels))]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), per_class=st.integers(1, 5), classes_per_batch=st.integers(1, 6),
       epoch=st.integers(0, 3))
def test_batches_follow_the_authors_epoch(seed, per_class, classes_per_batch, epoch):
    labels = random_labels(seed)
    batch_size = per_class * classes_per_batch
    eligible = sum(count >= per_class for count in Counter(labels.tolist()).values())
    if eligible < classes_per_batch:
        with pytest.raises(ValueError, match="classes"):
            ClassBalancedBatchSampler(labels, batch_size, per_class=per_class, seed=seed)
        return
    sampler = ClassBalancedBatchSampler(labels, batch_size, per_class=per_class, seed=seed)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert batches == authors_epoch(labels, batch_size, per_class, seed, epoch)
    sampler.set_epoch(epoch)
    assert len(sampler) == len(batches)

    used = [i for batch in batches for i in batch]
    assert len(used) == len(set(used)), "an item repeats within the epoch"
    for batch in batches:
        assert len(batch) == batch_size
        counts = Counter(labels[batch].tolist())
        assert len(counts) == classes_per_batch
        assert set(counts.values()) == {per_class}
    # The epoch ends only when no full batch can be formed from the unused items.
    left = Counter(labels[np.setdiff1d(np.arange(len(labels)), used)].tolist())
    assert sum(count >= per_class for count in left.values()) < classes_per_batch


def test_epochs_differ_and_repeat():
    labels = random_labels(1)
    sampler = ClassBalancedBatchSampler(labels, 12, per_class=3, seed=4)
    first = list(sampler)  # a finished epoch moves on to the next
    second = list(sampler)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first
    other_seed = ClassBalancedBatchSampler(labels, 12, per_class=3, seed=5)
    assert list(other_seed) != first


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_slices_partition_the_global_batch(world_size):
    labels = random_labels(2)
    batch_size = 24
    global_batches = list(ClassBalancedBatchSampler(labels, batch_size, per_class=2, seed=3))
    per_rank = [list(ClassBalancedBatchSampler(labels, batch_size, per_class=2, seed=3, rank=r,
                                               world_size=world_size)) for r in range(world_size)]
    for step, batch in enumerate(global_batches):
        slices = [per_rank[r][step] for r in range(world_size)]
        assert all(len(s) == batch_size // world_size for s in slices)
        assert [i for s in slices for i in s] == batch


def test_resume_mid_epoch():
    labels = random_labels(3)
    sampler = ClassBalancedBatchSampler(labels, 8, per_class=2, seed=0)
    sampler.set_epoch(2)
    everything = list(sampler)
    sampler.set_epoch(2)
    iterator = iter(sampler)
    head = [next(iterator), next(iterator)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 2
    fresh = ClassBalancedBatchSampler(labels, 8, per_class=2, seed=0)
    fresh.load_state_dict(state)
    assert head + list(fresh) == everything
    with pytest.raises(ValueError, match="seed"):
        ClassBalancedBatchSampler(labels, 8, per_class=2, seed=1).load_state_dict(state)


def test_drop_last_false_adds_the_remaining_classes():
    labels = np.repeat(np.arange(5), 4)  # 5 classes x 4 items, batches of 2 classes x 2 items
    batches = list(ClassBalancedBatchSampler(labels, 4, per_class=2, seed=0, drop_last=False))
    assert len(batches) == 5  # 10 groups of 2 -> 5 full batches, nothing left
    batches = list(ClassBalancedBatchSampler(labels, 6, per_class=2, seed=0, drop_last=False))
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used))
    assert all(len(set(labels[b].tolist())) == len(b) // 2 for b in batches)
    assert len(batches[-1]) <= 6


def test_errors_before_training():
    labels = np.repeat(np.arange(10), [5, 5, 5, 1, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="not divisible by per_class 4"):
        ClassBalancedBatchSampler(labels, 10, per_class=4)
    with pytest.raises(ValueError, match=r"needs 4 classes with at least 4 items, but only 3 of the 10 classes"):
        ClassBalancedBatchSampler(labels, 16, per_class=4)
    with pytest.raises(ValueError, match="at most 12"):
        ClassBalancedBatchSampler(labels, 16, per_class=4)
    with pytest.raises(ValueError, match="number of processes"):
        ClassBalancedBatchSampler(labels, 12, per_class=4, world_size=5)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler(labels, 12, per_class=4, rank=2, world_size=2)
