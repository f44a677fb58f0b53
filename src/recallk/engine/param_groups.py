"""Parameter groups for fine-tuning a pretrained backbone: a head learning rate (the authors' ``fc_lr_mul``),
layer-wise learning-rate decay, no weight decay on biases, norms and tokens, and frozen first blocks.

Every rate is a multiple of ``train.lr``, the backbone's rate (with layer decay: the rate of a layer above its
top block, so the top block trains at ``lr * layer_decay``):

- the embedding head (every parameter of the model outside ``model.backbone``: recallk's pooling, LayerNorm and
  Linear) trains at ``lr * fc_lr_mul``. The name and meaning are the authors' (``--fc_lr_mul`` in the code of
  Patel et al., CVPR 2022: "multiply the embedding layer learning rate by this value"; their runs set it to 1,
  one learning rate, method.md section 4);
- the criterion's own parameters (Proxy-Anchor's proxies) train at ``lr * loss_lr_multiplier`` (as the
  Proxy-Anchor paper's code: proxies at 100x the network's rate);
- ``layer_decay`` (layer-wise learning-rate decay of BEiT, Bao et al. ICLR 2022, and MAE, He et al. CVPR 2022,
  whose ViT fine-tuning uses 0.65 to 0.75): the backbone's layers, as timm groups them
  (``model.backbone.group_matcher(coarse=False)``, the grouping ``timm.optim.param_groups_layer_decay`` uses:
  the stem (patch embedding, position embedding, class and register tokens) is layer 0, transformer block i is
  layer i + 1, a ViT's final norm belongs to its last block), with the embedding head one layer above the top
  block: layer ``j`` of a backbone whose top block is layer ``T`` trains at
  ``lr * layer_decay ** (T + 1 - j)``. A ViT-B (12 blocks, 0-indexed i) gets ``decay ** (12 - i)`` in block i,
  ``decay ** 13`` in its stem, ``1`` (times ``fc_lr_mul``) in the head. A backbone's own pooling or projection
  parameters that timm groups in no block (SigLIP's attention pool, a CLIP projection) count as the head's
  layer (decay ** 0) but keep the backbone's ``fc_lr_mul`` of 1 (they are pretrained);
- ``filter_bias_and_bn`` (timm's ``create_optimizer_v2`` option of that name): no weight decay on 1-D parameters
  (biases, norm weights, GeM's p), on names ending in ``.bias`` and on what the backbone's
  ``no_weight_decay()`` names (position embeddings, class/register tokens);
- :func:`freeze_blocks` sets ``requires_grad=False`` on the stem and the first N blocks (timm's coarse grouping:
  transformer blocks, CNN stages); frozen parameters are in no group and never change.

With the defaults (``fc_lr_mul=1``, ``loss_lr_multiplier=1``, no layer decay, no filter, nothing frozen) there is
one group, of every trainable parameter in module order: the authors' single learning rate, the optimiser of
earlier releases.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from recallk.utils import count_text

_SENTINEL = "\x00no parameter has this name"


@dataclass(frozen=True)
class ParamGroup:
    """One optimiser group: ``params`` train at ``lr`` (absolute) with ``weight_decay``; ``parts`` names what
    they are (``"backbone layer 3"``, ``"head"``, ``"loss"``; one entry per distinct part, in order), ``count``
    the number of scalar weights."""

    parts: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    lr: float
    weight_decay: float

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.params)

    def as_dict(self) -> dict[str, object]:
        """The torch optimiser's group: ``{"params": [...], "lr": ..., "weight_decay": ...}``."""
        return {"params": list(self.params), "lr": self.lr, "weight_decay": self.weight_decay}


def _backbone(model: nn.Module, what: str) -> nn.Module:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"{what} needs a model with a timm backbone as its .backbone attribute (an embedding model "
                         f"of recallk.build_model); {type(model).__name__} has none: leave {what} at its default")
    return backbone


def _matcher(backbone: nn.Module, coarse: bool, what: str) -> object:
    group_matcher = getattr(backbone, "group_matcher", None)
    if not callable(group_matcher):
        raise ValueError(f"{what} needs timm's layer grouping (group_matcher), which {type(backbone).__name__} "
                         f"lacks: leave {what} at its default for this backbone")
    return group_matcher(coarse=coarse)


