"""Run lifecycle in the trainer (issue 19): a stop during an evaluation lets it finish and stops at the epoch's end
(weights and metrics.jsonl as in the uninterrupted run after resuming), steps that change no weight stop the run,
fp16 on the CPU is refused, each rank resumes its own random stream, progress lines go to train.log."""

from __future__ import annotations

import json
import signal
import warnings

import pytest
import torch

from recallk.engine import Stopped, Trainer, load_checkpoint
from recallk.engine.rng import capture_all_rng
from recallk.engine.trainer import TrainingStalledError
from recallk.engine.trainer_state import rank_rng
from tests.helpers.engine import NoisyImages, contrastive_loss, make_net, nearest_neighbour_eval


def make_trainer(run_dir, eval_fn=None, criterion=contrastive_loss, **overrides) -> Trainer:
    torch.manual_seed(0)
    dataset = NoisyImages()
    settings = dict(batch_size=8, chunk_size=4, per_class=2, epochs=3, optimizer="adam", lr=1e-2, device="cpu",
                    seed=3, progress=False, tensorboard=False)
    settings.update(overrides)
    return Trainer(make_net(dropout=0.2), criterion, dataset, run_dir,
                   eval_fn=eval_fn or nearest_neighbour_eval(dataset), **settings)


def fit(trainer: Trainer, **kwargs) -> Trainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(**kwargs)
    return trainer


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def key(record):
    return (record["kind"], record.get("scope"), record.get("split"), record["epoch"], record["step"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_during_an_evaluation_stops_after_it(tmp_path, signum):
    full = fit(make_trainer(tmp_path / "full"))
    base = nearest_neighbour_eval(NoisyImages())
    calls = []

    def stopping_eval(model, epoch):  # a signal arrives while epoch 2's evaluation runs
        calls.append(epoch)
        if epoch == 2 and calls.count(2) == 1:
            signal.raise_signal(signum)
        return base(model, epoch)

    with pytest.raises(Stopped) as info:
        fit(make_trainer(tmp_path / "cut", eval_fn=stopping_eval))
    assert info.value.signum == signum and (info.value.epoch, info.value.step) == (2, 6)
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"], state["step"]) == (2, 0, 6) and "pending_eval" not in state
    resumed = fit(make_trainer(tmp_path / "cut", eval_fn=stopping_eval), resume=True)
    assert calls == [0, 1, 2, 3]  # epoch 2's evaluation finished before the stop: not run again
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    cut_lines, full_lines = lines(tmp_path / "cut"), lines(tmp_path / "full")
    assert [key(r) for r in cut_lines] == [key(r) for r in full_lines]  # nothing missing, nothing twice
    assert [r.get("map@r") for r in cut_lines] == [r.get("map@r") for r in full_lines]
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "stopped by" in log and "epoch 3/3" in log
    said = f"continue with: Trainer(...).fit(resume=True) with run_dir {tmp_path / 'cut'}"  # the API's words
    assert "(after epoch 2 (step 6)); " + said in log
    assert log.index("epoch 2/3  step 6") < log.index("stopped by")  # the epoch's line, then the stop
    assert "resumed after epoch 2 (step 6): continuing with epoch 3" in log


def test_metrics_after_the_checkpoint_are_cut_on_resume(tmp_path):
    fit(make_trainer(tmp_path / "run", max_steps=4))  # stops (and saves) at step 4
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:  # a hard kill after step 5 had left this
        handle.write(json.dumps({"kind": "train", "scope": "interval", "epoch": 2, "step": 5, "time": 0}) + "\n")
    fit(make_trainer(tmp_path / "run"), resume=True)
    keys = [key(r) for r in lines(tmp_path / "run")]
    assert len(keys) == len(set(keys))
    assert [r["step"] for r in lines(tmp_path / "run") if r.get("scope") == "interval"] == list(range(1, 10))


def test_steps_that_change_no_weight_stop_the_run(tmp_path):
    def zero_loss(embeddings, labels):
        return 0.0 * embeddings.sum()

    with pytest.raises(TrainingStalledError, match="did not change the weights"):
        fit(make_trainer(tmp_path / "run", criterion=zero_loss, epochs=10))


def test_steps_the_grad_scaler_skips_stop_the_run(tmp_path):
    """fp16's GradScaler skips a step whose scaled gradients overflow; a run whose every step is skipped must stop.
    fp16 is refused on the CPU, so a real GradScaler with a huge scale makes the gradients overflow here: the test
    network is float64, and 2**127 x a gradient of about 1e298 is inf on every step (each skip halves the scale)."""

    def steep_loss(embeddings, labels):  # finite (|loss| <= 1e300), gradients 1e300 / numel
        return 1e300 * embeddings.mean()

    trainer = make_trainer(tmp_path / "run", criterion=steep_loss, epochs=10)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingStalledError, match="GradScaler skipped every one"):
        fit(trainer)
    assert trainer.step == 20 and trainer.scaler.get_scale() == 2.0 ** (127 - 20)
    for name, value in trainer.model.state_dict().items():
        if value.is_floating_point() and "running" not in name:  # BatchNorm statistics move in the forward
            assert torch.equal(value, before[name]), name  # no step was taken


def test_fp16_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"fp16.*CPU"):
        make_trainer(tmp_path / "run", amp="fp16")


def test_each_rank_resumes_its_own_random_stream():
    rank0 = capture_all_rng()
    torch.rand(3)
    rank1 = capture_all_rng()
    state = {"step": 5, "rng": rank0, "rng_per_rank": [rank0, rank1]}  # a checkpoint of two processes
    assert torch.equal(rank_rng(state, 1, seed=3)["torch_cpu"], rank1["torch_cpu"])
    assert torch.equal(rank_rng(state, 0, seed=3)["torch_cpu"], rank0["torch_cpu"])
    alone = {"step": 5, "rng": rank0}  # a checkpoint of one process, resumed by two
    assert torch.equal(rank_rng(alone, 0, seed=3)["torch_cpu"], rank0["torch_cpu"])
    with pytest.warns(UserWarning, match="no random state of step 5"):
        fresh = rank_rng(alone, 1, seed=3)
    assert not torch.equal(fresh["torch_cpu"], rank0["torch_cpu"])  # not rank 0's stream replayed
    with pytest.warns(UserWarning):
        again = rank_rng(alone, 1, seed=3)
    assert torch.equal(again["torch_cpu"], fresh["torch_cpu"])  # seeded from (seed, rank, step) alone
