"""Exact resume (issue 13, section 5): a stop signal inside pass 1, inside the loss or inside pass 2 of a SiMix
run with BatchNorm in train mode stops the run at the end of that step (the signal is only recorded), and the
resumed run ends with the weights, the loss's random state and the metrics.jsonl lines of the uninterrupted run;
augmentation randomness is a function of (seed, epoch, item), so the run is the same with any number of
DataLoader workers and resumes exactly with workers too."""

from __future__ import annotations

import json
import signal
import warnings

import pytest
import torch
from torch import nn

from recallk.data.loading import item_seed
from recallk.engine import Stopped, Trainer, load_checkpoint
from recallk.losses import RecallAtKSurrogate
from tests.helpers.engine import NoisyImages, make_net, nearest_neighbour_eval

STOP_STEP = 4  # the first step of epoch 2 (3 steps per epoch)
CHUNKS = 3  # batch 8 in chunks of 3


class SimixLoss(nn.Module):
    """RS@k with SiMix as a sub-module, so that a hook can stop the run right after its random draw."""

    def __init__(self) -> None:
        super().__init__()
        self.rsk = RecallAtKSurrogate(ks=(1, 2), simix=True, generator=torch.Generator().manual_seed(7))

    def forward(self, embeddings, labels):
        return self.rsk(embeddings, labels)


def make_trainer(run_dir, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = make_net(dropout=0.2)  # BatchNorm trains (ghost batches): its running statistics change in pass 1
    dataset = NoisyImages()  # augmentation noise from the global torch RNG
    settings = dict(batch_size=8, chunk_size=3, per_class=2, epochs=2, optimizer="adam", lr=1e-2, device="cpu",
                    seed=3, eval_fn=nearest_neighbour_eval(dataset), progress=False, tensorboard=False)
    settings.update(overrides)
    return Trainer(model, SimixLoss(), dataset, run_dir, **settings)


def fit(trainer: Trainer, **kwargs) -> Trainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the ghost-batch BatchNorm notice
        trainer.fit(**kwargs)
    return trainer


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        va, vb = sa[name], sb[name]
        if isinstance(va, dict):  # a loss's extra state: {"generator_state": ByteTensor}
            assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va), name
        else:
            assert torch.equal(va, vb), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fit(make_trainer(tmp_path_factory.mktemp("full")))


def lines(run_dir) -> list[dict]:
    """metrics.jsonl without what differs between runs (times, speeds)."""
    drop = ("time", "images_per_s", "data_wait_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stop_at(trainer: Trainer, where: str, signum: int) -> None:
    """Send this process ``signum`` during step STOP_STEP: in pass 1 (second chunk), right after the loss (its
    SiMix draw done), or in pass 2 (second chunk)."""
    calls = {"pass1": 0, "pass2": 0, "loss": 0}

    def model_hook(module, inputs, output):
        if not module.training:
            return  # evaluation
        kind = "pass2" if torch.is_grad_enabled() else "pass1"
        calls[kind] += 1
        if kind == where and calls[kind] == (STOP_STEP - 1) * CHUNKS + 2:
            signal.raise_signal(signum)

    def loss_hook(module, inputs, output):
        calls["loss"] += 1
        if where == "loss" and calls["loss"] == STOP_STEP:
            signal.raise_signal(signum)

    trainer.model.register_forward_hook(model_hook)
    trainer.criterion.rsk.register_forward_hook(loss_hook)


@pytest.mark.parametrize(("where", "signum"), [("pass1", signal.SIGINT), ("loss", signal.SIGTERM),
                                               ("pass2", signal.SIGUSR1)])
def test_a_signal_inside_a_step_stops_after_it_and_resumes_exactly(uninterrupted, tmp_path, where, signum):
    cut = make_trainer(tmp_path)
    _stop_at(cut, where, signum)
    with pytest.raises(Stopped) as info:
        fit(cut)
    assert info.value.signum == signum and info.value.step == STOP_STEP  # the step the signal came in: done
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == STOP_STEP
    resumed = fit(make_trainer(tmp_path), resume=True)
    assert_same_state(resumed.model, uninterrupted.model)
    assert_same_state(resumed.criterion, uninterrupted.criterion)  # SiMix's generator included
    assert lines(tmp_path) == lines(uninterrupted.run_dir)


def test_workers_do_not_change_the_run_and_resume_exactly(uninterrupted, tmp_path):
    with_workers = fit(make_trainer(tmp_path / "w", num_workers=2))
    assert_same_state(with_workers.model, uninterrupted.model)
    fit(make_trainer(tmp_path / "cut", num_workers=2, max_steps=STOP_STEP))
    resumed = fit(make_trainer(tmp_path / "cut", num_workers=2), resume=True)
    assert_same_state(resumed.model, uninterrupted.model)


def test_item_seed_depends_on_seed_epoch_and_item_only():
    seeds = {item_seed(s, e, i) for s in (0, 1) for e in (1, 2) for i in (0, 1, 2)}
    assert len(seeds) == 12 and all(0 <= x < 2**63 for x in seeds)
    assert item_seed(3, 2, 5) == item_seed(3, 2, 5)