def timm_layers(
    backbone: nn.Module, coarse: bool = False, what: str = "train.layer_decay"
) -> tuple[dict[str, int], int]:
    """``({parameter name: layer id}, top)`` of a timm backbone: timm's own grouping
    (``backbone.group_matcher(coarse)`` through ``timm.models.group_with_matcher``: 0 the stem, then one id per
    block (``coarse=False``: as ``param_groups_layer_decay`` groups them; ``coarse=True``: transformer blocks, CNN
    stages)). ``top`` is the id after the last block; parameters in no block (a pooling or projection head of the
    backbone) have id ``top``.

    Raises:
        ValueError: the backbone has no ``group_matcher`` (``what`` names the setting that needed it).
    """
    from timm.models._manipulate import group_with_matcher  # here: importing the engine stays light

    matcher = _matcher(backbone, coarse, what)
    names = [name for name, _ in backbone.named_parameters()] + [_SENTINEL]
    ids = group_with_matcher(((n, None) for n in names), matcher, reverse=True)
    top = ids.pop(_SENTINEL)  # unmatched names sort last: the sentinel's id is the first one past the blocks
    return ids, top


def freeze_blocks(model: nn.Module, blocks: int) -> list[str]:
    """Freeze the stem (patch/position embedding, class and register tokens; a CNN's first convolution) and the
    first ``blocks`` blocks of ``model.backbone`` (transformer blocks, CNN stages: timm's coarse grouping,
    :func:`timm_layers`): their parameters get ``requires_grad=False``. Returns the frozen names (of ``model``),
    [] for ``blocks=0`` (nothing is touched). BatchNorm statistics are the model's business (``freeze_bn``).

    Raises:
        ValueError: ``blocks`` is negative or larger than the backbone's number of blocks (the message gives it),
            or the model has no timm backbone with a layer grouping.
    """
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"freeze_blocks must be an integer >= 0 (the number of first blocks to freeze), got "
                         f"{blocks!r}")
    if blocks == 0:
        return []
    backbone = _backbone(model, "train.freeze_blocks")
    ids, top = timm_layers(backbone, coarse=True, what="train.freeze_blocks")
    depth = top - 1  # ids 1..top-1 are the blocks
    if blocks > depth:
        raise ValueError(f"freeze_blocks={blocks}, but {type(backbone).__name__} has {depth} blocks (timm's grouping: "
                         f"a stem and {depth} transformer blocks or CNN stages): use 0..{depth} ({depth} freezes every "
                         f"block; the head still trains)")
    prefix = _prefix(model, backbone)
    frozen = []
    for name, param in backbone.named_parameters():
        if ids[name] <= blocks:
            param.requires_grad_(False)
            frozen.append(prefix + name)
    return frozen


def _prefix(model: nn.Module, backbone: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is backbone:
            return name + "." if name else ""
    return ""


def _no_decay(name: str, param: nn.Parameter, patterns: Iterable[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in patterns)


def check_group_settings(fc_lr_mul: float, layer_decay: float | None, loss_lr_multiplier: float = 1.0) -> None:
    """Raise ValueError unless ``fc_lr_mul`` and ``loss_lr_multiplier`` are finite and positive and
    ``layer_decay`` is None or in (0, 1]."""
    for key, value in (("fc_lr_mul", fc_lr_mul), ("loss_lr_multiplier", loss_lr_multiplier)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key} must be a positive number (a multiple of lr; 1 = the same rate), got {value!r}")
    if layer_decay is not None and (isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float))
                                    or not 0 < layer_decay <= 1):
        raise ValueError(f"layer_decay must be in (0, 1] (each layer below the top trains at that fraction of the "
                         f"rate of the layer above; 0.65-0.75 for ViT-B fine-tuning) or null for none, got "
                         f"{layer_decay!r}")


