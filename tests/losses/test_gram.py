"""gram: E E^T with a one-matmul backward, and the CPU's upper-triangle blocking for large batches."""

from __future__ import annotations

import pytest
import torch

from recallk.losses import gram as gram_module
from recallk.losses.gram import gram


@pytest.mark.parametrize("rows", [7, 512, 1031])  # below the blocking threshold, at it, and an odd size above it
def test_gram_and_its_gradient_against_float64_autograd(rows, dtype, device):
    """Each dtype of RECALLK_TEST_DTYPES on RECALLK_TEST_DEVICE (the CPU blocks large batches, CUDA does not)."""
    g = torch.Generator().manual_seed(rows)
    base = torch.randn(rows, 24, generator=g, dtype=torch.float64)
    upstream = torch.randn(rows, rows, generator=g, dtype=torch.float64)
    truth_e = base.clone().requires_grad_()
    truth = truth_e @ truth_e.T
    (truth * upstream).sum().backward()
    e = base.to(device, dtype).requires_grad_()
    ours = gram(e)
    (ours * upstream.to(device, dtype)).sum().backward()
    eps = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(ours.double().cpu(), truth.detach(), rtol=0, atol=eps * truth.abs().max().item())
    torch.testing.assert_close(e.grad.double().cpu(), truth_e.grad, rtol=0,
                               atol=eps * truth_e.grad.abs().max().item())  # fmt: skip


def test_blocking_is_used_from_the_threshold(monkeypatch):
    calls = []
    real = gram_module._symmetric_gram
    monkeypatch.setattr(gram_module, "_symmetric_gram", lambda e: calls.append(e.shape[0]) or real(e))
    gram(torch.randn(gram_module._SYMMETRIC_MIN_ROWS - 1, 4))
    gram(torch.randn(gram_module._SYMMETRIC_MIN_ROWS, 4))
    assert calls == [gram_module._SYMMETRIC_MIN_ROWS]
