"""Datasets, class-balanced batch sampling and image transforms: ``build_dataset``, ``build_transforms``."""

from recallk.data.datasets import BadImageError, DatasetFileNotFoundError, ImageListDataset
from recallk.data.kanji import KanjiDataset, KanjiFontsMissingError
from recallk.data.registry import DATASETS, DEFAULT_EVAL_KS, SPLITS, build_dataset
from recallk.data.samplers import ClassBalancedBatchSampler
from recallk.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, transforms_for_model

__all__ = [
    "DATASETS",
    "DEFAULT_EVAL_KS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "BadImageError",
    "ClassBalancedBatchSampler",
    "DatasetFileNotFoundError",
    "ImageListDataset",
    "KanjiDataset",
    "KanjiFontsMissingError",
    "build_dataset",
    "build_transforms",
    "transforms_for_model",
]
