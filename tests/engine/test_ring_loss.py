"""Ring mode of the sharded RS@k loss (``engine/ring.py``): N = 2, 3, 4 gloo processes on the CPU, each holding
its own slice of the global batch, get the loss and their rows of the gradient that ONE process gets from
``criterion(all_rows, all_labels)`` (float64 to 1e-10, float32 to 1e-5 relative), with SiMix, include_query, uneven
and empty slices, a class spread over several ranks, a rank whose queries have no positive and a permuted layout.
Skipped when ``RECALLK_TEST_DEVICE`` is not the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recallk.engine import ring
from recallk.engine.ring import ring_loss_and_grad
from recallk.losses import RecallAtKSurrogate
from tests.helpers.device_settings import cpu_only
from tests.helpers.distributed import free_port

pytestmark = cpu_only("the ring runs on gloo processes on the CPU")

GENERATOR_SEED = 123

#: name -> the case: sizes (rows of each slice of the global batch), dtype, the loss's arguments, and options:
#: ``singletons`` (the last slice's items are of classes of their own), ``order`` (slice held by each rank; default
#: rank r holds slice r), ``block_elements`` (small: many chunks per block), ``bad_rank`` (NaN rows there),
#: ``unit`` (rows of unit norm).
CASES = {
    "f64_simix_include_query": dict(sizes=[7, 12], dtype=torch.float64,
                                    loss=dict(ks=(1, 2, 4, 8), tau_rank=0.01, simix=True, include_query=True)),
    "f32_plain": dict(sizes=[11, 4], dtype=torch.float32, loss=dict(ks=(1, 2, 4), tau_rank=0.05)),
    "bad_input_on_rank_1": dict(sizes=[6, 6], dtype=torch.float32, loss={}, bad_rank=1),
    "bf16_simix": dict(sizes=[9, 5], dtype=torch.bfloat16, loss=dict(ks=(1, 2), tau_rank=0.05, simix=True)),
    "f32_unit_rows": dict(sizes=[3, 10], dtype=torch.float32, unit=True, loss=dict(ks=(1, 4), tau_rank=0.02)),
    "f64_simix_capped_chunks": dict(sizes=[5, 9, 3], dtype=torch.float64, block_elements=40,
                                    loss=dict(ks=(1, 2, 4), tau_rank=0.05, tau_k=(1.0, 0.5, 2.0), simix=True,
                                              max_pairs_per_class=2)),
    "f32_simix": dict(sizes=[8, 3, 9], dtype=torch.float32, loss=dict(ks=(1, 2, 4, 8, 16), simix=True)),
    "f64_rank_without_positive": dict(sizes=[6, 6, 3], dtype=torch.float64, singletons=True,
                                      loss=dict(ks=(1, 2), tau_rank=0.05, simix=True)),
    "f64_empty_slice_include_query": dict(sizes=[1, 8, 0, 6], dtype=torch.float64,
                                          loss=dict(ks=(1, 2, 4), tau_rank=0.02, include_query=True)),
    "f64_permuted_layout": dict(sizes=[4, 7, 5, 3], dtype=torch.float64, order=[2, 0, 3, 1],
                                loss=dict(ks=(1, 2, 4), tau_rank=0.05)),
    "f32_simix_4": dict(sizes=[4, 7, 5, 3], dtype=torch.float32, loss=dict(ks=(1, 2, 4), simix=True)),
}
GROUPS = {2: ["f64_simix_include_query", "f32_plain", "bad_input_on_rank_1", "bf16_simix", "f32_unit_rows"],
          3: ["f64_simix_capped_chunks", "f32_simix", "f64_rank_without_positive"],
          4: ["f64_empty_slice_include_query", "f64_permuted_layout", "f32_simix_4"]}


def _batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's global batch in slice order: (B, 6) rows of any norm (the loss normalises them) and labels of
    4 classes, each spread over the slices; with ``singletons`` the last slice's labels occur nowhere else."""
    case = CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    total = sum(case["sizes"])
    emb = torch.randn(total, 6, generator=generator, dtype=torch.float64) * 3
    if case.get("unit"):  # rows of unit norm, as a model gives them: the loss uses them as they are
        emb = torch.nn.functional.normalize(emb, dim=1)
    emb = emb.to(case["dtype"])
    labels = torch.randint(0, 4, (total,), generator=generator)
    if case.get("singletons"):
        last = case["sizes"][-1]
        labels[total - last:] = torch.arange(100, 100 + last)
    return emb, labels


def _slices(name: str) -> list[slice]:
    sizes = CASES[name]["sizes"]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(start, start + size) for start, size in zip(starts, sizes)]


