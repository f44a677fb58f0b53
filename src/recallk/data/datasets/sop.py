"""Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt``, a header line then ``image_id class_id
super_class_id path`` (relative to the root); classes 1-11,318 are train, 11,319-22,634 test, as the lists say."""

from __future__ import annotations

from pathlib import Path

from recallk.data.datasets.base import image_list_builder, read_rows, require
from recallk.data.registry import DatasetSpec, register_dataset

_LISTS = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


def _parse(base: Path, split: str) -> tuple[list[Path], list[int], None]:
    """SOP split ``"train"`` or ``"test"``; class names are the SOP class ids as strings.

    Raises:
        ValueError: a malformed list line.
        DatasetFileNotFoundError: the root, list file or first image is missing.
    """
    list_file = require(base / _LISTS[split], f"SOP {split} list", "root must be Stanford_Online_Products/.")
    rows = read_rows(list_file, 4, "'image_id class_id super_class_id path'", skip=1)
    return [base / r[3] for r in rows], [int(r[1]) for r in rows], None


build_sop = image_list_builder("sop", _parse)
register_dataset(DatasetSpec("sop", build_sop, splits=tuple(_LISTS), eval_ks=(1, 10, 100, 1000)))
