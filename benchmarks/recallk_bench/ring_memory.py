"""Per-rank loss memory and time of ring mode (``recallk.engine.ring.ring_loss_and_grad``) against the replicated
path (all-gather the global batch, every rank computes the whole loss and its gradient), N gloo processes on the
CPU, 1 thread each (issue 26: ring under 1/3 of replicated at B = 65,536, d = 128, 4 processes).

Each mode runs in its own fresh processes (freed memory that the allocator keeps would hide the second mode's
peak), after one call on a tiny batch (the libraries' one-time set-up is no loss memory). Memory: the growth of
the peak resident memory (VmHWM, reset through /proc/self/clear_refs) of the loss call over the resident memory
just before it, with this rank's rows already built; the largest over the ranks. Time: the wall time of the call,
the largest over the ranks (they share the machine's cores: with fewer cores than processes the times are those
of a loaded machine; memory is not affected).

    PYTHONPATH=src python benchmarks/recallk_bench/ring_memory.py --batch 65536 --dim 128 --ranks 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODES = ("replicate", "ring")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _batch(args: argparse.Namespace, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a shuffled class-balanced batch (classes of ``per_class`` items, spread over the
    ranks), unit rows; the same global batch for every mode and N."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(args.batch) // args.per_class
    labels = labels[torch.randperm(args.batch, generator=generator)]
    bounds = [args.batch * r // world for r in range(world + 1)]
    rows = slice(bounds[rank], bounds[rank + 1])
    emb = torch.randn(args.batch, args.dim, generator=generator)[rows].clone()  # freed before the measurement
    return torch.nn.functional.normalize(emb, dim=1), labels[rows].clone()


def _work(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from recallk.engine.distributed import all_gather_rows
    from recallk.engine.ring import ring_loss_and_grad
    from recallk.losses import RecallAtKSurrogate

    criterion = RecallAtKSurrogate(simix=args.simix, generator=torch.Generator().manual_seed(0))

    def step(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if mode == "ring":
            return ring_loss_and_grad(criterion, emb, labels, block_elements=args.block_elements)
        everything, sizes = all_gather_rows(emb)
        all_labels, _ = all_gather_rows(labels)
        everything.requires_grad_(True)
        loss = criterion(everything, all_labels)
        loss.backward()
        offset = sum(sizes[:rank])
        return loss.detach(), everything.grad[offset : offset + emb.shape[0]].clone()

    step(*_batch(argparse.Namespace(**{**vars(args), "batch": 64 * world}), rank, world))  # one-time set-up costs
    criterion.generator.manual_seed(0)  # SiMix draws for the measured batch as if first: the same loss for every N
    emb, labels = _batch(args, rank, world)
    dist.barrier()
    _reset_peak()
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    loss, grad = step(emb, labels)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM") - before
    result = {"rank": rank, "seconds": seconds, "peak_mib": peak / 1024, "loss": float(loss),
              "grad_norm": float(grad.norm())}
    Path(out, f"{mode}{world}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=65536, help="global batch B (default 65,536)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width d (default 128)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4], help="numbers of processes N (default 4)")
    parser.add_argument("--per-class", type=int, default=4, help="items per class (default 4)")
    parser.add_argument("--simix", action="store_true", help="SiMix on")
    parser.add_argument("--block-elements", type=int, default=None,
                        help="ring mode's sigmoid buffer (default: recallk.engine.ring.DEFAULT_RING_BLOCK_ELEMENTS)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = []
    with tempfile.TemporaryDirectory() as out:
        for world in args.ranks:
            row = {"N": world}
            for mode in args.modes:
                mp.start_processes(_work, args=(world, _free_port(), mode, args, out), nprocs=world,
                                   start_method="spawn")
                ranks = [json.loads(Path(out, f"{mode}{world}_{r}.json").read_text()) for r in range(world)]
                row[mode] = {"seconds": max(r["seconds"] for r in ranks), "peak_mib": max(r["peak_mib"] for r in ranks),
                             "loss": ranks[0]["loss"]}
                print(f"B={args.batch} d={args.dim} N={world} simix={args.simix} {mode:9s}: per-rank peak growth "
                      f"{row[mode]['peak_mib']:8.1f} MiB, per-rank time {row[mode]['seconds']:7.2f} s, "
                      f"loss {row[mode]['loss']:.8f}", flush=True)
            if len(args.modes) == 2:
                print(f"  ring / replicate: memory {row['ring']['peak_mib'] / row['replicate']['peak_mib']:.3f}x, "
                      f"time {row['ring']['seconds'] / row['replicate']['seconds']:.3f}x", flush=True)
            figures.append(row)
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "dim": args.dim, "simix": args.simix,
                                         "torch_threads_per_process": 1, "figures": figures}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    main()
