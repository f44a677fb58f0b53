"""RS@k L2-normalises its input by default, as pytorch-metric-learning's losses do (issue 24, item 4): embeddings
of any scale give the loss and gradient of ``F.normalize(embeddings)``; ``normalize_embeddings=False`` takes them as
given (the loss of before); a model's unit-norm output is used untouched, so training numbers do not change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recallk.engine import cached_backward
from recallk.losses import RecallAtKSurrogate, build_loss
from recallk.losses.base import loss_config_keys, unit_rows
from recallk.testing.rsk import rsk_loss_reference

KS = (1, 2, 4)


def _batch(n: int = 24, d: int = 16, seed: int = 0, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian embeddings, rows of norms about 0.1 to 12 when ``scale``; 4 items per class."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g)
    if scale:
        emb = emb * (0.1 + 3 * torch.rand(n, 1, generator=g))
    return emb, torch.arange(n) // 4


def _loss_and_grad(loss_fn, emb, labels, **kw):
    leaf = emb.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf, labels, **kw)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("memory", ["matrix", "recompute"])
def test_raw_embeddings_give_the_loss_and_gradient_of_their_normalised_rows(memory):
    emb, labels = _batch()
    loss, grad = _loss_and_grad(RecallAtKSurrogate(ks=KS, memory=memory), emb, labels)
    # independent: F.normalize in the graph, then the float64 reference loss of the normalised rows
    leaf = emb.double().requires_grad_(True)
    unit = F.normalize(leaf, dim=1)
    expected = rsk_loss_reference(unit @ unit.T, labels, labels, self_index=torch.arange(len(labels)), ks=KS)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), abs=2e-6)
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-3, atol=1e-6)
    # the gradient of a scale-invariant loss is orthogonal to each row
    assert float((grad * emb).sum(1).abs().max()) < 1e-6


def test_the_issue_numbers_raw_and_normalised_agree():
    emb, labels = _batch(seed=1)
    loss_fn = RecallAtKSurrogate(ks=KS)
    raw = float(loss_fn(emb, labels))
    assert raw == pytest.approx(float(loss_fn(F.normalize(emb, dim=1), labels)), abs=1e-6)
    assert raw == pytest.approx(float(loss_fn(7.5 * emb, labels)), abs=1e-6)  # any scale


def test_normalize_embeddings_false_is_the_loss_of_the_rows_as_given():
    emb, labels = _batch(seed=2)
    loss, grad = _loss_and_grad(RecallAtKSurrogate(ks=KS, normalize_embeddings=False), emb, labels)
    leaf = emb.double().requires_grad_(True)
    expected = rsk_loss_reference(leaf @ leaf.T, labels, labels, self_index=torch.arange(len(labels)), ks=KS)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), abs=2e-6)
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-3, atol=1e-6)
    assert float(loss) != pytest.approx(float(RecallAtKSurrogate(ks=KS)(emb, labels)), abs=1e-4)


def test_the_reference_set_is_normalised_too():
    emb, labels = _batch(16, seed=3)
    ref, ref_labels = _batch(20, seed=4)
    loss_fn = RecallAtKSurrogate(ks=KS)
    loss = float(loss_fn(emb, labels, ref_emb=ref, ref_labels=ref_labels))
    q, r = F.normalize(emb.double(), dim=1), F.normalize(ref.double(), dim=1)
    assert loss == pytest.approx(float(rsk_loss_reference(q @ r.T, labels, ref_labels, ks=KS)), abs=2e-6)
    raw = RecallAtKSurrogate(ks=KS, normalize_embeddings=False)
    assert float(raw(emb, labels, ref_emb=ref, ref_labels=ref_labels)) == pytest.approx(
        float(rsk_loss_reference(emb.double() @ ref.double().T, labels, ref_labels, ks=KS)), abs=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("simix", [False, True])
def test_unit_norm_input_is_used_untouched_to_the_last_bit(dtype, simix):
    """A model's output (F.normalize, or it rounded to bf16 under AMP) gives exactly the loss and gradient of a loss
    that does not normalise: a training run's numbers do not change."""
    emb, labels = _batch(64, 128, seed=5)
    emb = F.normalize(emb.to(torch.float64 if dtype == torch.float64 else torch.float32), dim=1).to(dtype)
    assert unit_rows(emb) is emb
    for memory in ("matrix", "recompute"):
        options = dict(ks=KS, simix=simix, memory=memory)
        loss, grad = _loss_and_grad(RecallAtKSurrogate(**options, generator=torch.Generator().manual_seed(0)),
                                    emb, labels)
        old_loss, old_grad = _loss_and_grad(RecallAtKSurrogate(**options, generator=torch.Generator().manual_seed(0),
                                                               normalize_embeddings=False), emb, labels)
        assert torch.equal(loss, old_loss) and torch.equal(grad, old_grad)


def test_cached_step_gradients_are_those_of_a_loss_that_does_not_normalise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16))

    class Normalised(torch.nn.Module):  # a model that L2-normalises its output, as recallk's models do
        def forward(self, x):
            return F.normalize(model(x), dim=1)

    images, labels = torch.randn(16, 3, 4, 4), torch.arange(16) // 4
    grads = []
    for normalize in (True, False):
        model.zero_grad()
        cached_backward(Normalised(), images, labels, RecallAtKSurrogate(ks=KS, normalize_embeddings=normalize), 4)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_unit_rows_normalises_when_any_row_is_off_and_keeps_zero_rows():
    emb = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    emb[2] *= 1 + 1e-9  # off by far more than float64 rounding
    out = unit_rows(emb)
    assert out is not emb
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(unit_rows(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_the_option_is_checked_recorded_as_no_config_key_and_shown():
    with pytest.raises(ValueError, match="normalize_embeddings must be True or False"):
        RecallAtKSurrogate(normalize_embeddings="yes")
    assert "normalize_embeddings" not in loss_config_keys("rsk")  # runs' config.yaml is unchanged
    assert "normalize_embeddings" not in build_loss("rsk").loss_spec
    assert RecallAtKSurrogate().normalize_embeddings is True
    assert "normalize_embeddings=False" in repr(RecallAtKSurrogate(normalize_embeddings=False))
