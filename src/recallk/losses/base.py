"""The base of every loss and the loss registry.

A loss is one file with a :class:`MetricLoss` subclass (or a factory returning one) and one
``register_loss(name, factory)`` line; ``recallk.losses`` imports the file, :func:`build_loss` builds it by name
and ``tests/losses/test_loss_contract.py`` tests it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from recallk import checks
from recallk.kernels import no_autocast

_HALF = (torch.float16, torch.bfloat16)

__all__ = ["RUN_CONTEXT", "MetricLoss", "accepted_options", "build_loss", "loss_annotations", "loss_config_keys",
           "loss_defaults", "loss_min_per_class", "loss_names", "plain_value", "record_spec", "register_loss",
           "shard_range", "unit_rows"]


class MetricLoss(nn.Module):
    """``loss(embeddings, labels, ref_emb=None, ref_labels=None) -> scalar tensor`` (pytorch-metric-learning's
    convention): the queries ``embeddings`` are ranked against themselves, or against the reference set ``ref_emb``.

    :meth:`forward` checks the inputs and calls :meth:`compute`, which subclasses implement. A loss that draws
    random numbers keeps its ``generator`` attribute (a ``torch.Generator``); its state then travels with
    ``state_dict()`` as the extra state ``{"generator_state": ByteTensor}``.

    ``min_per_class``: the fewest items of one class a batch needs for the loss to learn anything: 2 for pair-
    and rank-based losses (a query needs a positive), 1 for proxy-based ones. The Trainer and the config refuse
    a smaller ``per_class`` before any work starts.

    A registered subclass records the arguments it was constructed with as ``loss_spec`` (``{"name": ...,
    **arguments}``, see :func:`record_spec`): the run's ``config.yaml`` and checkpoints read it.
    """

    min_per_class: int = 2
    #: whether :meth:`sharded_forward` exists: the loss is a sum over query rows that a rank can compute for a share of
    #: the queries against every reference (RS@k). Off here: a loss whose reduction needs the whole batch (a
    #: pytorch-metric-learning reducer's global counts, Smooth-AP, Proxy-Anchor) is computed whole on every rank.
    shardable: bool = False
    #: divide every row of ``embeddings`` and ``ref_emb`` by its L2 norm in :meth:`forward` (:func:`unit_rows`);
    #: off here (pytorch-metric-learning's losses normalise in their own distance), on by default for RS@k
    normalize_embeddings: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self: MetricLoss, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            name = _NAME_OF.get(type(self))
            if type(self).__init__ is recording_init and name is not None:  # the outermost __init__ only
                record_spec(self, name, kw, args=args)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None, *, indices_tuple: Any = None,
    ) -> torch.Tensor:  # fmt: skip
        """The loss of a batch, a scalar tensor.

        Args:
            embeddings: (B, d) floating query embeddings (L2-normalised by the model; a loss whose
                ``normalize_embeddings`` is set, RS@k by default, normalises them itself: :func:`unit_rows`).
            labels: (B,) integer labels.
            ref_emb: optional (N, d) reference embeddings (e.g. a memory bank); the queries are then ranked
                against it alone (no self exclusion). Needs ``ref_labels``.
            ref_labels: (N,) integer labels of ``ref_emb``.
            indices_tuple: pytorch-metric-learning's mined pairs or triplets: not supported (ValueError), here
                or as the third argument.

        Mixed precision: half (float16/bfloat16) embeddings are widened to float32 first and any active
        ``torch.autocast`` is turned off inside, so every loss computes in float32 (float64 for float64 input)
        in the standard AMP recipe; the gradient flows back to the half embeddings in their dtype.

        Raises:
            ValueError: NaN/Inf, embeddings whose inner products would overflow (``checks.check_embeddings``),
                wrong shapes, non-integer labels, an empty batch, ``ref_emb`` without ``ref_labels`` (or the
                reverse) or of another width, a miner's output (a tuple) in the third place or as
                ``indices_tuple``, or what the loss itself rejects.
        """
        if indices_tuple is not None or isinstance(ref_emb, (tuple, list)):
            raise ValueError(_no_miners(self))
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
            if self.normalize_embeddings:
                emb = unit_rows(emb)
                ref_emb = unit_rows(ref_emb) if ref_emb is not None else None
            emb = emb.float() if emb.dtype in _HALF else emb
            ref_emb = ref_emb.float() if ref_emb is not None and ref_emb.dtype in _HALF else ref_emb
            return self.compute(emb, labels, ref_emb, ref_labels)

    def compute(
        self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """The loss of checked inputs (labels int64 on the embeddings' device); ``ref_*`` both None or both set."""
        raise NotImplementedError

    def sharded_forward(self, embeddings: torch.Tensor, labels: torch.Tensor, shard: int,
                        shards: int) -> torch.Tensor:
        """Share ``shard`` of ``shards`` of the loss of the batch ``embeddings`` against itself: the shares of
        ``shard = 0 .. shards - 1`` sum to ``forward(embeddings, labels)`` (up to float rounding), each computed
        from that shard's query rows against every reference, so that several processes holding the same batch
        split the loss's O(B^2) work and memory between them (``engine/distributed.py``, rows sharding).

        Args:
            embeddings: (B, d) floating embeddings of the whole (global) batch, checked and normalised as in
                :meth:`forward`. labels: (B,) integer labels.
            shard: this share's index, ``0 <= shard < shards``. shards: the number of shares (the world size).

        Returns:
            A scalar tensor, differentiable with respect to every row of ``embeddings`` (the references too); a
            share holding no query with a positive is a zero with a zero gradient. A loss that draws random
            numbers (SiMix) draws them as :meth:`forward` does, so every share must be computed with the same
            random state (the engine arranges it).

        Raises:
            ValueError: a loss that cannot be sharded (``shardable`` False: use the whole loss on every rank,
                ``train.loss_sharding: replicate``), a bad ``shard``/``shards``, or what :meth:`forward` raises.
        """
        if not self.shardable:
            name = getattr(self, "loss_spec", {}).get("name") or type(self).__name__
            raise ValueError(f"loss {name!r} cannot be sharded (its value is no sum over query rows that a share of "
                             "the queries can compute): compute it whole, train.loss_sharding: replicate")
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be a positive integer (the number of processes), got {shards!r}")
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < shards:
            raise ValueError(f"shard must be an integer in [0, {shards}) (this process's rank), got {shard!r}")
        emb = checks.check_embeddings(embeddings)
        labels = checks.check_labels(labels, emb.shape[0]).to(emb.device)
        with no_autocast(emb.device):
            if self.normalize_embeddings:
                emb = unit_rows(emb)
            emb = emb.float() if emb.dtype in _HALF else emb
            return self.compute_shard(emb, labels, shard, shards)

    def compute_shard(self, embeddings: torch.Tensor, labels: torch.Tensor, shard: int,
                      shards: int) -> torch.Tensor:
        """:meth:`sharded_forward` on checked inputs; a shardable loss implements it."""
        raise NotImplementedError

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """``{"generator_state": torch.ByteTensor}`` of the loss's own ``generator`` ({} without one)."""
        generator = getattr(self, "generator", None)
        return {"generator_state": generator.get_state()} if isinstance(generator, torch.Generator) else {}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`get_extra_state` returned."""
        if state and "generator_state" in state:
            self.generator.set_state(state["generator_state"])


def shard_range(rows: int, shard: int, shards: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of ``rows`` that share ``shard`` of ``shards`` takes: contiguous, in shard order, sizes
    differing by at most one (``lo = rows * shard // shards``)."""
    return rows * shard // shards, rows * (shard + 1) // shards


#: how far from 1 a row's squared L2 norm may be, in units of its dtype's eps, for :func:`unit_rows` to take it as
#: already normalised: the rounding of a model's ``F.normalize`` output (measured: within 10 eps of 1 up to
#: d = 32,768 in float32 and 20 in float64), or of that output rounded to half precision (AMP: each component
#: within eps / 2, so the squared norm within eps + eps^2 / 4)
UNIT_NORM_ULPS = {torch.float32: 64, torch.float64: 64, torch.float16: 2, torch.bfloat16: 2}


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, d) with every row divided by its L2 norm, ``x_i / max(||x_i||, 1e-12)``, differentiably (as
    ``torch.nn.functional.normalize(x, dim=1)``, and as pytorch-metric-learning's ``normalize_embeddings=True``),
    computed in float32 for half input (float64 for float64).

    When every row already has unit norm to the rounding of ``x``'s dtype (``UNIT_NORM_ULPS``: what a model's
    ``F.normalize`` gives), ``x`` itself is returned, so that a training run's numbers are exactly those of a loss
    that does not normalise; the loss is the same function of the embeddings either way, and only the radial part
    of its gradient (which the model's own normalisation removes) differs from that of ``F.normalize``."""
    wide = x.float() if x.dtype in _HALF else x
    squared = (wide.detach() * wide.detach()).sum(dim=1)
    tolerance = UNIT_NORM_ULPS.get(x.dtype, 64) * torch.finfo(x.dtype).eps
    if x.shape[0] == 0 or bool(((squared - 1).abs() <= tolerance).all()):
        return x
    return torch.nn.functional.normalize(wide, dim=1)


def _no_miners(loss: nn.Module) -> str:
    """The error for a pytorch-metric-learning miner's output (``indices_tuple``) given to ``loss``."""
    name = (getattr(loss, "loss_spec", {}).get("name") or _NAME_OF.get(type(loss)) or getattr(loss, "name", None)
            or type(loss).__name__)
    what = "RS@k" if name == "rsk" else f"loss {name!r}"
    return (f"indices_tuple (a miner's output) is not supported by {what}: recallk's losses are called as "
            f"loss(embeddings, labels, ref_emb=None, ref_labels=None), and the third argument is a reference set, "
            f"not mined pairs or triplets; call loss(embeddings, labels) without the miner (the loss uses the "
            f"whole batch), or use pytorch-metric-learning's own loss with the miner")


_LOSSES: dict[str, Callable[..., nn.Module]] = {}
_MIN_PER_CLASS: dict[str, int] = {}
_NOT_CONFIG: dict[str, tuple[str, ...]] = {}
_NAME_OF: dict[Any, str] = {}  # a registered class -> its name (the loss_spec of a loss constructed directly)

#: run context :func:`build_loss` passes to the factories whose signature names it (Proxy-Anchor's proxies): the
#: key -> how the conflict with a value the caller gave reads (``{}``: the run's value).
RUN_CONTEXT = {"num_classes": "the training split has {} classes",
               "embedding_size": "the model's model.embed_dim is {}"}


def register_loss(name: str, factory: Callable[..., nn.Module], min_per_class: int | None = None,
                  not_config: tuple[str, ...] = ()) -> None:
    """Make ``build_loss(name, **args)`` return ``factory(**args)``.

    ``min_per_class`` (default: the factory's ``min_per_class`` attribute, else 2) is what
    :func:`loss_min_per_class` reports. The factory's signature is the loss's config: every keyword argument it
    names is a ``loss.<key>`` of a config (defaults: the signature's), except ``not_config`` (objects and test
    knobs such as RS@k's ``generator`` and ``block_size``). Raises ValueError on a taken name."""
    if name in _LOSSES:
        raise ValueError(f"a loss named {name!r} is already registered")
    _LOSSES[name] = factory
    _MIN_PER_CLASS[name] = int(min_per_class if min_per_class is not None else getattr(factory, "min_per_class", 2))
    _NOT_CONFIG[name] = tuple(not_config)
    if isinstance(factory, type):
        _NAME_OF[factory] = name


def loss_min_per_class(name: str) -> int:
    """The fewest items per class a batch needs for loss ``name`` (see :class:`MetricLoss`); ValueError when
    unknown."""
    _check_name(name)
    return _MIN_PER_CLASS[name]


def loss_names() -> tuple[str, ...]:
    """Every name :func:`build_loss` accepts, in registration order."""
    return tuple(_LOSSES)


def _check_name(name: str) -> None:
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {list(_LOSSES)}")


def build_loss(name: str, context: Mapping[str, Any] | None = None, /, **args: Any) -> nn.Module:
    """Build a criterion ``criterion(embeddings, labels, ref_emb=None, ref_labels=None) -> scalar`` by name.

    "rsk" -> :class:`recallk.losses.RecallAtKSurrogate` (``args`` = its arguments); "smooth_ap", "contrastive",
    "multi_similarity", "proxy_anchor" -> pytorch-metric-learning losses (see
    :func:`recallk.losses.baselines.build_baseline`); :func:`loss_names` lists them all. The result is an
    ``nn.Module``: include its ``parameters()`` in the optimiser (Proxy-Anchor has learnable proxies).

    ``context``: what the run knows (``RUN_CONTEXT``: ``num_classes`` of the training split, ``embedding_size`` of
    the model), given to the factories whose signature names it, where ``args`` leaves it out. The result records
    its arguments as ``loss_spec`` (:func:`record_spec`), without the ones taken from ``context``.

    Raises:
        ValueError: unknown name, bad arguments, or an argument that contradicts ``context``.
    """
    _check_name(name)
    accepted = accepted_options(name)
    filled = {}
    for key, value in (context or {}).items():
        if key not in accepted:
            continue
        if key not in args:
            filled[key] = value
        elif args[key] != value:
            what = RUN_CONTEXT.get(key, "the run gives {}").format(value)
            raise ValueError(f"loss.{key}={args[key]!r} but {what}: set it to {value} or leave it out (recallk "
                             f"fills it in)")
    try:
        loss = _LOSSES[name](**args, **filled)
    except TypeError as err:
        also = f"; it accepts {accepted}" if accepted else ""
        raise ValueError(f"bad options for loss {name!r}: {err}{also}") from err
    record_spec(loss, name, {**args, **filled}, leave_out=tuple(filled))
    return loss


def accepted_options(name: str) -> list[str]:
    """The keyword arguments loss ``name``'s factory names in its signature (RS@k: ``ks``, ``tau_rank``, ...; a
    baseline: its pytorch-metric-learning constructor's own, e.g. ``pos_margin``, ``neg_margin``).

    Raises:
        ValueError: unknown loss name.
    """
    _check_name(name)
    return [p.name for p in _parameters(name)]


def _parameters(name: str) -> list[inspect.Parameter]:
    try:
        params = inspect.signature(_LOSSES[name]).parameters.values()
    except (TypeError, ValueError):  # a factory without a signature
        return []
    return [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def loss_config_keys(name: str) -> list[str]:
    """The ``loss.<key>`` keys of a config naming loss ``name``: its factory's keyword arguments less the ones
    registered as ``not_config``, in signature order. ValueError for an unknown name."""
    return [key for key in accepted_options(name) if key not in _NOT_CONFIG[name]]


def loss_defaults(name: str) -> dict[str, Any]:
    """The defaults of :func:`loss_config_keys` that have one (tuples as lists, as a config holds them)."""
    keys = set(loss_config_keys(name))
    return {p.name: plain_value(p.default) for p in _parameters(name) if p.name in keys and p.default is not p.empty}


def loss_annotations(name: str) -> dict[str, Any]:
    """The type annotations of :func:`loss_config_keys` that have one (``{"ks": Sequence[int], ...}``), evaluated;
    {} when the factory's signature or its annotations cannot be read (a baseline's pml constructor). ValueError for
    an unknown name."""
    keys = set(loss_config_keys(name))
    try:
        params = inspect.signature(_LOSSES[name], eval_str=True).parameters.values()
    except (ImportError, NameError, TypeError, ValueError):
        return {}
    return {p.name: p.annotation for p in params if p.name in keys and p.annotation is not p.empty}


def plain_value(value: Any) -> Any:
    """``value`` as a config file holds it (tuples as lists)."""
    return [plain_value(v) for v in value] if isinstance(value, (list, tuple)) else value


def _is_plain(value: Any) -> bool:
    """Whether a config file (YAML) can hold ``value``: numbers, strings, booleans, None, lists of them."""
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def record_spec(loss: Any, name: str, kwargs: Mapping[str, Any], leave_out: tuple[str, ...] = (),
                args: tuple[Any, ...] = ()) -> None:
    """Set ``loss.loss_spec = {"name": name, **arguments}``: ``args`` and ``kwargs`` bound to the factory's
    signature with its defaults applied, less the registered ``not_config`` arguments and ``leave_out``, as a
    config's ``loss`` section holds them. Nothing is recorded when an argument is no plain value (a ``distance``
    object) or the factory has no signature. The one way a loss records its arguments: :func:`build_loss` and a
    registered :class:`MetricLoss` class constructed directly (``RecallAtKSurrogate(ks=(1, 2))``) both call it."""
    try:
        bound = inspect.signature(_LOSSES[name]).bind(*args, **kwargs)
    except (KeyError, TypeError, ValueError):  # no longer registered, or no signature to read
        return
    bound.apply_defaults()
    values: dict[str, Any] = {}
    for key, value in bound.arguments.items():
        kind = bound.signature.parameters[key].kind
        values.update(value if kind == inspect.Parameter.VAR_KEYWORD else {key: value})
    skip = set(_NOT_CONFIG[name]) | set(leave_out)
    values = {k: v for k, v in values.items() if k not in skip}
    if all(_is_plain(v) for v in values.values()):
        loss.loss_spec = {"name": name, **{k: plain_value(v) for k, v in values.items()}}
