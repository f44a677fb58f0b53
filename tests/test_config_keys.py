"""Every key the config accepts is read by something: no accepted-but-ignored key (issue 19, data.resize).

``model`` and ``loss`` (rsk) sections are passed whole to their builders (``config.section_arguments``), ``train``
to ``TrainSettings``: each of their keys must be a parameter there. The other keys are read by name in
``recallk.cli``, the only code that wires a config (``config["data"]["image_size"]``, or ``d["test_split"]`` after
``d = config["data"]``): each must appear as such a read. A key removed from DEFAULTS is refused with a message.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from recallk.config import DEFAULTS, ConfigError, load_config
from recallk.engine import TrainSettings
from recallk.losses import RecallAtKSurrogate
from recallk.models import build_model

SRC = Path(__file__).resolve().parent.parent / "src" / "recallk"
PASSED_WHOLE = {
    "model": set(inspect.signature(build_model).parameters),
    "loss": set(inspect.signature(RecallAtKSurrogate).parameters),
    "train": {f.name for f in dataclasses.fields(TrainSettings)},
}


def config_reads(code: str) -> set[tuple[str | None, str]]:
    """(section or None, key) of every read of a config key in ``code``: ``config["s"]["k"]``, ``config["k"]``,
    ``alias["k"]`` / ``alias.get("k")`` where ``alias = config["s"]`` (``config`` may be any name ending in
    ``config``)."""
    q = r"""["'](\w+)["']"""
    reads: set[tuple[str | None, str]] = set()
    aliases = dict(re.findall(rf"(\w+) = \w*config\[{q}\]", code))
    for outer, inner in re.findall(rf"\w*config\[{q}\](?:\[{q}\])?", code):
        reads.add((outer, inner) if inner else (None, outer))
    for alias, section in aliases.items():
        for item, got in re.findall(rf"\b{alias}(?:\[{q}\]|\.get\({q})", code):
            reads.add((section, item or got))
    return reads


def _cli_reads() -> set[tuple[str | None, str]]:
    return set().union(*(config_reads(p.read_text()) for p in (SRC / "cli").rglob("*.py")))


def test_model_loss_and_train_keys_are_parameters_of_what_receives_them():
    for section, params in PASSED_WHOLE.items():
        keys = set(DEFAULTS[section]) - {"name", "options"}
        assert keys <= params, (section, sorted(keys - params))


def test_every_other_key_is_read_by_name():
    reads = _cli_reads()
    keys = [(None, k) for k, v in DEFAULTS.items() if not isinstance(v, dict)]
    keys += [(s, k) for s, v in DEFAULTS.items() if isinstance(v, dict) and s not in PASSED_WHOLE for k in v]
    unread = [f"{s}.{k}" if s else k for s, k in keys if (s, k) not in reads]
    assert not unread, f"config keys accepted but never read: {unread}"


def test_config_reads_finds_direct_and_aliased_reads_only_of_config_sections():
    code = 'd = config["data"]\nx = d["image_size"] + d.get("root")\ny = config["eval"]["ks"], config["seed"]\n' \
           'spec["resize"] = 1\n'
    assert config_reads(code) == {("data", "image_size"), ("data", "root"), ("eval", "ks"), (None, "seed"),
                                  (None, "data")}


def test_removed_key_is_refused_with_what_to_do():
    with pytest.raises(ConfigError, match=r"data\.resize was removed"):
        load_config(None, ["data.resize=256"])
