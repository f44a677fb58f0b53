"""Run configuration: defaults, YAML presets and ``key=value`` overrides, strictly validated.

A configuration is a two-level mapping ``section -> key -> value`` (plus a few top-level keys). Every key that
may appear is listed in :data:`DEFAULTS`; anything else is an error that lists the valid keys, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says how to fix it."""


DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 1,
    "runs_dir": "runs",
    "data": {
        "dataset": "kanji",  # sop | cub | cars196 | inaturalist | vehicleid | folder | kanji
        "root": None,  # the dataset's own folder; kanji: render cache folder (null = default cache)
        "train_split": "train",
        "test_split": "test",
        "image_size": 224,  # training crop / test centre crop, pixels
        "resize": 256,  # test-time resize before the centre crop, pixels
        "num_workers": 0,
        "options": {},  # extra keyword arguments of recallk.data.build_dataset (e.g. max_classes)
        "test_options": {},  # merged over options for the test split only (e.g. a smaller max_classes)
    },
    "model": {
        "name": "resnet50",  # any timm model name
        "embed_dim": 512,
        "pretrained": False,  # false | true (timm hub) | path to a local .pth/.safetensors
        "pooling": None,  # null = the backbone's default head (gem for CNNs, cls for ViTs)
        "freeze_bn": True,
        "options": {},  # extra keyword arguments of timm.create_model (e.g. drop_path_rate, img_size)
    },
    "loss": {
        "name": "rsk",  # rsk | smooth_ap | contrastive | multi_similarity | proxy_anchor
        "ks": [1, 2, 4, 8, 16],
        "tau_rank": 0.01,
        "tau_k": 1.0,
        "include_query": False,
        "simix": False,
        "max_pairs_per_class": None,
        "backend": "auto",  # auto | torch | triton
        "similarity": "auto",  # auto | matrix | recompute (never store the (B, B) similarity)
        "options": {},  # extra keyword arguments for the baseline losses
    },
    "train": {
        "epochs": 10,
        "batch_size": 400,
        "chunk_size": 100,
        "per_class": 4,
        "optimizer": "adam",  # adam | adamw | sgd
        "lr": 1e-4,
        "weight_decay": 4e-4,
        "milestones": [],
        "gamma": 0.3,
        "loss_lr_multiplier": 1.0,  # LR of the loss's own parameters (Proxy-Anchor proxies) as a multiple of lr
        "amp": None,  # null | bf16 | fp16
        "device": "auto",
        "max_steps_per_epoch": None,
        "eval_every": 1,
        "best_metric": "map@r",
    },
    "eval": {
        "ks": None,  # null = the dataset's default ks (method.md section 5)
        "batch_size": 256,
        "pixel_baseline": False,  # also report raw L2-normalised pixels as a reference row
    },
}

_FREE_FORM = {("data", "options"), ("data", "test_options"), ("model", "options"), ("loss", "options")}


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(base: dict[str, Any], update: Mapping[str, Any], section: str = "") -> None:
    """Merge ``update`` into ``base`` in place: sections recurse, free-form mappings merge, the rest replace."""
    for key, value in update.items():
        path = f"{section}.{key}" if section else key
        if key not in base:
            valid = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, base)}; valid keys here: {valid}")
        if (section, key) in _FREE_FORM:
            if not isinstance(value, Mapping | None):
                raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
            base[key] = {**base[key], **dict(value or {})}
        elif not section and isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{path}' must be a mapping of {sorted(base[key])}, got {value!r}")
            _merge(base[key], value, key)
        else:
            base[key] = value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.batch_size=512"`` into (["train", "batch_size"], 512); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.batch_size=512)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; use section.key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({err})") from None
    return key.split("."), value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Resolve defaults <- YAML file at ``path`` <- ``overrides`` (``"section.key=value"`` strings).

    Raises:
        ConfigError: the file is missing or not a mapping, a key is unknown (the message lists the valid
            keys), or a value has the wrong type.
    """
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (presets live in configs/, e.g. configs/kanji.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        _merge(config, loaded)
    for text in overrides:
        parts, value = parse_override(text)
        _merge(config, _nest(parts, value))
    validate_config(config)
    return config


def _check_type(config: dict[str, Any], section: str | None, key: str, default: Any) -> None:
    where = f"{section}.{key}" if section else key
    value = config[section][key] if section else config[key]
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool) or (section == "model" and key == "pretrained" and isinstance(value, str))
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


def validate_config(config: dict[str, Any]) -> None:
    """Check value types and the few cross-field rules that can be checked without data.

    Raises:
        ConfigError: with the key and what is expected.
    """
    for key, default in DEFAULTS.items():
        if isinstance(default, dict):
            for sub, sub_default in default.items():
                _check_type(config, key, sub, sub_default)
        else:
            _check_type(config, None, key, default)
    train = config["train"]
    for key in ("batch_size", "chunk_size", "per_class", "epochs"):
        if train[key] is None or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if train["batch_size"] % train["per_class"]:
        fixed = max(train["batch_size"] // train["per_class"], 1) * train["per_class"]
        raise ConfigError(
            f"train.batch_size ({train['batch_size']}) must be divisible by train.per_class "
            f"({train['per_class']}); e.g. train.batch_size={fixed}"
        )
    if train["amp"] not in (None, "bf16", "fp16"):
        raise ConfigError(f"train.amp must be null, bf16 or fp16, got {train['amp']!r}")
    if train["optimizer"] not in ("adam", "adamw", "sgd"):
        raise ConfigError(f"train.optimizer must be adam, adamw or sgd, got {train['optimizer']!r}")
    if config["loss"]["backend"] not in ("auto", "torch", "triton"):
        raise ConfigError(f"loss.backend must be auto, torch or triton, got {config['loss']['backend']!r}")


def dump_config(config: Mapping[str, Any], path: str | Path) -> None:
    """Write the resolved configuration as YAML (keys in definition order)."""
    Path(path).write_text(yaml.safe_dump(dict(config), sort_keys=False))