def _run_group(rank: int, world: int) -> dict:
    """Every case of ``GROUPS[world]`` on this rank: {name: {"loss", "grad", "generator"} or {"error"}}."""
    torch.manual_seed(1000 + rank)  # the ranks' global streams differ: only the loss's own generator may count
    results = {}
    for name in GROUPS[world]:
        case = CASES[name]
        emb, labels = _batch(name)
        rows = _slices(name)[case.get("order", range(world))[rank]]
        mine = emb[rows].clone()
        if case.get("bad_rank") == rank:
            mine[0, 0] = float("nan")
        criterion = RecallAtKSurrogate(**case["loss"], generator=torch.Generator().manual_seed(GENERATOR_SEED))
        try:
            loss, grad = ring_loss_and_grad(criterion, mine, labels[rows], scale=2.0,
                                            block_elements=case.get("block_elements"))
        except ValueError as err:
            results[name] = {"error": str(err)}
            continue
        results[name] = {"loss": loss, "grad": grad, "generator": criterion.generator.get_state()}
    if world == 2:  # a loss other than RS@k is refused on every rank
        try:
            ring_loss_and_grad(torch.nn.MSELoss(), torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
        except ValueError as err:
            results["not_rsk"] = {"error": str(err)}
    return results


def _worker(rank: int, ports: dict[int, int], out_dir: str) -> None:
    """One process of 4 (process start-up costs more than the cases): the 4-rank group, then the first 3 ranks
    in a new group, then the first 2."""
    torch.set_num_threads(1)
    ring.RING_PIECE_ELEMENTS = 15  # blocks move in place in pieces of 2-3 rows: every piece boundary is crossed
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    for world in sorted(GROUPS, reverse=True):
        if rank >= world:
            return
        os.environ["MASTER_PORT"] = str(ports[world])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            torch.save(_run_group(rank, world), Path(out_dir) / f"world{world}_rank{rank}.pt")
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ring_runs(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ring")
    ports: dict[int, int] = {}
    while len(set(ports.values())) < len(GROUPS):  # one port per group (the OS may offer one twice)
        ports = {world: free_port() for world in GROUPS}
    mp.start_processes(_worker, args=(ports, str(out_dir)), nprocs=max(GROUPS), start_method="spawn")
    return out_dir


@pytest.fixture(params=sorted(GROUPS), ids=lambda n: f"{n}_ranks")
def ring_results(request, ring_runs) -> tuple[int, list[dict]]:
    world = request.param
    return world, [torch.load(ring_runs / f"world{world}_rank{rank}.pt") for rank in range(world)]


def _one_process(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, gradient (scale 2) and generator state after the call of one process on the whole batch."""
    emb, labels = _batch(name)
    criterion = RecallAtKSurrogate(**CASES[name]["loss"], generator=torch.Generator().manual_seed(GENERATOR_SEED),
                                   backend="torch", memory="matrix")
    emb = emb.clone().requires_grad_(True)
    loss = criterion(emb, labels)
    (2.0 * loss).backward()
    return loss.detach(), emb.grad, criterion.generator.get_state()


def _tolerance(dtype: torch.dtype) -> float:
    """float64: 1e-10; float32: 1e-5 relative; bfloat16 (computed in float32, the gradient rounded to bfloat16):
    two of its units in the last place."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)


def test_ring_equals_one_process(ring_results):
    world, results = ring_results
    for name in GROUPS[world]:
        case = CASES[name]
        if "bad_rank" in case:
            continue
        loss, grad, generator = _one_process(name)
        tol = _tolerance(case["dtype"])
        slices = _slices(name)
        order = case.get("order", range(world))
        for rank, result in enumerate(results):
            got = result[name]
            assert "error" not in got, f"{name}, rank {rank}: {got.get('error')}"
            assert got["loss"].dtype == loss.dtype and got["grad"].dtype == case["dtype"]
            torch.testing.assert_close(got["loss"], loss, rtol=min(tol, 1e-5), atol=0,
                                       msg=f"{name}: loss of rank {rank}")
            expected = grad[slices[order[rank]]]
            torch.testing.assert_close(got["grad"], expected, rtol=tol, atol=tol * float(grad.abs().max()),
                                       msg=f"{name}: gradient rows of rank {rank}")
            # SiMix drew what one process draws, and the generators stay in step
            assert torch.equal(got["generator"], generator), name


def test_cases_cover_what_they_claim():
    """The data of the cases are what their names say: a class over several slices, a last slice of classes of
    their own (no positive), an empty slice, and SiMix with pairs across slices."""
    for name in CASES:
        _, labels = _batch(name)
        owners = [set(labels[rows].tolist()) for rows in _slices(name)]
        assert any(sum(label in owned for owned in owners) >= 2 for label in range(4)), name
    _, labels = _batch("f64_rank_without_positive")
    last = labels[_slices("f64_rank_without_positive")[-1]]
    assert not bool(torch.isin(last, labels[: -last.numel()]).any()) and last.unique().numel() == last.numel()
    assert 0 in CASES["f64_empty_slice_include_query"]["sizes"]


def test_bad_input_on_one_rank_raises_on_every_rank(ring_runs):
    """NaN rows on rank 1 only: rank 1 says what is wrong, rank 0 says which rank failed; nobody waits forever."""
    results = [torch.load(ring_runs / f"world2_rank{rank}.pt") for rank in range(2)]
    assert "NaN" in results[1]["bad_input_on_rank_1"]["error"] or "finite" in results[1]["bad_input_on_rank_1"][
        "error"]
    assert "rank(s) [1]" in results[0]["bad_input_on_rank_1"]["error"]
    for result in results:
        assert "train.loss_sharding=rows" in result["not_rsk"]["error"]


def test_without_process_group_says_how():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_loss_and_grad(RecallAtKSurrogate(), torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
