"""The run config a Trainer records (``config.yaml`` and every checkpoint's ``config``): what the trainer knows of
its run, merged with what its caller gives."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn
from torchvision import transforms as T

from recallk.run_folder import plain_config

#: TrainSettings fields that are no ``train.*`` key of a config: ``seed`` is the top-level key, ``num_workers`` is
#: ``data.num_workers``, ``progress`` (``--no-progress``) and ``distributed`` (torchrun) come from the command line.
#: ``recallk.config`` derives its ``train`` keys with this list and :func:`trainer_run_config` its section.
TRAIN_FROM_ELSEWHERE = ("seed", "num_workers", "progress", "distributed")
#: config sections whose ``name`` says what the other keys describe (a given section of another name replaces the
#: derived one whole in :func:`merge_run_config`).
_NAMED_SECTIONS = ("model", "loss")


def describe_loss(criterion: Any) -> dict[str, Any] | None:
    """The config ``loss`` section of a criterion that describes itself, else None.

    A criterion describes itself by its ``loss_spec`` attribute, ``{"name": ..., **its arguments}``: what every
    loss :func:`recallk.losses.build_loss` builds, and every registered loss class constructed directly, records
    (:func:`recallk.losses.base.record_spec`; ``recallk train -c config.yaml`` accepts it as a ``loss`` section).
    """
    spec = getattr(criterion, "loss_spec", None)
    if isinstance(spec, Mapping) and "name" in spec:
        return plain_config(spec)
    return None


def _model_section(model: Any) -> dict[str, Any] | None:
    """The config ``model`` section the model records (``model_section``, written by
    :func:`recallk.models.build_model` with its ``model_spec``), or None."""
    section = getattr(model, "model_section", None)
    return plain_config(section) if isinstance(section, Mapping) else None


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
    """The config ``data`` keys a training set knows from its record ``data_spec`` (what
    :func:`recallk.data.build_dataset` writes: ``dataset``, absolute ``root``, ``split``, ``options``; a
    :func:`recallk.data.validation_split` subset adds ``val_classes`` and ``val_seed``): ``dataset`` (None without
    a record), ``root`` (when not None), ``train_split``, ``options`` (when the set has them), ``val_classes`` and
    ``val_seed`` (when recorded), ``image_size`` (from its transform) and ``num_workers``."""
    record = getattr(train_dataset, "data_spec", None)
    record = dict(record) if isinstance(record, Mapping) else {}
    section: dict[str, Any] = {"dataset": record.get("dataset")}
    if record.get("root") is not None:
        section["root"] = record["root"]
    if "split" in record:
        section["train_split"] = record["split"]
    section["image_size"] = _image_size(getattr(train_dataset, "transform", None))
    section["num_workers"] = num_workers
    if isinstance(record.get("options"), Mapping):
        section["options"] = dict(record["options"])
    for key in ("val_classes", "val_seed"):  # the training classes of recallk.data.validation_split
        if record.get(key) is not None:
            section[key] = record[key]
    return section


def trainer_run_config(model: nn.Module, criterion: Any, settings: Any, train_dataset: Any) -> dict[str, Any]:
    """What a :class:`recallk.engine.Trainer` knows of its run, as a config dict (the sections of
    ``config.yaml``, plain YAML types, only keys that ``recallk.config`` has, so that ``recallk train -c
    config.yaml`` takes the file). Each part only reads what the object records of itself: ``model`` (the
    model's ``model_section``; None for a model ``build_model`` did not build), ``loss`` (:func:`describe_loss`;
    None when it cannot describe itself), ``train`` (the :class:`TrainSettings` fields less
    ``TRAIN_FROM_ELSEWHERE``), ``seed``, and ``data`` (:func:`_data_section`: the training set's ``data_spec``, so
    that ``recallk eval --checkpoint`` evaluates the run's own test split, e.g. a folder's held-out
    ``test_classes``).
    """
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    return plain_config({
        "seed": fields["seed"],
        "data": _data_section(train_dataset, fields["num_workers"]),
        "model": _model_section(model),
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
