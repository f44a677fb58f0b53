"""Run configuration: defaults, YAML presets and ``key=value`` overrides, strictly validated.

A configuration is a two-level mapping ``section -> key -> value`` (plus a few top-level keys). The keys and
defaults of the ``model``, ``loss`` and ``train`` sections are read from what they configure (the signature of
:func:`recallk.models.build_model`, the signature of the factory registered for the loss that ``loss.name`` names:
``loss: {name, <that loss's own arguments>}``, the fields of :class:`recallk.engine.TrainSettings`), so they
cannot drift apart; their values are checked by the same code that uses them. Any other key is an error that lists
the valid keys, so a typo never silently falls back to a default. Config files of older releases (``loss.options``,
``loss.similarity``) load through one converter, :func:`upgrade_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from recallk.data import DATASET_SPECS, dataset_spec
from recallk.data.datasets.base import absolute_root
from recallk.engine import TrainSettings
from recallk.engine.run_config import TRAIN_FROM_ELSEWHERE
from recallk.engine.settings import check_amp_device, check_per_class
from recallk.evaluation import retrieval_metrics
from recallk.evaluation.metrics import COUNT_KEYS, metric_order
from recallk.kernels import get_backend
from recallk.losses import build_loss, loss_min_per_class, loss_names
from recallk.losses.base import loss_annotations, loss_config_keys, loss_defaults, plain_value
from recallk.models import build_model
from recallk.run_folder import read_yaml, write_config
from recallk.utils import resolve_device


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says how to fix it."""


def _signature_defaults(fn: Callable[..., Any], skip: Iterable[str]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: plain_value(p.default) for p in params if p.default is not p.empty and p.name not in set(skip)}


#: train settings the CLI sets from elsewhere (``seed`` top level, ``data.num_workers``, ``--no-progress``, torchrun),
#: shared with the Trainer's own config.yaml.
_TRAIN_FROM_ELSEWHERE = TRAIN_FROM_ELSEWHERE
_REMOVED = {
    ("data", "resize"): "data.resize was removed (it was never read): the test transform resizes as the model's "
    "weights config says (crop_pct: the shorter side to floor(image_size / crop_pct); the authors' presets 256/224, "
    "method.md section 4) and centre-crops image_size",
    ("loss", "options"): "loss.options was removed: a loss's arguments are keys of loss, for every loss (e.g. "
    "loss.name=contrastive loss.pos_margin=0.0, or 'loss={pos_margin: 0.0, neg_margin: 1.0}')",
    ("loss", "similarity"): "loss.similarity was removed: use loss.memory (same values)",
}

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 1,
    "runs_dir": "runs",
    "data": {
        "dataset": "kanji",  # a registered dataset: recallk.data.DATASET_SPECS
        "root": None,  # the dataset's own folder; kanji: render cache folder (null = default cache)
        "train_split": "train",
        "test_split": "test",
        "image_size": 224,  # training crop / test centre crop, pixels
        "num_workers": 0,
        "options": {},  # extra keyword arguments of recallk.data.build_dataset (e.g. max_classes)
        "test_options": {},  # merged over options for the test split only (e.g. a smaller max_classes)
        # validation classes carved from the training split (number, or fraction in (0, 1); null = none): they
        # choose checkpoints/best.pt instead of the test split (recallk.data.splits, docs/run-folder.md)
        "val_classes": None,
        "val_seed": 0,  # seed of that split (fixed by default, so runs of different seeds share it)
    },
    # build_model's arguments; options: extra keyword arguments of timm.create_model (e.g. drop_path_rate)
    "model": {"name": "resnet50", **_signature_defaults(build_model, skip=("name",)), "options": {}},
    # the loss that name names and its own arguments (recallk.losses.build_loss): the defaults of that loss's
    # signature are filled in when a config is resolved (load_config); these are RS@k's
    "loss": {"name": "rsk", **loss_defaults("rsk")},
    "train": {
        **{f.name: plain_value(f.default) for f in dataclasses.fields(TrainSettings)
           if f.name not in _TRAIN_FROM_ELSEWHERE and f.default is not dataclasses.MISSING},
        "epochs": 10,
        "batch_size": 400,
        "chunk_size": 100,
    },
    "eval": {
        "ks": None,  # null = the dataset's evaluation ks (DatasetSpec.eval_ks, method.md section 5)
        "batch_size": 256,
        "pixel_baseline": False,  # also report raw L2-normalised pixels as a reference row
    },
}

