"""Two processes on the CPU (gloo) give the single-process gradient of the global batch (skipped when
``RECALLK_TEST_DEVICE`` is not the CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recallk.engine import DistributedGather, Trainer, cached_backward, freeze_batchnorm
from recallk.engine.distributed import all_gather_rows, init_distributed
from tests.helpers.device_settings import cpu_only
from tests.helpers.distributed import free_port
from tests.helpers.engine import (
    GeneratorMixLoss,
    NoisyImages,
    RandomMixLoss,
    grads,
    make_batch,
    make_net,
    nearest_neighbour_eval,
)

pytestmark = cpu_only("two gloo processes share the CPU; NCCL would need a GPU per process")
WORLD_SIZE = 2
BATCH = 12


def _trainer(run_dir: Path, distributed: bool) -> Trainer:
    torch.manual_seed(0)
    model = freeze_batchnorm(make_net(dropout=0.0))
    # No augmentation noise: the ranks' own random streams differ from the single process's by design.
    return Trainer(model, RandomMixLoss(), NoisyImages(noise=0.0), run_dir, batch_size=8, chunk_size=3, per_class=2,
                   epochs=1, optimizer="sgd", lr=0.1, device="cpu", progress=False, tensorboard=False,
                   max_steps_per_epoch=2, distributed=distributed,
                   # evaluation runs on rank 0 only while the others wait: it must not deadlock on best.pt
                   eval_fn=nearest_neighbour_eval(NoisyImages(noise=0.0)))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = init_distributed(backend="gloo")
    try:
        assert (context.rank, context.world_size, context.device.type) == (rank, WORLD_SIZE, "cpu")
        # Rows of different lengths per rank are gathered in rank order.
        gathered, sizes = all_gather_rows(torch.full((rank + 1, 2), float(rank)))
        assert sizes == [1, 2] and gathered[:, 0].tolist() == [0.0, 1.0, 1.0]

        model = freeze_batchnorm(make_net(dropout=0.0))
        criterion = RandomMixLoss()
        images, labels = make_batch(batch=BATCH)
        rows = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        torch.manual_seed(100 + rank)  # ranks' own streams differ; the criterion must use rank 0's
        if rank == 0:
            torch.manual_seed(100)
        loss = cached_backward(model, images[rows], labels[rows], criterion, chunk_size=4, gather=DistributedGather())
        torch.save({"loss": loss, "model": grads(model), "criterion": grads(criterion)},
                   Path(out_dir) / f"grads{rank}.pt")

        # A loss with its own generator, seeded differently on each rank (as is the global RNG): the step must
        # make every rank draw rank 0's numbers.
        model = freeze_batchnorm(make_net(dropout=0.0))
        criterion = GeneratorMixLoss(seed=10 + rank)
        torch.manual_seed(200 + rank)
        loss = cached_backward(model, images[rows], labels[rows], criterion, chunk_size=4,
                               gather=DistributedGather())
        torch.save({"loss": loss, "model": grads(model), "criterion": grads(criterion),
                    "generator": criterion.get_extra_state()["generator_state"]},
                   Path(out_dir) / f"generator_grads{rank}.pt")

        trainer = _trainer(Path(out_dir) / "run", distributed=True)
        trainer.fit()
        torch.save(trainer.model.state_dict(), Path(out_dir) / f"weights{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, start_method="spawn")
    return out_dir



def _assert_equals_one_process(result, loss, expected_model, expected_criterion):
    """A rank's saved loss and gradients equal the one-process run's."""
    torch.testing.assert_close(result["loss"], loss, rtol=1e-12, atol=0)
    assert result["model"].keys() == expected_model.keys()
    for name, grad in expected_model.items():
        torch.testing.assert_close(result["model"][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    for name, grad in expected_criterion.items():
        torch.testing.assert_close(result["criterion"][name], grad, rtol=1e-10, atol=1e-12, msg=name)

def test_two_process_gradient_equals_one_process(two_process_results):
    model = freeze_batchnorm(make_net(dropout=0.0))
    criterion = RandomMixLoss()
    images, labels = make_batch(batch=BATCH)
    torch.manual_seed(100)
    loss = cached_backward(model, images, labels, criterion, chunk_size=5)
    expected_model, expected_criterion = grads(model), grads(criterion)
    for rank in range(WORLD_SIZE):
        result = torch.load(two_process_results / f"grads{rank}.pt")
        _assert_equals_one_process(result, loss, expected_model, expected_criterion)


def test_loss_generator_is_shared_across_ranks(two_process_results):
    """Each rank seeds its loss's own generator differently; the loss's extra state is broadcast from rank 0, so
    the ranks' losses agree and the summed gradient is the one-process gradient of the global batch."""
    model = freeze_batchnorm(make_net(dropout=0.0))
    criterion = GeneratorMixLoss(seed=10)
    images, labels = make_batch(batch=BATCH)
    loss = cached_backward(model, images, labels, criterion, chunk_size=5)
    expected_model, expected_criterion = grads(model), grads(criterion)
    results = [torch.load(two_process_results / f"generator_grads{rank}.pt") for rank in range(WORLD_SIZE)]
    for result in results:
        _assert_equals_one_process(result, loss, expected_model, expected_criterion)
        # the generators stay in step after the loss
        assert torch.equal(result["generator"], criterion.generator.get_state())


def test_two_process_training_equals_one_process(two_process_results, tmp_path):
    trainer = _trainer(tmp_path / "run", distributed=False)
    trainer.fit()
    expected = trainer.model.state_dict()
    for rank in range(WORLD_SIZE):
        weights = torch.load(two_process_results / f"weights{rank}.pt")
        for name, value in expected.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-9, atol=1e-11, msg=name)
    checkpoint = torch.load(two_process_results / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert len(checkpoint["rng_per_rank"]) == WORLD_SIZE


def test_init_distributed_without_torchrun_says_how(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed()
