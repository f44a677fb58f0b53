"""Benchmark of the cached two-pass step against a plain full-batch step (time and peak memory).

Time: the cached step (pass 1 without grad, loss, pass 2 with backward) over a plain step
(``loss(model(images)).backward()`` on the whole batch), on the same images, median of interleaved repeats;
also the cached step with the whole batch as one chunk (the two-pass overhead alone, without the cost of
running the network on smaller batches).
Memory: peak of one step at B = chunk, 4 x chunk, 16 x chunk, each configuration in a fresh subprocess; on the
CPU the growth of the peak resident memory (VmHWM, reset through /proc/self/clear_refs; ru_maxrss elsewhere)
over the resident memory after building the model and the batch; on CUDA ``torch.cuda.max_memory_allocated``
over the memory allocated before the step.

    python benchmarks/bench.py engine --model resnet18 --resolution 64 --chunk 16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recallk.engine import cached_backward, freeze_batchnorm
from recallk_bench.arguments import BENCH_SCRIPT, HelpFormatter, positive_int, prog, timm_model


class _Embedder(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)


def build_benchmark_model(name: str, dim: int, device: torch.device) -> nn.Module:
    """timm ``name`` (random weights) -> Linear(dim) -> L2, BatchNorm frozen, in train mode."""
    import timm

    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    model = freeze_batchnorm(_Embedder(backbone, dim)).to(device)
    return model.train()


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A cheap stand-in loss (softmax over same-class similarities) so that the engine's cost dominates."""
    sim = embeddings @ embeddings.T / 0.1
    eye = torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
    sim = sim.masked_fill(eye, float("-inf"))
    positive = (labels[:, None] == labels[None, :]) & ~eye
    return -(sim.log_softmax(1).masked_fill(~positive, 0).sum(1) / positive.sum(1).clamp(min=1)).mean()


def build_criterion(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "contrastive":
        return contrastive_loss
    from recallk.losses import RecallAtKSurrogate

    return RecallAtKSurrogate(simix=name == "rsk-simix")


def make_batch(batch: int, resolution: int, per_class: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, generator=generator)
    labels = torch.arange(batch) // per_class
    return images, labels


def plain_step(model, images, labels, criterion, device) -> None:
    model.zero_grad(set_to_none=True)
    criterion(model(images.to(device)).float(), labels.to(device)).backward()


def cached_step(model, images, labels, criterion, device, chunk) -> None:
    model.zero_grad(set_to_none=True)
    cached_backward(model, images, labels, criterion, chunk, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ratio(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median seconds of the plain and the cached step on the same batch, interleaved, and their ratio."""
    model = build_benchmark_model(args.model, args.dim, device)
    criterion = build_criterion(args.loss)
    batch = args.time_batch or 4 * args.chunk
    images, labels = make_batch(batch, args.resolution)
    steps = {"plain": lambda: plain_step(model, images, labels, criterion, device),
             "cached": lambda: cached_step(model, images, labels, criterion, device, args.chunk),
             "cached_one_chunk": lambda: cached_step(model, images, labels, criterion, device, batch)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats + 1):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"batch": batch, "plain_s": median["plain"], "cached_s": median["cached"],
            "cached_one_chunk_s": median["cached_one_chunk"], "ratio": median["cached"] / median["plain"],
            "ratio_one_chunk": median["cached_one_chunk"] / median["plain"]}


def measure_memory(mode: str, batch: int, args: argparse.Namespace, device: torch.device) -> float:
    """Peak extra memory (MiB) of one ``mode`` step ("plain" or "cached") over the state before it."""
    model = build_benchmark_model(args.model, args.dim, device)
    criterion = build_criterion(args.loss)
    images, labels = make_batch(batch, args.resolution)
    warm_images, warm_labels = make_batch(4, args.resolution)
    plain_step(model, warm_images, warm_labels, criterion, device)  # load kernels, allocate .grad
    model.zero_grad(set_to_none=False)
    if device.type == "cuda":
        images, labels = images.to(device), labels.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_cpu_peak()
    if mode == "plain":
        plain_step(model, images, labels, criterion, device)
    else:
        cached_step(model, images, labels, criterion, device, args.chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return (_cpu_peak_kib() - base) / 1024


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> int:
    """Reset the peak resident set size to the current one where Linux allows it; returns the baseline (KiB).

    Elsewhere the baseline is the peak so far (ru_maxrss), which can hide a step smaller than earlier peaks.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to VmRSS
        current = _proc_status_kib("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_peak_kib() -> int:
    peak = _proc_status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _common_argv(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--resolution", str(args.resolution), "--chunk", str(args.chunk),
            "--dim", str(args.dim), "--device", args.device, "--loss", args.loss]


def memory_table(args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for multiple in args.multiples:
        batch = multiple * args.chunk
        row: dict[str, float] = {"batch": batch}
        for mode in ("cached", "plain"):
            command = [sys.executable, BENCH_SCRIPT, "engine", *_common_argv(args),
                       "--measure-memory", mode, str(batch)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row[f"{mode}_mib"] = json.loads(output.strip().splitlines()[-1])["peak_mib"]
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bench.py engine``: every number positive, ``--model`` a timm name (checked here, so a
    bad value is a one-line usage error, exit 2); ``--help`` shows each default."""
    parser = argparse.ArgumentParser(prog=prog("engine"), description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", type=timm_model, default="resnet18",
                        help="timm model name, random weights (timm.list_models() lists them)")
    parser.add_argument("--resolution", type=positive_int, default=64, help="image side in pixels")
    parser.add_argument("--chunk", type=positive_int, default=16, help="chunk size of the cached step")
    parser.add_argument("--dim", type=positive_int, default=128, help="embedding dimension")
    parser.add_argument("--multiples", type=positive_int, nargs="+", default=[1, 4, 16],
                        help="batch sizes for the memory table, as multiples of the chunk")
    parser.add_argument("--time-batch", type=positive_int, default=None,
                        help="batch of the timing (default: 4 x chunk)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--loss", default="contrastive", choices=["contrastive", "rsk", "rsk-simix"],
                        help="the loss of both steps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-memory", action="store_true", help="only the timing")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--measure-memory", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``bench.py engine`` arguments (:func:`build_parser`); bad values exit 2 with a usage line."""
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.measure_memory:
        mode, batch = args.measure_memory
        print(json.dumps({"peak_mib": measure_memory(mode, int(batch), args, device)}))
        return 0
    result: dict[str, object] = {"settings": {k: v for k, v in vars(args).items() if k != "measure_memory"},
                                 "torch": torch.__version__, "threads": torch.get_num_threads()}
    timing = time_ratio(args, device)
    result["time"] = timing
    print(f"{args.model} {args.resolution}px on {device}, chunk {args.chunk}, batch {timing['batch']}: "
          f"plain {timing['plain_s']:.3f} s, cached {timing['cached_s']:.3f} s (ratio {timing['ratio']:.2f}), "
          f"cached in one chunk {timing['cached_one_chunk_s']:.3f} s (ratio {timing['ratio_one_chunk']:.2f})")
    if not args.skip_memory:
        rows = memory_table(args)
        result["memory"] = rows
        print("batch  cached peak MiB  plain peak MiB")
        for row in rows:
            print(f"{int(row['batch']):5d}  {row['cached_mib']:15.1f}  {row['plain_mib']:14.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0

