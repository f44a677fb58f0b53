"""A pytorch-metric-learning miner's output (``indices_tuple``) given to a recallk loss is refused, naming what it
is, for every registered loss (issue 24, item 5): ``loss(e, y, miner(e, y))`` used to take the tuple for
``ref_emb`` and answer "pass ref_emb and ref_labels together"."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import miners

from recallk.losses import build_loss, loss_names

#: options a loss cannot be built without
OPTIONS = {"proxy_anchor": {"num_classes": 4, "embedding_size": 8}}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1), torch.arange(16) % 4


def _who(name: str) -> str:
    return "RS@k" if name == "rsk" else f"loss '{name}'"


@pytest.mark.parametrize("name", loss_names())
@pytest.mark.parametrize("miner", [miners.MultiSimilarityMiner(), miners.TripletMarginMiner(margin=0.5)])
def test_a_miners_tuple_in_the_third_place_is_refused(name, miner):
    loss_fn = build_loss(name, **OPTIONS.get(name, {}))
    emb, labels = _batch()
    mined = miner(emb, labels)
    assert isinstance(mined, tuple) and len(mined) in (3, 4)  # what pml's miners return
    with pytest.raises(ValueError, match=rf"^indices_tuple \(a miner's output\) is not supported by {_who(name)}: "):
        loss_fn(emb, labels, mined)
    with pytest.raises(ValueError, match=r"^indices_tuple \(a miner's output\) is not supported"):
        loss_fn(emb, labels, indices_tuple=mined)  # pytorch-metric-learning's keyword
    with pytest.raises(ValueError, match=r"^indices_tuple"):
        loss_fn(emb, labels, list(mined), labels)
    assert torch.isfinite(loss_fn(emb, labels))  # without the miner the loss works


@pytest.mark.parametrize("name", loss_names())
def test_the_message_says_how_to_call_the_loss(name):
    emb, labels = _batch()
    with pytest.raises(ValueError) as err:
        build_loss(name, **OPTIONS.get(name, {}))(emb, labels, miners.MultiSimilarityMiner()(emb, labels))
    assert "call loss(embeddings, labels)" in str(err.value) and "pass ref_emb and ref_labels" not in str(err.value)
