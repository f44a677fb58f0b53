"""BatchNorm left in train mode in the cached step (issue 13, section 4): ghost-batch semantics, checked against
an explicit reference that embeds chunk by chunk with autograd and back-propagates once; on
``RECALLK_TEST_DEVICE`` (default the CPU)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from recallk.engine import cached_backward, freeze_batchnorm
from tests.helpers.device_settings import TEST_DEVICE
from tests.helpers.engine import contrastive_loss
from tests.helpers.engine import make_net as _make_net


def _data(b: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 6, 6, generator=g, dtype=torch.float64)
    return images.to(TEST_DEVICE), (torch.arange(b) // 3).to(TEST_DEVICE)


def make_net(**kwargs):
    return _make_net(**kwargs).to(TEST_DEVICE)


def _ghost_reference(net, images, labels, chunk_size):
    """Each chunk through the train-mode model once, with autograd; one backward of the loss of the whole batch."""
    out = torch.cat([net(c) for c in torch.split(images, chunk_size)])
    loss = contrastive_loss(out, labels)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("chunk_size", [3, 5, 12])
def test_ghost_batchnorm_matches_the_explicit_reference(chunk_size):
    images, labels = _data()
    net = make_net(dropout=0.0).train()
    ref = copy.deepcopy(net)
    want = _ghost_reference(ref, images, labels, chunk_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cached_backward(net, images, labels, contrastive_loss, chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    # Running statistics: updated exactly once per chunk, as the reference (one forward per chunk) did.
    torch.testing.assert_close(net.bn.running_mean, ref.bn.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(net.bn.running_var, ref.bn.running_var, rtol=1e-12, atol=1e-14)
    n_chunks = -(-12 // chunk_size)
    assert int(net.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == n_chunks


def test_cumulative_momentum_counts_each_chunk_once():
    images, labels = _data()
    net = make_net(dropout=0.0).train()
    net.bn.momentum = None  # cumulative moving average: depends on num_batches_tracked
    net.bn.num_batches_tracked.fill_(10)  # ten earlier batches weigh against this step's chunks
    ref = copy.deepcopy(net)
    _ghost_reference(ref, images, labels, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached_backward(net, images, labels, contrastive_loss, 4)
    torch.testing.assert_close(net.bn.running_var, ref.bn.running_var, rtol=1e-12, atol=1e-14)


def test_one_time_warning_names_the_fix():
    images, labels = _data()
    net = make_net(dropout=0.0).train()
    with pytest.warns(UserWarning, match=r"ghost-batch.*freeze_batchnorm.*model\.freeze_bn"):
        cached_backward(net, images, labels, contrastive_loss, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second step of the same model stays quiet
        net.zero_grad()
        cached_backward(net, images, labels, contrastive_loss, 4)


def test_frozen_batchnorm_gives_no_warning_and_the_full_batch_gradient():
    images, labels = _data()
    net = freeze_batchnorm(make_net(dropout=0.0)).train()
    ref = copy.deepcopy(net)
    loss = contrastive_loss(ref(images), labels)
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_backward(net, images, labels, contrastive_loss, 5)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
