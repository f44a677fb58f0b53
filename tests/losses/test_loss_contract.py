"""Every registered loss: a finite scalar with a finite gradient, ``ref_emb``/``ref_labels`` accepted, clear
ValueErrors. A new loss is tested here by registering it (add its required options to ``OPTIONS``)."""

from __future__ import annotations

import pytest
import torch

from recallk.losses import LOSSES, RecallAtKSurrogate, build_loss, loss_names
from tests.helpers.device_settings import TEST_DEVICE

#: options a loss cannot be built without
OPTIONS = {"proxy_anchor": {"num_classes": 4, "embedding_size": 8}}


def batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1).to(TEST_DEVICE)
    return emb, torch.arange(n) % 4


@pytest.mark.parametrize("name", loss_names())
def test_scalar_with_finite_gradient(name: str) -> None:
    loss_fn = build_loss(name, **OPTIONS.get(name, {}))
    emb, labels = batch()
    emb.requires_grad_()
    loss = loss_fn(emb, labels)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("name", loss_names())
def test_accepts_a_reference_set(name: str) -> None:
    loss_fn = build_loss(name, **OPTIONS.get(name, {}))
    emb, labels = batch()
    ref_emb, ref_labels = batch(seed=1, n=12)
    try:
        loss = loss_fn(emb, labels, ref_emb=ref_emb, ref_labels=ref_labels)
    except ValueError as err:  # pytorch-metric-learning's losses that rank against proxies or the batch only
        assert "ref_emb" in str(err)
        return
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.item() != pytest.approx(loss_fn(emb, labels).item(), abs=1e-9)  # the reference set was used


@pytest.mark.parametrize("name", loss_names())
def test_bad_input_is_a_clear_value_error(name: str) -> None:
    loss_fn = build_loss(name, **OPTIONS.get(name, {}))
    emb, labels = batch()
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss_fn(emb.index_fill(0, torch.tensor([2]), float("nan")), labels)
    with pytest.raises(ValueError, match="one label per item"):
        loss_fn(emb, labels[:-1])
    with pytest.raises(ValueError, match="together"):
        loss_fn(emb, labels, ref_emb=emb)
    with pytest.raises(ValueError, match="dimensions"):
        loss_fn(emb, labels, ref_emb=emb[:, :4], ref_labels=labels)
    assert name in LOSSES


def test_simix_generator_state_travels_with_the_state_dict() -> None:
    emb, labels = batch()
    loss_fn = RecallAtKSurrogate(simix=True, generator=torch.Generator().manual_seed(5))
    loss_fn(emb, labels)  # advance the generator
    state = loss_fn.state_dict()
    assert set(state) == {"_extra_state"} and set(state["_extra_state"]) == {"generator_state"}
    assert state["_extra_state"]["generator_state"].dtype == torch.uint8
    fresh = RecallAtKSurrogate(simix=True, generator=torch.Generator().manual_seed(99))
    fresh.load_state_dict(state)
    assert fresh(emb, labels).item() == loss_fn(emb, labels).item()
    assert build_loss("contrastive").state_dict() == {}  # no random state: nothing added


def test_a_loss_records_the_arguments_it_was_constructed_with() -> None:
    """``loss_spec``: the name and every config argument (defaults included; the generator and block_size are no
    config), whether the loss is built by name or constructed directly; the old ``similarity=`` is gone."""
    expected = {"name": "rsk", "ks": [1, 2], "tau_rank": 0.02, "tau_k": 1.0, "include_query": False, "simix": True,
                "max_pairs_per_class": None, "backend": "auto", "memory": "matrix"}
    direct = RecallAtKSurrogate((1, 2), 0.02, simix=True, memory="matrix", block_size=8,
                                generator=torch.Generator())
    assert direct.loss_spec == expected
    assert build_loss("rsk", ks=[1, 2], tau_rank=0.02, simix=True, memory="matrix").loss_spec == expected
    assert build_loss("smooth_ap", temperature=0.05).loss_spec == {"name": "smooth_ap", "temperature": 0.05}
    with pytest.raises(TypeError, match="similarity"):
        RecallAtKSurrogate(similarity="matrix")
