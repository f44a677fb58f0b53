"""Losses: the Recall@k surrogate (RS@k), SiMix, and pytorch-metric-learning baselines.

``reference`` holds slow float64 implementations for the tests; import it explicitly
(``from recallk.losses import reference``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from recallk.losses.baselines import BASELINES, MetricLearningBaseline, build_baseline
from recallk.losses.rsk import RecallAtKSurrogate
from recallk.losses.simix import simix, simix_embeddings, simix_pairs

__all__ = [
    "LOSSES",
    "MetricLearningBaseline",
    "RecallAtKSurrogate",
    "build_loss",
    "simix",
    "simix_embeddings",
    "simix_pairs",
]

#: every name build_loss accepts
LOSSES = ("rsk", *BASELINES)


def build_loss(name: str, **cfg: Any) -> nn.Module:
    """Build a criterion ``criterion(embeddings, labels) -> scalar tensor`` by name.

    "rsk" -> :class:`RecallAtKSurrogate` (``cfg`` = its arguments); "smooth_ap", "contrastive",
    "multi_similarity", "proxy_anchor" -> pytorch-metric-learning losses (see
    :func:`recallk.losses.baselines.build_baseline`). The result is an ``nn.Module``: include its
    ``parameters()`` in the optimiser (Proxy-Anchor has learnable proxies).

    Raises:
        ValueError: unknown name or bad options.
    """
    if name == "rsk":
        try:
            return RecallAtKSurrogate(**cfg)
        except TypeError as err:
            raise ValueError(f"bad options for loss 'rsk': {err}") from err
    if name in BASELINES:
        return build_baseline(name, **cfg)
    raise ValueError(f"unknown loss {name!r}: choose one of {list(LOSSES)}")
