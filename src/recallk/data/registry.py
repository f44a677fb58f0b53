"""Dataset names -> builders, their splits and the evaluation k's of each benchmark (method.md section 4)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from recallk.data import kanji
from recallk.data.datasets import cars196, cub, folder, inaturalist, sop, vehicleid

DATASETS: dict[str, Callable[..., Dataset]] = {
    "sop": sop.build_sop,
    "cub": cub.build_cub,
    "cars196": cars196.build_cars196,
    "inaturalist": inaturalist.build_inaturalist,
    "vehicleid": vehicleid.build_vehicleid,
    "folder": folder.build_folder,
    "kanji": kanji.build_kanji,
}

# Allowed splits per dataset; None means any split name (the folder loader uses root/<split>/ if given).
SPLITS: dict[str, tuple[str, ...] | None] = {
    "sop": sop.SPLITS,
    "cub": cub.SPLITS,
    "cars196": cars196.SPLITS,
    "inaturalist": inaturalist.SPLITS,
    "vehicleid": vehicleid.SPLITS,
    "folder": None,
    "kanji": kanji.SPLITS,
}

DEFAULT_EVAL_KS: dict[str, tuple[int, ...]] = {
    "inaturalist": (1, 4, 16, 32),
    "sop": (1, 10, 100, 1000),
    "vehicleid": (1, 5),
    "cars196": (1, 2, 4, 8, 16),
    "cub": (1, 2, 4, 8, 16),
    "kanji": (1, 2, 4, 8),
    "folder": (1, 2, 4, 8),
}

# Options each builder takes beyond (root, split, transform).
OPTIONS: dict[str, frozenset[str]] = {
    **{
        name: frozenset({"skip_bad_images"}) for name in ("sop", "cub", "cars196", "inaturalist", "vehicleid", "folder")
    },
    "kanji": frozenset({"max_classes", "fonts", "size", "mode", "num_workers", "progress"}),
}


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str | None = "train",
    transform: Callable | None = None,
    **options: Any,
) -> Dataset:
    """Build dataset ``name`` (a key of DATASETS) for ``split``.

    The result has ``.labels`` (``(N,)`` numpy int64, one class id per item in item order), ``.classes``
    (class names) and items ``(image, label)`` where ``image`` is a PIL RGB image, or ``transform(image)`` if
    given.
    ``root`` is the dataset's own folder (for ``kanji``: the cache folder, None for the default).
    Options: ``skip_bad_images`` for the image datasets; ``max_classes``, ``fonts``, ``size``, ``mode``,
    ``num_workers``, ``progress`` for kanji.

    Raises:
        ValueError: unknown name, split or option (the message lists the valid ones); missing files raise
            DatasetFileNotFoundError, a ValueError too.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    splits = SPLITS[name]
    if splits is not None and split not in splits:
        raise ValueError(f"dataset {name!r} has splits {list(splits)}, got {split!r}")
    unknown = set(options) - OPTIONS[name]
    if unknown:
        raise ValueError(f"dataset {name!r} takes no option(s) {sorted(unknown)}; valid: {sorted(OPTIONS[name])}")
    return DATASETS[name](root, split, transform, **options)
