"""Miniature trees of every registered dataset, in each one's exact on-disk format, written with tiny JPEGs.

Every image is a solid colour unique to its file, so reading item i back checks that item i is the listed file.
Each ``make_<dataset>(root)`` returns ``(expected, colours)``: ``{split: [(path, class name), ...]}`` from the
lists it writes, and ``{path: colour}``. ``TREES`` maps each dataset name to its writer and the build options of
its miniature: tests/data/test_dataset_contract.py fails for a registered dataset missing from it.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image


def _colour(n: int) -> tuple[int, int, int]:
    return (40 + 50 * (n % 4), 40 + 50 * ((n // 4) % 4), 40 + 50 * ((n // 16) % 4))


def write_jpeg(path: Path, n: int) -> tuple[int, int, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = _colour(n)
    Image.new("RGB", (12, 10), colour).save(path, "JPEG", quality=95)
    return colour


def check_items(ds, expected: list[tuple[Path, str]], colours: dict[Path, tuple[int, int, int]]) -> None:
    """Paths in order, one label per item, classes[labels[i]] is item i's class, images are the files."""
    assert [Path(p) for p in ds.paths] == [p for p, _ in expected]
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (len(expected),)
    assert [ds.classes[k] for k in ds.labels] == [c for _, c in expected]
    assert len(ds.classes) == len({c for _, c in expected}) == len(set(ds.labels.tolist()))
    assert sorted(set(ds.labels.tolist())) == list(range(len(ds.classes)))
    for i, (path, cls) in enumerate(expected):
        image, label = ds[i]
        assert image.mode == "RGB" and label == ds.labels[i] and ds.classes[label] == cls
        assert np.abs(np.asarray(image, dtype=int)[5, 6] - colours[path]).max() <= 6


def make_sop(root: Path) -> dict[str, list[tuple[Path, str]]]:
    rows = {
        "train": [(1, 1, "bicycle_final/111_0.JPG"), (1, 1, "bicycle_final/111_1.JPG"), (2, 2, "chair_final/2_0.JPG")],
        "test": [
            (11319, 3, "bicycle_final/9_0.JPG"),
            (11320, 3, "bicycle_final/10_0.JPG"),
            (11319, 3, "bicycle_final/9_1.JPG"),
        ],
    }
    out, colours = {}, {}
    n = 0
    for split, items in rows.items():
        lines = ["image_id class_id super_class_id path"]
        out[split] = []
        for cls, sup, rel in items:
            n += 1
            lines.append(f"{n} {cls} {sup} {rel}")
            colours[root / rel] = write_jpeg(root / rel, n)
            out[split].append((root / rel, str(cls)))
        name = "Ebay_train.txt" if split == "train" else "Ebay_test.txt"
        (root / name).write_text("\n".join(lines) + "\n")
    return out, colours


def make_cub(root: Path):
    # (image id, class id, path); classes 1 and 100 are train, 101 and 200 test
    rows = [
        (1, 1, "001.Black_footed_Albatross/a.jpg"),
        (2, 100, "100.Brown_Pelican/b.jpg"),
        (3, 101, "101.White_Pelican/c.jpg"),
        (4, 1, "001.Black_footed_Albatross/d.jpg"),
        (5, 200, "200.Common_Yellowthroat/e.jpg"),
    ]
    names = {1: "001.Black_footed_Albatross", 100: "100.Brown_Pelican", 101: "101.White_Pelican"}
    names[200] = "200.Common_Yellowthroat"
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, _, p in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in rows))
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in names.items()))
    # the official split file disagrees with the class split on purpose: it must be ignored
    (root / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i, _, _ in rows))
    colours = {root / "images" / p: write_jpeg(root / "images" / p, i) for i, _, p in rows}
    expected = {
        "train": [(root / "images" / p, names[c]) for _, c, p in rows if c <= 100],
        "test": [(root / "images" / p, names[c]) for _, c, p in rows if c > 100],
    }
    return expected, colours


def make_cars(root: Path):
    # (relative path, class, test flag); classes 1 and 98 train, 99 and 196 test; the flag is ignored
    rows = [
        ("car_ims/000001.jpg", 1, 0),
        ("car_ims/000002.jpg", 1, 1),
        ("car_ims/000003.jpg", 98, 1),
        ("car_ims/000004.jpg", 99, 0),
        ("car_ims/000005.jpg", 196, 1),
        ("car_ims/000006.jpg", 99, 1),
    ]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, (rel, cls, test) in enumerate(rows):
        ann[0, j] = (
            np.array([rel]),
            np.array([[3]], np.uint8),
            np.array([[2]], np.uint8),
            np.array([[9]], np.uint8),
            np.array([[8]], np.uint8),
            np.array([[cls]], np.uint8),
            np.array([[test]], np.uint8),
        )
    class_names = np.empty((1, 196), dtype=object)
    for c in range(196):
        class_names[0, c] = f"Car Model {c + 1}"
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": class_names})
    colours = {root / rel: write_jpeg(root / rel, j) for j, (rel, _, _) in enumerate(rows)}
    expected = {
        "train": [(root / rel, f"Car Model {c}") for rel, c, _ in rows if c <= 98],
        "test": [(root / rel, f"Car Model {c}") for rel, c, _ in rows if c > 98],
    }
    return expected, colours


