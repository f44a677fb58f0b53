"""The loss section of a run's config, as a researcher switching losses meets it: a preset's RS@k keys do not block
another loss, bad baseline options are refused before any work, baselines name themselves in the start block,
loss errors name their config keys, contrastive margins follow the loss's distance."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import recallk
from recallk.cli.main import main
from recallk.config import ConfigError, load_config
from tests.helpers.runs import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
KANJI = str(REPO / "configs" / "kanji.yaml")
TINY = tiny_overrides("kanji")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_preset_simix_is_reset_with_a_note_and_contrastive_trains(tmp_path, capsys):
    code = main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "c", "--no-progress", "loss.name=contrastive",
                 "loss={pos_margin: 0.0, neg_margin: 1.0}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"loss.simix: true of {KANJI} is an argument of RS@k, not used by loss 'contrastive' (dropped)" in err
    saved = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["loss"]
    assert saved == {"name": "contrastive", "pos_margin": 0.0, "neg_margin": 1.0}  # no RS@k key left
    load_config(tmp_path / "c" / "config.yaml")  # the saved config is a valid one for the loss it names
    start = [line for line in out.splitlines() if line.startswith("loss ")]
    assert start and "contrastive" in start[0] and "'pos_margin': 0.0" in start[0], out
    assert "MetricLearningBaseline" not in out


def test_rsk_key_typed_with_another_loss_is_refused_with_the_way_out(tmp_path, capsys):
    code = main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "r", "loss.name=contrastive", "loss.simix=true"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("loss.simix=true is not an argument of loss 'contrastive' (an argument of loss 'rsk': loss.name=rsk): "
            "drop loss.simix; loss 'contrastive' takes ['pos_margin', 'neg_margin']") in err, err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match=r"drop loss\.ks"):
        load_config(KANJI, ["loss.name=smooth_ap", "loss={ks: [1, 2]}"])


def test_file_keys_reset_only_for_another_loss(capsys):
    assert load_config(KANJI)["loss"]["simix"] is True  # rsk keeps them, silently
    assert "note" not in capsys.readouterr().err
    assert load_config(KANJI, ["loss.name=smooth_ap"])["loss"] == {"name": "smooth_ap", "temperature": 0.01}
    assert "loss.simix: true" in capsys.readouterr().err  # the note names the dropped preset key


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.name=contrastive", "loss.pos_margin=abc"], "loss.pos_margin='abc' of loss 'contrastive'"),
    (["loss.name=contrastive", "loss={neg_margin: -1}"], "loss.neg_margin=-1 of loss 'contrastive'"),
    (["loss.name=multi_similarity", 'loss.alpha="2"'], "loss.alpha='2' of loss 'multi_similarity'"),
    (["loss.name=multi_similarity", "loss.beta=.inf"], "loss.beta=inf of loss 'multi_similarity'"),
    (["loss.name=smooth_ap", "loss.temperature=-1"], "loss.temperature=-1 of loss 'smooth_ap'"),
    (["loss.name=proxy_anchor", "loss.alpha=0"], "loss.alpha=0 of loss 'proxy_anchor'"),
    (["loss.name=contrastive", "loss.foo=1"], "loss 'contrastive' takes ['pos_margin', 'neg_margin']"),
    (["loss.memory=foo"], "loss.memory must be one of ('auto', 'matrix', 'recompute'), got 'foo'"),
    (["loss.max_pairs=2"], "(did you mean 'loss.max_pairs_per_class'?): drop loss.max_pairs; loss 'rsk' takes "
     "['ks', 'tau_rank', 'tau_k', 'include_query', 'simix', 'max_pairs_per_class'"),
])
def test_bad_loss_values_are_refused_before_any_work(tmp_path, capsys, overrides, message):
    # the preset's loss.simix=true is dropped for another loss: only the value under test is wrong
    code = main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "b", "--no-progress", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


def test_proxy_anchor_num_classes_is_checked_against_the_training_split(tmp_path, capsys):
    code = main(["train", *TINY, f"runs_dir={tmp_path}", "--name", "p", "--no-progress", "loss.name=proxy_anchor",
                 "loss.num_classes=5"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert ("loss.num_classes=5 but the training split has 8 classes: set it to 8 or leave it out "
            "(recallk fills it in)") in err, err


def test_contrastive_margins_with_another_distance_are_not_bounded_as_distances():
    """With pml's default (L2) distance a margin is a distance (>= 0, neg_margin > 0); with cosine similarity the
    paper-style margins pos_margin=1, neg_margin=0 are similarities and must be accepted."""
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity

    loss = recallk.build_loss("contrastive", pos_margin=1.0, neg_margin=0.0, distance=CosineSimilarity())
    emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    assert torch.isfinite(loss(emb, torch.arange(8) // 2))
    with pytest.raises(ValueError, match=r"loss.neg_margin=0.0"):
        recallk.build_loss("contrastive", pos_margin=1.0, neg_margin=0.0)
