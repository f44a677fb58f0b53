"""Shared data makers for the evaluation tests: clustered embeddings, uneven classes, exact ties."""

from __future__ import annotations

import numpy as np


def integer_clusters(
    rng: np.random.Generator, n: int, dim: int = 8, n_classes: int = 15, singletons: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer embeddings around integer class centres, classes of geometric (uneven) sizes;
    at most ``n`` items.

    Inner products of small integers are exact in float32 and float64 alike, so the fast float32 search and the
    float64 reference see the same scores; equal scores (ties, duplicated points) are frequent. The last
    ``singletons`` classes have one item each (queries without a positive in leave-one-out).
    """
    sizes = rng.geometric(n_classes / n, size=n_classes)
    labels = np.repeat(np.arange(n_classes), sizes)[: max(1, n - singletons)]
    labels = np.concatenate([labels, n_classes + np.arange(singletons)])
    centres = rng.integers(-2, 3, size=(n_classes + singletons, dim))
    noise = rng.integers(-1, 2, size=(len(labels), dim)) * (rng.random((len(labels), dim)) < 0.3)
    perm = rng.permutation(len(labels))
    return (centres[labels] + noise)[perm].astype(np.float32), labels[perm].astype(np.int64)


def gaussian_clusters(
    rng: np.random.Generator, n: int, dim: int = 16, n_classes: int = 25
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised Gaussian clusters of uneven sizes: continuous values, so no exact ties."""
    labels = np.sort(rng.choice(n_classes, size=n, p=rng.dirichlet(np.ones(n_classes))))
    centres = rng.standard_normal((n_classes, dim))
    x = centres[labels] + 0.9 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return x[perm].astype(np.float32), labels[perm].astype(np.int64)
