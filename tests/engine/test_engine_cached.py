"""cached_backward against one ordinary full-batch backward, in float64, on ``RECALLK_TEST_DEVICE`` (default the
CPU): the model, the criterion and the batch are built on the CPU (the same numbers on every device), then moved."""

from __future__ import annotations

import copy

import pytest
import torch

from recallk.engine import (
    RngState,
    backward_chunks,
    cached_backward,
    embed_without_grad,
    freeze_batchnorm,
    loss_and_embedding_grad,
    split_into_chunks,
)
from tests.helpers.device_settings import TEST_DEVICE
from tests.helpers.engine import RandomMixLoss as _RandomMixLoss
from tests.helpers.engine import contrastive_loss, grads
from tests.helpers.engine import make_batch as _make_batch
from tests.helpers.engine import make_net as _make_net

CHUNK_SIZES = [1, 4, 5, 12, 50]  # 5 does not divide B = 12; 50 > B


def make_net(**kwargs):
    return _make_net(**kwargs).to(TEST_DEVICE)


def make_batch(**kwargs):
    return tuple(t.to(TEST_DEVICE) for t in _make_batch(**kwargs))


def RandomMixLoss(**kwargs):
    return _RandomMixLoss(**kwargs).to(TEST_DEVICE)


def full_batch_grads(model, criterion, images, labels, chunk_size=None):
    """The obvious computation: one autograd graph over the whole batch, one backward. With ``chunk_size`` the
    forward runs chunk by chunk inside that single graph, which fixes the dropout masks to those a chunked
    forward draws, without any caching or replay."""
    model.zero_grad(set_to_none=True)
    if chunk_size is None:
        embeddings = model(images)
    else:
        embeddings = torch.cat([model(chunk) for chunk in images.split(chunk_size)])
    loss = criterion(embeddings, labels)
    loss.backward()
    return loss.detach(), grads(model)


def cached_grads(model, criterion, images, labels, chunk_size, **kw):
    model.zero_grad(set_to_none=True)
    loss = cached_backward(model, images, labels, criterion, chunk_size, **kw)
    return loss, grads(model)


def assert_grads_equal(actual, expected, rtol=1e-10, atol=1e-12):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_matches_full_batch_without_dropout(chunk_size):
    model = freeze_batchnorm(make_net(dropout=0.0))
    model.train()
    images, labels = make_batch()
    loss_ref, expected = full_batch_grads(model, contrastive_loss, images, labels)
    loss, actual = cached_grads(model, contrastive_loss, images, labels, chunk_size)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    assert_grads_equal(actual, expected)
    assert "bn.weight" in actual  # the frozen BN's affine parameters still get gradients


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_matches_full_batch_with_dropout(chunk_size):
    model = freeze_batchnorm(make_net(dropout=0.3))
    model.train()
    images, labels = make_batch()
    torch.manual_seed(7)
    loss_ref, expected = full_batch_grads(model, contrastive_loss, images, labels, chunk_size)
    rng_after_reference = torch.get_rng_state()
    torch.manual_seed(7)
    loss, actual = cached_grads(model, contrastive_loss, images, labels, chunk_size)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    assert_grads_equal(actual, expected)
    # The replay is invisible to the rest of the program: the global stream ends where one forward leaves it.
    assert torch.equal(torch.get_rng_state(), rng_after_reference)


def test_one_chunk_with_dropout_equals_plain_model_call():
    model = freeze_batchnorm(make_net(dropout=0.5))
    images, labels = make_batch()
    torch.manual_seed(3)
    _, expected = full_batch_grads(model, contrastive_loss, images, labels)
    torch.manual_seed(3)
    _, actual = cached_grads(model, contrastive_loss, images, labels, chunk_size=len(images))
    assert_grads_equal(actual, expected)


def test_rng_replay_matters():
    """Without restoring each chunk's pass-1 RNG state (here: replaying states captured after pass 1 instead),
    pass 2 draws other dropout masks and the gradient is wrong."""
    model = freeze_batchnorm(make_net(dropout=0.3))
    images, labels = make_batch()
    torch.manual_seed(7)
    _, expected = full_batch_grads(model, contrastive_loss, images, labels, chunk_size=4)

    device = TEST_DEVICE
    for replay in (True, False):
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        chunks = split_into_chunks(images, 4)
        embeddings, states = embed_without_grad(model, chunks, device=device)
        if not replay:
            states = [RngState(device) for _ in chunks]  # captured at the wrong moment
        _, grad = loss_and_embedding_grad(contrastive_loss, embeddings, labels)
        backward_chunks(model, chunks, grad, states, device=device)
        if replay:
            assert_grads_equal(grads(model), expected)
        else:
            difference = max((grads(model)[n] - expected[n]).abs().max().item() for n in expected)
            assert difference > 1e-4


def test_batchnorm_in_train_mode_breaks_equality():
    """Documentation: with batch statistics a chunk's output depends on the chunking, so the cached gradient is
    not the full-batch gradient. That is why BatchNorm is frozen."""
    model = make_net(dropout=0.0)
    model.train()
    images, labels = make_batch()
    reference_model = copy.deepcopy(model)
    _, expected = full_batch_grads(reference_model, contrastive_loss, images, labels)
    _, actual = cached_grads(model, contrastive_loss, images, labels, chunk_size=4)
    difference = max((actual[n] - expected[n]).abs().max().item() for n in expected)
    assert difference > 1e-4


