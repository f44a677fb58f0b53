"""Issue 19, per-rank random state: ``recallk train`` under ``torchrun --nproc-per-node 2`` (gloo, CPU), stopped by
SIGTERM sent to the whole process group after its first step (as Slurm does at pre-emption), then ``--resume``d,
ends with exactly the weights and the metrics.jsonl lines of the same run left alone.

The ranks' random streams matter here through the model: drop-path (``model.options.drop_path_rate``) draws its
masks from each rank's own torch generator (seeded seed + rank). The augmentation does not test them: each item
is augmented from its own seed (seed, epoch, item), independent of the rank's stream (``recallk.data.loading``).
A resume that gave rank 1 rank 0's stream (the bug the issue names) or a fresh one changes rank 1's masks, hence
the averaged gradients and the weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from recallk.cli.main import main
from recallk.engine import trainer as trainer_module
from recallk.engine import trainer_state
from tests.helpers.distributed import free_port
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
TINY = tiny_overrides("folder", "model.options.drop_path_rate=0.2", "train.epochs=2", "train.tensorboard=false",
                      "train.max_steps_per_epoch=3")


def _torchrun(runs: Path, name: str, *extra: str) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m recallk train ...`` in a new session (its own process group, as a job of
    Slurm): one torch thread per rank, the same arithmetic in every run so that weights compare bit for bit."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "recallk",
                             "train", "--name", name, f"runs_dir={runs}", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _records(run: Path) -> list[tuple]:
    """The step/epoch/loss fields of every metrics.jsonl line, in order (times and speeds differ between runs)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r.get("scope"), r.get("split"), r["epoch"], r["step"], r.get("loss"), r.get("lr"),
             r.get("map@r")) for r in records]


def test_two_process_sigterm_and_resume_restores_each_ranks_stream(tmp_path):
    data = write_image_folder(tmp_path / "data", {"train": range(8), "test": range(8, 12)}, per_class=8)
    runs = tmp_path / "runs"
    args = [f"data.root={data}", *TINY]
    started: list[subprocess.Popen] = []
    try:
        _stop_resume_and_compare(runs, args, started)
    finally:  # a failed assertion leaves no launcher or rank running
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


def _stop_resume_and_compare(runs: Path, args: list[str], started: list[subprocess.Popen]) -> None:
    full = _torchrun(runs, "full", *args)  # the uninterrupted run (concurrently with the cut one: 2 cores, 4 ranks)
    cut_dir = runs / "cut"
    cut = _torchrun(runs, "cut", *args)
    started += [full, cut]
    metrics = cut_dir / "metrics.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline and cut.poll() is None:  # wait for the first completed step
        if metrics.is_file() and '"scope": "interval"' in metrics.read_text():
            break
        time.sleep(0.02)
    assert cut.poll() is None, cut.communicate()
    os.killpg(cut.pid, signal.SIGTERM)  # launcher and both ranks, as Slurm signals a job step
    out, err = cut.communicate(timeout=200)
    # the ranks stop cleanly, saying so; torchrun itself, signalled too, prints its SignalException and exits 1
    assert cut.returncode == 1, out + err
    assert "Traceback" not in out and "File \"" + str(REPO / "src") not in err, out + err
    said = [line for line in (out + err).splitlines() if "stopped by SIGTERM" in line]
    assert len(said) == 1 and (f"continue with: torchrun --nproc-per-node 2 -m recallk train --name cut --resume "
                               f"runs_dir={runs} (with the same torchrun options as before)") in said[0], out + err
    last = torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=False)
    assert 1 <= last["step"] < 6
    rank0, rank1 = last["rng_per_rank"]  # both ranks stopped at the same step and saved together
    assert torch.equal(rank0["torch_cpu"], last["rng"]["torch_cpu"])
    assert not torch.equal(rank1["torch_cpu"], rank0["torch_cpu"])  # rank 1's own stream
    assert sorted(p.name for p in (cut_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]

    resumed = _torchrun(runs, "cut", "--resume", "--no-progress")
    started.append(resumed)
    out, err = resumed.communicate(timeout=200)
    assert resumed.returncode == 0, out + err
    assert "no random state" not in err, err  # each rank found its own stream (no fresh-stream warning)
    out, err = full.communicate(timeout=200)
    assert full.returncode == 0, out + err

    want = torch.load(runs / "full" / "checkpoints" / "last.pt", weights_only=False)
    got = torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=False)
    assert got["step"] == want["step"] == 6
    different = [name for name, value in want["model"].items() if not torch.equal(got["model"][name], value)]
    assert not different, f"{len(different)} of {len(want['model'])} tensors differ, e.g. {different[:3]}"
    assert _records(cut_dir) == _records(runs / "full")  # no line missing or duplicated, same losses


def test_a_second_sigterm_during_the_save_does_not_abort_it(tmp_path, monkeypatch, capsys):
    """Slurm signals the launcher and the ranks, and torchrun then forwards the signal: a rank gets SIGTERM twice
    within milliseconds. Here (one process, deterministic) the first comes after step 1's update and the second
    inside the checkpoint write; last.pt must still be written, the stop said once, and the exit code be
    SIGTERM's."""
    data = write_image_folder(tmp_path / "data", {"train": range(8), "test": range(8, 12)}, per_class=8)
    real_step, real_save = trainer_module.Trainer._train_step, trainer_state.save_checkpoint

    sent: list[str] = []

    def step_then_sigterm(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        sent.append("first")
        os.kill(os.getpid(), signal.SIGTERM)  # recorded: the run stops at the end of step 1
        return loss

    def sigterm_then_save(state, path):
        if sent == ["first"]:  # the save the stop makes (not best.pt's after evaluation 0)
            sent.append("second")
            os.kill(os.getpid(), signal.SIGTERM)  # the second signal, inside the save
            time.sleep(0.01)
        return real_save(state, path)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", step_then_sigterm)
    monkeypatch.setattr(trainer_state, "save_checkpoint", sigterm_then_save)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--name", "r", f"runs_dir={tmp_path / 'runs'}", f"data.root={data}", *TINY])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert sent == ["first", "second"] and code == 128 + signal.SIGTERM
    assert out.count("stopped by SIGTERM") == 1, out
    assert torch.load(tmp_path / "runs" / "r" / "checkpoints" / "last.pt", weights_only=False)["step"] == 1
