"""PKU VehicleID (``VehicleID_V1.0/``): lists ``train_test_split/*.txt`` of ``image_name vehicle_id`` lines,
images at ``image/<name>.jpg``; the small, medium and large test sets are each evaluated leave-one-out."""

from __future__ import annotations

from pathlib import Path

from recallk.data.datasets.base import image_list_builder, read_rows, require
from recallk.data.registry import DatasetSpec, register_dataset

_TESTS = {"test_small": "test_list_800.txt", "test_medium": "test_list_1600.txt", "test_large": "test_list_2400.txt"}
_LISTS = {"train": "train_list.txt", **_TESTS}


def _parse(base: Path, split: str) -> tuple[list[Path], list[int], None]:
    """VehicleID split ``train``, ``test_small``, ``test_medium`` or ``test_large`` (classes: vehicle ids).

    Raises:
        ValueError: a malformed list line.
        DatasetFileNotFoundError: the root, the list file or the first image is missing.
    """
    list_file = require(
        base / "train_test_split" / _LISTS[split], f"VehicleID {split} list", "root must be VehicleID_V1.0/."
    )
    rows = read_rows(list_file, 2, "'image_name vehicle_id'")
    return [base / "image" / f"{r[0]}.jpg" for r in rows], [int(r[1]) for r in rows], None


build_vehicleid = image_list_builder("vehicleid", _parse)
register_dataset(
    DatasetSpec("vehicleid", build_vehicleid, splits=tuple(_LISTS), eval_ks=(1, 5), eval_splits=tuple(_TESTS))
)