def parameter_groups(
    model: nn.Module,
    criterion: nn.Module | None = None,
    *,
    lr: float,
    weight_decay: float,
    fc_lr_mul: float = 1.0,
    loss_lr_multiplier: float = 1.0,
    layer_decay: float | None = None,
    filter_bias_and_bn: bool = False,
) -> list[ParamGroup]:
    """The optimiser groups of ``model`` (and ``criterion``'s own parameters) by the rules of this module.

    Only parameters with ``requires_grad`` are grouped; a parameter shared by model and criterion is counted once
    (in the model). Groups are keyed by (learning rate, weight decay) in the order their first parameter comes
    (model, then criterion), each keeping its parameters in module order.

    Raises:
        ValueError: a non-positive or non-finite ``fc_lr_mul`` / ``loss_lr_multiplier``, a ``layer_decay``
            outside (0, 1], ``fc_lr_mul`` or ``layer_decay`` asked of a model without a timm ``.backbone`` (or
            ``layer_decay`` of a backbone without timm's layer grouping), or no trainable parameter at all.
            ``filter_bias_and_bn`` works on any model (1-D parameters and biases; the token names of a
            ``no_weight_decay()`` of the backbone, or of the model itself).
    """
    check_group_settings(fc_lr_mul, layer_decay, loss_lr_multiplier)
    needs_backbone = fc_lr_mul != 1 or layer_decay is not None
    backbone = _backbone(model, "train.fc_lr_mul" if fc_lr_mul != 1 else "train.layer_decay") if needs_backbone else (
        getattr(model, "backbone", None) if filter_bias_and_bn else None)
    backbone = backbone if isinstance(backbone, nn.Module) else None
    prefix = _prefix(model, backbone) if backbone is not None else ""
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    layers: dict[str, int] = {}
    top = 0
    if layer_decay is not None:
        layers, top = timm_layers(backbone)
    patterns: set[str] = set()
    owner = backbone if backbone is not None else model  # a timm model given whole names its own tokens
    if filter_bias_and_bn and callable(getattr(owner, "no_weight_decay", None)):
        patterns = {prefix + p for p in owner.no_weight_decay()}

    seen: set[int] = set()
    groups: dict[tuple[float, float], tuple[list[str], list[nn.Parameter]]] = {}

    def add(part: str, param: nn.Parameter, rate: float, decay: float) -> None:
        parts, params = groups.setdefault((rate, decay), ([], []))
        if part not in parts:
            parts.append(part)
        params.append(param)

    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        decay = 0.0 if filter_bias_and_bn and _no_decay(name, param, patterns) else weight_decay
        if backbone is None:
            add("model", param, lr, decay)
        elif id(param) not in in_backbone:
            add("head", param, lr * fc_lr_mul, decay)
        elif layer_decay is None:
            add("backbone", param, lr, decay)
        else:
            layer = layers.get(name[len(prefix):], top)
            part = "backbone stem" if layer == 0 else "backbone head" if layer == top else f"backbone block {layer}"
            add(part, param, lr * layer_decay ** (top - layer) if layer < top else lr, decay)
    if criterion is not None:
        for name, param in criterion.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                decay = 0.0 if filter_bias_and_bn and _no_decay(name, param, ()) else weight_decay
                add("loss", param, lr * loss_lr_multiplier, decay)
    if not groups:
        raise ValueError("nothing to train: the model and criterion have no parameter with requires_grad=True "
                         "(train.freeze_blocks froze every one?)")
    return [ParamGroup(tuple(parts), tuple(params), rate, decay)
            for (rate, decay), (parts, params) in groups.items()]


def groups_text(groups: Sequence[ParamGroup], frozen: int = 0) -> str:
    """One line for the start block: ``"lr 0.0001, weight decay 0.0004 (one group)"``, or for several groups the rate
    of each part (the backbone's as a range, top to stem), the weight decay and what is frozen: ``"28 groups: head
    lr 0.0001, backbone lr 1e-05..5.5e-08; weight decay 0.05 (0 on 39.9k weights: biases, norms, tokens); 1.8M
    weights frozen (train.freeze_blocks)"``. ``frozen``: the number of frozen scalar weights."""
    if len(groups) == 1 and not frozen:
        g = groups[0]
        return f"lr {g.lr:g}, weight decay {g.weight_decay:g} (one group)"
    by_part: dict[str, list[float]] = {}
    for g in groups:
        for part in g.parts:
            by_part.setdefault("backbone" if part.startswith("backbone") else part, []).append(g.lr)
    texts = []
    for part, rates in by_part.items():
        low, high = min(rates), max(rates)
        texts.append(f"{part} lr {high:.3g}" if low == high else f"{part} lr {high:.3g}..{low:.3g}")
    decays = sorted({g.weight_decay for g in groups})
    no_decay = sum(g.count for g in groups if g.weight_decay == 0)
    decay = f"weight decay {decays[-1]:g}" + (f" (0 on {_count(no_decay)} weights: biases, norms, tokens)"
                                              if no_decay and decays[-1] else "")
    frozen_text = f"; {_count(frozen)} weights frozen (train.freeze_blocks)" if frozen else ""
    return f"{count_text(len(groups), 'group')}: " + ", ".join(texts) + f"; {decay}{frozen_text}"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


__all__ = ["ParamGroup", "check_group_settings", "freeze_blocks", "groups_text", "parameter_groups", "timm_layers"]
