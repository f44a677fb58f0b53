"""Baseline losses from pytorch-metric-learning behind the ``criterion(embeddings, labels)`` convention.

The losses themselves are pytorch-metric-learning's; this module only builds them by name, checks inputs and
adapts the batch layout where a loss needs one (Smooth-AP wants each class's items next to each other).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from recallk.losses import validation as v

__all__ = ["BASELINES", "MetricLearningBaseline", "build_baseline"]

#: name -> pytorch-metric-learning class name
BASELINES = {
    "smooth_ap": "SmoothAPLoss",
    "contrastive": "ContrastiveLoss",
    "multi_similarity": "MultiSimilarityLoss",
    "proxy_anchor": "ProxyAnchorLoss",
}


class MetricLearningBaseline(nn.Module):
    """Wraps a pytorch-metric-learning loss as ``criterion(embeddings, labels) -> scalar``.

    The wrapped loss is the submodule ``loss``, so its parameters (Proxy-Anchor's proxies) appear in
    ``parameters()`` and the trainer's optimiser updates them.
    """

    def __init__(self, name: str, loss: nn.Module, group_by_class: bool = False) -> None:
        super().__init__()
        self.name = name
        self.loss = loss
        self.group_by_class = group_by_class

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, d) floating embeddings, (B,) integer labels -> scalar loss tensor. Raises ValueError on bad input."""
        emb = v.check_embeddings(embeddings)
        labels = v.check_labels(labels, emb.shape[0]).to(emb.device)
        if self.group_by_class:
            emb, labels = _smooth_ap_layout(emb, labels)
        return self.loss(emb, labels)


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
    return MetricLearningBaseline(name, loss, group_by_class=(name == "smooth_ap"))
