"""The shared dataset class :class:`ImageListDataset` (image files with integer labels), the checks every loader
needs, and :func:`image_list_builder`, which makes a dataset builder of a parser of the dataset's own lists."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm


class DatasetFileNotFoundError(FileNotFoundError, ValueError):
    """A list file, folder or image that a loader expects is missing (a ValueError and FileNotFoundError)."""


#: The Python spelling of the way out of a bad image, which ends the message of a :class:`BadImageError`; a caller
#: with other words for it (the CLI: ``data.options.skip_bad_images=true``) builds its own from ``.problem`` and
#: ``.fix``.
SKIP_BAD_IMAGES_HINT = ("or pass skip_bad_images=True to skip unreadable images (they are then listed in "
                        "dataset.skipped)")


class BadImageError(ValueError):
    """An image file exists but cannot be decoded; ``.path`` is the file.

    ``str(err)`` is ``"<problem>. <fix>, <SKIP_BAD_IMAGES_HINT>."``: ``.problem`` says what is wrong with the file,
    ``.fix`` how to repair the file itself (without the ``skip_bad_images`` option, which callers name in their
    own words).
    """

    def __init__(self, path: str | os.PathLike, cause: BaseException | None = None) -> None:
        self.path = str(path)
        reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        self.problem = f"cannot decode image {self.path}{reason}"
        self.fix = "Replace or delete the file"
        super().__init__(f"{self.problem}. {self.fix}, {SKIP_BAD_IMAGES_HINT}.")

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt as raised (e.g. across a loader worker's pipe)
        return _rebuild_bad_image_error, (type(self), self.__dict__, self.args)


def _rebuild_bad_image_error(cls: type, state: dict[str, Any], args: tuple[Any, ...]) -> BadImageError:
    err = cls.__new__(cls)
    ValueError.__init__(err, *args)
    err.__dict__.update(state)
    return err


def require(path: Path, what: str, hint: str = "", folder: bool = False) -> Path:
    """Return ``path`` if it is a file (a folder if ``folder``), else raise DatasetFileNotFoundError naming both."""
    if not (path.is_dir() if folder else path.is_file()):
        where = f"the {'folder' if folder else 'file'} {path}.{(' ' + hint) if hint else ''}"
        raise DatasetFileNotFoundError(f"{what} not found: expected {where}")
    return path


class MissingRootError(ValueError):
    """A dataset that reads files was given no root; ``dataset`` names it (the CLI says ``--root``)."""

    def __init__(self, dataset: str) -> None:
        super().__init__(f"dataset {dataset!r} needs root= (the folder the dataset unpacks to); see docs/datasets.md")
        self.dataset = dataset


def resolve_root(root: str | os.PathLike | None, name: str) -> Path:
    """The dataset root as a Path; MissingRootError (a ValueError) when it is None, DatasetFileNotFoundError when
    absent."""
    if root is None:
        raise MissingRootError(name)
    return require(Path(root).expanduser(), f"{name} root folder", folder=True)


def absolute_root(root: str | os.PathLike) -> str:
    """``root`` as an absolute path string (``~`` expanded, relative to the current directory, symbolic links kept
    as named), as ``recallk.config.with_absolute_root`` records ``data.root``."""
    return os.path.abspath(os.path.expanduser(str(root)))


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text list file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_rows(path: Path, fields: int, expected: str, skip: int = 0, maxsplit: int = -1) -> list[list[str]]:
    """The lines of a list file after ``skip`` header lines, each split on whitespace into ``fields`` parts.

    Raises ValueError ``"<path>:<line>: expected <expected>, got '<line>'"`` for a line with another count.
    """
    rows = []
    for n, line in enumerate(read_lines(path)[skip:], start=1 + skip):
        parts = line.split(maxsplit=maxsplit)
        if len(parts) != fields:
            raise ValueError(f"{path}:{n}: expected {expected}, got {line!r}")
        rows.append(parts)
    return rows


#: Transparent pixels are composited onto this opaque background (white, as image viewers and web pages show
#: product photos) before the alpha channel is dropped.
TRANSPARENCY_BACKGROUND = (255, 255, 255)

#: Modes holding more than 8 bits per sample, as Pillow names them, and the divisor that maps their full range
#: onto 0..255 (16-bit: 65535 / 255 = 257). Mode "I" (32-bit signed) is read as 16-bit data, the range of every
#: format that produces it (16-bit PNG and TIFF); values outside 0..65535 are refused.
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
#: Modes with an alpha band (composited on ``TRANSPARENCY_BACKGROUND``), and modes Pillow's ``convert("RGB")``
#: turns into the same picture; the export sidecar states these rules (``recallk.retrieval.export``).
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
PLAIN_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"})


class UnsupportedImageModeError(BadImageError):
    """An image decodes, but its pixel mode has no defined 8-bit RGB form; ``.path`` and ``.mode`` say which."""

    def __init__(self, path: str | os.PathLike, mode: str, why: str) -> None:
        self.mode = mode
        self.path = str(path)
        self.problem = f"cannot convert image {path} (Pillow mode {mode!r}) to 8-bit RGB: {why}"
        self.fix = ("Convert the file to 8-bit RGB (e.g. PIL.Image.open(path).convert('RGB') after scaling its values "
                    "to 0..255)")
        ValueError.__init__(self, f"{self.problem}. {self.fix}, {SKIP_BAD_IMAGES_HINT}.")


def _scaled_to_l(img: Image.Image, path: str | os.PathLike) -> Image.Image:
    """A 16-bit ("I;16*", "I") or float ("F") greyscale image as mode "L", by the fixed rule of its mode:
    16-bit v -> round(v / 257); float in [0, 1] -> round(255 v). Anything else raises UnsupportedImageModeError."""
    a = np.asarray(img)
    if img.mode in SIXTEEN_BIT_MODES:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise UnsupportedImageModeError(path, img.mode, f"values span {lo}..{hi}, outside the 16-bit 0..65535")
        out = np.rint(a.astype(np.float64) / 257.0)
    else:  # "F"
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise UnsupportedImageModeError(
                path, img.mode, f"32-bit float values span {lo:g}..{hi:g}; only 0..1 has a defined 8-bit form"
            )
        out = np.rint(a.astype(np.float64) * 255.0)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def to_rgb8(img: Image.Image, path: str | os.PathLike = "<image>", *, in_place: bool = False) -> Image.Image:
    """The 8-bit RGB picture of a decoded Pillow image, as an image viewer shows it.

    - EXIF orientation is applied (``PIL.ImageOps.exif_transpose``): a photo stored sideways comes out upright.
    - Transparency (an alpha channel, or a ``transparency`` key of a "P", "L" or "RGB" image) is composited onto
      ``TRANSPARENCY_BACKGROUND`` (white).
    - 16-bit greyscale ("I;16", "I;16B", "I;16L", "I;16N", "I") maps 0..65535 to 0..255 (v / 257, rounded);
      float "F" maps 0..1 to 0..255. Pillow reads 16-bit RGB files (PNG, TIFF) as 8-bit "RGB" itself.
    - "1", "L", "P", "RGB", "CMYK", "YCbCr" use Pillow's conversion.

    ``in_place``: orient ``img`` itself (no copy) and return it when it is already RGB (the loader's own images).

    Raises:
        UnsupportedImageModeError: a mode or value range without a defined 8-bit form (names file and mode).
    """
    img = ImageOps.exif_transpose(img, in_place=True) or img if in_place else ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info and in_place:
        return img
    if mode in SIXTEEN_BIT_MODES or mode == "F":
        return _scaled_to_l(img, path).convert("RGB")
    if mode in ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENCY_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in PLAIN_MODES:
        return img.convert("RGB")
    raise UnsupportedImageModeError(path, mode, "recallk has no rule for this mode")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully decoded as 8-bit RGB by :func:`to_rgb8` (EXIF orientation applied, transparency
    on white, 16-bit and float scaled by fixed rules).

    Raises:
        DatasetFileNotFoundError: the file is missing.
        BadImageError: it cannot be decoded (naming the file); :class:`UnsupportedImageModeError` when it decodes
            to a mode or value range without a defined 8-bit RGB form (naming the file and the mode).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb8(img, path, in_place=True)
    except FileNotFoundError as e:
        raise DatasetFileNotFoundError(f"image not found: {path}") from e
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(path, e) from e


def image_is_readable(path: str | os.PathLike) -> bool:
    """Fast full decode check, including the conversion to 8-bit RGB: JPEGs decode at 1/8 scale (draft mode),
    other formats decode fully."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            to_rgb8(img, path, in_place=True)
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


class ImageListDataset(Dataset):
    """Images listed by path, with integer labels.

    Args:
        paths: image files, in dataset order.
        class_keys: one hashable, sortable class key per path (e.g. an int id or a folder name).
        transform: applied to the PIL RGB image; None returns the PIL image.
        class_names: optional map key -> display name; default ``str(key)``.
        skip_bad_images: when True, decode every image once at construction (fast draft decode), drop the
            unreadable or missing ones, warn, and record them in ``.skipped``; when False, a bad image raises
            :class:`BadImageError` (naming the file) when it is read.
        name: dataset name used in messages.
        root: the folder the dataset was read from (the ``root`` of ``build_dataset``, made absolute by the
            builders), or None; recorded by a :class:`recallk.engine.Trainer` run as ``data.root``.
        split: the split it is (the ``split`` of ``build_dataset``), or None; recorded as ``data.train_split``.
        options: the ``build_dataset`` options it was built with that change which items it holds (e.g. a
            folder's ``test_classes`` and ``test_seed``), or ``{}``; recorded as ``data.options``.

    Attributes:
        root, split, options: as given (``options`` a new dict).
        paths: list of ``str`` paths, one per item.
        labels: ``numpy.int64`` array of shape ``(N,)``, class ids in ``0..C-1`` (keys in sorted order).
        classes: list of ``C`` class names, ``classes[labels[i]]`` is item i's class.
        skipped: list of ``str`` paths dropped by ``skip_bad_images``.

    ``progress`` (keyword): show the tqdm bar of the ``skip_bad_images`` check (False: no bar, as the CLI's
    ``--no-progress`` passes it).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        class_keys: Sequence[Hashable],
        transform: Callable[[Image.Image], Any] | None = None,
        class_names: dict[Hashable, str] | None = None,
        skip_bad_images: bool = False,
        name: str = "dataset",
        *,
        root: str | None = None,
        split: str | None = None,
        options: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if len(paths) != len(class_keys):
            raise ValueError(f"{name}: {len(paths)} paths but {len(class_keys)} class keys")
        if len(paths) == 0:
            raise ValueError(f"{name}: the image list is empty; check the root folder and the split")
        paths = [str(p) for p in paths]
        keys = list(class_keys)
        self.skipped: list[str] = []
        if skip_bad_images:
            ok = [image_is_readable(p) for p in tqdm(paths, desc=f"checking {name} images", leave=False,
                                                      disable=not progress)]
            self.skipped = [p for p, good in zip(paths, ok) if not good]
            if self.skipped:
                shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
                warnings.warn(f"{name}: skipped {len(self.skipped)} unreadable image(s): {shown}", stacklevel=3)
            paths = [p for p, good in zip(paths, ok) if good]
            keys = [k for k, good in zip(keys, ok) if good]
            if not paths:
                raise ValueError(f"{name}: every image was unreadable")
        else:
            first = Path(paths[0])
            if not first.is_file():
                raise DatasetFileNotFoundError(
                    f"{name}: the first listed image {first} does not exist; is root the dataset's "
                    "own folder (the one holding its list files and images)?"
                )
        sorted_keys = sorted(set(keys))
        index = {k: i for i, k in enumerate(sorted_keys)}
        names = class_names or {}
        self.name = name
        self.root, self.split, self.options = root, split, dict(options or {})
        self.paths: list[str] = paths
        self.labels: np.ndarray = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
        self.classes: list[str] = [names.get(k, str(k)) for k in sorted_keys]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = load_rgb(self.paths[i])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self)} images, {len(self.classes)} classes)"


def image_list_builder(name: str, parse: Callable, default_split: str | None = "train") -> Callable[..., Dataset]:
    """The builder ``build(root, split, transform=None, skip_bad_images=False, progress=True)`` of dataset ``name``
    (``progress``: the bar of the ``skip_bad_images`` check), documented by ``parse(root folder, split) -> (paths,
    class_keys, class_names or None)``, which reads the lists."""

    def build(
        root: str | os.PathLike | None,
        split: str | None = default_split,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
        progress: bool = True,
    ) -> ImageListDataset:
        base = resolve_root(root, name)
        paths, keys, names = parse(base, split)
        return ImageListDataset(paths, keys, transform, names, skip_bad_images, name=f"{name}/{split or 'all'}",
                                root=absolute_root(base), split=split,
                                options={"skip_bad_images": True} if skip_bad_images else {}, progress=progress)

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__module__, build.__doc__ = parse.__module__, parse.__doc__
    return build
