"""docs/architecture.md stays true: every name its layer table gives is importable where the table says, and the
worked example of adding a loss (``MarginLoss``), run as pasted, is a sound loss."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: backticked words of the layer table that are fields, attributes or methods of a named class, not importable
#: names (each is next to the class it belongs to in the table)
NOT_NAMES = {
    "eval_protocol",  # DatasetSpec field
    "forward",  # MetricLoss.forward
    "min_per_class",  # register_loss's argument, MetricLoss attribute
    "model_spec",  # checkpoint content
    "model_id",  # TrainedModel attribute
    "recallk",  # the command
}
#: a Python name, dotted, optionally called: `build_model(name, ...)`, `datasets.base.load_rgb`
NAME = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\(.*\))?$")


def layer_rows() -> list[tuple[list[str], list[str]]]:
    """(packages, backticked tokens of 'public names') of each row of the layer table."""
    table = DOC.read_text(encoding="utf-8").split("| layer | package | public names |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.strip().splitlines()[1:]:  # after the |---| line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"a layer table row that is not 3 cells: {line[:80]}"
        rows.append((re.findall(r"`([\w.]+)`", cells[1]), re.findall(r"`([^`]+)`", cells[2])))
    return rows


def resolve(base: str, dotted: str) -> object:
    """``base.dotted`` by attribute access, importing submodules of packages on the way; AttributeError if absent."""
    obj: object = importlib.import_module(base)
    for part in dotted.split("."):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif isinstance(obj, ModuleType) and hasattr(obj, "__path__"):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except ModuleNotFoundError:
                raise AttributeError(f"{obj.__name__} has no {part}") from None
        else:
            raise AttributeError(f"{getattr(obj, '__name__', obj)} has no {part}")
    return obj


def where_importable(packages: list[str], dotted: str) -> list[str]:
    """The row's packages (or ``recallk`` for a name spelt from the package, ``data.splits``) that hold it."""
    bases = list(packages) + ["recallk" for p in packages if dotted.split(".")[0] == p.rsplit(".", 1)[-1]]
    found = []
    for base in bases:
        try:
            resolve(base, dotted)
            found.append(base)
        except AttributeError:
            pass
    return found


def test_the_layer_tables_names_are_importable_where_it_says():
    rows = layer_rows()
    assert len(rows) >= 10 and all(packages for packages, _ in rows)
    checked, missing = 0, []
    for packages, tokens in rows:
        for token in tokens:
            m = NAME.match(token)
            if not m or m.group(1) in NOT_NAMES:
                continue  # paths, commands, quoted strings, fields
            checked += 1
            if not where_importable(packages, m.group(1)):
                missing.append(f"{m.group(1)} (row {', '.join(packages)})")
    assert not missing, f"docs/architecture.md names what is not importable there: {missing}"
    assert checked >= 80  # the parser still reads the table


def test_the_name_check_catches_a_wrong_home():
    assert where_importable(["recallk.evaluation"], "metrics.metric_order") == ["recallk.evaluation"]
    assert not where_importable(["recallk.evaluation"], "metric_order")
    assert not where_importable(["recallk.data"], "DeviceNormalize")
    assert not where_importable(["recallk.data"], "datasets.base.SymlinkLoopError")
    assert where_importable(["recallk.data"], "datasets.folder.SymlinkLoopError") == ["recallk.data"]
    assert where_importable(["recallk.testing"], "testing.rsk") == ["recallk"]


@pytest.fixture
def margin_loss():
    """The doc's ``MarginLoss`` block executed as pasted; its registration is undone after the test."""
    from recallk.losses import base

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    (code,) = [b for b in blocks if "class MarginLoss" in b]
    saved = dict(base._LOSSES), dict(base._MIN_PER_CLASS)
    namespace: dict = {}
    try:
        exec(compile(code, "docs/architecture.md:MarginLoss", "exec"), namespace)
        yield namespace["MarginLoss"]
    finally:
        base._LOSSES.clear()
        base._LOSSES.update(saved[0])
        base._MIN_PER_CLASS.clear()
        base._MIN_PER_CLASS.update(saved[1])


def brute_force_margin(q, ql, r, rl, margin, exclude_self):
    pos, neg = [], []
    for i in range(len(q)):
        for j in range(len(r)):
            if exclude_self and i == j:
                continue
            s = float(q[i] @ r[j])
            (pos if ql[i] == rl[j] else neg).append((1 - s) if ql[i] == rl[j] else max(0.0, s - margin))
    return sum(neg) / len(neg) + sum(pos) / len(pos)


def test_the_margin_loss_example_is_a_sound_loss(margin_loss):
    from recallk.losses import build_loss

    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ref = torch.nn.functional.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=1)
    ref_labels = torch.tensor([0, 1, 3, 3])
    loss = margin_loss(margin=0.1)
    assert isinstance(build_loss("margin", margin=0.1), margin_loss)
    # the batch against itself: each query's positives exclude itself
    want = brute_force_margin(emb, labels, emb, labels, 0.1, exclude_self=True)
    assert loss(emb, labels).item() == pytest.approx(want, abs=1e-12)
    want = brute_force_margin(emb, labels, ref, ref_labels, 0.1, exclude_self=False)
    assert loss(emb, labels, ref_emb=ref, ref_labels=ref_labels).item() == pytest.approx(want, abs=1e-12)
    for bad_labels in (torch.arange(6), torch.zeros(6, dtype=torch.long)):  # singletons; one class only
        with pytest.raises(ValueError, match=r"positive pair .* negative"):
            loss(emb, bad_labels)
    with pytest.raises(ValueError, match="ClassBalancedBatchSampler"):
        loss(emb, labels, ref_emb=ref, ref_labels=ref_labels + 10)
