"""Random batches shared by the loss tests."""

from __future__ import annotations

import torch


def random_batch(
    n: int, n_classes: int, dim: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) L2-normalised embeddings and (n,) labels in random order with variable class sizes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return emb.to(dtype), labels
