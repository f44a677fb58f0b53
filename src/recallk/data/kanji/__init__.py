"""Kanji across fonts, the embedded default dataset (docs/datasets.md): classes, split, dataset, transforms, spec.

A class is one JIS X 0208 level-1 kanji (EUC-JP rows 0xB0-0xCF x cells 0xA1-0xFE: 2,965 characters); an item is
its rendering (:mod:`.render`, with the cache) in one font of ``fonts.tsv`` (:mod:`.fonts`: Debian packages).
Rendered type designs, not scans; a character bad in any selected font is dropped. Split: the characters ordered
by SHA-256 of ``"recallk-kanji-split-0:" + character``; the first 1,483 are train, the other 1,482 test (fixed,
disjoint, independent of numpy versions and of the fonts). Within a split, classes keep JIS order.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms as T

from recallk.data.kanji.fonts import FontEntry, KanjiFontsMissingError, check_fonts_installed, font_table, select_fonts
from recallk.data.kanji.render import DEFAULT_SIZE, RENDER_VERSION, find_cache, render_cache, render_glyph
from recallk.data.registry import DatasetSpec, register_dataset

__all__ = [
    "DEFAULT_SIZE",
    "RENDER_VERSION",
    "SPLITS",
    "FontEntry",
    "KanjiDataset",
    "KanjiFontsMissingError",
    "RandomStrokeWidth",
    "build_kanji",
    "check_fonts_installed",
    "default_cache_dir",
    "font_table",
    "kanji_transforms",
    "level1_kanji",
    "render_cache",
    "render_glyph",
    "select_fonts",
    "split_candidates",
]

SPLITS = ("train", "test")
SPLIT_SALT = "recallk-kanji-split-0:"


def default_cache_dir() -> Path:
    """``$RECALLK_CACHE/kanji`` if RECALLK_CACHE is set, else ``~/.cache/recallk/kanji``."""
    base = os.environ.get("RECALLK_CACHE")
    return Path(base).expanduser() / "kanji" if base else Path.home() / ".cache" / "recallk" / "kanji"


def level1_kanji() -> list[str]:
    """JIS X 0208 level-1 kanji in JIS order: EUC-JP rows 0xB0-0xCF x cells 0xA1-0xFE that decode (2,965)."""
    chars = []
    for row in range(0xB0, 0xD0):
        for cell in range(0xA1, 0xFF):
            try:
                chars.append(bytes([row, cell]).decode("euc_jp"))
            except UnicodeDecodeError:
                continue
    return chars


def split_candidates(split: str) -> list[str]:
    """Characters of a split before dropping bad ones, in JIS order (the rule is in the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"kanji split must be one of {SPLITS}, got {split!r}")
    chars = level1_kanji()
    order = sorted(chars, key=lambda c: hashlib.sha256((SPLIT_SALT + c).encode("utf-8")).hexdigest())
    n_train = (len(order) + 1) // 2
    members = set(order[:n_train] if split == "train" else order[n_train:])
    return [c for c in chars if c in members]


