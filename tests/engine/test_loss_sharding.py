"""The sharded loss of issue 26 (``DistributedGather(sharding=...)``): N = 2, 3, 4 gloo processes on the CPU,
uneven slices, SiMix on and each rank's torch seed different, give the loss and the summed parameter gradient of
ONE process on the whole batch (float64 to 1e-10, float32 to 1e-5 relative) in every mode (replicate, rows with
its reduce-scatter and its all-reduce, ring); which rank holds which slice does not matter; a loss that cannot
shard falls back to replicate and the run's log says so once; one step makes one all-reduce of the parameter
gradients and is deterministic. Skipped when ``RECALLK_TEST_DEVICE`` is not the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recallk.engine import DistributedGather, Trainer, cached_backward, freeze_batchnorm
from recallk.engine.distributed import init_distributed
from recallk.losses import RecallAtKSurrogate, build_loss
from tests.helpers.device_settings import cpu_only
from tests.helpers.distributed import count_collectives, free_port
from tests.helpers.engine import NoisyImages, make_net

pytestmark = cpu_only("the shards run as gloo processes on the CPU")

FEATURES, DIM, CLASSES, CHUNK = 10, 6, 4, 4
#: rows of each slice of the global batch, by number of processes (uneven on purpose)
SIZES = {2: [7, 5], 3: [7, 5, 9], 4: [7, 5, 9, 3]}
#: which slice each rank holds in the permutation check
ORDERS = {2: [1, 0], 3: [2, 0, 1], 4: [3, 1, 0, 2]}
#: name -> (gather arguments, loss arguments on top of LOSS); "one" is the one-process run
MODES = {"replicate": dict(sharding="replicate"), "rows": dict(sharding="rows"),
         "rows_all_reduce": dict(sharding="rows", reduce="all_reduce"), "ring": dict(sharding="ring"),
         "auto": dict()}
LOSS = dict(ks=(1, 2, 4), tau_rank=0.05, simix=True)
DTYPES = {"f64": torch.float64, "f32": torch.float32}
TOLERANCE = {"f64": dict(rtol=1e-10, atol=1e-12), "f32": dict(rtol=1e-5, atol=1e-7)}


def _batch(total: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, FEATURES) random features and labels of CLASSES classes spread over every slice."""
    generator = torch.Generator().manual_seed(total)
    features = torch.randn(total, FEATURES, generator=generator, dtype=torch.float64).to(dtype)
    labels = (torch.arange(total) % CLASSES)[torch.randperm(total, generator=generator)]
    return features, labels


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, DIM, dtype=dtype)


def _loss(seed: int, **extra: object) -> RecallAtKSurrogate:
    torch.manual_seed(seed)  # the loss's SiMix generator is seeded from the global seed: different on every rank
    return RecallAtKSurrogate(**{**LOSS, **extra})


def _step(features, labels, criterion, gather=None):
    model = _model(features.dtype)
    loss = cached_backward(model, features, labels, criterion, chunk_size=CHUNK, gather=gather)
    return {"loss": loss.double(), **{name: p.grad.double().clone() for name, p in model.named_parameters()}}


def _slices(sizes: list[int]) -> list[slice]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(start, start + size) for start, size in zip(starts, sizes)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed(backend="gloo")
    results: dict[str, object] = {}
    try:
        sizes = SIZES[world]
        for tag, dtype in DTYPES.items():
            features, labels = _batch(sum(sizes), dtype)
            mine = _slices(sizes)[rank]
            for mode, arguments in MODES.items():
                memory = "recompute" if mode == "rows" and tag == "f32" else "matrix"
                results[f"{tag}/{mode}"] = _step(features[mine], labels[mine], _loss(100 + rank, memory=memory),
                                                 DistributedGather(**arguments))
        # Which rank holds which slice: the global batch is then another order of the same rows (SiMix off: its
        # pairs follow the batch order), and the summed gradient must be that of the same set.
        features, labels = _batch(sum(sizes), torch.float64)
        held = _slices(sizes)[ORDERS[world][rank]]
        for mode in ("rows", "ring"):
            results[f"permuted/{mode}"] = _step(features[held], labels[held], _loss(100, simix=False),
                                                DistributedGather(sharding=mode))
        if world == 2:
            _two_process_checks(rank, features[_slices(sizes)[rank]], labels[_slices(sizes)[rank]], Path(out),
                                results)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_process_checks(rank: int, features: torch.Tensor, labels: torch.Tensor, out: Path,
                        results: dict[str, object]) -> None:
    """A loss that cannot shard under "rows"; the scaled gradient; collectives counted; two runs identical."""
    gather = DistributedGather(sharding="rows")
    criterion = build_loss("multi_similarity")
    results["note/multi_similarity"] = gather.note(criterion)
    results["note/rsk"] = DistributedGather().note(_loss(100))
    results["f64/multi_similarity"] = _step(features, labels, criterion, gather)
    model = _model(torch.float64)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    cached_backward(model, features, labels, _loss(100), chunk_size=CHUNK, scaler=scaler, gather=gather)
    results["f64/rows_scaled_by_8"] = {name: p.grad.clone() for name, p in model.named_parameters()}
    model = _model(torch.float64)
    parameters = sum(p.numel() for p in model.parameters())
    with count_collectives() as calls:
        cached_backward(model, features, labels, _loss(100), chunk_size=CHUNK, gather=gather)
    results["parameter_all_reduces"] = sum(1 for name, numel in calls if name == "all_reduce" and numel == parameters)
    results["collectives"] = [name for name, _ in calls]
    results["again/rows"] = _step(features, labels, _loss(100, memory="matrix"), DistributedGather(sharding="rows"))
    torch.manual_seed(0)
    trainer = Trainer(freeze_batchnorm(make_net(dropout=0.0)), build_loss("multi_similarity"), NoisyImages(noise=0.0),
                      out / "run", batch_size=8, chunk_size=4, per_class=2, epochs=1, optimizer="sgd", lr=0.1,
                      device="cpu", progress=False, tensorboard=False, max_steps_per_epoch=2, distributed=True,
                      loss_sharding="rows", eval_fn=lambda model, epoch: {"map@r": 0.0})
    trainer.fit()


