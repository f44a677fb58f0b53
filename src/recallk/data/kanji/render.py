"""Rendering kanji glyphs, and the render cache.

A glyph is drawn large with PIL, cropped to its ink bounding box, scaled to fit ``size - 2 * margin`` pixels on
its longer side (aspect kept) and centred in a ``size x size`` grey image, dark ink (0) on white (255); margin =
size // 16. A (character, font) pair is *bad* when the font's cmap lacks the character, the drawing has no ink,
or it equals the font's drawing of an unassigned code point (tofu).
Cache: ``<cache dir>/kanji-v<version>-<size>px-<hash>.npy`` (uint8, ``(chars, fonts, size, size)``) plus a JSON
manifest (chars, fonts, bad pairs, version); any cache whose manifest covers the wanted chars and fonts is reused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from recallk.data.kanji.fonts import FontEntry, check_fonts_installed
from recallk.run_folder import atomic_path, write_atomic

RENDER_VERSION = 1
DEFAULT_SIZE = 64
_TOFU_PROBE = "\U0010fffd"  # a private-use code point no font here maps: its drawing is the font's .notdef


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
    offsets = range(0, len(chars), chunk)
    tasks = [(f.path, col, list(chars[s : s + chunk]), size) for col, f in enumerate(fonts) for s in offsets]
    starts = [s for _ in fonts for s in offsets]
    context = _pool_context()
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8) if len(chars) * len(fonts) > 4000 else 0
    if context is None:
        num_workers = 0
    bad: list[tuple[str, str, str]] = []
    pool = context.Pool(num_workers) if num_workers > 0 else None
    bar = tqdm(total=len(chars) * len(fonts), desc="rendering kanji", unit="glyph", disable=not progress)
    try:
        with atomic_path(cache_dir / f"{key}.npy") as tmp:
            shape = (len(chars), len(fonts), size, size)
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            results = pool.imap(_render_task, tasks) if pool is not None else map(_render_task, tasks)
            for start, (column, images, task_bad) in zip(starts, results):
                array[start : start + len(images), column] = images
                bad += [(chars[start + i], fonts[column].name, reason) for i, reason in task_bad]
                bar.update(len(images))
            array.flush()
            del array
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
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
    write_atomic(path, json.dumps(manifest, ensure_ascii=False, indent=1))
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
