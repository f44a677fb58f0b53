"""Each benchmark loader on a miniature tree in its exact on-disk format, written here with tiny JPEGs.

Every image is a solid colour unique to its file, so reading item i back checks that item i is the listed file.
Expected labels, class names and splits come from the lists the tests write, not from the loaders.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from recallk.data import BadImageError, DatasetFileNotFoundError, build_dataset


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


# --------------------------------------------------------------------------------------------------- SOP


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


def test_sop(tmp_path):
    expected, colours = make_sop(tmp_path)
    for split in ("train", "test"):
        ds = build_dataset("sop", tmp_path, split)
        check_items(ds, expected[split], colours)
    assert len(build_dataset("sop", tmp_path, "train").classes) == 2
    assert len(build_dataset("sop", tmp_path, "test").classes) == 2


def test_sop_missing_list_names_the_file(tmp_path):
    make_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("Ebay_test.txt")) as err:
        build_dataset("sop", tmp_path, "test")
    assert str(tmp_path) in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileNotFoundError)


def test_missing_root_and_missing_first_image(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match="nowhere"):
        build_dataset("sop", tmp_path / "nowhere", "train")
    make_sop(tmp_path)
    (tmp_path / "bicycle_final/111_0.JPG").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("111_0.JPG")):
        build_dataset("sop", tmp_path, "train")


# --------------------------------------------------------------------------------------------------- CUB


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


def test_cub_class_split(tmp_path):
    expected, colours = make_cub(tmp_path)
    for split in ("train", "test"):
        check_items(build_dataset("cub", tmp_path, split), expected[split], colours)


def test_cub_missing_labels_file(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("image_class_labels.txt")):
        build_dataset("cub", tmp_path, "train")


# --------------------------------------------------------------------------------------------------- Cars196


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


def test_cars196_class_split_from_mat(tmp_path):
    expected, colours = make_cars(tmp_path)
    for split in ("train", "test"):
        check_items(build_dataset("cars196", tmp_path, split), expected[split], colours)


def test_cars196_missing_mat(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("cars_annos.mat")):
        build_dataset("cars196", tmp_path, "train")


# --------------------------------------------------------------------------------------------------- iNaturalist


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


def test_inaturalist(tmp_path):
    expected, colours = make_inat(tmp_path)
    for split in ("train", "test"):
        check_items(build_dataset("inaturalist", tmp_path, split), expected[split], colours)
    assert build_dataset("inaturalist", tmp_path, "train").classes == ["Aves/7", "Plantae/100"]


def test_inaturalist_missing_list(tmp_path):
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("Inaturalist_train_set1.txt")):
        build_dataset("inaturalist", tmp_path, "train")


# --------------------------------------------------------------------------------------------------- VehicleID


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


def test_vehicleid_all_splits(tmp_path):
    expected, colours = make_vehicleid(tmp_path)
    for split in ("train", "test_small", "test_medium", "test_large"):
        check_items(build_dataset("vehicleid", tmp_path, split), expected[split], colours)


def test_vehicleid_missing_test_list(tmp_path):
    make_vehicleid(tmp_path)
    (tmp_path / "train_test_split/test_list_2400.txt").unlink()
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("test_list_2400.txt")):
        build_dataset("vehicleid", tmp_path, "test_large")


# --------------------------------------------------------------------------------------------------- folder


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


def test_folder_with_splits(tmp_path):
    expected, colours = make_folder(tmp_path)
    for split in ("train", "test"):
        check_items(build_dataset("folder", tmp_path, split), expected[split], colours)
    with pytest.raises(ValueError, match="split"):
        build_dataset("folder", tmp_path, None)


def test_folder_without_splits(tmp_path):
    expected, colours = make_folder(tmp_path)
    ds = build_dataset("folder", tmp_path / "train", None)
    check_items(ds, expected["train"], colours)
    with pytest.raises(DatasetFileNotFoundError, match="train"):
        build_dataset("folder", tmp_path / "train", "train")
    with pytest.raises(DatasetFileNotFoundError, match="no images"):
        build_dataset("folder", tmp_path / "train" / "cat", None)


# --------------------------------------------------------------------------------------------------- bad images


def test_corrupt_image_fails_naming_the_file_unless_skipped(tmp_path):
    expected, colours = make_sop(tmp_path)
    garbage = tmp_path / "chair_final/2_0.JPG"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    truncated = tmp_path / "bicycle_final/111_1.JPG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    ds = build_dataset("sop", tmp_path, "train")
    assert len(ds) == 3
    ds[0]
    for i, bad in ((1, truncated), (2, garbage)):
        with pytest.raises(BadImageError, match=re.escape(bad.name)) as err:
            ds[i]
        assert err.value.path == str(bad) and "skip_bad_images" in str(err.value)

    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = build_dataset("sop", tmp_path, "train", skip_bad_images=True)
    assert sorted(ds.skipped) == sorted([str(truncated), str(garbage)])
    check_items(ds, expected["train"][:1], colours)


def test_skip_bad_images_is_silent_on_a_clean_tree(tmp_path):
    expected, colours = make_sop(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_dataset("sop", tmp_path, "test", skip_bad_images=True)
    assert ds.skipped == []
    check_items(ds, expected["test"], colours)


def test_transform_is_applied(tmp_path):
    make_sop(tmp_path)
    ds = build_dataset("sop", tmp_path, "train", transform=lambda im: im.size)
    assert ds[0] == ((12, 10), ds.labels[0])
