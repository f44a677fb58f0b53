"""Revisited Oxford 5k and Paris 6k (Radenovic, Iscen, Tolias, Avrithis, Chum, CVPR 2018), optionally with the
R1M distractors.

On disk (as the benchmark's own download script lays it out): ``<root>/gnd_roxford5k.pkl`` (``gnd_rparis6k.pkl``)
and ``<root>/jpg/<name>.jpg``. The pickle is a dict with ``imlist`` (database image names, no extension),
``qimlist`` (the 70 query image names) and ``gnd``: one dict per query with ``bbx`` ``[x1, y1, x2, y2]`` (pixels)
and the database indices ``easy``, ``hard`` and ``junk``. Splits: ``query`` (the query images cropped to their
box) and ``database``. R1M: ``distractors=<folder>`` holding ``revisitop1m.txt`` (one relative image name per line)
and ``jpg/``; its images are appended to the database after the ground-truth images (never positive, never junk).

The pickle is read by :class:`GroundTruthUnpickler`, which admits only what the benchmark's files hold (builtins
containers, numbers and strings, numpy arrays, dtypes and scalars): the file comes over plain http, and a plain
``pickle.load`` of a tampered file would run its code.

Labels: the ground truth is per query (``dataset.ground_truth``), not per class; ``labels`` / ``classes`` are the
landmark prefix of each file name (``all_souls_000013`` -> ``all_souls``; R1M images: ``revisitop1m``), a
convenience for browsing, never used by the evaluation.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recallk.data.datasets.base import (
    ImageListDataset,
    absolute_root,
    load_rgb,
    read_lines,
    require,
    resolve_root,
)
from recallk.data.registry import DatasetSpec, register_dataset

SPLITS = ("query", "database")
DISTRACTOR_CLASS = "revisitop1m"


class RevisitedDataset(ImageListDataset):
    """An :class:`ImageListDataset` of a revisited benchmark split; query images are cropped to their box.

    Attributes (beyond ImageListDataset's):
        ground_truth: list of one dict per query: ``bbx`` (4,) float64 ``[x1, y1, x2, y2]`` and ``easy``,
            ``hard``, ``junk`` (int64 arrays of database indices), as in the pickle.
        boxes: (Q, 4) float64 crop boxes of the query split's items (row i for item i); None for the database.
        num_ground_truth_images: database images the ground truth indexes (distractors come after them).
    """

    def __init__(self, *args: Any, ground_truth: list[dict[str, np.ndarray]], boxes: np.ndarray | None,
                 num_ground_truth_images: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ground_truth = ground_truth
        self.boxes = boxes
        self.num_ground_truth_images = num_ground_truth_images

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = load_rgb(self.paths[i])
        if self.boxes is not None:  # PIL rounds the float box to whole pixels
            image = image.crop(tuple(float(v) for v in self.boxes[i]))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


def _landmark(name: str) -> str:
    stem, _, number = Path(name).name.rpartition("_")
    return stem if stem and number.isdigit() else Path(name).name


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals this numpy's own array, dtype and scalar pickles name (protocols 0 to 5), under both the
    ``numpy.core`` (numpy 1.x) and ``numpy._core`` (numpy 2) module names; taken from the reductions themselves,
    so that nothing is imported by name."""
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # numpy.core.multiarray.scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy.core.numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


_BUILTINS = {"set": set, "frozenset": frozenset, "bytes": bytes, "bytearray": bytearray, "complex": complex}
_ALLOWED_GLOBALS = {
    **_numpy_globals(),
    **{(module, key): value for module in ("builtins", "__builtin__") for key, value in _BUILTINS.items()},
}
OFFICIAL_SITE = "http://cmp.felk.cvut.cz/revisitop/"


class GroundTruthUnpickler(pickle.Unpickler):
    """An unpickler of revisited ground-truth files that calls nothing but the constructors of builtins containers,
    numbers and strings and of numpy arrays, dtypes and scalars (``_ALLOWED_GLOBALS``), plus ``_codecs.encode`` with
    latin-1 (how protocols 0 to 2 store bytes). Any other global is refused before it is looked up, so before any
    of the file's code could run.

    Raises (from ``load``):
        ValueError: naming the file and the refused global (or codec), saying the file is not a revisited
            ground-truth file and to download it again from the benchmark's site.
    """

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def _refuse(self, what: str) -> ValueError:
        return ValueError(
            f"{self.path}: not a revisited ground-truth file: it asks for {what}, and those files hold only lists, "
            f"dicts, strings, numbers and numpy arrays (it was not unpickled further; it may have been tampered "
            f"with); re-download it from the benchmark's official site, {OFFICIAL_SITE}"
        )

    def _latin1_encode(self, text: str, encoding: str = "utf-8") -> bytes:
        if str(encoding).lower().replace("_", "-") not in ("latin-1", "latin1"):
            raise self._refuse(f"_codecs.encode with the codec {encoding!r} (only latin-1 is allowed)")
        return text.encode("latin-1")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise self._refuse(f"the global {module}.{name}")
        return allowed


def load_ground_truth(path: Path, name: str) -> tuple[list[str], list[str], list[dict[str, np.ndarray]]]:
    """``(imlist, qimlist, gnd)`` of a revisited ground-truth pickle, checked.

    Read with :class:`GroundTruthUnpickler`, never a plain ``pickle.load``.

    Raises:
        ValueError: a global or codec other than those of containers, numbers, strings and numpy arrays (the file
            is refused before any of it runs), not a dict with ``imlist``/``qimlist``/``gnd``, one gnd entry per
            query missing, a gnd entry without ``bbx``/``easy``/``hard``/``junk``, a box that is not 4 numbers with
            x1 < x2 and y1 < y2, or a database index out of range.
    """
    try:
        with open(path, "rb") as f:
            cfg = GroundTruthUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: cannot read the {name} ground truth pickle ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{path}: expected a dict with keys 'imlist', 'qimlist' and 'gnd', got {got}")
    imlist, qimlist = [str(n) for n in cfg["imlist"]], [str(n) for n in cfg["qimlist"]]
    if len(cfg["gnd"]) != len(qimlist):
        raise ValueError(f"{path}: {len(qimlist)} query images but {len(cfg['gnd'])} ground-truth entries")
    gnd = []
    for q, entry in enumerate(cfg["gnd"]):
        missing = {"bbx", "easy", "hard", "junk"} - set(entry)
        if missing:
            raise ValueError(f"{path}: gnd[{q}] lacks {sorted(missing)}")
        box = np.asarray(entry["bbx"], dtype=np.float64).reshape(-1)
        if box.shape != (4,) or not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"{path}: gnd[{q}]['bbx'] must be [x1, y1, x2, y2] with x1 < x2, y1 < y2, got {box}")
        item = {"bbx": box}
        for key in ("easy", "hard", "junk"):
            ids = np.asarray(entry[key], dtype=np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= len(imlist)):
                raise ValueError(f"{path}: gnd[{q}][{key!r}] holds an index outside [0, {len(imlist) - 1}]")
            item[key] = ids
        gnd.append(item)
    return imlist, qimlist, gnd


