"""Kanji across fonts: the embedded default dataset.

Each class is one JIS X 0208 level-1 kanji (EUC-JP rows 0xB0-0xCF, cells 0xA1-0xFE: 2,965 characters); each
item is that character rendered in one of the fonts listed in ``kanji-fonts.tsv`` (Debian font packages:
brush, cursive, handwriting, pixel and print faces). These are rendered type designs, not scans.

Rendering: the glyph is drawn large with PIL, cropped to its ink bounding box, scaled to fit
``size - 2 * margin`` pixels on its longer side (aspect kept) and centred in a ``size x size`` grey image,
dark ink (0) on white (255); margin = size // 16.
A (character, font) pair is *bad* when the font's cmap lacks the character, the drawing has no ink, or it
equals the font's drawing of an unassigned code point (tofu); a character bad in any selected font is dropped.

Split: the 2,965 characters are ordered by SHA-256 of ``"recallk-kanji-split-0:" + character``; the first
1,483 are train, the other 1,482 test (disjoint, fixed, independent of numpy versions and of the fonts).
Within a split, classes keep JIS order.

Cache: rendered once into ``<cache dir>/kanji-v<version>-<size>px-<hash>.npy`` (uint8, shape
``(chars, fonts, size, size)``) plus a JSON manifest (chars, fonts, bad pairs, version); later loads
memory-map the array and any cache whose manifest covers the requested characters and fonts is reused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset
from tqdm.auto import tqdm

RENDER_VERSION = 1
DEFAULT_SIZE = 64
SPLITS = ("train", "test")
SPLIT_SALT = "recallk-kanji-split-0:"
_TOFU_PROBE = "\U0010fffd"  # a private-use code point no font here maps: its drawing is the font's .notdef


class KanjiFontsMissingError(FileNotFoundError, ValueError):
    """Font files of kanji-fonts.tsv are not installed; the message names the Debian packages."""


@dataclass(frozen=True)
class FontEntry:
    """One font of kanji-fonts.tsv: Debian ``package``, font file ``path`` and short ``name`` (file stem)."""

    package: str
    path: str

    @property
    def name(self) -> str:
        return Path(self.path).stem


def font_table() -> list[FontEntry]:
    """The fonts of ``recallk/data/kanji-fonts.tsv`` (package<TAB>font file), in file order."""
    text = resources.files("recallk.data").joinpath("kanji-fonts.tsv").read_text(encoding="utf-8")
    entries = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            package, path = line.split("\t")
            entries.append(FontEntry(package.strip(), path.strip()))
    return entries


def select_fonts(fonts: Sequence[str] | None = None) -> list[FontEntry]:
    """Fonts by name (file stem, e.g. ``"ipag"``), file name, full path or Debian package (all its files).

    Raises:
        ValueError: an unknown font, listing the valid names.
    """
    table = font_table()
    if fonts is None:
        return table
    if isinstance(fonts, str):
        fonts = [fonts]
    chosen: list[FontEntry] = []
    for want in fonts:
        hits = [e for e in table if want in (e.name, Path(e.path).name, e.path, e.package)]
        if not hits:
            raise ValueError(f"unknown kanji font {want!r}; choose from {[e.name for e in table]}")
        chosen += [e for e in hits if e not in chosen]
    return chosen


def check_fonts_installed(fonts: Sequence[FontEntry]) -> None:
    """Raise KanjiFontsMissingError naming the Debian packages whose font files are missing."""
    missing = [e for e in fonts if not Path(e.path).is_file()]
    if missing:
        packages = sorted({e.package for e in missing})
        files = ", ".join(e.path for e in missing)
        raise KanjiFontsMissingError(
            f"kanji dataset: {len(missing)} font file(s) missing ({files}). Install them with "
            "`make setup` or "
            f"`sudo apt-get install -y {' '.join(packages)}`, or pick installed fonts with the fonts= option."
        )


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


def default_cache_dir() -> Path:
    """``$RECALLK_CACHE/kanji`` if RECALLK_CACHE is set, else ``~/.cache/recallk/kanji``."""
    base = os.environ.get("RECALLK_CACHE")
    return Path(base).expanduser() / "kanji" if base else Path.home() / ".cache" / "recallk" / "kanji"


# ---------------------------------------------------------------------------------------------- rendering


def render_glyph(font: ImageFont.FreeTypeFont, char: str, size: int = DEFAULT_SIZE) -> np.ndarray | None:
    """Draw ``char`` as a ``(size, size)`` uint8 image, dark ink on white; None if blank."""
    big = round(font.size * 2)
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).text((big // 2, big // 2), char, fill=255, font=font, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    fit = size - 2 * max(1, size // 16)
    scale = fit / max(glyph.size)
    w, h = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
    glyph = glyph.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("L", (size, size), 0)
    out.paste(glyph, ((size - w) // 2, (size - h) // 2))
    return 255 - np.asarray(out, dtype=np.uint8)


_WORKER_FONTS: dict[str, tuple[ImageFont.FreeTypeFont, set[int], np.ndarray | None]] = {}


def _load_font(path: str, size: int) -> tuple[ImageFont.FreeTypeFont, set[int], np.ndarray | None]:
    from fontTools.ttLib import TTFont

    key = f"{path}@{size}"
    if key not in _WORKER_FONTS:
        font = ImageFont.truetype(path, max(96, round(size * 1.5)), index=0)
        with TTFont(path, fontNumber=0, lazy=True) as tt:
            cmap = set(tt.getBestCmap())
        _WORKER_FONTS[key] = (font, cmap, render_glyph(font, _TOFU_PROBE, size))
    return _WORKER_FONTS[key]


def _render_task(task: tuple[str, int, Sequence[str], int]) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    """Render chars in one font -> (font column, (n, size, size) uint8, [(char offset, reason), ...])."""
    path, column, chars, size = task
    font, cmap, tofu = _load_font(path, size)
    out = np.full((len(chars), size, size), 255, dtype=np.uint8)
    bad = []
    for i, char in enumerate(chars):
        if ord(char) not in cmap:
            bad.append((i, "not in cmap"))
            continue
        img = render_glyph(font, char, size)
        if img is None:
            bad.append((i, "blank"))
        elif tofu is not None and np.array_equal(img, tofu):
            bad.append((i, "tofu"))
        else:
            out[i] = img
    return column, out, bad


def _pool_context() -> multiprocessing.context.BaseContext | None:
    """Fork on Linux (workers run only PIL and fontTools and never re-import ``__main__``, so scripts without a
    main guard, notebooks and stdin work); None (render in-process) elsewhere and inside daemonic workers."""
    if sys.platform != "linux" or multiprocessing.current_process().daemon:
        return None
    return multiprocessing.get_context("fork")


def _cache_key(fonts: Sequence[FontEntry], chars: Sequence[str], size: int) -> str:
    text = json.dumps([RENDER_VERSION, size, [f.name for f in fonts], "".join(chars)])
    return f"kanji-v{RENDER_VERSION}-{size}px-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


def render_cache(
    chars: Sequence[str],
    fonts: Sequence[FontEntry],
    cache_dir: Path,
    size: int = DEFAULT_SIZE,
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Render ``chars x fonts`` into ``cache_dir`` (.npy + .json, written atomically); returns the manifest.

    ``num_workers`` processes render in parallel (None: the CPU count, capped at 8, for more than 4,000
    glyphs; 0: in this process; always in-process off Linux). Raises KanjiFontsMissingError if a font file
    is missing.
    """
    check_fonts_installed(fonts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(fonts, chars, size)
    chunk = 128
    tasks = [
        (f.path, col, list(chars[s : s + chunk]), size)
        for col, f in enumerate(fonts)
        for s in range(0, len(chars), chunk)
    ]
    starts = [s for _ in fonts for s in range(0, len(chars), chunk)]
    context = _pool_context()
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8) if len(chars) * len(fonts) > 4000 else 0
    if context is None:
        num_workers = 0
    tmp = cache_dir / f".{key}.{uuid.uuid4().hex}.npy.tmp"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(chars), len(fonts), size, size))
    bad: list[tuple[str, str, str]] = []
    pool = context.Pool(num_workers) if num_workers > 0 else None
    bar = tqdm(total=len(chars) * len(fonts), desc="rendering kanji", unit="glyph", disable=not progress)
    try:
        results = pool.imap(_render_task, tasks) if pool is not None else map(_render_task, tasks)
        for start, (column, images, task_bad) in zip(starts, results):
            array[start : start + len(images), column] = images
            bad += [(chars[start + i], fonts[column].name, reason) for i, reason in task_bad]
            bar.update(len(images))
        array.flush()
        del array
        os.replace(tmp, cache_dir / f"{key}.npy")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if tmp.exists():
            tmp.unlink()
    manifest = {
        "version": RENDER_VERSION,
        "size": size,
        "array": f"{key}.npy",
        "chars": "".join(chars),
        "fonts": [f.name for f in fonts],
        "font_files": [f.path for f in fonts],
        "bad": sorted(bad),
    }
    path = cache_dir / f"{key}.json"
    tmp_json = cache_dir / f".{key}.{uuid.uuid4().hex}.json.tmp"
    tmp_json.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp_json, path)
    return path


def find_cache(cache_dir: Path, chars: Sequence[str], font_names: Sequence[str], size: int) -> Path | None:
    """A manifest in ``cache_dir`` covering every char and font at this size and version, or None."""
    if not cache_dir.is_dir():
        return None
    want_chars, want_fonts = set(chars), set(font_names)
    for path in sorted(cache_dir.glob("kanji-*.json"), key=lambda p: p.stat().st_size):
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            m.get("version") == RENDER_VERSION
            and m.get("size") == size
            and want_fonts <= set(m.get("fonts", ()))
            and want_chars <= set(m.get("chars", ""))
            and (cache_dir / m.get("array", "")).is_file()
        ):
            return path
    return None


# ---------------------------------------------------------------------------------------------- dataset


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


def build_kanji(
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform: Callable | None = None,
    **options: Any,
) -> KanjiDataset:
    """Registry entry for ``kanji``: ``KanjiDataset(root, split, transform, **options)``."""
    return KanjiDataset(root, split, transform, **options)
