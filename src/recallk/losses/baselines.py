"""Baseline losses from pytorch-metric-learning as :class:`~recallk.losses.base.MetricLoss` modules.

The losses themselves are pytorch-metric-learning's; this module only builds them by name, checks inputs and
adapts the batch layout where a loss needs one (Smooth-AP wants each class's items next to each other).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from recallk.losses.base import MetricLoss, register_loss

__all__ = ["BASELINES", "NO_REFERENCE_SET", "MetricLearningBaseline", "build_baseline"]

#: name -> pytorch-metric-learning class name
BASELINES = {
    "smooth_ap": "SmoothAPLoss",
    "contrastive": "ContrastiveLoss",
    "multi_similarity": "MultiSimilarityLoss",
    "proxy_anchor": "ProxyAnchorLoss",
}

#: baselines that take no ``ref_emb``/``ref_labels`` (ValueError): Smooth-AP ranks the batch against itself,
#: Proxy-Anchor compares items with its class proxies.
NO_REFERENCE_SET = ("smooth_ap", "proxy_anchor")


class MetricLearningBaseline(MetricLoss):
    """Wraps a pytorch-metric-learning loss as ``criterion(embeddings, labels, ref_emb=None, ref_labels=None)``.

    The wrapped loss is the submodule ``loss``, so its parameters (Proxy-Anchor's proxies) appear in
    ``parameters()`` and the trainer's optimiser updates them. ``ref_emb``/``ref_labels`` go to it unchanged;
    Smooth-AP and Proxy-Anchor (``NO_REFERENCE_SET``) take no reference set and raise ValueError for any
    ``ref_emb``, before any other check of the batch (pytorch-metric-learning does not support it there).
    """

    # No random state of its own: its state dict stays that of the wrapped loss.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, name: str, loss: nn.Module, group_by_class: bool = False) -> None:
        super().__init__()
        self.name = name
        self.loss = loss
        self.group_by_class = group_by_class

    def compute(
        self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        if ref_emb is not None and self.name in NO_REFERENCE_SET:
            raise ValueError(
                f"loss {self.name!r} does not take a reference set (ref_emb, ref_labels): pytorch-metric-learning's "
                f"{BASELINES[self.name]} supports none; call it as loss(embeddings, labels), or use a loss that "
                f"does ({', '.join(n for n in BASELINES if n not in NO_REFERENCE_SET)} or rsk)"
            )
        if self.group_by_class:
            embeddings, labels = _smooth_ap_layout(embeddings, labels)
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels)


def _smooth_ap_layout(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch layout under which pytorch-metric-learning's SmoothAPLoss computes Smooth-AP.

    pml (checked with 2.9.0) reshapes the batch to (B // u, B // (B // u), d) with u = the number of distinct
    labels, i.e. it takes consecutive groups of ``B // (B // u)`` items as the classes: right only when the
    number of classes equals the items per class. Sorting the batch by class and passing stand-in labels with
    ``m`` distinct values (m = items per class, each used C times) makes its groups the real classes. The value
    is unchanged by the reordering (a mean over queries); tests check it against the Smooth-AP formula.
    """
    order = torch.sort(labels, stable=True).indices
    emb, labels = emb[order], labels[order]
    counts = torch.unique_consecutive(labels, return_counts=True)[1]
    if counts.numel() < 1 or bool((counts != counts[0]).any()) or int(counts[0]) < 2:
        raise ValueError(
            f"smooth_ap needs every class of the batch to have the same number (>= 2) of items, got class sizes "
            f"{sorted(set(counts.tolist()))}: use recallk.data.ClassBalancedBatchSampler"
        )
    per_class = int(counts[0])
    stand_in = torch.arange(labels.numel(), device=labels.device) % per_class
    return emb, stand_in


def build_baseline(name: str, **cfg: Any) -> MetricLearningBaseline:
    """Build a baseline by name: "smooth_ap", "contrastive", "multi_similarity" or "proxy_anchor".

    ``cfg`` goes to the pytorch-metric-learning constructor (e.g. ``margin``, ``alpha``; Proxy-Anchor needs
    ``num_classes`` and ``embedding_size``, and its labels must lie in [0, num_classes)).

    Raises:
        ValueError: unknown name, or options the loss does not accept / required options missing.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline loss {name!r}: choose one of {sorted(BASELINES)}")
    # Imported here, not with recallk.losses: RS@k and the kernels must work where only torch is installed
    # (e.g. a GPU machine running benchmarks/gpu_check.py).
    from pytorch_metric_learning import losses as pml_losses

    cls = getattr(pml_losses, BASELINES[name], None)
    if cls is None:
        raise ValueError(
            f"pytorch-metric-learning has no {BASELINES[name]} in this version: upgrade it "
            "(pip install -U pytorch-metric-learning)"
        )
    try:
        loss = cls(**cfg)
    except TypeError as err:
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
        raise ValueError(
            f"bad options for loss {name!r} ({err}): it accepts {params} and pytorch-metric-learning's common "
            "options (distance, reducer, ...)"
        ) from err
    built = MetricLearningBaseline(name, loss, group_by_class=(name == "smooth_ap"))
    built.min_per_class = _MIN_PER_CLASS.get(name, 2)
    return built


#: Proxy-Anchor compares items with learnt class proxies: one item of a class in a batch is enough.
_MIN_PER_CLASS = {"proxy_anchor": 1}

for _name in BASELINES:
    register_loss(_name, functools.partial(build_baseline, _name), min_per_class=_MIN_PER_CLASS.get(_name, 2))
