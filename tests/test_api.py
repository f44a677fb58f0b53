"""The top-level API the README shows resolves to the real objects, and the README's two commands exist."""

from pathlib import Path

import pytest

import recallk

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(recallk._EXPORTS))
def test_every_export_resolves(name):
    obj = getattr(recallk, name)
    module = __import__(recallk._EXPORTS[name], fromlist=[name])
    assert obj is getattr(module, name)


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        recallk.nope  # noqa: B018


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1 : readme.index("```bash") + 3]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_simix_from_top_level_matches_losses_module():
    import torch

    sim = torch.eye(4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    aug, aug_labels = recallk.simix(sim, labels, alphas=torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert aug.shape == (6, 6) and aug_labels.tolist() == [0, 0, 1, 1, 0, 1]
    # virtual item of (0, 1) with alpha 0.5: s(v, 0) = 0.5 * 1 + 0.5 * 0
    assert aug[4, 0].item() == pytest.approx(0.5)
