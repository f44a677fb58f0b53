"""Seeded class-disjoint splits (recallk.data.splits) and the flat folder's train/test split (test_classes)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from recallk.data import ClassSubset, build_dataset, class_disjoint_split, validation_split
from recallk.data.splits import check_batchable, held_out_count
from tests.helpers.dataset_trees import write_jpeg


def _labels(sizes):
    return np.repeat(np.arange(len(sizes)), sizes)


def test_split_partitions_items_by_whole_classes():
    labels = np.random.default_rng(0).permutation(_labels([3, 1, 4, 1, 5, 9, 2, 6, 5, 3]))
    kept, held = class_disjoint_split(labels, 3, seed=7)
    assert kept.dtype == held.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))
    assert np.all(np.diff(kept) > 0) and np.all(np.diff(held) > 0)
    assert set(labels[kept]).isdisjoint(labels[held])
    assert len(set(labels[held])) == 3 and len(set(labels[kept])) == 7


def test_split_is_the_documented_sha256_order():
    """Independent of numpy's and torch's generators: the classes whose SHA-256 digests come first."""
    names = [f"class{c}" for c in range(20)]
    labels = _labels([2] * 20)
    _, held = class_disjoint_split(labels, 5, seed=3, class_names=names)
    digest = {c: hashlib.sha256(f"recallk-class-split-3:{names[c]}".encode()).hexdigest() for c in range(20)}
    expected = sorted(range(20), key=digest.get)[:5]
    assert sorted(set(labels[held].tolist())) == sorted(expected)
    # pinned: the same split on every machine and release
    assert sorted(set(labels[held].tolist())) == [0, 1, 8, 11, 19]


def test_split_is_seeded():
    labels = _labels([2] * 40)
    a = class_disjoint_split(labels, 0.25, seed=1)
    b = class_disjoint_split(labels, 0.25, seed=1)
    c = class_disjoint_split(labels, 0.25, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert len(set(labels[a[1]])) == 10  # 25 % of 40 classes


def test_split_follows_class_names_not_ids():
    """Renumbering the classes (e.g. a class folder added in front) moves no class across the split."""
    names = [f"n{c:02d}" for c in range(12)]
    labels = _labels([2] * 12)
    _, held = class_disjoint_split(labels, 4, seed=0, class_names=names)
    shifted_names = ["aaa-new", *names]
    _, held2 = class_disjoint_split(labels + 1, 4, seed=0, class_names=shifted_names)
    held_names = {names[c] for c in labels[held]}
    held2_names = {shifted_names[c] for c in (labels + 1)[held2]}
    assert held_names == held2_names


@pytest.mark.parametrize(("held_out", "classes", "count"), [(1, 5, 1), (4, 5, 4), (0.5, 10, 5), (0.01, 10, 1),
                                                            (0.99, 10, 9), (0.25, 6, 2)])
def test_held_out_count(held_out, classes, count):
    assert held_out_count(held_out, classes) == count


@pytest.mark.parametrize(("held_out", "message"), [(0, "between 1 and"), (5, "between 1 and"), (-1, "between 1"),
                                                   (1.0, r"in \(0, 1\)"), (0.0, r"in \(0, 1\)"),
                                                   (True, "number of classes"), ("3", "number of classes")])
def test_bad_held_out_is_refused(held_out, message):
    with pytest.raises(ValueError, match=message):
        class_disjoint_split(_labels([2] * 5), held_out, what="data.val_classes")


def test_one_class_cannot_be_split():
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_disjoint_split(np.zeros(5, dtype=np.int64), 0.5)


def test_check_batchable_names_the_shortfall():
    labels = _labels([4, 4, 4, 3, 8])  # 4 classes with >= 4 items
    check_batchable(labels, 16, 4, "x leaves")
    with pytest.raises(ValueError, match=r"x leaves 4 training classes .* needs 5"):
        check_batchable(labels, 20, 4, "x leaves")


class _Items:
    """A dataset of (item index, label): shows which base item a subset reads."""

    def __init__(self, labels, classes):
        self.labels, self.classes = np.asarray(labels, dtype=np.int64), classes
        self.paths = [f"p{i}" for i in range(len(labels))]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return i, int(self.labels[i])


def test_class_subset_renumbers_labels_and_keeps_names():
    base = _Items([0, 2, 1, 2, 3, 0], ["a", "b", "c", "d"])
    subset = ClassSubset(base, [1, 3, 4], transform=lambda i: ("seen", i))
    assert subset.labels.dtype == np.int64 and subset.labels.tolist() == [0, 0, 1]
    assert subset.classes == ["c", "d"] and subset.class_ids.tolist() == [2, 3]
    assert subset.paths == ["p1", "p3", "p4"] and len(subset) == 3
    assert [subset[i] for i in range(3)] == [(("seen", 1), 0), (("seen", 3), 0), (("seen", 4), 1)]
    with pytest.raises(ValueError, match="indices"):
        ClassSubset(base, [6])


def _flat_folder(root, classes=10, per_class=2):
    n = 0
    for c in range(classes):
        for k in range(per_class):
            n += 1
            write_jpeg(root / f"kind{c:02d}" / f"{k}.jpg", n)
    return root


def test_folder_test_classes_is_a_seeded_class_disjoint_split(tmp_path):
    root = _flat_folder(tmp_path)
    train = build_dataset("folder", root, "train", test_classes=0.3)
    test = build_dataset("folder", root, "test", test_classes=0.3)
    assert len(train.classes) == 7 and len(test.classes) == 3
    assert set(train.classes).isdisjoint(test.classes)
    assert sorted(train.classes + test.classes) == [f"kind{c:02d}" for c in range(10)]
    assert sorted(train.paths + test.paths) == sorted(str(p) for p in root.rglob("*.jpg"))
    assert sorted(set(train.labels.tolist())) == list(range(7))
    # the split is the documented class_disjoint_split of the class folder names
    names = sorted(f"kind{c:02d}" for c in range(10))
    _, held = class_disjoint_split(np.arange(10), 0.3, seed=0, class_names=names)
    assert test.classes == [names[i] for i in held]
    again = build_dataset("folder", root, "test", test_classes=3, test_seed=0)
    other = build_dataset("folder", root, "test", test_classes=3, test_seed=5)
    assert again.classes == test.classes and other.classes != test.classes
    image, label = test[0]
    assert image.mode == "RGB" and test.classes[label] == test.classes[0]


def test_folder_test_classes_errors(tmp_path):
    root = _flat_folder(tmp_path / "flat", classes=3)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        build_dataset("folder", root, "all", test_classes=1)
    with pytest.raises(ValueError, match="between 1 and 2"):
        build_dataset("folder", root, "train", test_classes=3)
    tree = tmp_path / "tree"
    write_jpeg(tree / "train" / "a" / "0.jpg", 1)
    write_jpeg(tree / "test" / "b" / "0.jpg", 2)
    with pytest.raises(ValueError, match="already holds train/ and test/"):
        build_dataset("folder", tree, "train", test_classes=1)


def test_validation_split_is_the_class_disjoint_split_with_what_a_run_records():
    class Base:  # a registered dataset's attributes, items (name, label)
        name, root, split, options = "folder/train", "/data/photos", "train", {"test_classes": 0.5}
        classes = tuple(f"c{i}" for i in range(7))
        labels = np.repeat(np.arange(7), 3)

        def __getitem__(self, i):
            return f"img{i}", int(self.labels[i])

    base = Base()
    train, val = validation_split(base, 0.3, seed=5, train_transform=str.upper, val_transform=str.title)
    kept, held = class_disjoint_split(base.labels, 0.3, 5, class_names=base.classes)
    assert np.array_equal(train.indices, kept) and np.array_equal(val.indices, held)
    assert (train.val_classes, train.val_seed) == (0.3, 5) and not hasattr(val, "val_classes")
    assert train.name == "folder/train (training classes)" and val.name == "folder/train (validation classes)"
    for subset in (train, val):
        assert (subset.root, subset.split, subset.options) == (base.root, base.split, base.options)
    assert train[0][0] == f"IMG{kept[0]}" and val[0][0] == f"Img{held[0]}"
