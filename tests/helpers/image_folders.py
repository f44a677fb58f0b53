"""A tiny synthetic image-folder dataset for the tests: each class a coarse random colour (or grey) pattern, its
images noisy copies of it, saved as PNG files that ``recallk.build_dataset("folder", ...)`` reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, classes: int | Mapping[str, Iterable[int]] = 6, *, per_class: int = 4,
                       grid: int = 3, cell: tuple[int, int] = (11, 11), channels: int | None = 3,
                       noise: float = 0.1, seed: int = 0, class_name: str = "class{:02d}") -> Path:
    """Write an image folder of noisy copies of one coarse pattern per class under ``root``; return ``root``.

    Layout: ``classes=n`` writes a flat folder ``root/<class>/<i>.png`` of classes 0..n-1; a mapping such as
    ``{"train": range(8), "test": range(8, 12)}`` writes ``root/<split>/<class>/<i>.png`` with the given class
    indices under each split, in the mapping's order. ``<class>`` is ``class_name.format(c)`` (``class03``) and
    ``<i>`` runs 0..per_class-1.

    Pixels: with ``rng = np.random.default_rng(seed)``, each class draws ``base = rng.random((grid, grid,
    channels))`` (``(grid, grid)`` when ``channels`` is None), then each of its images draws its noise in turn:
    ``np.kron(base, ones(cell)) + noise * rng.standard_normal(shape)``, an image of ``grid * cell[0]`` rows and
    ``grid * cell[1]`` columns (RGB for ``channels=3``, grey "L" for None), clipped to [0, 1] and stored as uint8
    ``(x * 255)`` truncated. The same arguments give the same bytes.

    Folders are created with their parents; an existing class folder raises FileExistsError.
    """
    root = Path(root)
    layout = {None: range(classes)} if isinstance(classes, int) else classes
    rng = np.random.default_rng(seed)
    pattern_shape = (grid, grid) if channels is None else (grid, grid, channels)
    block = np.ones(cell if channels is None else (*cell, 1))
    for split, indices in layout.items():
        for c in indices:
            base = rng.random(pattern_shape)
            folder = (root if split is None else root / split) / class_name.format(c)
            folder.mkdir(parents=True)
            for i in range(per_class):
                pattern = np.kron(base, block)
                image = pattern + noise * rng.standard_normal(pattern.shape)
                Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root
