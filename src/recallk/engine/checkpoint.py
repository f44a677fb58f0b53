"""Checkpoints written atomically: a crash while writing never leaves a truncated or missing file behind.

Every trainer checkpoint also says what it is (docs/run-folder.md): ``config`` (the run's resolved config, as
``config.yaml`` holds it), ``model_spec`` (``{"name": ..., **build_model keyword arguments}``, None for a model
that ``recallk.models.build_model`` did not build) and ``recallk_version``, so that it can be used alone, copied
anywhere. ``best.pt`` is weights-only (:func:`weights_only_state`): it cannot resume a run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchvision import transforms as T

from recallk.data.datasets.base import absolute_root
from recallk.data.registry import DATASET_SPECS
from recallk.losses import RecallAtKSurrogate
from recallk.models import build_model
from recallk.utils import write_text_atomic

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

CHECKPOINT_FORMAT = 2  # 1 kept a loss's generator beside its state dict, as "criterion_generator"
#: what a weights-only checkpoint (best.pt) keeps of a trainer checkpoint: no optimizer, scheduler, scaler, rng,
#: criterion or progress counters beyond epoch and step.
WEIGHTS_ONLY_KEYS = ("format", "model", "config", "model_spec", "recallk_version", "best", "epoch", "step")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows opening a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new, empty temporary file beside ``path`` (exclusive create, mode ``0o666`` less the umask, as ``open``
    would give; ``tempfile.mkstemp`` would make it 0600); returns (fd, name)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with torch.save to ``path`` atomically; returns the path.

    The state goes to a temporary file in the same folder, is flushed and fsync'ed, then ``os.replace`` puts it
    in place (atomic on POSIX and Windows). If anything fails, the temporary file is removed, the previous file
    at ``path`` is untouched and the error propagates. The file gets the mode of any file the process creates
    (``0o666 & ~umask``: group-readable under the usual umask 022 or 002), like the run's other files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only).

    Uses ``torch.load(weights_only=True)``, so a file cannot run code when loaded. A trainer checkpoint of an
    older format comes back in the current one (``CHECKPOINT_FORMAT``).
    Raises FileNotFoundError with the path when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # MultiStepLR keeps its milestones in a Counter.
    with torch.serialization.safe_globals([collections.Counter]):
        state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, dict) and "criterion_generator" in state:  # format 1
        generator_state = state.pop("criterion_generator")
        if generator_state is not None and state.get("criterion") is not None:
            state["criterion"]["_extra_state"] = {"generator_state": generator_state}
        state["format"] = CHECKPOINT_FORMAT
    return state


def weights_only_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The weights-only export of a trainer checkpoint (what ``best.pt`` holds): the entries of
    ``WEIGHTS_ONLY_KEYS`` that ``state`` has (model weights, config, model_spec, recallk_version, best, epoch,
    step), without optimizer, scheduler, scaler, random state and criterion. It evaluates and loads
    (``recallk.load_model``) but cannot resume training."""
    return {key: state[key] for key in WEIGHTS_ONLY_KEYS if key in state}


def is_weights_only(state: Mapping[str, Any]) -> bool:
    """Whether a trainer checkpoint lacks the optimizer state a resume needs (``best.pt``, a weights export)."""
    return "model" in state and "optimizer" not in state


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as ``config.yaml`` holds it: YAML's plain types (tuples become lists), by a
    ``yaml.safe_dump`` / ``yaml.safe_load`` round trip, so that the checkpoint and the file say the same.

    Raises:
        ValueError: a value YAML cannot represent (an object, a tensor), naming its type.
    """
    try:
        return yaml.safe_load(yaml.safe_dump(_plain(dict(config)), sort_keys=False))
    except yaml.YAMLError as e:
        raise ValueError(f"the run config must hold plain values (numbers, strings, lists, mappings): {e}") from e


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (os.PathLike, torch.device, torch.dtype)):
        return str(value)
    return value


def write_config_yaml(config: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``config`` as YAML (keys in their order) to ``path`` atomically (temp file + ``os.replace``); returns
    the path. ``recallk.config.dump_config`` (the CLI's ``config.yaml``) writes through it too."""
    return write_text_atomic(path, yaml.safe_dump(plain_config(config), sort_keys=False))


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
