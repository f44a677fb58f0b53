"""The dataset registry: one :class:`DatasetSpec` per dataset, registered by the dataset's own module.

A new dataset is one module calling ``register_dataset(DatasetSpec(...))``, one import line that loads it (in
``recallk/data/datasets/__init__.py``) and a miniature tree writer in ``tests/helpers/dataset_trees.py``."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch.utils.data import Dataset

#: The evaluation protocols a DatasetSpec can name (``DatasetSpec.eval_protocol``).
EVAL_PROTOCOLS = ("leave_one_out", "query_gallery", "revisited")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything about one dataset.

    Attributes:
        name: the registry key (``build_dataset(name, ...)``).
        build: ``build(root, split, transform, **options) -> Dataset`` with ``.labels`` and ``.classes``.
        splits: the valid split names; None = any split name (the folder loader).
        eval_ks: the benchmark's evaluation k's of recall@k, ascending (method.md sections 4 and 5).
        eval_splits: the evaluation protocol: the test splits, each evaluated as ``eval_protocol`` says.
        eval_protocol: how a test split is searched (one of ``EVAL_PROTOCOLS``): ``"leave_one_out"`` (every item
            queries all the others of its split), ``"query_gallery"`` (the split's items query ``gallery_split``;
            In-Shop) or ``"revisited"`` (the split's items query ``gallery_split`` with per-query easy/hard/junk
            ground truth in the query dataset's ``.ground_truth``; revisited Oxford/Paris, where ``eval_ks`` are
            the k's of mP@k).
        gallery_split: the split searched by the queries; required unless ``eval_protocol`` is leave-one-out.
        image_size: default image side (for models that take any input size); None = the model's size, or 224.
        transforms: ``transforms(kind, size, interpolation) -> list`` of the PIL transforms before ToTensor and
            Normalize; None = the ImageNet photo transforms of method.md section 4.
    """

    name: str
    build: Callable[..., Dataset]
    splits: tuple[str, ...] | None
    eval_ks: tuple[int, ...]
    eval_splits: tuple[str, ...] = ("test",)
    image_size: int | None = None
    transforms: Callable[..., list] | None = None
    eval_protocol: str = "leave_one_out"
    gallery_split: str | None = None

    def __post_init__(self) -> None:
        if self.eval_protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"dataset {self.name!r}: eval_protocol must be one of {EVAL_PROTOCOLS}, "
                             f"got {self.eval_protocol!r}")
        if (self.gallery_split is None) != (self.eval_protocol == "leave_one_out"):
            raise ValueError(f"dataset {self.name!r}: give gallery_split exactly when eval_protocol is not "
                             f"'leave_one_out' (got {self.eval_protocol!r} and gallery_split={self.gallery_split!r})")

    @property
    def options(self) -> frozenset[str]:
        """The keyword options ``build`` takes beyond ``root``, ``split`` and ``transform`` (from its signature)."""
        return frozenset(inspect.signature(self.build).parameters) - {"root", "split", "transform"}


_SPECS: dict[str, DatasetSpec] = {}
DATASET_SPECS: Mapping[str, DatasetSpec] = MappingProxyType(_SPECS)  # read-only view: name -> spec


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry under ``spec.name``; ValueError if the name is taken."""
    if spec.name in _SPECS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; ValueError listing the registered names if there is none."""
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(_SPECS)}")
    return _SPECS[name]


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str | None = "train",
    transform: Callable | None = None,
    **options: Any,
) -> Dataset:
    """Build dataset ``name`` (a key of ``DATASET_SPECS``) for ``split``.

    The result has ``.labels`` (``(N,)`` numpy int64, one class id per item in item order), ``.classes``
    (class names) and items ``(image, label)`` where ``image`` is a PIL RGB image, or ``transform(image)`` if
    given. ``root`` is the dataset's own folder (for ``kanji``: the cache folder, None for the default).
    ``options``: see ``dataset_spec(name).options`` (``skip_bad_images`` for the image datasets). The result
    records how it was built as ``data_spec`` (:func:`record_data_spec`).

    Raises:
        ValueError: unknown name, split or option (the message lists the valid ones); missing files raise
            DatasetFileNotFoundError, a ValueError too.
    """
    spec = dataset_spec(name)
    if spec.splits is not None and split not in spec.splits:
        raise ValueError(f"dataset {name!r} has splits {list(spec.splits)}, got {split!r}")
    unknown = set(options) - spec.options
    if unknown:
        raise ValueError(f"dataset {name!r} takes no option(s) {sorted(unknown)}; valid: {sorted(spec.options)}")
    dataset = spec.build(root, split, transform, **options)
    record_data_spec(dataset, name, split)
    return dataset


def record_data_spec(dataset: Any, name: str, split: str | None) -> None:
    """Set ``dataset.data_spec``: how to build it again, ``{"dataset": name, "root": its root (absolute; None for
    a default place such as the kanji cache), "split": its split, "options": the options that change which items
    it holds}``, read from the dataset's own ``root``, ``split`` and ``options`` (``options`` None when it has
    none). A :class:`recallk.engine.Trainer` run records it as the ``data`` section of its config.yaml."""
    from recallk.data.datasets.base import absolute_root

    root = getattr(dataset, "root", None)
    options = getattr(dataset, "options", None)
    dataset.data_spec = {"dataset": name, "root": None if root is None else absolute_root(root),
                         "split": getattr(dataset, "split", split),
                         "options": dict(options) if isinstance(options, Mapping) else None}