class KanjiDataset(Dataset):
    """Kanji across fonts: class = character, item = one font's rendering.

    Args:
        root: cache folder (None: :func:`default_cache_dir`).
        split: ``"train"`` or ``"test"`` (disjoint character sets).
        transform: applied to the PIL image; None returns the PIL image.
        max_classes: keep at most the first n characters of the split (quick demos and tests); only those are
            rendered if no cache covers them.
        fonts: a subset of fonts (names, files or packages, see :func:`select_fonts`); default all of the TSV.
        size: rendered side in pixels (default 64).
        mode: ``"RGB"`` (default: the grey image repeated in 3 channels, so every model takes it) or ``"L"``.
        num_workers: rendering processes (None: automatic; 0: none).
        progress: show a tqdm bar while rendering.

    Attributes:
        labels: ``(N,)`` int64 class ids; items are class-major (``N = classes x fonts``).
        classes: the characters (``classes[label]``).
        fonts: font names; ``font_ids`` is the ``(N,)`` int64 font index of each item.
        cache_file: the manifest used.
        name: ``"kanji/<split>"``, as :func:`recallk.data.build_dataset` names its datasets (a Trainer API run
            records the dataset from it).
        root: the cache folder as given (``~`` expanded), None for the default one.
        options: the arguments given that change the items (``max_classes``, ``fonts``, and ``size`` and
            ``mode`` when not the defaults), as ``build_dataset`` options: recorded as ``data.options``.

    Raises:
        KanjiFontsMissingError: rendering is needed and font files are missing (lists the Debian packages).
        ValueError: unknown split or font, or ``max_classes < 1``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        max_classes: int | None = None,
        fonts: Sequence[str] | None = None,
        size: int = DEFAULT_SIZE,
        mode: str = "RGB",
        num_workers: int | None = None,
        progress: bool = True,
    ) -> None:
        if max_classes is not None and max_classes < 1:
            raise ValueError(f"max_classes must be a positive integer or None, got {max_classes}")
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        entries = select_fonts(fonts)
        cache_dir = Path(root).expanduser() if root is not None else default_cache_dir()
        candidates = split_candidates(split)
        if max_classes is None:
            wanted = level1_kanji()  # render both splits at once so that train and test share one cache
        else:
            wanted = candidates[: max_classes + max_classes // 20 + 2]  # slack for characters dropped as bad
            candidates = wanted
        names = [e.name for e in entries]
        manifest_path = find_cache(cache_dir, wanted, names, size) or render_cache(
            wanted, entries, cache_dir, size, num_workers, progress
        )
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        bad_chars = {c for c, font, _ in manifest["bad"] if font in set(names)}
        classes = [c for c in candidates if c not in bad_chars][:max_classes]
        row_of = {c: i for i, c in enumerate(manifest["chars"])}
        col_of = {f: i for i, f in enumerate(manifest["fonts"])}
        self.split = split
        self.name = f"kanji/{split}"
        self.root = None if root is None else str(cache_dir)
        # the options that change which items it holds, as given (a Trainer API run records them as data.options)
        given = {"max_classes": max_classes, "fonts": None if fonts is None else list(fonts),
                 "size": None if size == DEFAULT_SIZE else size, "mode": None if mode == "RGB" else mode}
        self.options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        self.classes: list[str] = classes
        self.fonts: list[str] = names
        self.dropped: list[str] = [c for c in candidates if c in bad_chars]
        self.cache_file: Path = manifest_path
        self.transform = transform
        self.mode = mode
        self._array_path = cache_dir / manifest["array"]
        self._rows = np.array([row_of[c] for c in classes], dtype=np.int64)
        self._cols = np.array([col_of[f] for f in names], dtype=np.int64)
        n_fonts = len(names)
        self.labels: np.ndarray = np.repeat(np.arange(len(classes), dtype=np.int64), n_fonts)
        self.font_ids: np.ndarray = np.tile(np.arange(n_fonts, dtype=np.int64), len(classes))
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        """The memory-mapped cache, uint8 ``(cache chars, cache fonts, size, size)``."""
        if self._array is None:
            self._array = np.load(self._array_path, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_array"] = None  # workers reopen the memory map instead of pickling the data
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def image_array(self, i: int) -> np.ndarray:
        """Item i as a ``(size, size)`` uint8 array, dark ink (0) on white (255)."""
        n_fonts = len(self.fonts)
        return np.array(self.array[self._rows[i // n_fonts], self._cols[i % n_fonts]])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        image = Image.fromarray(self.image_array(i))
        if self.mode == "RGB":
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def __repr__(self) -> str:
        return f"KanjiDataset({self.split}, {len(self.classes)} characters x {len(self.fonts)} fonts)"


build_kanji = KanjiDataset  # the registry's builder: build_kanji(root, split, transform, **options)


class RandomStrokeWidth:
    """With probability ``p``, thicken (MinFilter) or thin (MaxFilter), with equal chance, the dark strokes of a
    light PIL image of any mode, with a filter size drawn from ``sizes`` (odd pixel widths); same size and mode."""

    def __init__(self, p: float = 0.5, sizes: Sequence[int] = (3,)) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not sizes or any(s < 3 or s % 2 == 0 for s in sizes):
            raise ValueError(f"sizes must be odd integers >= 3, got {sizes}")
        self.p = p
        self.sizes = tuple(sizes)

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        size = random.choice(self.sizes)
        filt = ImageFilter.MinFilter(size) if random.random() < 0.5 else ImageFilter.MaxFilter(size)
        return image.filter(filt)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sizes={self.sizes})"


def kanji_transforms(kind: str, size: int, interp: T.InterpolationMode) -> list[Callable]:
    """The PIL part of the kanji transforms (before ToTensor and Normalize) for ``kind`` ``"train"`` or ``"test"``.

    Train: random affine (rotation, shift, scale, shear; white fill) + random stroke width + random resized crop
    (no flip: a mirrored character is not the character). Test: resize to the size only.
    """
    if kind == "test":
        return [T.Resize((size, size), interpolation=interp)]
    return [
        T.RandomAffine(degrees=8, translate=(0.06, 0.06), scale=(0.9, 1.1), shear=8, interpolation=interp, fill=255),
        RandomStrokeWidth(p=0.5, sizes=(3,)),
        T.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.85, 1.18), interpolation=interp),
    ]


register_dataset(
    DatasetSpec(
        "kanji", KanjiDataset, splits=SPLITS, eval_ks=(1, 2, 4, 8), image_size=DEFAULT_SIZE, transforms=kanji_transforms
    )
)
