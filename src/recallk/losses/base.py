"""The base of every loss and the loss registry.

A loss is one file with a :class:`MetricLoss` subclass (or a factory returning one) and one
``register_loss(name, factory)`` line; ``recallk.losses`` imports the file, :func:`build_loss` builds it by name
and ``tests/losses/test_loss_contract.py`` tests it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from recallk import checks
from recallk.kernels import no_autocast

_HALF = (torch.float16, torch.bfloat16)

__all__ = ["MetricLoss", "accepted_options", "build_loss", "loss_min_per_class", "loss_names", "register_loss"]


class MetricLoss(nn.Module):
    """``loss(embeddings, labels, ref_emb=None, ref_labels=None) -> scalar tensor`` (pytorch-metric-learning's
    convention): the queries ``embeddings`` are ranked against themselves, or against the reference set ``ref_emb``.

    :meth:`forward` checks the inputs and calls :meth:`compute`, which subclasses implement. A loss that draws
    random numbers keeps its ``generator`` attribute (a ``torch.Generator``); its state then travels with
    ``state_dict()`` as the extra state ``{"generator_state": ByteTensor}``.

    ``min_per_class``: the fewest items of one class a batch needs for the loss to learn anything: 2 for pair-
    and rank-based losses (a query needs a positive), 1 for proxy-based ones. The Trainer and the config refuse
    a smaller ``per_class`` before any work starts.
    """

    min_per_class: int = 2

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The loss of a batch, a scalar tensor.

        Args:
            embeddings: (B, d) floating query embeddings (L2-normalised by the model).
            labels: (B,) integer labels.
            ref_emb: optional (N, d) reference embeddings (e.g. a memory bank); the queries are then ranked
                against it alone (no self exclusion). Needs ``ref_labels``.
            ref_labels: (N,) integer labels of ``ref_emb``.

        Mixed precision: half (float16/bfloat16) embeddings are widened to float32 first and any active
        ``torch.autocast`` is turned off inside, so every loss computes in float32 (float64 for float64 input)
        in the standard AMP recipe; the gradient flows back to the half embeddings in their dtype.

        Raises:
            ValueError: NaN/Inf, embeddings whose inner products would overflow (``checks.check_embeddings``),
                wrong shapes, non-integer labels, an empty batch, ``ref_emb`` without ``ref_labels`` (or the
                reverse) or of another width, or what the loss itself rejects.
        """
        emb = checks.check_embeddings(embeddings)
        labels = checks.check_labels(labels, emb.shape[0]).to(emb.device)
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("pass ref_emb and ref_labels together (the reference set and its labels), or neither")
        if ref_emb is not None:
            ref_emb = checks.check_embeddings(ref_emb, name="ref_emb")
            if ref_emb.shape[1] != emb.shape[1]:
                raise ValueError(
                    f"ref_emb has {ref_emb.shape[1]} dimensions but embeddings have {emb.shape[1]}: use the same model"
                )
            ref_labels = checks.check_labels(ref_labels, ref_emb.shape[0], name="ref_labels", against="ref_emb")
            ref_labels = ref_labels.to(emb.device)
        with no_autocast(emb.device):
            emb = emb.float() if emb.dtype in _HALF else emb
            ref_emb = ref_emb.float() if ref_emb is not None and ref_emb.dtype in _HALF else ref_emb
            return self.compute(emb, labels, ref_emb, ref_labels)

    def compute(
        self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """The loss of checked inputs (labels int64 on the embeddings' device); ``ref_*`` both None or both set."""
        raise NotImplementedError

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """``{"generator_state": torch.ByteTensor}`` of the loss's own ``generator`` ({} without one)."""
        generator = getattr(self, "generator", None)
        return {"generator_state": generator.get_state()} if isinstance(generator, torch.Generator) else {}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`get_extra_state` returned."""
        if state and "generator_state" in state:
            self.generator.set_state(state["generator_state"])


_LOSSES: dict[str, Callable[..., nn.Module]] = {}
_MIN_PER_CLASS: dict[str, int] = {}


def register_loss(name: str, factory: Callable[..., nn.Module], min_per_class: int | None = None) -> None:
    """Make ``build_loss(name, **cfg)`` return ``factory(**cfg)``; ``min_per_class`` (default: the factory's
    ``min_per_class`` attribute, else 2) is what :func:`loss_min_per_class` reports. Raises ValueError on a taken
    name."""
    if name in _LOSSES:
        raise ValueError(f"a loss named {name!r} is already registered")
    _LOSSES[name] = factory
    _MIN_PER_CLASS[name] = int(min_per_class if min_per_class is not None else getattr(factory, "min_per_class", 2))


def loss_min_per_class(name: str) -> int:
    """The fewest items per class a batch needs for loss ``name`` (see :class:`MetricLoss`); ValueError when
    unknown."""
    if name not in _MIN_PER_CLASS:
        raise ValueError(f"unknown loss {name!r}: choose one of {list(_LOSSES)}")
    return _MIN_PER_CLASS[name]


def loss_names() -> tuple[str, ...]:
    """Every name :func:`build_loss` accepts, in registration order."""
    return tuple(_LOSSES)


def build_loss(name: str, **cfg: Any) -> nn.Module:
    """Build a criterion ``criterion(embeddings, labels, ref_emb=None, ref_labels=None) -> scalar`` by name.

    "rsk" -> :class:`recallk.losses.RecallAtKSurrogate` (``cfg`` = its arguments); "smooth_ap", "contrastive",
    "multi_similarity", "proxy_anchor" -> pytorch-metric-learning losses (see
    :func:`recallk.losses.baselines.build_baseline`); :func:`loss_names` lists them all. The result is an
    ``nn.Module``: include its ``parameters()`` in the optimiser (Proxy-Anchor has learnable proxies).

    Raises:
        ValueError: unknown name or bad options.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {list(_LOSSES)}")
    try:
        return _LOSSES[name](**cfg)
    except TypeError as err:
        accepted = accepted_options(name)
        also = f"; it accepts {accepted}" if accepted else ""
        raise ValueError(f"bad options for loss {name!r}: {err}{also}") from err


def accepted_options(name: str) -> list[str]:
    """The keyword arguments loss ``name``'s factory names in its signature (RS@k: ``ks``, ``tau_rank``, ...;
    [] for a factory that takes ``**options`` only, such as the baselines, whose constructor says what it takes).

    Raises:
        ValueError: unknown loss name.
    """
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {list(_LOSSES)}")
    try:
        params = inspect.signature(_LOSSES[name]).parameters.values()
    except (TypeError, ValueError):  # a factory without a signature
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
