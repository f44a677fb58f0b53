"""Datasets, class-balanced batch sampling, class-disjoint splits and image transforms: ``build_dataset``,
``class_disjoint_split`` / ``ClassSubset`` (validation classes), ``build_transforms``.

Importing a dataset's module registers its :class:`DatasetSpec`: ``recallk.data.datasets`` (images), ``kanji``."""

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
