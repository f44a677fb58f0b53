"""Trainer end to end on a tiny synthetic dataset: logs, checkpoints, exact resume, NaN, Ctrl-C."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from recallk.engine import NonFiniteLossError, Stopped, Trainer, freeze_batchnorm, load_checkpoint
from tests.helpers.engine import GeneratorMixLoss, NoisyImages, RandomMixLoss, make_net, nearest_neighbour_eval

EPOCHS = 2  # 6 classes x 6 items, batches of 4 classes x 2 items -> 3 steps per epoch
# (the authors' epoch drains the first 4 classes of the shuffled list: 3 batches, 2 classes left over)


class FaultyLoss(nn.Module):
    """RandomMixLoss that returns NaN on its ``at``-th call (1-based), or instead sends this process the signal
    ``signum`` there, ``times`` times (as Ctrl-C pressed once or twice)."""

    def __init__(self, at: int | None = None, signum: int | None = None, times: int = 1) -> None:
        super().__init__()
        self.inner = RandomMixLoss()
        self.at, self.signum, self.times, self.calls = at, signum, times, 0

    def forward(self, embeddings, labels):
        self.calls += 1
        loss = self.inner(embeddings, labels)
        if self.calls == self.at:
            if self.signum is not None:
                for _ in range(self.times):
                    signal.raise_signal(self.signum)
                return loss
            return loss * float("nan")
        return loss


def make_trainer(run_dir: Path, criterion: nn.Module | None = None, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = freeze_batchnorm(make_net(dropout=0.2))
    dataset = NoisyImages()
    settings = dict(batch_size=8, chunk_size=3, per_class=2, epochs=EPOCHS, optimizer="adam", lr=1e-2,
                    milestones=(1,), gamma=0.5, device="cpu", seed=3, eval_fn=nearest_neighbour_eval(dataset),
                    progress=False, tensorboard=False)
    settings.update(overrides)
    return Trainer(model, criterion if criterion is not None else FaultyLoss(), dataset, run_dir, **settings)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    trainer = make_trainer(run_dir, tensorboard=True, progress=True)
    result = trainer.fit()
    return run_dir, trainer, result


def test_run_folder(uninterrupted):
    run_dir, trainer, result = uninterrupted
    records = read_metrics(run_dir)
    for record in records:
        assert {"kind", "epoch", "step", "time"} <= record.keys()
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["split"] == "test" and "map@r" in r for r in evals)
    train = [r for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in train if r["scope"] == "interval"]
    assert steps == list(range(1, 7))
    epoch_lines = [r for r in train if r["scope"] == "epoch"]
    assert [r["epoch"] for r in epoch_lines] == [1, 2]
    # MultiStepLR: halved after epoch 1.
    assert [r["lr"] for r in epoch_lines] == [pytest.approx(1e-2), pytest.approx(5e-3)]
    assert all(r["images_per_s"] > 0 for r in train if r["scope"] == "interval")
    interval_losses = [r["loss"] for r in train if r["scope"] == "interval"]
    assert epoch_lines[0]["loss"] == pytest.approx(sum(interval_losses[:3]) / 3)

    assert result["map@r"] == evals[-1]["map@r"]
    assert result["best_map@r"] == max(r["map@r"] for r in evals)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (last["epoch"], last["step"], last["position"]) == (EPOCHS, 6, 0)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(last["model"][name], value)
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["best"]["value"] == result["best_map@r"]
    assert any((run_dir / "tensorboard").iterdir())


@pytest.mark.parametrize("stop_after", [2, 3, 5])
def test_resume_after_max_steps_is_bit_identical(uninterrupted, tmp_path, stop_after):
    _, reference, _ = uninterrupted
    first = make_trainer(tmp_path, max_steps=stop_after)
    first.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == stop_after
    resumed = make_trainer(tmp_path)
    with torch.no_grad():  # the weights must come from the checkpoint
        for p in resumed.model.parameters():
            p.add_(1.0)
    resumed.fit(resume=True)
    assert_same_weights(resumed.model, reference.model)
    assert resumed.step == 6
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]


def test_ctrl_c_inside_a_step_stops_after_it_and_resume_is_bit_identical(uninterrupted, tmp_path):
    run_dir, reference, _ = uninterrupted
    handler = signal.getsignal(signal.SIGINT)
    trainer = make_trainer(tmp_path, criterion=FaultyLoss(at=5, signum=signal.SIGINT))  # inside step 5's loss
    with pytest.raises(Stopped) as info, pytest.warns(UserWarning, match="stopped by Ctrl-C"):
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is handler  # the handler before fit is back
    stop = info.value
    assert isinstance(stop, KeyboardInterrupt) and (stop.signal_name, stop.signum) == ("SIGINT", signal.SIGINT)
    assert (stop.epoch, stop.step, stop.saved_to) == (1, 5, tmp_path / "checkpoints" / "last.pt")
    assert stop.position_text == "in epoch 2 after batch 2 of 3 (step 5)"
    assert str(stop) == (f"stopped by Ctrl-C: saved {tmp_path / 'checkpoints' / 'last.pt'} (in epoch 2 after batch 2 "
                         f"of 3 (step 5)); continue with: Trainer(...).fit(resume=True) with run_dir {tmp_path}")
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"], state["step"]) == (1, 2, 5)  # the step the signal came in: done
    resumed = make_trainer(tmp_path)
    resumed.fit(resume=str(tmp_path / "checkpoints" / "last.pt"))
    assert_same_weights(resumed.model, reference.model)
    drop = ("time", "images_per_s", "data_wait_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path)] == [
        {k: v for k, v in r.items() if k not in drop} for r in read_metrics(run_dir)]


def test_a_stop_after_an_epochs_last_batch_resumes_with_that_epochs_end(uninterrupted, tmp_path):
    """A stop at the last batch of epoch 1 (step 3 of 3) saves the position "after batch 3 of 3"; the resume says it
    continues with the end of epoch 1 (before: "continuing with batch 4", a batch that does not exist) and ends as
    the run left alone."""
    _, reference, _ = uninterrupted
    with pytest.raises(Stopped) as info, pytest.warns(UserWarning):
        make_trainer(tmp_path, criterion=FaultyLoss(at=3, signum=signal.SIGTERM)).fit()
    assert info.value.position_text == "in epoch 1 after batch 3 of 3 (step 3)"
    resumed = make_trainer(tmp_path)
    resumed.fit(resume=True)
    log = (tmp_path / "train.log").read_text()
    assert "(step 3): continuing with the end of epoch 1)" in log and "batch 4" not in log
    assert_same_weights(resumed.model, reference.model)


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    trainer = make_trainer(tmp_path, criterion=FaultyLoss(at=5, signum=signal.SIGINT, times=2))
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert type(info.value) is KeyboardInterrupt  # not Stopped: nothing saved after the second Ctrl-C
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3  # epoch 1's, as it was
    assert "stopped by" not in (tmp_path / "train.log").read_text()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, criterion=FaultyLoss(at=5))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 5"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 3)
    for value in state["model"].values():
        assert torch.isfinite(value.double()).all()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_resume_refuses_other_settings(uninterrupted, tmp_path):
    run_dir, _, _ = uninterrupted
    trainer = make_trainer(tmp_path, batch_size=12)
    with pytest.raises(ValueError, match="batch_size=8"):
        trainer.fit(resume=str(run_dir / "checkpoints" / "last.pt"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path / "empty").fit(resume=True)


def test_settings_errors_before_training(tmp_path):
    with pytest.raises(ValueError, match="not divisible by per_class"):
        make_trainer(tmp_path, batch_size=9)
    with pytest.raises(ValueError, match="needs 8 classes"):
        make_trainer(tmp_path, batch_size=16)
    with pytest.raises(ValueError, match="amp"):
        make_trainer(tmp_path, amp="fp8")
    with pytest.raises(ValueError, match="optimizer"):
        make_trainer(tmp_path, optimizer="lamb")
    trainer = make_trainer(tmp_path, best_metric="recall@1000")
    with pytest.raises(ValueError, match="recall@1000"):
        trainer.fit()
    assert not (tmp_path / "checkpoints").exists()


def test_without_eval_and_with_step_cap(tmp_path):
    trainer = make_trainer(tmp_path, eval_fn=None, max_steps_per_epoch=2, epochs=3, eval_every=2)
    result = trainer.fit()
    assert trainer.step == 6 and "train_loss" in result
    assert not [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


def _simix_loss() -> nn.Module:
    from recallk.losses import RecallAtKSurrogate

    return RecallAtKSurrogate(ks=(1, 2), simix=True, generator=torch.Generator().manual_seed(7))


def test_resume_with_simix_replays_the_loss_generator(tmp_path):
    """SiMix draws its alphas from the loss's own generator: a resumed run must continue that stream."""
    full = make_trainer(tmp_path / "full", criterion=_simix_loss())
    full.fit()
    first = make_trainer(tmp_path / "cut", criterion=_simix_loss(), max_steps=4)
    first.fit()
    resumed = make_trainer(tmp_path / "cut", criterion=_simix_loss())
    resumed.fit(resume=True)
    assert_same_weights(resumed.model, full.model)


def test_loss_generator_travels_in_the_criterion_state(tmp_path):
    """A loss's own generator is saved as its extra state (format 2), and a run cut short resumes bit-identically."""
    full = make_trainer(tmp_path / "full", criterion=GeneratorMixLoss(seed=7))
    full.fit()
    make_trainer(tmp_path / "cut", criterion=GeneratorMixLoss(seed=7), max_steps=4).fit()
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert state["format"] == 2 and set(state["criterion"]["_extra_state"]) == {"generator_state"}
    resumed = make_trainer(tmp_path / "cut", criterion=GeneratorMixLoss(seed=99))
    resumed.fit(resume=True)
    assert_same_weights(resumed.model, full.model)

