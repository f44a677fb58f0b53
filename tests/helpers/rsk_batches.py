"""Random batches shared by the loss tests, on the test device (``RECALLK_TEST_DEVICE``, default the CPU)."""

from __future__ import annotations

import torch

from tests.helpers.device_settings import TEST_DEVICE


def random_batch(
    n: int, n_classes: int, dim: int, seed: int, dtype: torch.dtype = torch.float64, device: torch.device = TEST_DEVICE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) L2-normalised embeddings and (n,) labels in random order with variable class sizes, drawn on the
    CPU (the same numbers on every device) and put on ``device``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return emb.to(device, dtype), labels.to(device)
