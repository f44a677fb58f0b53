"""Which losses take a reference set: Smooth-AP and Proxy-Anchor refuse ``ref_emb`` first, whatever the batch,
with a message naming the losses that take one; the others use it (README: "Every loss takes ...")."""

from __future__ import annotations

import pytest
import torch

from recallk.losses import build_loss, loss_names
from recallk.losses.baselines import NO_REFERENCE_SET
from tests.helpers.device_settings import TEST_DEVICE

OPTIONS = {"proxy_anchor": {"num_classes": 4, "embedding_size": 8}}


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    return emb.to(TEST_DEVICE), (torch.arange(n) % 4).to(TEST_DEVICE)


@pytest.mark.parametrize("name", ["smooth_ap", "proxy_anchor"])
def test_losses_without_a_reference_set_say_so_before_any_batch_check(name):
    loss_fn = build_loss(name, **OPTIONS.get(name, {}))
    emb, labels = batch()
    ref_emb, ref_labels = batch(seed=1)
    # e[:4]: four classes of one item, which smooth_ap alone would refuse for its class sizes; emb itself as the
    # reference set (the same tensor) is refused too
    for queries, query_labels, ref, rl in ((emb[:4], labels[:4], ref_emb, ref_labels), (emb, labels, emb, labels)):
        with pytest.raises(ValueError, match=rf"loss '{name}' does not take a reference set \(ref_emb") as err:
            loss_fn(queries, query_labels, ref_emb=ref, ref_labels=rl)
        assert "class sizes" not in str(err.value) and "rsk" in str(err.value)
    assert torch.isfinite(loss_fn(emb, labels))  # without a reference set it works


def test_every_other_loss_uses_the_reference_set():
    assert set(NO_REFERENCE_SET) == {"smooth_ap", "proxy_anchor"}
    emb, labels = batch(16)
    ref_emb, ref_labels = batch(12, seed=1)
    for name in set(loss_names()) - set(NO_REFERENCE_SET):
        loss_fn = build_loss(name, **OPTIONS.get(name, {}))
        with_ref = loss_fn(emb, labels, ref_emb=ref_emb, ref_labels=ref_labels)
        assert torch.isfinite(with_ref) and with_ref.item() != pytest.approx(loss_fn(emb, labels).item(), abs=1e-9)
