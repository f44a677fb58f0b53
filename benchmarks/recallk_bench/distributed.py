"""Benchmark of the sharded loss (issue 26): per-rank step time and peak memory of one global batch split over N
processes, for each ``train.loss_sharding`` mode, as ratios to one process on the whole batch (same run).

Each configuration runs in fresh processes (``torch.multiprocessing`` spawn; gloo on the CPU, NCCL with one GPU
per rank on CUDA), ``--threads`` torch threads per process. The model is a linear map of random features to
``--dim`` dimensions, so the loss (RS@k, with SiMix when ``--simix``) dominates the step; the step is
``cached_backward`` on the rank's 1/N of the batch. Time: the median over ``--steps`` steps after one warm-up
step, the slowest rank's. Memory: on the CPU the growth of the peak resident set (VmHWM, reset through
``/proc/self/clear_refs`` before the step) over the resident set before it, the largest rank's; on CUDA
``torch.cuda.max_memory_allocated`` over the memory allocated before the step.

    python benchmarks/bench.py distributed --ranks 1 2 4 --batch 6000 --dim 64 --simix
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recallk.engine import DistributedGather, cached_backward
from recallk.losses import RecallAtKSurrogate
from recallk_bench.arguments import HelpFormatter, positive_int, prog
from recallk_bench.engine import _cpu_peak_kib, _reset_cpu_peak

#: the modes ``--modes`` takes: a ``train.loss_sharding`` value, or rows with one all-reduce instead of the
#: reduce-scatter (``DistributedGather(reduce="all_reduce")``)
MODES = {"replicate": dict(sharding="replicate"), "rows": dict(sharding="rows"), "ring": dict(sharding="ring"),
         "rows-all-reduce": dict(sharding="rows", reduce="all_reduce")}
FEATURES = 64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch, FEATURES, generator=generator)
    labels = torch.arange(args.batch) // args.per_class
    return features, labels


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_run(rank: int, world: int, mode: str, args: argparse.Namespace, port: int, out: str) -> None:
    """One rank of one configuration: warm-up step, ``args.steps`` timed steps, one step with its memory peak."""
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        features, labels = _batch(args)
        mine = slice(args.batch * rank // world, args.batch * (rank + 1) // world)
        features, labels = features[mine].to(device), labels[mine].to(device)
        torch.manual_seed(0)
        model = nn.Linear(FEATURES, args.dim).to(device)
        criterion = RecallAtKSurrogate(simix=args.simix, memory=args.memory).to(device)
        gather = DistributedGather(**MODES[mode]) if world > 1 else None

        def step() -> None:
            model.zero_grad(set_to_none=False)
            cached_backward(model, features, labels, criterion, chunk_size=args.chunk, gather=gather)

        step()  # warm-up: kernels loaded, .grad allocated
        times = []
        for _ in range(args.steps):
            if world > 1:
                dist.barrier()
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        if world > 1:
            dist.barrier()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            base = _reset_cpu_peak()
            step()
            peak_mib = (_cpu_peak_kib() - base) / 1024
        result = {"step_s": statistics.median(times), "peak_mib": peak_mib}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Per-rank figures of one configuration: the slowest rank's step time, the largest rank's memory peak."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_run, args=(world, mode, args, _free_port(), out), nprocs=world, join=True)
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
    return {"step_s": max(r["step_s"] for r in ranks), "peak_mib": max(r["peak_mib"] for r in ranks)}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bench.py distributed``; ``--help`` shows each default."""
    parser = argparse.ArgumentParser(prog=prog("distributed"), description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2, 4], help="numbers of processes")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["replicate", "rows", "ring"],
                        help="sharding modes measured with more than one process")
    parser.add_argument("--batch", type=positive_int, default=6000, help="global batch (items)")
    parser.add_argument("--per-class", type=positive_int, default=4, help="items per class in the batch")
    parser.add_argument("--dim", type=positive_int, default=64, help="embedding dimension")
    parser.add_argument("--simix", action="store_true", help="RS@k with SiMix")
    parser.add_argument("--memory", choices=["auto", "matrix", "recompute"], default="auto",
                        help="RS@k's memory mode (ring mode ignores it): the (rows, B) similarity stored or recomputed")
    parser.add_argument("--chunk", type=positive_int, default=1024, help="chunk size of the cached step")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser


def _print_row(row: dict) -> None:
    print(f"| {row['ranks']} | {row['mode']} | {row['step_s']:.3f} | {row['time_ratio']:.2f} | "
          f"{row['peak_mib']:.0f} | {row['memory_ratio']:.2f} |", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch % args.per_class:
        build_parser().error(f"--batch {args.batch} must be a multiple of --per-class {args.per_class}")
    if args.device == "cuda" and torch.cuda.device_count() < max(args.ranks):
        build_parser().error(f"--device cuda runs one process per GPU: {max(args.ranks)} processes need as many "
                             f"GPUs, this machine has {torch.cuda.device_count()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# batch {args.batch} ({args.per_class} per class), d = {args.dim}, SiMix {'on' if args.simix else 'off'}, "
          f"memory {args.memory}, "
          f"{args.threads} thread(s) per process, {args.device}, torch {torch.__version__}, load average {load:.1f}")
    print("| processes | mode | step time per rank (s) | x one process | peak memory growth per rank (MiB) "
          "| x one process |")
    print("|---|---|---|---|---|---|", flush=True)
    one = measure(1, "replicate", args)
    rows = [{"ranks": 1, "mode": "one process", **one, "time_ratio": 1.0, "memory_ratio": 1.0}]
    _print_row(rows[-1])
    for world in (w for w in args.ranks if w > 1):
        for mode in args.modes:
            figures = measure(world, mode, args)
            rows.append({"ranks": world, "mode": mode, **figures, "time_ratio": figures["step_s"] / one["step_s"],
                         "memory_ratio": figures["peak_mib"] / one["peak_mib"]})
            _print_row(rows[-1])
    print(f"# load average after: {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0