#: mappings merged key by key whose keys are checked elsewhere: the data and model options (by the dataset and
#: timm), the loss section (by the signature of the loss it names: :func:`resolve_loss`)
_FREE_FORM = {("data", "options"), ("data", "test_options"), ("model", "options"), ("", "loss")}


def _suggest(key: str, valid: Iterable[str], section: str = "") -> str:
    """`` (did you mean 'train.lr'?)``: the closest valid key, spelt as an override (with its section), or ""."""
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{section + '.' if section else ''}{close[0]}'?)" if close else ""


def _merge(base: dict[str, Any], update: Mapping[str, Any], section: str = "") -> None:
    """Merge ``update`` into ``base`` in place: sections recurse, free-form mappings merge, the rest replace."""
    for key, value in update.items():
        path = f"{section}.{key}" if section else key
        if (section, key) in _REMOVED:
            raise ConfigError(_REMOVED[section, key])
        if key not in base:
            valid = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, base, section)}; valid keys here: {valid}")
        if (section, key) in _FREE_FORM:
            if not isinstance(value, Mapping | None):
                raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
            for inner in value or {}:
                if (key, inner) in _REMOVED:
                    raise ConfigError(_REMOVED[key, inner])
            base[key] = {**base[key], **dict(value or {})}
        elif not section and isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{path}' must be a mapping of {sorted(base[key])}, got {value!r}")
            _merge(base[key], value, key)
        else:
            base[key] = value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.batch_size=512"`` into (["train", "batch_size"], 512); the value is parsed as YAML
    (:func:`read_yaml`: ``train.lr=1e-3`` is a float)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.batch_size=512)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; use section.key=value (e.g. train.lr=1e-4)")
    try:
        value = read_yaml(raw) if raw != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({err})") from None
    return key.split("."), value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def upgrade_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config (a file's mapping, a run's ``config.yaml``, a checkpoint's ``config``) in the current format: the
    one converter of older formats. Older loss sections held RS@k's arguments as keys of ``loss`` for every loss
    (at their defaults for the others) and another loss's arguments under ``loss.options``, and spelt
    ``loss.memory`` as ``loss.similarity``; they become ``loss: {name, <that loss's own arguments>}``. A current
    config is returned unchanged (a copy)."""
    out = copy.deepcopy(dict(config))
    loss = out.get("loss")
    if not isinstance(loss, Mapping) or not ({"options", "similarity"} & set(loss)):
        return out
    loss = dict(loss)
    if "similarity" in loss:  # memory wins where both are given
        loss.setdefault("memory", loss.pop("similarity"))
    options = loss.pop("options", None)
    if loss.get("name", "rsk") != "rsk":  # the old format's RS@k keys, kept at their defaults for other losses
        loss = {k: v for k, v in loss.items() if k not in _OLD_RSK_KEYS}
    out["loss"] = {**loss, **dict(options or {})}
    return out


#: the RS@k keys every loss section of the old format held (``upgrade_config`` drops them for another loss)
_OLD_RSK_KEYS = ("ks", "tau_rank", "tau_k", "include_query", "simix", "max_pairs_per_class", "backend", "memory")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Resolve defaults <- YAML file at ``path`` <- ``overrides`` (``"section.key=value"`` strings).

    The file goes through :func:`upgrade_config` (older formats load). The ``loss`` section is resolved last
    (:func:`resolve_loss`): the defaults of the loss ``loss.name`` names, then the keys given.

    Raises:
        ConfigError: the file is missing or not a mapping, a key is unknown (the message lists the valid
            keys), or a value has the wrong type.
    """
    config = copy.deepcopy(DEFAULTS)
    config["loss"] = {}  # what the file and the command line give; resolve_loss fills in the rest
    loaded: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (presets live in configs/, e.g. configs/kanji.yaml)")
        try:
            loaded = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        _merge(config, upgrade_config(loaded))
    typed: set[str] = set()  # the loss keys the command line sets
    for text in overrides:
        parts, value = parse_override(text)
        _merge(config, _nest(parts, value))
        if parts[0] == "loss":
            typed.update(parts[1:2] if len(parts) > 1 else (value if isinstance(value, Mapping) else ()))
    config["loss"] = resolve_loss(config["loss"], typed, path)
    whole_numbers(config)
    validate_config(config)
    return config


def _integer_kind(annotation: Any) -> str | None:
    """"int" for ``int`` / ``int | None``, "list" for ``tuple[int, ...]`` / ``Sequence[int]`` (optionally
    ``| None``), else None."""
    if annotation is int:
        return "int"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _integer_kind(rest[0]) if len(rest) == 1 else None
    if origin in (tuple, list, Sequence) and args and args[0] is int and all(a in (int, Ellipsis) for a in args):
        return "list"
    return None


def _annotations(fn: Any) -> dict[str, Any]:
    """The evaluated parameter annotations of ``fn`` (a function or class), {} when they cannot be read."""
    try:
        return {p.name: p.annotation for p in inspect.signature(fn, eval_str=True).parameters.values()}
    except (NameError, TypeError, ValueError):
        return {}


def integer_keys(config: Mapping[str, Any]) -> dict[tuple[str, ...], str]:
    """The keys of ``config`` that hold integers: ``{("train", "max_steps"): "int", ("train", "milestones"): "list",
    ...}`` (a key's path), read from what they configure: the annotations of :class:`TrainSettings`, of
    ``build_model``, of the factory of the loss ``loss.name`` names (:func:`recallk.losses.base.loss_annotations`)
    and of the builder of the dataset ``data.dataset`` names (``data.options``, ``data.test_options``), else an
    integer default; ``eval.ks`` is a list of integers."""
    kinds: dict[tuple[str, ...], str] = {("eval", "ks"): "list"}
    for key, default in DEFAULTS.items():
        for sub, value in (default.items() if isinstance(default, dict) else [(None, default)]):
            if type(value) is int:
                kinds[(key, sub) if sub is not None else (key,)] = "int"
    spec = DATASET_SPECS.get(config["data"].get("dataset"))
    dataset = _annotations(spec.build) if spec is not None else {}
    hints = {("train",): typing.get_type_hints(TrainSettings), ("model",): _annotations(build_model),
             ("loss",): loss_annotations(config["loss"].get("name", DEFAULTS["loss"]["name"])),
             ("data", "options"): dataset, ("data", "test_options"): dataset}
    for section, section_hints in hints.items():
        part = _at(config, section)
        for key, annotation in section_hints.items():
            kind = _integer_kind(annotation)
            if kind is not None and isinstance(part, Mapping) and key in part:
                kinds[(*section, key)] = kind
    return kinds


def _at(config: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """``config[path[0]][path[1]]...``."""
    for key in path:
        config = config[key]
    return config


def _whole(value: Any) -> Any:
    """A float that is a whole number (1e3, 1000.0) as that int; anything else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def whole_numbers(config: dict[str, Any]) -> None:
    """Where an integer is expected (:func:`integer_keys`), a whole number written as a float (``1e3``, the notation
    YAML 1.2 reads as a float; ``1000.0``) becomes that integer, in place, in lists too
    (``train.milestones=[1e1, 2e1]`` -> [10, 20], ``data.options.max_classes=1e2`` -> 100).

    Raises:
        ConfigError: a float that is no whole number (or inf/NaN) where an integer is expected, naming the key.
    """
    for path, kind in integer_keys(config).items():
        part, key, where = _at(config, path[:-1]), path[-1], ".".join(path)
        value = part.get(key)
        if kind == "int" and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"config key '{where}' must be int, got {value!r}")
            part[key] = int(value)
        elif kind == "list" and isinstance(value, list) and any(isinstance(v, float) for v in value):
            if not all(v.is_integer() for v in value if isinstance(v, float)):
                raise ConfigError(f"config key '{where}' must be a list of integers, got {_yaml_value(value)}")
            part[key] = [_whole(v) for v in value]


def _yaml_value(value: Any) -> str:
    """``value`` as YAML writes it on one line (``true``, ``[1, 2]``, ``auto``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def resolve_loss(given: Mapping[str, Any], typed: Iterable[str] = (), path: Path | None = None) -> dict[str, Any]:
    """The ``loss`` section of a config: ``{"name": loss.name (default rsk), **that loss's defaults (its factory's
    signature: :func:`recallk.losses.base.loss_defaults`), **the keys given}``.

    A key given that is no argument of the named loss is refused, unless it is an argument of another registered
    loss that the config file at ``path`` set and the command line (``typed``) did not: a preset's RS@k keys
    (every preset sets ``simix: true``) then do not block another loss named on the command line; they are
    dropped, with one note on stderr (rank 0) naming those whose values are not RS@k's defaults.

    Raises:
        ConfigError: ``loss.name`` is no registered loss, or a key is no argument of the loss (naming the key,
            the loss, a close valid key and the valid keys).
    """
    given = dict(given)
    name = given.pop("name", DEFAULTS["loss"]["name"])
    if not isinstance(name, str) or name not in loss_names():
        raise ConfigError(f"loss.name must be one of {list(loss_names())}, got {name!r}")
    valid, typed = loss_config_keys(name), set(typed)
    unknown = [k for k in given if k not in valid]
    elsewhere = {k for n in loss_names() if n != name for k in _keys_if_known(n)} if unknown else set()
    unused = [k for k in unknown if path is not None and k not in typed and k in elsewhere]
    for key in unknown:
        if key in unused:
            continue
        others = [n for n in loss_names() if n != name and key in _keys_if_known(n)]
        where = f" (an argument of loss {others[0]!r}: loss.name={others[0]})" if others else ""
        raise ConfigError(
            f"loss.{key}={_yaml_value(given[key])} is not an argument of loss {name!r}{where}"
            f"{_suggest(key, valid, 'loss')}: drop loss.{key}; loss {name!r} takes {valid}")
    said = [k for k in unused if k not in DEFAULTS["loss"] or given[k] != DEFAULTS["loss"][k]]
    if said and os.environ.get("RANK", "0") == "0":
        others = [n for n in loss_names() if n != name and all(k in _keys_if_known(n) for k in said)]
        whose = "RS@k" if others[:1] == ["rsk"] else f"loss {others[0]!r}" if others else "another loss"
        verb = "is an argument" if len(said) == 1 else "are arguments"
        text = ", ".join(f"loss.{k}: {_yaml_value(given[k])}" for k in said)
        print(f"note: {text} of {path} {verb} of {whose}, not used by loss {name!r} (dropped)", file=sys.stderr,
              flush=True)
    return {"name": name, **loss_defaults(name), **{k: v for k, v in given.items() if k not in unknown}}


def _keys_if_known(name: str) -> list[str]:
    """:func:`loss_config_keys` of loss ``name``, [] when its signature cannot be read (e.g. no
    pytorch-metric-learning installed: a message then names no baseline)."""
    try:
        return loss_config_keys(name)
    except (ImportError, TypeError, ValueError):
        return []


def _check_type(config: dict[str, Any], section: str | None, key: str, default: Any) -> None:
    where = f"{section}.{key}" if section else key
    value = config[section].get(key) if section else config[key]
    if default is None or value is None or (section == "loss" and type(default) is int):
        return  # a loss's integer default may stand for a real number (pml's margins): the loss checks it
    if isinstance(default, bool):
        ok = isinstance(value, bool) or (where == "model.pretrained" and isinstance(value, str))
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                value = float(value)
                config[section][key] = value
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "tau_k" and isinstance(value, list):
            ok = all(isinstance(v, (int, float)) for v in value)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config key '{where}' must be {type(default).__name__}, got {value!r}")


def _in_config_words(message: str, section: str, keys: Iterable[str]) -> str:
    """``"amp must be ..."`` -> ``"train.amp must be ..."``: name the keys as a config file spells them."""
    pattern = r"(?<![\w.])(" + "|".join(map(re.escape, sorted(keys, key=len, reverse=True))) + r")(?![\w])"
    return re.sub(pattern, rf"{section}.\1", message)


def validate_config(config: dict[str, Any]) -> None:
    """Check value types, and the values with the code that uses them, without building models or data.

    Raises:
        ConfigError: with the key and what is expected.
    """
    data, loss, train = config["data"], config["loss"], config["train"]
    if loss.get("name") not in loss_names():
        raise ConfigError(f"loss.name must be one of {list(loss_names())}, got {loss.get('name')!r}")
    for key, default in {**DEFAULTS, "loss": {"name": "", **loss_defaults(loss["name"])}}.items():
        if isinstance(default, dict):
            for sub, sub_default in default.items():
                _check_type(config, key, sub, sub_default)
        else:
            _check_type(config, None, key, default)
    if data["dataset"] not in DATASET_SPECS:
        raise ConfigError(f"data.dataset must be one of {sorted(DATASET_SPECS)}, got {data['dataset']!r}")
    for key in ("batch_size", "per_class", "epochs"):
        if train[key] is None or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if train["batch_size"] % train["per_class"]:  # checked before TrainSettings, in config words
        fixed = max(train["batch_size"] // train["per_class"], 1) * train["per_class"]
        raise ConfigError(
            f"train.batch_size ({train['batch_size']}) must be divisible by train.per_class "
            f"({train['per_class']}); e.g. train.batch_size={fixed}"
        )
    try:
        train_settings(config)  # its own checks: sizes, divisibility, optimizer, amp, ...
        check_per_class(train["per_class"], loss_min_per_class(loss["name"]), f"loss {loss['name']!r}")
    except (TypeError, ValueError) as err:
        raise ConfigError(_in_config_words(str(err), "train", train)) from None


def train_settings(config: Mapping[str, Any], **elsewhere: Any) -> TrainSettings:
    """The :class:`TrainSettings` of a resolved config: its ``train`` section, ``seed``, ``data.num_workers``, and
    ``elsewhere`` (``progress``, ``distributed``: set by the command line, not the file)."""
    return TrainSettings(**config["train"], seed=config["seed"], num_workers=config["data"]["num_workers"],
                         **elsewhere)


def section_arguments(config: Mapping[str, Any], section: str) -> dict[str, Any]:
    """The keyword arguments a ``model`` or ``loss`` section gives its builder: its keys except ``name`` and
    ``options`` (lists as tuples), then the model's free-form ``options``."""
    part = config[section]
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in part.items() if k not in ("name", "options")}
    return {**args, **(part.get("options") or {})}


def dump_config(config: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved configuration as YAML (keys in definition order), atomically (temp file + os.replace):
    :func:`recallk.run_folder.write_config`, the writer the Trainer uses too."""
    write_config(config, path)


def with_absolute_root(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``data.root`` made absolute (``~`` expanded, relative to the current directory;
    symbolic links kept as named; None stays None), so that ``config.yaml`` and the checkpoints name the data
    wherever they are read (``recallk eval --checkpoint`` from another directory)."""
    out = copy.deepcopy(dict(config))
    root = out["data"]["root"]
    if root is not None:
        out["data"]["root"] = absolute_root(root)
    return out


def produced_metrics(config: Mapping[str, Any]) -> list[str]:
    """The names of the metrics a training run's evaluations produce (``recallk.evaluation.retrieval_metrics``
    at ``eval.ks`` or the dataset's ks), found by running that function on a tiny made-up set; the query counts
    (``evaluation.metrics.COUNT_KEYS``) are not metrics to choose ``best.pt`` by and are left out."""
    ks = tuple(config["eval"]["ks"] or dataset_spec(config["data"]["dataset"]).eval_ks)
    n = max(ks) + 2
    embeddings = np.random.default_rng(0).standard_normal((n, 2)).astype(np.float32)
    return sorted((m for m in retrieval_metrics(embeddings, np.arange(n) % 2, ks) if m not in COUNT_KEYS),
                  key=metric_order)


def check_startable(config: Mapping[str, Any], world_size: int = 1) -> None:
    """The cheap checks of a resolved config that need no model, data loading or run folder: run before any of
    them, so that a mistake costs no weight download and leaves nothing behind.

    Checks: the data splits and options are the dataset's, ``data.root`` (when given) is an existing folder,
    the loss builds from its section (:func:`check_loss`: its values and options), ``train.best_metric`` is a
    metric the run's evaluation produces, ``train.batch_size`` splits evenly
    between ``world_size`` processes, ``train.lr`` is finite and positive, the class-split keys
    (:func:`check_class_splits`),
    ``train.device`` names a device this machine has, and ``train.amp=fp16`` is not asked of the CPU (the
    GradScaler would skip every step there).

    Raises:
        ConfigError: naming the key, what is wrong and how to fix it.
    """
    data, train = config["data"], config["train"]
    spec = dataset_spec(data["dataset"])
    for key in ("train_split", "test_split"):
        if spec.splits is not None and data[key] not in spec.splits:
            raise ConfigError(f"data.{key}={data[key]!r} is not a split of dataset {spec.name!r}: "
                              f"use one of {list(spec.splits)}")
    for key in ("options", "test_options"):
        unknown = sorted(set(data[key]) - spec.options)
        if unknown:
            raise ConfigError(f"data.{key} has {unknown}, not options of dataset {spec.name!r}; "
                              f"valid: {sorted(spec.options)}")
    if data["root"] is not None and not Path(str(data["root"])).expanduser().is_dir():
        raise ConfigError(f"data.root={data['root']} is not a folder: set data.root=/path/to/{spec.name} (the "
                          f"folder the dataset unpacks to; see docs/datasets.md)")
    check_class_splits(config)
    check_loss(config)
    metrics = produced_metrics(config)
    if train["best_metric"] not in metrics:
        raise ConfigError(f"train.best_metric={train['best_metric']!r} is not a metric this run produces; "
                          f"choose one of {metrics} (e.g. train.best_metric=map@r)")
    if train["batch_size"] % world_size:
        unit = math.lcm(world_size, train["per_class"])
        raise ConfigError(
            f"train.batch_size={train['batch_size']} cannot be split evenly between {world_size} processes (each "
            f"takes an equal slice of the global batch): use a multiple of {unit} "
            f"(e.g. train.batch_size={max(train['batch_size'] // unit, 1) * unit})")
    if not math.isfinite(train["lr"]):  # NaN and inf pass every comparison below; the weights become NaN
        raise ConfigError(f"train.lr={train['lr']} is not a finite number: one step would make every weight NaN; "
                          f"use a positive learning rate such as train.lr=1e-4")
    if train["lr"] <= 0:
        what = "would never change the weights" if train["lr"] == 0 else "would climb the loss instead of lowering it"
        raise ConfigError(f"train.lr={train['lr']} {what}: use a positive learning rate such as train.lr=1e-4")
    try:
        device = resolve_device(train["device"])
    except RuntimeError as err:
        raise ConfigError(f"train.device={train['device']!r} is not a device name ({err}); use auto, cpu, cuda "
                          f"or cuda:N") from None
    if device.type == "cuda" and world_size == 1:  # several processes: each rank uses cuda:LOCAL_RANK
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"train.device={train['device']!r}: this machine has {count} CUDA device(s); use "
                              f"train.device=auto or cpu" + (f" or cuda:0..cuda:{count - 1}" if count else ""))
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"train.device={train['device']!r} is not supported; use auto, cpu, cuda or cuda:N")
    if world_size == 1:
        try:
            check_amp_device(train["amp"], device)
        except ValueError as err:
            raise ConfigError(_in_config_words(str(err), "train", train)) from None
    backend = config["loss"].get("backend", "auto")
    if backend != "auto" and device.type == "cpu":  # a GPU-only kernel backend, found before the run folder
        try:
            get_backend(backend, torch.zeros(1, device=device))
        except ValueError as err:
            raise ConfigError(f"loss.backend={backend}: {err}".replace("use backend='torch'",
                                                                          "use loss.backend=torch")) from None


def run_context(config: Mapping[str, Any], train_labels: Any = None) -> dict[str, Any]:
    """What the run gives :func:`recallk.losses.build_loss` as context (``RUN_CONTEXT``): ``embedding_size``
    (``model.embed_dim``) and ``num_classes`` (the training split's, from its (N,) integer ``train_labels``; without
    them ``loss.num_classes`` when set, else 1: the cheap check before any data is read)."""
    classes = int(np.max(train_labels)) + 1 if train_labels is not None else config["loss"].get("num_classes", 1)
    return {"num_classes": classes, "embedding_size": config["model"]["embed_dim"]}


def check_loss(config: Mapping[str, Any]) -> None:
    """Build the loss of the ``loss`` section once (cheap: no model, no data), so that a bad value fails before
    anything else: every loss from its own keys (errors name ``loss.<key>``; a baseline's values are checked by
    :func:`recallk.losses.baselines.check_baseline_options`), with the context :func:`run_context` gives (the
    number of classes is checked against the training split later, where it is known).

    Raises:
        ConfigError: naming the key, what is wrong and how to fix it.
    """
    name = config["loss"]["name"]
    try:
        build_loss(name, run_context(config), **section_arguments(config, "loss"))
    except (TypeError, ValueError) as err:
        message = str(err)  # a message that names loss.<key> already is in config words
        raise ConfigError(message if "loss." in message else _in_config_words(message, "loss", loss_config_keys(name))
                          ) from None


def check_class_splits(config: Mapping[str, Any]) -> None:
    """Check ``data.val_classes`` / ``data.val_seed`` and the folder split options ``test_classes`` /
    ``test_seed`` (numbers of the right kind; the same folder split for the train and the test split).

    Raises:
        ConfigError: naming the key and a valid value.
    """
    data = config["data"]
    val = data["val_classes"]
    if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))
                            or (isinstance(val, int) and val < 1) or (isinstance(val, float) and not 0 < val < 1)):
        raise ConfigError(f"data.val_classes={val!r}: give a number of training classes to hold out for validation "
                          f"(an integer >= 1, e.g. data.val_classes=50), a fraction in (0, 1) (e.g. "
                          f"data.val_classes=0.2), or null for no validation split")
    for key, value in (("data.val_seed", data["val_seed"]),
                       *((f"data.{part}.test_seed", data[part]["test_seed"]) for part in ("options", "test_options")
                         if "test_seed" in data[part])):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer (the seed of the class split), got {value!r}")
    if data["dataset"] != "folder":
        return
    split = {key: data["options"].get(key) for key in ("test_classes", "test_seed")}
    test_split = {key: data["test_options"].get(key, value) for key, value in split.items()}
    if split != test_split:
        raise ConfigError(f"data.test_options changes the folder's class split ({split} -> {test_split}): the train "
                          f"and test splits must come from the same split; set test_classes and test_seed in "
                          f"data.options only")
    classes = split["test_classes"]
    if classes is None:
        return
    if (isinstance(classes, bool) or not isinstance(classes, (int, float)) or (isinstance(classes, int) and classes < 1)
            or (isinstance(classes, float) and not 0 < classes < 1)):
        raise ConfigError(f"data.options.test_classes={classes!r}: give a number of classes (an integer >= 1) or a "
                          f"fraction in (0, 1) of the folder's classes, e.g. data.options.test_classes=0.5")
    splits = {"data.train_split": data["train_split"], "data.test_split": data["test_split"]}
    if splits != {"data.train_split": "train", "data.test_split": "test"}:
        raise ConfigError(f"data.options.test_classes splits a flat <class>/<image> folder into 'train' and 'test': "
                          f"set data.train_split=train and data.test_split=test (got {splits})")


