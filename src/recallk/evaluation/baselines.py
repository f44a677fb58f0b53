"""Reference points that need no training: raw pixels as embeddings."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


def pixel_embeddings(dataset: Dataset, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels as embeddings: each image resized to ``size`` x ``size`` grey, flattened, L2-normalised.

    ``dataset`` yields PIL images (no transform) and has ``.labels``. Returns float32 (N, size * size) and
    int64 (N,), row i from item i.
    """
    rows = []
    for i in range(len(dataset)):
        image = dataset[i][0].convert("L").resize((size, size))
        rows.append(np.asarray(image, dtype=np.float32).ravel())
    pixels = np.stack(rows)
    pixels /= np.linalg.norm(pixels, axis=1, keepdims=True).clip(min=1e-12)
    return pixels, np.asarray(dataset.labels, dtype=np.int64)