def test_freeze_batchnorm_survives_train_and_keeps_statistics():
    model = freeze_batchnorm(make_net(dropout=0.0))
    model.train()
    assert model.training and not model.bn.training
    before = model.bn.running_mean.clone()
    images, labels = make_batch()
    cached_backward(model, images, labels, contrastive_loss, 5)
    assert torch.equal(model.bn.running_mean, before)
    assert model.bn.weight.grad is not None


@pytest.mark.parametrize("chunk_size", [3, 5])
def test_random_criterion_with_parameters(chunk_size):
    """A criterion that draws random numbers (like SiMix) and has its own parameters: both the model and the
    criterion gradients match, because the criterion is called once, at the same point of the RNG stream."""
    model = freeze_batchnorm(make_net(dropout=0.3))
    criterion = RandomMixLoss()
    images, labels = make_batch()
    torch.manual_seed(11)
    criterion.zero_grad()
    loss_ref, expected = full_batch_grads(model, criterion, images, labels, chunk_size)
    expected_criterion = grads(criterion)
    criterion.zero_grad()
    torch.manual_seed(11)
    loss, actual = cached_grads(model, criterion, images, labels, chunk_size)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    assert_grads_equal(actual, expected)
    assert_grads_equal(grads(criterion), expected_criterion)


def _simix_surrogate():
    losses = pytest.importorskip("recallk.losses", reason="recallk.losses is not written yet")
    if not hasattr(losses, "RecallAtKSurrogate"):
        pytest.skip("recallk.losses.RecallAtKSurrogate does not exist yet")
    return losses.RecallAtKSurrogate


@pytest.mark.parametrize("simix", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 5])
def test_recall_at_k_surrogate(simix, chunk_size):
    surrogate = _simix_surrogate()
    model = freeze_batchnorm(make_net(dropout=0.3))
    images, labels = make_batch(batch=16)
    try:
        criterion = surrogate(simix=simix)
    except TypeError as error:
        pytest.skip(f"RecallAtKSurrogate(simix=...) is not available yet: {error}")
    # SiMix draws its alphas from the loss's own generator, once per call: same seed, same alphas.
    torch.manual_seed(5)
    criterion.generator = torch.Generator().manual_seed(123)
    loss_ref, expected = full_batch_grads(model, criterion, images, labels, chunk_size)
    torch.manual_seed(5)
    criterion.generator = torch.Generator().manual_seed(123)
    loss, actual = cached_grads(model, criterion, images, labels, chunk_size)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    assert_grads_equal(actual, expected, rtol=1e-8, atol=1e-10)


def test_gradients_accumulate_like_backward():
    model = freeze_batchnorm(make_net(dropout=0.0))
    images, labels = make_batch()
    _, once = cached_grads(model, contrastive_loss, images, labels, 5)
    cached_backward(model, images, labels, contrastive_loss, 5)
    assert_grads_equal(grads(model), {n: 2 * g for n, g in once.items()})


def test_grad_scaler_scales_every_gradient():
    model = freeze_batchnorm(make_net(dropout=0.0, dtype=torch.float32))
    criterion = RandomMixLoss().float()
    images, labels = make_batch(dtype=torch.float32)
    torch.manual_seed(0)
    criterion.zero_grad()
    _, plain = cached_grads(model, criterion, images, labels, 5)
    plain_criterion = grads(criterion)
    criterion.zero_grad()
    scaler = torch.amp.GradScaler(TEST_DEVICE.type, init_scale=2.0**10)
    torch.manual_seed(0)
    loss, scaled = cached_grads(model, criterion, images, labels, 5, scaler=scaler)
    assert torch.isfinite(loss)
    assert_grads_equal(scaled, {n: g * 2.0**10 for n, g in plain.items()}, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads(criterion), {n: g * 2.0**10 for n, g in plain_criterion.items()}, rtol=1e-5,
                       atol=1e-6)


def test_bf16_autocast_runs_and_is_close():
    model = freeze_batchnorm(make_net(dropout=0.0, dtype=torch.float32))
    images, labels = make_batch(dtype=torch.float32)
    _, expected = cached_grads(model, contrastive_loss, images, labels, 5)
    loss, actual = cached_grads(model, contrastive_loss, images, labels, 5, autocast_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32
    for name in expected:
        assert actual[name].dtype == torch.float32
        scale = expected[name].abs().max().item()
        assert (actual[name] - expected[name]).abs().max().item() <= 0.1 * scale + 1e-3, name


def test_bad_input():
    model = make_net(dropout=0.0)
    images, labels = make_batch()
    with pytest.raises(ValueError, match="chunk_size"):
        cached_backward(model, images, labels, contrastive_loss, 0)
    with pytest.raises(ValueError, match="labels has 11"):
        cached_backward(model, images, labels[:11], contrastive_loss, 4)
    with pytest.raises(ValueError, match="scalar"):
        cached_backward(model, images, labels, lambda e, y: e.sum(1), 4)
