"""A stop signal (SIGTERM, as Slurm sends it) at the worst moments of a run: inside the routine write of last.pt
at an epoch's end, inside the write of best.pt, and during the optimiser update. The signal is only recorded
(``recallk.engine.stop``): the write or the update finishes, the run stops at the next safe point (the end of
the step, or of the epoch) with a complete last.pt, and the resumed run ends as the same run left alone (weights
bit for bit, the same metrics.jsonl lines). Found by a new-user trial when the signal raised: a signal inside
``torch.save`` came out as a RuntimeError ("unexpected pos"), no last.pt, a run that could not be resumed."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import recallk
from recallk.data.transforms import transforms_for_model
from recallk.engine import Stopped, Trainer, TrainSettings, load_checkpoint
from recallk.engine import checkpoint as checkpoint_module
from recallk.losses import RecallAtKSurrogate
from recallk.models import build_model
from tests.helpers.image_folders import write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


class SignalOnFirstWrite:
    """A file whose first ``write`` sends ``signum`` (SIGTERM) to this process: the handler then runs inside
    torch.save's C++ writer, as a real signal arriving during a checkpoint write does."""

    def __init__(self, handle, signum: int = signal.SIGTERM) -> None:
        self.handle, self.sent, self.signum = handle, False, signum

    def write(self, data) -> int:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def signal_inside_save_of(monkeypatch, name: str, nth: int = 1, signum: int = signal.SIGTERM) -> list[str]:
    """Make the ``nth`` torch.save of checkpoint ``name`` receive ``signum`` during its first write; returns the
    list of names saved (for the test to see that the signalled save happened)."""
    real_save, saved, calls = torch.save, [], {"n": 0}

    def save(state, handle, *args, **kwargs):
        is_it = isinstance(state, dict) and _kind(state) == name
        saved.append(_kind(state))
        if is_it:
            calls["n"] += 1
            if calls["n"] == nth:
                handle = SignalOnFirstWrite(handle, signum)
        return real_save(state, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    return saved


def signal_during_update(monkeypatch, nth: int, signum: int) -> None:
    """Send ``signum`` to this process inside the ``nth`` Adam update (its handler runs during the update)."""
    real_step, count = torch.optim.Adam.step, {"n": 0}

    def step(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == nth:
            os.kill(os.getpid(), signum)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)


def _kind(state: dict) -> str:
    return "best.pt" if "optimizer" not in state else "last.pt"


def run(top, name: str, resume: bool = False, epochs: int = 2) -> Trainer:
    data = top / "data"
    if not data.exists():
        write_image_folder(data, 6, cell=(13, 9))
    torch.manual_seed(0)
    model = build_model("resnet10t", embed_dim=8, freeze_bn=True)
    train_set = recallk.build_dataset("folder", data, None, transform=transforms_for_model(model, "train",
                                                                                          image_size=32))
    eval_set = recallk.build_dataset("folder", data, None, transform=transforms_for_model(model, "test",
                                                                                         image_size=32))

    def eval_fn(net, epoch):
        embeddings, labels = recallk.embed_dataset(net, eval_set, batch_size=32, device="cpu", progress=False)
        return recallk.retrieval_metrics(embeddings, labels, (1, 2))

    settings = TrainSettings(batch_size=8, chunk_size=8, per_class=2, epochs=epochs, lr=1e-2, device="cpu",
                             progress=False, tensorboard=False, max_steps_per_epoch=2, log_every=1)
    trainer = Trainer(model, RecallAtKSurrogate(ks=(1, 2), tau_rank=0.02), train_set, top / name, settings,
                      eval_fn=eval_fn)
    trainer.fit(resume=resume)
    return trainer


def lines(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s", "data_wait_s")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    top = tmp_path_factory.mktemp("alone")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (one_thread): the same sums in the same order
    try:
        run(top, "alone")
    finally:
        torch.set_num_threads(threads)
    return top


def assert_same_as_alone(alone, folder):
    want = load_checkpoint(alone / "alone" / "checkpoints" / "last.pt")
    got = load_checkpoint(folder / "checkpoints" / "last.pt")
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    assert lines(folder) == lines(alone / "alone")


def test_sigterm_inside_the_epoch_end_write_of_last_pt(alone, monkeypatch):
    top = alone.parent / "cut-last"
    top.mkdir()
    (top / "data").symlink_to(alone / "data")
    saved = signal_inside_save_of(monkeypatch, "last.pt")
    with pytest.raises(Stopped) as info:  # when the signal raised: RuntimeError from torch's zip writer, no last.pt
        run(top, "r")
    assert (info.value.signal_name, info.value.step) == ("SIGTERM", 2)
    state = load_checkpoint(top / "r" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"], state["step"]) == (1, 0, 2)  # epoch 1 done
    assert saved.count("last.pt") == 1  # the epoch-end write completed and is the stop's checkpoint
    monkeypatch.undo()
    run(top, "r", resume=True)
    assert_same_as_alone(alone, top / "r")


def test_sigterm_inside_the_write_of_best_pt(alone, monkeypatch):
    top = alone.parent / "cut-best"
    top.mkdir()
    (top / "data").symlink_to(alone / "data")
    signal_inside_save_of(monkeypatch, "best.pt")  # the first: after the evaluation before training
    with pytest.raises(Stopped) as info:
        run(top, "r")
    assert info.value.step == 0  # stopped right after that evaluation, before any step
    folder = top / "r"
    best = json.loads((folder / "best.json").read_text())
    assert best["epoch"] == 0 and load_checkpoint(folder / "checkpoints" / "best.pt")["epoch"] == 0
    last = load_checkpoint(folder / "checkpoints" / "last.pt")
    assert (last["step"], last["best"]["epoch"]) == (0, 0)
    monkeypatch.undo()
    run(top, "r", resume=True)
    assert_same_as_alone(alone, folder)
    assert (folder / "checkpoints" / "best.pt").is_file()


def test_sigterm_during_the_update_stops_after_it(alone, monkeypatch):
    top = alone.parent / "cut-step"
    top.mkdir()
    (top / "data").symlink_to(alone / "data")
    signal_during_update(monkeypatch, 3, signal.SIGTERM)  # the first update of epoch 2
    with pytest.raises(Stopped):
        run(top, "r")
    steps = [r["step"] for r in lines(top / "r") if r["kind"] == "train" and r["scope"] == "interval"]
    assert steps == [1, 2, 3]  # step 3 finished, its metrics line with it
    assert load_checkpoint(top / "r" / "checkpoints" / "last.pt")["step"] == 3
    monkeypatch.undo()
    run(top, "r", resume=True)
    assert_same_as_alone(alone, top / "r")


def test_a_second_ctrl_c_inside_the_stop_write_aborts_once_the_file_is_complete(alone, monkeypatch):
    """Ctrl-C during step 3, then a second Ctrl-C inside the write of the stop's last.pt: the abort waits for the
    write's end (found by a new-user trial: raised inside torch.save, it came out as RuntimeError "unexpected pos"
    and the CLI exited 1 with an error outcome)."""
    top = alone.parent / "cut-twice"
    top.mkdir()
    (top / "data").symlink_to(alone / "data")
    signal_during_update(monkeypatch, 3, signal.SIGINT)  # the first update of epoch 2
    saved = signal_inside_save_of(monkeypatch, "last.pt", nth=2, signum=signal.SIGINT)  # the stop's save
    with pytest.raises(KeyboardInterrupt) as info:
        run(top, "r")
    assert type(info.value) is KeyboardInterrupt  # the abort, not Stopped, and no RuntimeError
    assert saved.count("last.pt") == 2
    assert load_checkpoint(top / "r" / "checkpoints" / "last.pt")["step"] == 3  # written whole
    assert not [p for p in (top / "r" / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary
    monkeypatch.undo()
    run(top, "r", resume=True)
    assert_same_as_alone(alone, top / "r")


def test_the_epoch_line_shows_the_epochs_learning_rate(tmp_path):
    """The lr printed with an epoch is the one its steps used (the scheduler steps after the line): with
    milestones [1] and gamma 0.1, epoch 1 ran at 0.01 and epoch 2 at 0.001, as metrics.jsonl records them."""
    write_image_folder(tmp_path / "data", 6, cell=(13, 9))
    torch.manual_seed(0)
    model = build_model("resnet10t", embed_dim=8, freeze_bn=True)
    train_set = recallk.build_dataset("folder", tmp_path / "data", None,
                                      transform=transforms_for_model(model, "train", image_size=32))
    settings = TrainSettings(batch_size=8, chunk_size=8, per_class=2, epochs=2, lr=1e-2, milestones=[1], gamma=0.1,
                             device="cpu", progress=False, tensorboard=False, max_steps_per_epoch=1)
    Trainer(model, RecallAtKSurrogate(ks=(1, 2), tau_rank=0.02), train_set, tmp_path / "run", settings).fit()
    epochs = [r for r in lines(tmp_path / "run") if r["kind"] == "train" and r["scope"] == "epoch"]
    assert [r["lr"] for r in epochs] == pytest.approx([1e-2, 1e-3])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "epoch 1/2  step 1  " in log and "lr 0.01  " in log and "lr 0.001  " in log
