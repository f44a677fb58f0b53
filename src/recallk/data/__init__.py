"""Datasets, class-balanced batch sampling, class-disjoint splits and image transforms: ``build_dataset``,
``class_disjoint_split`` / ``ClassSubset`` (validation classes), ``build_transforms``.

Importing a dataset's module registers its :class:`DatasetSpec`: ``recallk.data.datasets`` (images), ``kanji``."""

import warnings

from recallk.data.datasets import BadImageError, DatasetFileNotFoundError, ImageListDataset
from recallk.data.kanji import KanjiDataset, KanjiFontsMissingError
from recallk.data.registry import DATASET_SPECS, DatasetSpec, build_dataset, dataset_spec, register_dataset
from recallk.data.samplers import ClassBalancedBatchSampler
from recallk.data.splits import ClassSubset, class_disjoint_split, validation_split
from recallk.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, transforms_for_model

__all__ = [
    "DATASET_SPECS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "ClassBalancedBatchSampler",
    "ClassSubset",
    "DatasetFileNotFoundError",
    "DatasetSpec",
    "ImageListDataset",
    "KanjiDataset",
    "KanjiFontsMissingError",
    "build_dataset",
    "build_transforms",
    "class_disjoint_split",
    "dataset_spec",
    "register_dataset",
    "transforms_for_model",
    "validation_split",
]

_DEPRECATED = {"DATASETS": "build", "SPLITS": "splits", "DEFAULT_EVAL_KS": "eval_ks"}  # {dataset: spec.<attr>}


def __getattr__(name: str):
    if name not in _DEPRECATED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new = f"recallk.data.dataset_spec(name).{_DEPRECATED[name]}"
    warnings.warn(f"recallk.data.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
    return {n: getattr(spec, _DEPRECATED[name]) for n, spec in DATASET_SPECS.items()}
