"""Seeded, class-disjoint splits of a labelled dataset: the validation classes carved from the training classes
(``data.val_classes``) and the train/test split of a flat ``<class>/<image>`` folder (``test_classes``).

The split is a function of the class names (or ids) and a seed only, not of the random number generators of
numpy or torch (whose streams may change between versions): the classes are ordered by the SHA-256 hex digest of
``"recallk-class-split-<seed>:<class name>"`` and the first ones are held out. The same classes, names and seed
give the same split on every machine and release; adding a class moves no other class from one side to the other
(only the number held out of a fraction may change by one).

Held-out classes are whole classes (metric learning's protocol: the evaluation classes are never seen in
training, method.md section 5; "A Metric Learning Reality Check", Musgrave et al., ECCV 2020, section 4, for
choosing hyper-parameters and checkpoints on validation classes instead of the test classes).
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

__all__ = ["ClassSubset", "check_batchable", "class_disjoint_split", "held_out_count", "validation_split"]


def held_out_count(held_out: int | float, num_classes: int, what: str = "held_out") -> int:
    """How many of ``num_classes`` classes ``held_out`` asks for.

    Args:
        held_out: an int >= 1 (that many classes) or a float in (0, 1) (that fraction of the classes, rounded to
            the nearest whole class, at least 1 and at most ``num_classes - 1``).
        num_classes: the number of classes to split.
        what: the option's name in messages (e.g. ``"data.val_classes"``).

    Raises:
        ValueError: ``held_out`` is not such a number, fewer than 2 classes, or a count that leaves no class.
    """
    if isinstance(held_out, bool) or not isinstance(held_out, numbers.Real):
        raise ValueError(f"{what} must be a number of classes (an integer >= 1) or a fraction in (0, 1), got "
                         f"{held_out!r}")
    if num_classes < 2:
        raise ValueError(f"{what}: a class-disjoint split needs at least 2 classes, the data has {num_classes}")
    if isinstance(held_out, numbers.Integral):
        count = int(held_out)
        if count < 1 or count >= num_classes:
            raise ValueError(f"{what}={count} must hold out between 1 and {num_classes - 1} of the {num_classes} "
                             f"classes (at least one class must remain); use a smaller number or a fraction such as "
                             f"{what}=0.2")
        return count
    fraction = float(held_out)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{what}={held_out!r}: a fraction of the classes must be in (0, 1), e.g. {what}=0.2; "
                         f"or give a number of classes (an integer >= 1)")
    return min(max(round(fraction * num_classes), 1), num_classes - 1)


def _class_order(keys: Sequence[str], seed: int) -> np.ndarray:
    """Indices of ``keys`` sorted by SHA-256 of ``"recallk-class-split-<seed>:<key>"`` (ties, impossible in
    practice, by index)."""
    digests = [hashlib.sha256(f"recallk-class-split-{seed}:{key}".encode()).hexdigest() for key in keys]
    return np.array(sorted(range(len(keys)), key=lambda i: (digests[i], i)), dtype=np.int64)


def class_disjoint_split(
    labels: Sequence[int] | np.ndarray,
    held_out: int | float,
    seed: int = 0,
    class_names: Sequence[Any] | None = None,
    what: str = "held_out",
) -> tuple[np.ndarray, np.ndarray]:
    """Split the items of ``labels`` into (kept, held out) by whole classes, reproducibly.

    The classes present in ``labels`` are ordered by the SHA-256 digest of ``"recallk-class-split-<seed>:<name>"``
    (``name`` = ``str(class_names[c])`` when given, else the id ``c``) and the first
    :func:`held_out_count` of them are held out: the result depends on the names and the seed only.

    Args:
        labels: (N,) integer class ids, one per item, in item order.
        held_out: number of classes (int >= 1) or fraction of the classes (float in (0, 1)) to hold out.
        seed: chooses the split (any int; the same seed gives the same split).
        class_names: optional, indexed by class id (e.g. ``dataset.classes``): the split then follows the names,
            so it does not change when ids are renumbered.
        what: the option's name in messages.

    Returns:
        ``(kept, held)``: ascending int64 index arrays into ``labels``; they partition ``range(N)`` and no class has
        items in both.

    Raises:
        ValueError: labels not a 1-D integer array, a bad ``held_out`` (see :func:`held_out_count`), a class id
            without a name in ``class_names``, or ``seed`` not an integer.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D array of integer class ids, got shape {labels.shape}, dtype "
                         f"{labels.dtype}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"the split seed must be an integer, got {seed!r}")
    present = np.unique(labels)
    count = held_out_count(held_out, len(present), what)
    if class_names is not None:
        if len(present) and (present.min() < 0 or present.max() >= len(class_names)):
            raise ValueError(f"class ids run from {present.min()} to {present.max()} but class_names has "
                             f"{len(class_names)} names")
        keys = [str(class_names[c]) for c in present]
    else:
        keys = [str(int(c)) for c in present]
    held_classes = present[_class_order(keys, int(seed))[:count]]
    is_held = np.isin(labels, held_classes)
    return np.flatnonzero(~is_held).astype(np.int64), np.flatnonzero(is_held).astype(np.int64)