def _distractor_paths(folder: str | os.PathLike) -> list[Path]:
    base = require(Path(folder).expanduser(), "R1M distractor folder", folder=True)
    names = read_lines(require(base / "revisitop1m.txt", "R1M image list", "distractors= is the revisitop1m folder."))
    return [base / "jpg" / (n if Path(n).suffix else f"{n}.jpg") for n in names]


def revisited_builder(name: str) -> Callable[..., RevisitedDataset]:
    """The builder ``build(root, split="database", transform=None, distractors=None)`` of ``roxford5k`` or
    ``rparis6k``."""

    def build(
        root: str | os.PathLike | None,
        split: str = "database",
        transform: Callable | None = None,
        distractors: str | os.PathLike | None = None,
    ) -> RevisitedDataset:
        """Revisited split ``query`` (query images cropped to their ``bbx``) or ``database`` (all images, then
        the R1M images of ``distractors`` if given; the option is ignored for ``query``).

        Raises:
            ValueError: a bad ground-truth pickle (see ``load_ground_truth``).
            DatasetFileNotFoundError: the root, the pickle, the first image or the R1M files are missing.
        """
        if split not in SPLITS:
            raise ValueError(f"dataset {name!r} has splits {list(SPLITS)}, got {split!r}")
        base = resolve_root(root, name)
        pkl = require(base / f"gnd_{name}.pkl", f"{name} ground truth", f"root must hold gnd_{name}.pkl and jpg/.")
        imlist, qimlist, gnd = load_ground_truth(pkl, name)
        names = qimlist if split == "query" else imlist
        paths = [base / "jpg" / f"{n}.jpg" for n in names]
        keys = [_landmark(n) for n in names]
        if split == "database" and distractors is not None:
            extra = _distractor_paths(distractors)
            paths, keys = paths + extra, keys + [DISTRACTOR_CLASS] * len(extra)
        boxes = np.stack([g["bbx"] for g in gnd]) if split == "query" else None
        options = {"distractors": absolute_root(distractors)} if split == "database" and distractors else {}
        return RevisitedDataset(paths, keys, transform, name=f"{name}/{split}", ground_truth=gnd, boxes=boxes,
                                num_ground_truth_images=len(imlist), root=absolute_root(base), split=split,
                                options=options)

    build.__name__ = build.__qualname__ = f"build_{name}"
    return build


build_roxford5k = revisited_builder("roxford5k")
build_rparis6k = revisited_builder("rparis6k")
for _name, _build in (("roxford5k", build_roxford5k), ("rparis6k", build_rparis6k)):
    register_dataset(
        DatasetSpec(
            _name,
            _build,
            splits=SPLITS,
            eval_ks=(1, 5, 10),
            eval_splits=("query",),
            eval_protocol="revisited",
            gallery_split="database",
        )
    )