#: keys that ``--resume`` may change: they change how long the run goes, how often it evaluates and logs, and how
#: data is loaded, but not one step of the training itself.
RESUME_SAFE_KEYS = ("train.epochs", "train.max_steps", "train.eval_every", "train.log_every", "train.tensorboard",
                    "train.prefetch_factor", "data.num_workers", "eval.batch_size", "eval.pixel_baseline")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and (not prefix or (prefix[:-1], key) not in _FREE_FORM):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def resume_changes(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What ``requested`` changes of a run's ``saved`` config: ``{"train.epochs": (old, new), ...}``, only the keys
    of :data:`RESUME_SAFE_KEYS` (``name`` and ``runs_dir`` are where the run is, not what it is).

    Raises:
        ConfigError: any other key differs; the message lists each as ``key: saved -> requested`` and how to
            resume (leave out ``-c`` and the overrides: ``--resume`` reads the run's own config.yaml).
    """
    old, new = _flatten(saved), _flatten(requested)
    differ = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
              if k not in ("name", "runs_dir") and old.get(k) != new.get(k)}
    refused = {k: v for k, v in differ.items() if k not in RESUME_SAFE_KEYS}
    if refused:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"--resume continues the run as its config.yaml says; these overrides would change it:\n{lines}\n"
            f"resume with --name and --resume alone (plus, if wanted, overrides of {', '.join(RESUME_SAFE_KEYS)}), "
            f"or start a new run under another --name")
    return differ