def make_inat(root: Path):
    lists = {
        "train": ["train_val2018/Plantae/100/a.jpg", "train_val2018/Plantae/100/b.jpg", "train_val2018/Aves/7/c.jpg"],
        "test": ["train_val2018/Insecta/55/d.jpg", "train_val2018/Plantae/101/e.jpg"],
    }
    (root / "Inat_dataset_splits").mkdir()
    colours, expected, n = {}, {}, 0
    for split, paths in lists.items():
        (root / f"Inat_dataset_splits/Inaturalist_{split}_set1.txt").write_text("\n".join(paths) + "\n")
        expected[split] = []
        for rel in paths:
            n += 1
            colours[root / rel] = write_jpeg(root / rel, n)
            expected[split].append((root / rel, "/".join(rel.split("/")[1:3])))
    return expected, colours


def make_vehicleid(root: Path):
    lists = {
        "train": ("train_list.txt", [("0000001", 1), ("0000002", 1), ("0000003", 2)]),
        "test_small": ("test_list_800.txt", [("0000010", 5), ("0000011", 5), ("0000012", 6)]),
        "test_medium": ("test_list_1600.txt", [("0000010", 5), ("0000013", 7)]),
        "test_large": ("test_list_2400.txt", [("0000014", 8), ("0000015", 8), ("0000016", 9), ("0000017", 9)]),
    }
    (root / "train_test_split").mkdir()
    colours, expected = {}, {}
    for split, (name, rows) in lists.items():
        (root / "train_test_split" / name).write_text("".join(f"{i} {v}\n" for i, v in rows))
        expected[split] = []
        for image, vid in rows:
            path = root / "image" / f"{image}.jpg"
            colours[path] = write_jpeg(path, int(image))
            expected[split].append((path, str(vid)))
    return expected, colours


def make_folder(root: Path):
    colours, expected, n = {}, {}, 0
    for split, classes in {"train": {"cat": 2, "dog": 1}, "test": {"emu": 2}}.items():
        expected[split] = []
        for cls, count in classes.items():
            for k in range(count):
                n += 1
                path = root / split / cls / f"{k}.jpg"
                colours[path] = write_jpeg(path, n)
                expected[split].append((path, cls))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    write_jpeg(root / "train" / ".hidden" / "x.jpg", 0)
    return expected, colours


def make_inshop(root: Path):
    # (image name, item id, split); item 2 is in query and gallery, item 5 in the gallery only
    rows = [
        ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "train"),
        ("img/WOMEN/Dresses/id_00000001/01_2_side.jpg", "id_00000001", "train"),
        ("img/MEN/Denim/id_00000003/01_1_front.jpg", "id_00000003", "train"),
        ("img/WOMEN/Tees_Tanks/id_00000002/01_1_front.jpg", "id_00000002", "query"),
        ("img/WOMEN/Tees_Tanks/id_00000004/02_1_front.jpg", "id_00000004", "query"),
        ("img/WOMEN/Tees_Tanks/id_00000002/01_2_side.jpg", "id_00000002", "gallery"),
        ("img/WOMEN/Tees_Tanks/id_00000004/02_3_back.jpg", "id_00000004", "gallery"),
        ("img/MEN/Shirts_Polos/id_00000005/01_4_full.jpg", "id_00000005", "gallery"),
    ]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    lines += [f"{name:<60} {item} {split}" for name, item, split in rows]
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    colours = {root / name: write_jpeg(root / name, n) for n, (name, _, _) in enumerate(rows)}
    expected = {s: [(root / name, item) for name, item, split in rows if split == s] for s in ("train", "query",
                                                                                              "gallery")}
    return expected, colours


REVISITED_IMLIST = {
    "roxford5k": ["all_souls_000001", "ashmolean_000002", "oxford_000003", "all_souls_000013", "radcliffe_000005"],
    "rparis6k": ["paris_defense_000001", "paris_eiffel_000002", "paris_general_000003", "paris_defense_000605"],
}


def make_revisited(root: Path, name: str):
    """gnd_<name>.pkl and jpg/; the queries are database images too (as in the benchmark), cropped to a box."""
    imlist = REVISITED_IMLIST[name]
    qimlist = [imlist[3], imlist[1]]
    gnd = [
        {"bbx": [1.0, 2.0, 9.0, 8.0], "easy": [0], "hard": [3], "junk": [2]},
        {"bbx": [0.4, 0.6, 10.5, 9.2], "easy": [], "hard": [1], "junk": [0]},
    ]
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    colours = {root / "jpg" / f"{n}.jpg": write_jpeg(root / "jpg" / f"{n}.jpg", i) for i, n in enumerate(imlist)}
    landmark = lambda n: n.rpartition("_")[0]  # noqa: E731
    expected = {
        "database": [(root / "jpg" / f"{n}.jpg", landmark(n)) for n in imlist],
        "query": [(root / "jpg" / f"{n}.jpg", landmark(n)) for n in qimlist],
    }
    return expected, colours


@dataclass(frozen=True)
class MiniTree:
    """How to build a dataset's miniature: ``write(root)`` writes it, ``options`` go to build_dataset.

    ``root_is_cache``: the dataset makes its root itself (kanji renders its cache there) instead of requiring it.
    """

    write: Callable[[Path], Any]
    options: dict[str, Any] = field(default_factory=dict)
    root_is_cache: bool = False


TREES: dict[str, MiniTree] = {
    "sop": MiniTree(make_sop),
    "cub": MiniTree(make_cub),
    "cars196": MiniTree(make_cars),
    "inaturalist": MiniTree(make_inat),
    "vehicleid": MiniTree(make_vehicleid),
    "folder": MiniTree(make_folder),
    "inshop": MiniTree(make_inshop),
    "roxford5k": MiniTree(lambda root: make_revisited(root, "roxford5k")),
    "rparis6k": MiniTree(lambda root: make_revisited(root, "rparis6k")),
    # two characters in one font, rendered by the dataset into root (its cache folder)
    "kanji": MiniTree(lambda root: None, {"max_classes": 2, "fonts": ["ipag"], "progress": False}, True),
}
