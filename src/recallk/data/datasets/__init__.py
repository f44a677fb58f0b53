"""Loaders for the benchmark datasets and for a folder of images; on-disk formats in docs/datasets.md."""

from recallk.data.datasets.base import BadImageError, DatasetFileNotFoundError, ImageListDataset
from recallk.data.datasets.cars196 import build_cars196
from recallk.data.datasets.cub import build_cub
from recallk.data.datasets.folder import build_folder
from recallk.data.datasets.inaturalist import build_inaturalist
from recallk.data.datasets.inshop import build_inshop
from recallk.data.datasets.revisited import RevisitedDataset, build_roxford5k, build_rparis6k
from recallk.data.datasets.sop import build_sop
from recallk.data.datasets.vehicleid import build_vehicleid

__all__ = [
    "BadImageError",
    "DatasetFileNotFoundError",
    "ImageListDataset",
    "RevisitedDataset",
    "build_cars196",
    "build_cub",
    "build_folder",
    "build_inaturalist",
    "build_inshop",
    "build_roxford5k",
    "build_rparis6k",
    "build_sop",
    "build_vehicleid",
]