def _run(world: int, tmp_path: Path) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _check_sum(ranks: list[dict], key: str, want: dict, tolerance: dict) -> None:
    """Every rank's loss is the one-process loss; the ranks' parameter gradients sum to its gradient."""
    for result in ranks:
        torch.testing.assert_close(result[key]["loss"], want["loss"], **tolerance, msg=f"{key} loss")
    for name in ("weight", "bias"):
        # cached_backward's gradients are already all-reduced: each rank holds the sum
        for result in ranks:
            torch.testing.assert_close(result[key][name], want[name], **tolerance, msg=f"{key} {name}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_sharding_gives_the_one_process_loss_and_gradient(world, tmp_path):
    ranks = _run(world, tmp_path)
    sizes = SIZES[world]
    for tag, dtype in DTYPES.items():
        features, labels = _batch(sum(sizes), dtype)
        one = _step(features, labels, _loss(100, memory="matrix"))  # rank 0's seed: the generator every rank uses
        for mode in MODES:
            _check_sum(ranks, f"{tag}/{mode}", one, TOLERANCE[tag])
    features, labels = _batch(sum(sizes), torch.float64)
    one = _step(features, labels, _loss(100, simix=False))
    for mode in ("rows", "ring"):
        _check_sum(ranks, f"permuted/{mode}", one, TOLERANCE["f64"])
    if world != 2:
        return
    rank0 = ranks[0]
    assert rank0["note/multi_similarity"] == ("replicate: loss multi_similarity cannot be sharded: every rank "
                                              "computes the whole global-batch loss (train.loss_sharding: rows "
                                              "asked; only RS@k shards)")
    assert rank0["note/rsk"].startswith("rows: ")
    one = _step(features, labels, build_loss("multi_similarity"))
    _check_sum(ranks, "f64/multi_similarity", one, TOLERANCE["f64"])
    for name, grad in rank0["f64/rows_scaled_by_8"].items():
        torch.testing.assert_close(grad, 8 * rank0["f64/rows"][name], rtol=1e-12, atol=0)
    assert rank0["parameter_all_reduces"] == 1, rank0["collectives"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("loss multi_similarity cannot be sharded") == 1, log
    for result in ranks:
        for key in ("loss", "weight", "bias"):
            assert torch.equal(result["again/rows"][key], result["f64/rows"][key]), key


def test_an_unknown_sharding_is_refused_with_the_choices():
    from recallk.engine import TrainSettings

    with pytest.raises(ValueError, match=r"train.loss_sharding must be one of \['auto', 'replicate', 'rows', 'ring'\]"):
        TrainSettings(batch_size=8, chunk_size=4, epochs=1, loss_sharding="columns")
    with pytest.raises(ValueError, match="reduce must be one of"):
        DistributedGather(reduce="gather")


@pytest.mark.parametrize("memory", ["matrix", "recompute"])
def test_the_shares_of_one_process_sum_to_the_loss_and_its_gradient(memory):
    """``sharded_forward`` alone: for every number of shards the shares (same generator state each) sum to
    ``forward`` and so do their gradients (float64), SiMix on; the last rows are of classes of their own, so
    without SiMix the last share of 6 holds no query with a positive: 0, with a zero gradient."""
    generator = torch.Generator().manual_seed(3)
    emb = torch.randn(30, 5, generator=generator, dtype=torch.float64) * 2
    labels = torch.cat([torch.arange(24) % 6, torch.arange(100, 106)])  # 6 singletons at the end
    loss = RecallAtKSurrogate(ks=(1, 2, 4), tau_rank=0.05, simix=True, max_pairs_per_class=3, memory=memory)
    start = loss.generator.get_state()
    whole = emb.clone().requires_grad_(True)
    value = loss(whole, labels)
    value.backward()
    want = value.detach()
    for shards in (1, 2, 3, 6):
        total, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(emb)
        for shard in range(shards):
            loss.generator.set_state(start)
            part = emb.clone().requires_grad_(True)
            share = loss.sharded_forward(part, labels, shard, shards)
            share.backward()
            total, grad = total + share.detach(), grad + part.grad
        torch.testing.assert_close(total, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, whole.grad, rtol=1e-10, atol=1e-14)
    loss = RecallAtKSurrogate(ks=(1, 2), memory=memory)  # without SiMix the last 5 of 30 rows are singletons only
    part = emb.clone().requires_grad_(True)
    share = loss.sharded_forward(part, labels, 5, 6)
    share.backward()
    assert share.item() == 0.0 and not part.grad.any()


def test_a_loss_that_cannot_shard_and_a_bad_shard_are_refused():
    emb, labels = torch.randn(8, 4), torch.arange(8) % 2
    with pytest.raises(ValueError, match="loss 'multi_similarity' cannot be sharded"):
        build_loss("multi_similarity").sharded_forward(emb, labels, 0, 2)
    with pytest.raises(ValueError, match=r"shard must be an integer in \[0, 2\)"):
        RecallAtKSurrogate().sharded_forward(emb, labels, 2, 2)
