"""Randomness and several machines (issue 13, sections 2 and 7).

- ``RecallAtKSurrogate(simix=True)`` built after different per-rank seeds: two gloo processes give the summed
  gradient of one global-batch loss (the one-process gradient) and equal losses on both ranks.
- ``torchrun --nnodes 2`` (two "nodes" on localhost, static rendezvous, gloo) trains to the weights of one
  process (slow: two torchrun launches).
- A stop signal that reaches one rank only stops both at the same step (they agree at every step boundary), with
  one ``last.pt`` holding both ranks' random states; the resumed run ends with the weights of the run left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recallk.engine import DistributedGather, Stopped, Trainer, cached_backward, freeze_batchnorm, load_checkpoint
from recallk.engine.distributed import init_distributed
from recallk.losses import RecallAtKSurrogate
from tests.helpers.distributed import free_port
from tests.helpers.engine import NoisyImages, grads, make_batch, make_net

WORLD_SIZE = 2
BATCH = 12
HERE = Path(__file__).resolve().parent


def _simix_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    init_distributed(backend="gloo")
    try:
        model = freeze_batchnorm(make_net(dropout=0.0))
        images, labels = make_batch(batch=BATCH, classes=3)
        rows = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        torch.manual_seed(100 + rank)  # the user's per-rank seed, before building the loss
        criterion = RecallAtKSurrogate(ks=(1, 2, 4), simix=True)
        losses = []
        for _ in range(2):  # two steps: the second step's SiMix draw must agree too
            model.zero_grad()
            losses.append(cached_backward(model, images[rows], labels[rows], criterion, chunk_size=4,
                                          gather=DistributedGather()))  # fmt: skip
        torch.save({"losses": losses, "model": grads(model)}, Path(out_dir) / f"simix{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_simix_with_different_rank_seeds_gives_the_global_batch_gradient(tmp_path):
    mp.start_processes(_simix_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn")
    model = freeze_batchnorm(make_net(dropout=0.0))
    images, labels = make_batch(batch=BATCH, classes=3)
    torch.manual_seed(100)  # rank 0's seed: its generator state is the one every rank uses
    criterion = RecallAtKSurrogate(ks=(1, 2, 4), simix=True)
    want = []
    for _ in range(2):
        model.zero_grad()
        want.append(cached_backward(model, images, labels, criterion, chunk_size=5))
    expected = grads(model)
    results = [torch.load(tmp_path / f"simix{rank}.pt") for rank in range(WORLD_SIZE)]
    for result in results:
        for got, loss in zip(result["losses"], want):
            torch.testing.assert_close(got, loss, rtol=1e-12, atol=0)
        for name, grad in expected.items():
            torch.testing.assert_close(result["model"][name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
def test_torchrun_two_nodes_trains_like_one_process(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}  # the repository: tests.helpers
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "tests.engine.multinode_train", str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(outputs)
    distributed = torch.load(tmp_path / "weights.pt")
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    subprocess.run([sys.executable, "-m", "tests.engine.multinode_train", str(single_dir), "--single"], env=env,
                   check=True, timeout=300)  # fmt: skip
    single = torch.load(single_dir / "weights.pt")
    start = freeze_batchnorm(make_net(dropout=0.0)).state_dict()
    assert any(not torch.equal(single[k], start[k]) for k in start)  # the run did train
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-9, atol=1e-11, msg=name)


def _stop_trainer(out: Path, rank: int) -> Trainer:
    torch.manual_seed(0)
    model = freeze_batchnorm(make_net(dropout=0.2))  # dropout masks come from each rank's own stream
    torch.manual_seed(100 + rank)
    criterion = RecallAtKSurrogate(ks=(1, 2, 4), simix=True, memory="matrix")
    return Trainer(model, criterion, NoisyImages(), out / "run", batch_size=8, chunk_size=3, per_class=2, epochs=2,
                   optimizer="sgd", lr=0.5, device="cpu", progress=False, tensorboard=False, max_steps_per_epoch=3,
                   distributed=True, eval_fn=lambda m, e: {"map@r": 0.0})


def _stop_worker(rank: int, port: int, out_dir: str, cut: bool) -> None:
    """``cut``: SIGTERM to rank 1 alone inside pass 1 of step 2; each rank records how it stopped, then both
    resume. Else the run left alone. Rank 0 writes the final weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    init_distributed(backend="gloo")
    out = Path(out_dir)
    try:
        trainer = _stop_trainer(out, rank)
        if cut:
            passes = []

            def signal_rank1(module, inputs, output):
                if module.training and not torch.is_grad_enabled():  # pass 1 (2 chunks a step on each rank)
                    passes.append(1)
                    if rank == 1 and len(passes) == 3:
                        os.kill(os.getpid(), signal.SIGTERM)

            trainer.model.register_forward_hook(signal_rank1)
            try:
                trainer.fit()
                record = {"stopped": None}
            except Stopped as stop:
                record = {"stopped": (stop.signal_name, stop.step, trainer.step)}
            dist.barrier()  # rank 0 has written last.pt
            if rank == 0:
                state = load_checkpoint(out / "run" / "checkpoints" / "last.pt")
                record["saved"] = (state["step"], len(state["rng_per_rank"]))
                record["files"] = sorted(p.name for p in (out / "run" / "checkpoints").iterdir())
            torch.save(record, out / f"stop{rank}.pt")
            trainer = _stop_trainer(out, rank)
            trainer.fit(resume=True)
        else:
            trainer.fit()
        if rank == 0:
            torch.save(trainer.model.state_dict(), out / "weights.pt")
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    for name, cut in (("cut", True), ("alone", False)):
        (tmp_path / name).mkdir()
        mp.start_processes(_stop_worker, args=(free_port(), str(tmp_path / name), cut), nprocs=WORLD_SIZE,
                           start_method="spawn")
    rank0, rank1 = (torch.load(tmp_path / "cut" / f"stop{rank}.pt") for rank in range(WORLD_SIZE))
    assert rank0["stopped"] == rank1["stopped"] == ("SIGTERM", 2, 2)  # rank 0 was not signalled, and agreed
    assert rank0["saved"] == (2, WORLD_SIZE) and rank0["files"] == ["best.pt", "last.pt"]  # no per-rank files
    want, got = torch.load(tmp_path / "alone" / "weights.pt"), torch.load(tmp_path / "cut" / "weights.pt")
    assert all(torch.equal(got[k], v) for k, v in want.items())
