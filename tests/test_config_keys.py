"""Every key the config accepts is read by something (no accepted-but-ignored key, issue 19, data.resize), and the
loss keys are the ones the README documents and reach the loss.

The ``loss`` keys are compared with a hand-written list of what the README documents for each loss (not with the
signatures they are read from), and each loss's section round-trips: config -> build_loss -> the loss's own record
``loss_spec`` -> config, with values that differ from the defaults and are checked on the built object. The keys of
``data``, ``eval`` and the top level are read by name in ``recallk.cli``, the only code that wires a config
(``config["data"]["image_size"]``, or ``d["test_split"]`` after ``d = config["data"]``): each must appear as such
a read. A key removed from DEFAULTS is refused with a message.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from recallk.cli.wiring import criterion_from_config
from recallk.config import DEFAULTS, ConfigError, load_config
from recallk.engine.run_config import describe_loss
from recallk.losses import loss_config_keys, loss_names

SRC = Path(__file__).resolve().parent.parent / "src" / "recallk"
#: sections passed whole to what they configure (build_model, build_loss, TrainSettings)
PASSED_WHOLE = ("model", "loss", "train")

#: the loss keys the README documents ("Every loss is called ...", and RS@k's arguments), written by hand
DOCUMENTED_LOSS_KEYS = {
    "rsk": ["ks", "tau_rank", "tau_k", "include_query", "simix", "max_pairs_per_class", "backend", "memory"],
    "smooth_ap": ["temperature"],
    "contrastive": ["pos_margin", "neg_margin"],
    "multi_similarity": ["alpha", "beta", "base"],
    "proxy_anchor": ["num_classes", "embedding_size", "margin", "alpha"],
}

#: for each loss, overrides with non-default values and how to read each back from the built loss
ROUND_TRIP = {
    "rsk": (["loss.ks=[1, 4]", "loss.tau_rank=0.05", "loss.simix=true", "loss.memory=recompute"],
            lambda loss: (loss.ks, loss.tau_rank, loss.simix, loss.memory), ((1, 4), 0.05, True, "recompute")),
    "smooth_ap": (["loss.temperature=0.05"], lambda loss: loss.loss.temperature, 0.05),
    "contrastive": (["loss.pos_margin=0.2", "loss.neg_margin=0.7"],
                    lambda loss: (loss.loss.pos_margin, loss.loss.neg_margin), (0.2, 0.7)),
    "multi_similarity": (["loss.alpha=3.0", "loss.beta=40.0", "loss.base=0.4"],
                         lambda loss: (loss.loss.alpha, loss.loss.beta, loss.loss.base), (3.0, 40.0, 0.4)),
    "proxy_anchor": (["loss.margin=0.2", "loss.alpha=16.0"],
                     lambda loss: (loss.loss.margin, loss.loss.alpha, tuple(loss.loss.proxies.shape)),
                     (0.2, 16.0, (6, 512))),  # 6 classes of the labels below, model.embed_dim = 512
}


def test_every_registered_loss_takes_the_keys_the_readme_documents():
    assert list(loss_names()) == list(DOCUMENTED_LOSS_KEYS)
    for name, keys in DOCUMENTED_LOSS_KEYS.items():
        assert loss_config_keys(name) == keys, name
    assert [k for k in DEFAULTS["loss"] if k != "name"] == DOCUMENTED_LOSS_KEYS["rsk"]


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_a_loss_section_round_trips_through_the_loss_it_builds(name):
    overrides, read, expected = ROUND_TRIP[name]
    config = load_config(None, [f"loss.name={name}", *overrides])
    loss = criterion_from_config(config, np.arange(12) % 6)
    assert read(loss) == expected
    assert describe_loss(loss) == config["loss"]  # the run's context (Proxy-Anchor's classes) is not config
    typed = "loss=" + yaml.safe_dump(describe_loss(loss), default_flow_style=True, width=1000).strip()
    assert load_config(None, [typed])["loss"] == config["loss"]


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
