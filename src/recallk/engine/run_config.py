"""The run config a Trainer records (``config.yaml`` and every checkpoint's ``config``): what the trainer knows of
its run, merged with what its caller gives."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn
from torchvision import transforms as T

from recallk.data.datasets.base import absolute_root
from recallk.data.registry import DATASET_SPECS
from recallk.losses import RecallAtKSurrogate
from recallk.models import build_model
from recallk.run_folder import _plain, plain_config

#: TrainSettings fields that are no ``train.*`` key of a config: ``seed`` is the top-level key, ``num_workers`` is
#: ``data.num_workers``, ``progress`` (``--no-progress``) and ``distributed`` (torchrun) come from the command line.
#: ``recallk.config`` derives its ``train`` keys with this list and :func:`trainer_run_config` its section.
TRAIN_FROM_ELSEWHERE = ("seed", "num_workers", "progress", "distributed")
#: RecallAtKSurrogate arguments that are no ``loss.*`` key of a config: a generator object, a test knob, a
#: deprecated spelling. Shared by ``recallk.config`` (its ``loss`` keys) and :func:`describe_loss`.
LOSS_NOT_CONFIG = ("generator", "block_size", "similarity")
#: config sections whose ``name`` says what the other keys describe (a given section of another name replaces the
#: derived one whole in :func:`merge_run_config`).
_NAMED_SECTIONS = ("model", "loss")

def _rsk_config_keys() -> list[str]:
    """The ``loss`` keys of a config for RS@k: RecallAtKSurrogate's arguments with a default, less
    ``LOSS_NOT_CONFIG`` (what ``recallk.config.DEFAULTS["loss"]`` holds besides ``name`` and ``options``)."""
    params = inspect.signature(RecallAtKSurrogate).parameters.values()
    return [p.name for p in params if p.default is not p.empty and p.name not in LOSS_NOT_CONFIG]


def describe_loss(criterion: Any) -> dict[str, Any] | None:
    """The config ``loss`` section of a criterion that can describe itself, else None; only keys the CLI config
    has (``recallk train -c config.yaml`` accepts it).

    A criterion describes itself by a ``loss_spec`` attribute (a mapping with ``name`` and its keyword arguments:
    for ``"rsk"`` the RS@k keys stay keys, anything else goes under ``options``, as does every argument of another
    loss), or, for :class:`recallk.losses.RecallAtKSurrogate`, by its constructor's arguments read back from its
    attributes (``{"name": "rsk", "ks": [...], ..., "options": {}}``, the shape of the CLI config's section,
    without ``LOSS_NOT_CONFIG``: the random generator is state, ``block_size`` a test knob).
    """
    spec = getattr(criterion, "loss_spec", None)
    if isinstance(spec, Mapping) and "name" in spec:
        spec = dict(spec)
        name, options = spec.pop("name"), dict(spec.pop("options", None) or {})
        keys = _rsk_config_keys() if name == "rsk" else []
        section = {k: v for k, v in spec.items() if k in keys}
        options.update({k: v for k, v in spec.items() if k not in keys and k not in LOSS_NOT_CONFIG})
        return _plain({"name": name, **section, "options": options})
    if isinstance(criterion, RecallAtKSurrogate):
        return {"name": "rsk", **{n: _plain(getattr(criterion, n)) for n in _rsk_config_keys()}, "options": {}}
    return None


def _model_section(model_spec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A ``model_spec`` in the shape of the CLI config's ``model`` section: build_model's own arguments, then the
    timm keyword arguments under ``options``."""
    if model_spec is None:
        return None
    own = set(inspect.signature(build_model).parameters) - {"timm_kwargs"}
    section = {k: v for k, v in model_spec.items() if k in own}
    return _plain({**section, "options": {k: v for k, v in model_spec.items() if k not in own}})


def _image_size(transform: Any) -> int | None:
    """The output size of a torchvision transform: its first crop (RandomResizedCrop, CenterCrop, RandomCrop), else
    its first Resize, else None."""
    steps = list(getattr(transform, "transforms", ()))
    for kinds in ((T.RandomResizedCrop, T.CenterCrop, T.RandomCrop), (T.Resize,)):
        for step in steps:
            if isinstance(step, kinds) and step.size is not None:
                size = step.size if isinstance(step.size, int) else step.size[-1] if len(step.size) else None
                return int(size) if size is not None else None
    return None