def check_batchable(labels: np.ndarray, batch_size: int, per_class: int, what: str) -> None:
    """Raise unless ``labels`` has at least ``batch_size // per_class`` classes of ``per_class`` or more items
    (what :class:`recallk.data.ClassBalancedBatchSampler` needs for one batch).

    Args:
        labels: (N,) class ids of the training items that remain.
        batch_size, per_class: the run's batch (images) and images per class.
        what: what removed classes and how to change it, in the message (e.g. ``"data.val_classes=0.5 leaves"``).

    Raises:
        ValueError: too few classes remain, naming how many and how many a batch needs.
    """
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    usable, needed = int((counts >= per_class).sum()), batch_size // per_class
    if usable < needed:
        raise ValueError(f"{what} {usable} training classes with at least {per_class} images (per_class), but a "
                         f"batch of {batch_size} images needs {needed}: hold out fewer classes, or lower "
                         f"train.batch_size (or train.per_class)")


class ClassSubset(Dataset):
    """The items ``indices`` of ``base``, with labels renumbered ``0..C'-1`` over the classes they contain.

    Samplers and losses use it as any dataset (``labels``, ``classes``, items ``(image, label)``). Build ``base``
    with ``transform=None`` (items are PIL images) and give the transform here, so that one decoded dataset serves
    subsets with different transforms (training augmentation for the kept classes, the test transform for the
    validation classes).

    Args:
        base: a dataset with ``.labels`` ((N,) int) and ``.classes`` (names), items ``(image, label)``.
        indices: (n,) int indices into ``base``, in the subset's item order.
        transform: applied to each image of ``base`` (None: as ``base`` returns it).
        name: used in messages and ``repr``.

    Attributes:
        root, split, options, data_spec: ``base``'s, when it has them (``data_spec``: how ``build_dataset`` built
            it, see :func:`recallk.data.registry.record_data_spec`).
        labels: (n,) numpy int64 in ``0..C'-1``, following the order of the original class ids.
        classes: the ``C'`` class names (``classes[labels[i]]`` is item i's class, as in ``base``).
        indices: (n,) int64, item i is ``base[indices[i]]``; ``class_ids``: (C',) the original class ids.
        paths: item paths, when ``base`` has ``paths``.

    Raises:
        ValueError: ``base`` without ``labels``/``classes``, or an index out of range.
    """

    def __init__(self, base: Any, indices: Sequence[int] | np.ndarray,
                 transform: Callable[[Any], Any] | None = None, name: str = "subset") -> None:
        if getattr(base, "labels", None) is None or getattr(base, "classes", None) is None:
            raise ValueError("ClassSubset needs a base dataset with .labels and .classes")
        indices = np.asarray(indices, dtype=np.int64)
        base_labels = np.asarray(base.labels)
        if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(base_labels))):
            raise ValueError(f"{name}: indices must be a 1-D array in [0, {len(base_labels)})")
        self.base, self.indices, self.transform, self.name = base, indices, transform, name
        for attribute in ("root", "split", "options", "data_spec"):  # data_spec: what a run records of its data
            if hasattr(base, attribute):
                setattr(self, attribute, getattr(base, attribute))
        self.class_ids, labels = np.unique(base_labels[indices], return_inverse=True)
        self.labels = labels.astype(np.int64).reshape(-1)
        self.classes = [base.classes[c] for c in self.class_ids]
        if getattr(base, "paths", None) is not None:
            self.paths = [base.paths[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, _ = self.base[int(self.indices[i])]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def __repr__(self) -> str:
        return f"ClassSubset({self.name}: {len(self)} items, {len(self.classes)} classes)"


def validation_split(
    base: Any,
    val_classes: int | float,
    seed: int = 0,
    train_transform: Callable[[Any], Any] | None = None,
    val_transform: Callable[[Any], Any] | None = None,
    what: str = "val_classes",
) -> tuple[ClassSubset, ClassSubset]:
    """(training classes, validation classes) of a training split, as ``recallk train`` makes them from
    ``data.val_classes`` and ``data.val_seed``: :func:`class_disjoint_split` by ``base.classes`` and ``seed``.

    Build ``base`` with ``transform=None`` (e.g. ``build_dataset("folder", root, "train", transform=None)``) and give
    the training augmentation and the test transform here. The training subset is named ``"<base.name> (training
    classes)"`` and carries ``val_classes`` and ``val_seed`` (also in its ``data_spec``), so that a
    :class:`recallk.engine.Trainer` run on it records ``data.dataset``, ``root``, ``train_split``, ``options``,
    ``val_classes`` and ``val_seed`` in its ``config.yaml``: ``recallk eval --checkpoint`` then evaluates the
    dataset's test split, and ``recallk train -c`` holds out the same classes.

    Args:
        base: a dataset with ``.labels``, ``.classes`` and usually ``.name`` (``"<dataset>/<split>"``).
        val_classes: classes held out for validation: an int >= 1, or a fraction in (0, 1) of the classes.
        seed: the split's seed (``data.val_seed``).
        train_transform, val_transform: applied to the images of each subset.
        what: the option's name in messages.

    Returns:
        ``(train, val)``: :class:`ClassSubset` of ``base``, no class in both.

    Raises:
        ValueError: see :func:`class_disjoint_split`.
    """
    kept, held = class_disjoint_split(base.labels, val_classes, seed, class_names=base.classes, what=what)
    name = getattr(base, "name", None) or "dataset"
    train = ClassSubset(base, kept, train_transform, name=f"{name} (training classes)")
    train.val_classes, train.val_seed = val_classes, int(seed)
    if isinstance(getattr(base, "data_spec", None), dict):  # recorded with how the base was built
        train.data_spec = {**base.data_spec, "val_classes": val_classes, "val_seed": int(seed)}
    return train, ClassSubset(base, held, val_transform, name=f"{name} (validation classes)")
