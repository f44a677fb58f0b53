"""DeepFashion In-Shop Clothes Retrieval (``In-shop Clothes Retrieval Benchmark/``, "Eval" + "Img").

On disk: ``list_eval_partition.txt`` (a count line, the header ``image_name item_id evaluation_status``, then one
``img/<...>/<item id>/<file>.jpg id_XXXXXXXX train|query|gallery`` line per image) and the ``img/`` tree the
image names point into. Classes are item ids. The protocol searches the ``query`` split against the ``gallery``
split (Recall@k, k in 1, 10, 20, 30, 40, 50; Liu et al., "DeepFashion", CVPR 2016).
"""

from __future__ import annotations

from pathlib import Path

from recallk.data.datasets.base import image_list_builder, read_rows, require
from recallk.data.registry import DatasetSpec, register_dataset

SPLITS = ("train", "query", "gallery")
_LIST = "list_eval_partition.txt"


def _parse(base: Path, split: str) -> tuple[list[Path], list[str], None]:
    """In-Shop split ``train``, ``query`` or ``gallery`` of ``list_eval_partition.txt`` (classes: item ids).

    Raises:
        ValueError: a malformed list line, or an evaluation status other than train/query/gallery.
        DatasetFileNotFoundError: the root, the list file or the first image is missing.
    """
    list_file = require(
        base / _LIST, "In-Shop partition list", "root must be the folder holding list_eval_partition.txt and img/."
    )
    rows = read_rows(list_file, 3, "'image_name item_id evaluation_status'", skip=2)
    for n, (_, _, status) in enumerate(rows, start=3):
        if status not in SPLITS:
            raise ValueError(f"{list_file}:{n}: evaluation_status must be one of {list(SPLITS)}, got {status!r}")
    chosen = [(name, item) for name, item, status in rows if status == split]
    return [base / name for name, _ in chosen], [item for _, item in chosen], None


build_inshop = image_list_builder("inshop", _parse)
register_dataset(
    DatasetSpec(
        "inshop",
        build_inshop,
        splits=SPLITS,
        eval_ks=(1, 10, 20, 30, 40, 50),
        eval_splits=("query",),
        eval_protocol="query_gallery",
        gallery_split="gallery",
    )
)