def _data_section(train_dataset: Any, num_workers: int) -> dict[str, Any]:
    """The config ``data`` keys a training set knows: ``dataset`` (the registered dataset its ``name`` starts
    with, as ``build_dataset`` names sets ``"<dataset>/<split>"``, else None), ``root`` (its ``root`` made
    absolute) and ``train_split`` (its ``split``) when it has them, ``image_size`` (from its transform),
    ``num_workers``, ``options`` (its ``options``, e.g. a folder's ``test_classes`` and ``test_seed``), and
    ``val_classes``/``val_seed`` for the training classes of :func:`recallk.data.validation_split`."""
    name = str(getattr(train_dataset, "name", None) or "").split("/")[0]
    known = name in DATASET_SPECS
    section: dict[str, Any] = {"dataset": name if known else None}
    root = getattr(train_dataset, "root", None)
    if known and root is not None:
        section["root"] = absolute_root(root)
    if known and hasattr(train_dataset, "split"):
        section["train_split"] = train_dataset.split
    section["image_size"] = _image_size(getattr(train_dataset, "transform", None))
    section["num_workers"] = num_workers
    options = getattr(train_dataset, "options", None)
    if known and isinstance(options, Mapping):
        section["options"] = dict(options)
    for key in ("val_classes", "val_seed"):  # the training classes of recallk.data.validation_split
        if known and getattr(train_dataset, key, None) is not None:
            section[key] = getattr(train_dataset, key)
    return section


def trainer_run_config(model: nn.Module, criterion: Any, settings: Any, train_dataset: Any) -> dict[str, Any]:
    """What a :class:`recallk.engine.Trainer` knows of its run, as a config dict (the sections of
    ``config.yaml``, plain YAML types, only keys that ``recallk.config`` has, so that ``recallk train -c
    config.yaml`` takes the file): ``model`` (from the model's ``model_spec``; None for a model ``build_model``
    did not build), ``loss`` (:func:`describe_loss`; None when it cannot describe itself), ``train`` (the
    :class:`TrainSettings` fields less ``TRAIN_FROM_ELSEWHERE``), ``seed``, and ``data``: ``dataset`` (the
    registered dataset the train set's ``name`` starts with, else None), ``root`` (absolute), ``train_split`` and
    ``options`` when the train set has them (``recallk.data.ImageListDataset``'s ``root``, ``split``, ``options``:
    ``recallk eval --checkpoint`` then evaluates the run's own test split, e.g. a folder's held-out
    ``test_classes``), ``image_size`` (read from the train transform, else None) and ``num_workers``.
    """
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return plain_config({
        "seed": fields["seed"],
        "data": _data_section(train_dataset, fields["num_workers"]),
        "model": _model_section(getattr(model, "model_spec", None)),
        "loss": describe_loss(criterion),
        "train": {k: v for k, v in fields.items() if k not in TRAIN_FROM_ELSEWHERE},
    })


def merge_run_config(derived: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run config of a :class:`recallk.engine.Trainer` given ``config=``: ``given`` merged over ``derived``
    (:func:`trainer_run_config`) section by section, the given values winning.

    A top-level key that is a mapping in both is merged key by key (keys in ``given``'s order, then the derived
    ones it lacks); any other given value (a scalar, None, a mapping where the derived one is None) replaces the
    derived one. A ``model`` or ``loss`` section given with another ``name`` than the derived one replaces it
    whole (the derived keys describe another model or loss). Keys only ``derived`` has are kept. Values are
    returned as plain YAML types (:func:`plain_config`).

    Raises:
        ValueError: a value YAML cannot represent (see :func:`plain_config`).
    """
    if given is None:
        return plain_config(derived)
    given = plain_config(given)
    merged: dict[str, Any] = {}
    for key in [*given, *(k for k in derived if k not in given)]:
        if key not in given:
            merged[key] = derived[key]
            continue
        mine, theirs = derived.get(key), given[key]
        other_thing = key in _NAMED_SECTIONS and isinstance(mine, Mapping) and isinstance(theirs, Mapping) and (
            "name" in theirs and theirs["name"] != mine.get("name"))
        if isinstance(mine, Mapping) and isinstance(theirs, Mapping) and not other_thing:
            merged[key] = {**theirs, **{k: v for k, v in mine.items() if k not in theirs}}
        else:
            merged[key] = theirs
    return plain_config(merged)
