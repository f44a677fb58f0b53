"""Baseline losses from pytorch-metric-learning as :class:`~recallk.losses.base.MetricLoss` modules.

The losses themselves are pytorch-metric-learning's; this module only builds them by name, checks inputs and
adapts the batch layout where a loss needs one (Smooth-AP wants each class's items next to each other).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recallk.losses.base import MetricLoss, record_spec, register_loss

__all__ = ["BASELINES", "NO_REFERENCE_SET", "MetricLearningBaseline", "build_baseline", "check_baseline_options"]

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

    The options are checked first (:func:`check_baseline_options`). The built loss describes itself by its
    ``loss_spec`` (``{"name": name, **cfg}`` with the constructor's defaults, when every option is a plain value
    a config can hold: :func:`recallk.losses.base.record_spec`), which the Trainer's start block,
    ``config.yaml`` and checkpoints read (:func:`recallk.engine.run_config.describe_loss`).

    Raises:
        ValueError: unknown name, option values out of range, or options the loss does not accept / required
            options missing.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline loss {name!r}: choose one of {sorted(BASELINES)}")
    check_baseline_options(name, cfg)
    cls = _pml_class(name)
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
    record_spec(built, name, cfg)
    return built


def _pml_class(name: str) -> type:
    """The pytorch-metric-learning class of baseline ``name``."""
    # Imported here, not with recallk.losses: RS@k and the kernels must work where only torch is installed
    # (e.g. a GPU machine running benchmarks/gpu_check.py).
    from pytorch_metric_learning import losses as pml_losses

    cls = getattr(pml_losses, BASELINES[name], None)
    if cls is None:
        raise ValueError(
            f"pytorch-metric-learning has no {BASELINES[name]} in this version: upgrade it "
            "(pip install -U pytorch-metric-learning)"
        )
    return cls


class _BaselineFactory:
    """The registered factory of one baseline, ``build_baseline(name, **cfg)``, whose signature is its
    pytorch-metric-learning constructor's (read when asked: pytorch-metric-learning is imported then), so that its
    arguments are the loss's config keys with pml's defaults."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.min_per_class = _MIN_PER_CLASS.get(name, 2)

    def __call__(self, **cfg: Any) -> MetricLearningBaseline:
        return build_baseline(self.name, **cfg)

    @property
    def __signature__(self) -> inspect.Signature:
        params = list(inspect.signature(_pml_class(self.name).__init__).parameters.values())[1:]  # less self
        return inspect.Signature([p.replace(kind=p.KEYWORD_ONLY) if p.kind == p.POSITIONAL_OR_KEYWORD else p
                                  for p in params])


#: the numeric options of each baseline (pytorch-metric-learning's constructor arguments, default distances):
#: name -> option -> (what it is, lower bound, whether the bound itself is allowed, integer only)
_NUMERIC_OPTIONS: dict[str, dict[str, tuple[str, float | None, bool, bool]]] = {
    # margins of the hinges on the (L2) distance of positive and negative pairs: distances are >= 0
    "contrastive": {"pos_margin": ("the distance below which a positive pair costs nothing", 0.0, True, False),
                    "neg_margin": ("the distance above which a negative pair costs nothing", 0.0, False, False)},
    # alpha, beta: the scales of the positive and negative soft maxima (the loss divides by them); base: the
    # similarity threshold lambda of the exponents (any real, 0.5 in the paper)
    "multi_similarity": {"alpha": ("the scale of the positive pairs' soft maximum", 0.0, False, False),
                         "beta": ("the scale of the negative pairs' soft maximum", 0.0, False, False),
                         "base": ("the similarity threshold of the exponents", None, False, False)},
    # margin: the cosine margin delta (>= 0, 0.1 in the paper); alpha: the scale of the soft maxima (32)
    "proxy_anchor": {"num_classes": ("the number of class proxies", 1.0, True, True),
                     "embedding_size": ("the embedding dimension of the proxies", 1.0, True, True),
                     "margin": ("the cosine margin", 0.0, True, False),
                     "alpha": ("the scale of the soft maxima", 0.0, False, False)},
    # temperature of the sigmoid that smooths the rank indicator (0.01 in the paper)
    "smooth_ap": {"temperature": ("the temperature of the rank sigmoid", 0.0, False, False)},
}


#: options whose range above holds for pml's default distance only
_DISTANCE_BOUNDED = frozenset({"pos_margin", "neg_margin"})


def check_baseline_options(name: str, options: Mapping[str, Any]) -> None:
    """Check the values of a baseline's numeric options (``_NUMERIC_OPTIONS``) before pytorch-metric-learning
    sees them: real numbers (integers where counts are meant), finite, and within the range their definition
    allows (temperatures and scales positive, margins on distances non-negative; with a ``distance`` given,
    contrastive margins may be any real, as for cosine similarity). Other options (pml's common ones: distance,
    reducer, ...) are left to the constructor.

    Raises:
        ValueError: naming ``loss.<key>``, the value, and the valid range.
    """
    for key, (meaning, low, inclusive, integer) in _NUMERIC_OPTIONS.get(name, {}).items():
        if key not in options:
            continue
        if "distance" in options and key in _DISTANCE_BOUNDED:
            low = None  # another distance (e.g. cosine similarity, where margins are similarities): any real
        value = options[key]
        kind = "an integer" if integer else "a real number"
        if low is not None:
            bound = int(low) if integer else low
            kind += f" {'>=' if inclusive else '>'} {bound}"
        where = f"loss.{key}={value!r} of loss {name!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
            raise ValueError(f"{where}: {key} is {meaning} and must be {kind}, got a {type(value).__name__} "
                             f"(write it unquoted, e.g. loss.{key}={_example(name, key)})")
        if not math.isfinite(value) or (low is not None and (value < low or (value == low and not inclusive))):
            raise ValueError(f"{where}: {key} is {meaning} and must be {kind} (finite), e.g. "
                             f"loss.{key}={_example(name, key)}")


def _example(name: str, key: str) -> Any:
    """pytorch-metric-learning's default of option ``key`` of baseline ``name`` (a valid example value)."""
    examples = {"num_classes": 100, "embedding_size": 512}
    if key in examples:
        return examples[key]
    return inspect.signature(_pml_class(name).__init__).parameters[key].default


#: Proxy-Anchor compares items with learnt class proxies: one item of a class in a batch is enough.
_MIN_PER_CLASS = {"proxy_anchor": 1}

for _name in BASELINES:
    register_loss(_name, _BaselineFactory(_name), min_per_class=_MIN_PER_CLASS.get(_name, 2))
