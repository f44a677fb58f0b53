"""Losses: the Recall@k surrogate (RS@k), SiMix, and pytorch-metric-learning baselines.

Every loss is a :class:`MetricLoss` (``loss(embeddings, labels, ref_emb=None, ref_labels=None)``) registered by
name in its own file (:func:`register_loss`); :func:`build_loss` builds one by name. The slow float64 references
used by the tests are in :mod:`recallk.testing.rsk`.
"""

from __future__ import annotations

from typing import Any

from recallk.losses.base import (
    MetricLoss,
    build_loss,
    loss_config_keys,
    loss_defaults,
    loss_min_per_class,
    loss_names,
    register_loss,
)
from recallk.losses.rsk import RecallAtKSurrogate  # registers first: build_loss's names start with rsk

# isort: split
from recallk.losses.baselines import MetricLearningBaseline
from recallk.losses.simix import simix, simix_embeddings, simix_pairs

__all__ = [
    "LOSSES",
    "MetricLearningBaseline",
    "MetricLoss",
    "RecallAtKSurrogate",
    "build_loss",
    "loss_config_keys",
    "loss_defaults",
    "loss_min_per_class",
    "loss_names",
    "register_loss",
    "simix",
    "simix_embeddings",
    "simix_pairs",
]


def __getattr__(name: str) -> Any:
    if name == "LOSSES":  # every name build_loss accepts, read from the registry
        return loss_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
