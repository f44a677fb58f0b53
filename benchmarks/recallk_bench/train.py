"""Training throughput: loader alone, cached step alone and the trainer end to end, on the same data and model.

One run measures, on a folder of JPEGs (written to a temporary folder unless ``--root`` names one laid out as
``root/<class>/<image>``) and one model:

- **loader-only**: images/s of :class:`recallk.data.loading.ChunkedBatchLoader` (the trainer's loader: all
  workers load chunks of the same batch; uint8 images), epochs after the first (worker start-up excluded);
- **step-only**: images/s of the trainer's step (streaming cached step + optimiser update) on one batch of
  chunks already in memory (median step time of repeats timed before and after the end-to-end run);
- **end-to-end**: images/s of :meth:`recallk.engine.Trainer.fit`, from its per-step log lines of the epochs
  after the first (each step's time includes its wait for data; checkpoint writing between epochs excluded);

and prints ``end_to_end / min(loader, step)``, the wait before the first chunk of a batch against one chunk's
and one whole batch's loading time by one worker, and the bytes of the kept images of one batch (uint8)
against float32. On a 2-core CPU the defaults keep the step on one thread and the loading on one worker, the
analogue of a GPU step fed by CPU workers. ``--device cuda`` with the GPU command in docs/benchmarks.md.

    python benchmarks/bench.py train         # CPU defaults: resnet18, 64 px, batch 128, chunk 32, 1 worker
    python benchmarks/bench.py train --device cuda --model resnet50 --image-size 224 --jpeg-size 256 --batch 960 \\
        --chunk 240 --workers 14 --amp bf16 --channels-last --classes 240 --per-class-images 16 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from recallk.data import build_dataset, build_transforms
from recallk.data.loading import ChunkedBatchLoader
from recallk.data.samplers import ClassBalancedBatchSampler
from recallk.data.transforms import with_device_normalize
from recallk.engine import Trainer
from recallk.losses import RecallAtKSurrogate
from recallk_bench.arguments import HelpFormatter, non_negative_int, positive_int, prog, timm_model
from recallk_bench.engine import build_benchmark_model


def _epochs(text: str) -> int:
    """``--epochs``: an int of at least 2 (epoch 1 is the untimed warm-up of both timed runs)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"--epochs must be >= 2: the first epoch is the warm-up (worker start-up, allocator) and is not timed, "
            f"so the loader-only and end-to-end figures come from epochs 2 and later (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bench.py train``: numbers checked, ``--model`` a timm name (a bad value is a one-line
    usage error, exit 2); ``--help`` shows each default."""
    parser = argparse.ArgumentParser(prog=prog("train"), description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--model", type=timm_model, default="resnet18",
                        help="timm model name (random weights, BatchNorm frozen; timm.list_models() lists them)")
    parser.add_argument("--embed-dim", type=positive_int, default=128, help="embedding dimension")
    parser.add_argument("--image-size", type=positive_int, default=64, help="training crop (RandomResizedCrop), px")
    parser.add_argument("--jpeg-size", type=positive_int, default=80, help="side of the JPEGs written, px")
    parser.add_argument("--root", help="an existing folder root/<class>/<image> (default: write JPEGs to a temp dir)")
    parser.add_argument("--classes", type=positive_int, default=40, help="classes of JPEGs written")
    parser.add_argument("--per-class-images", type=positive_int, default=16, help="images per class written")
    parser.add_argument("--batch", type=positive_int, default=128, help="batch size")
    parser.add_argument("--chunk", type=positive_int, default=32, help="chunk size")
    parser.add_argument("--per-class", type=positive_int, default=4, help="items per class in a batch")
    parser.add_argument("--workers", type=non_negative_int, default=1, help="data loader worker processes")
    parser.add_argument("--threads", type=non_negative_int, default=1,
                        help="torch threads of the step (CPU); 0 = leave as is")
    parser.add_argument("--epochs", type=_epochs, default=3,
                        help="epochs of the loader-only and end-to-end runs, at least 2: the first epoch is the "
                             "warm-up (worker start-up, allocator) and is not timed")
    parser.add_argument("--step-repeats", type=positive_int, default=4, help="timed steps of the step-only run")
    parser.add_argument("--amp", default=None, help="train.amp: bf16, fp16 or none (default: none)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line too")
    parser.add_argument("--memory-only", action="store_true",
                        help="only measure the host memory of one batch's kept images (resident-set growth)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``bench.py train`` arguments (:func:`build_parser`); bad values exit 2 with a usage line."""
    parser = build_parser()
    return parser.parse_args(argv)


def write_jpegs(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> int:
    """``classes`` folders of ``per_class`` smooth random JPEGs (``size`` px, quality 90): photo-like decode
    cost. Returns the number of images written."""
    rng = np.random.default_rng(seed)

    def write(job: tuple[int, int, np.ndarray]) -> None:
        c, i, coarse = job
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        image.save(root / f"class_{c:04d}" / f"{i:03d}.jpg", quality=90)

    jobs = []
    for c in range(classes):
        (root / f"class_{c:04d}").mkdir(parents=True, exist_ok=True)
        jobs += [(c, i, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for i in range(per_class)]
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 1)) as pool:
        list(pool.map(write, jobs))
    return len(jobs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(args: argparse.Namespace, dataset: Any, run_dir: Path, epochs: int) -> Trainer:
    torch.manual_seed(0)
    model = build_benchmark_model(args.model, args.embed_dim, torch.device(args.device))
    criterion = RecallAtKSurrogate()
    return Trainer(model, criterion, dataset, run_dir, batch_size=args.batch, chunk_size=args.chunk,
                   per_class=args.per_class, epochs=epochs, lr=1e-4, device=args.device, seed=1,
                   num_workers=args.workers, amp=args.amp, channels_last=args.channels_last, progress=False,
                   tensorboard=False, log_every=1)


def loader_only(args: argparse.Namespace, dataset: Any) -> dict[str, Any]:
    """Images/s of the trainer's loader over epochs 2..E, and the waits for the first chunk of each batch."""
    host, _ = with_device_normalize(dataset)
    sampler = ClassBalancedBatchSampler(dataset.labels, args.batch, per_class=args.per_class, seed=1)
    loader = ChunkedBatchLoader(host, sampler, args.chunk, seed=1, num_workers=args.workers,
                                pin_memory=torch.device(args.device).type == "cuda")
    images, seconds, epoch_start_waits, later_waits, cold = 0, 0.0, [], [], None
    try:
        for epoch in range(1, args.epochs + 1):
            loader.reset_timing()
            start, count = time.perf_counter(), 0
            for batch in loader.epoch(epoch):
                for chunk, _ in batch:
                    count += len(chunk)
            elapsed = time.perf_counter() - start
            if epoch == 1:
                cold = loader.first_chunk_waits[0]
                continue
            images, seconds = images + count, seconds + elapsed
            epoch_start_waits.append(loader.first_chunk_waits[0])
            later_waits += loader.first_chunk_waits[1:]
    finally:
        loader.close()
    rate = images / seconds
    per_worker = rate / max(args.workers, 1)
    return {"images_per_s": rate, "first_epoch_first_chunk_wait_s": cold,
            "epoch_start_first_chunk_wait_s": statistics.mean(epoch_start_waits),
            "later_batches_first_chunk_wait_s": statistics.mean(later_waits) if later_waits else None,
            "one_chunk_one_worker_s": args.chunk / per_worker, "one_batch_one_worker_s": args.batch / per_worker}


def step_only(args: argparse.Namespace, dataset: Any, run_dir: Path) -> dict[str, Any]:
    """Images/s of the trainer's step on one batch of uint8 chunks held in memory (no loading)."""
    trainer = make_trainer(args, dataset, run_dir, epochs=1)
    host, _ = with_device_normalize(dataset)
    sampler = ClassBalancedBatchSampler(dataset.labels, args.batch, per_class=args.per_class, seed=1)
    loader = ChunkedBatchLoader(host, sampler, args.chunk, seed=1, num_workers=0,
                                pin_memory=trainer.device.type == "cuda")
    chunks = [(x.clone(), y.clone()) for x, y in next(iter(loader.epoch(1)))]
    kept = sum(x.numel() * x.element_size() for x, _ in chunks)
    trainer.model.train()
    trainer._train_step(iter(chunks), 1)  # warm-up (allocator, cudnn autotune)
    _sync(trainer.device)
    times = []
    for _ in range(args.step_repeats):
        start = time.perf_counter()
        trainer._train_step(iter(chunks), 1)
        _sync(trainer.device)
        times.append(time.perf_counter() - start)
    return {"images_per_s": args.batch / statistics.median(times), "step_s": times, "kept_bytes_per_batch": kept,
            "kept_dtype": str(chunks[0][0].dtype), "float32_bytes_per_batch": kept // chunks[0][0].element_size() * 4}


def end_to_end(args: argparse.Namespace, dataset: Any, run_dir: Path) -> dict[str, Any]:
    """Images/s of Trainer.fit over epochs 2..E from its per-step log lines (each includes its data wait)."""
    trainer = make_trainer(args, dataset, run_dir, epochs=args.epochs)
    trainer.fit()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "train" and r.get("scope") == "interval" and r["epoch"] >= 2]
    seconds = sum(args.batch / r["images_per_s"] for r in steps)
    return {"images_per_s": len(steps) * args.batch / seconds, "steps": len(steps),
            "data_wait_s_per_step": statistics.mean(r["data_wait_s"] for r in steps)}


def _resident_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def kept_memory(args: argparse.Namespace, dataset: Any) -> dict[str, Any]:
    """Growth of this process's resident memory while it holds one batch of chunks as the trainer keeps them for
    pass 2 (as received from the loader: uint8, shared memory from the workers), against their bytes."""
    host, _ = with_device_normalize(dataset)
    sampler = ClassBalancedBatchSampler(dataset.labels, args.batch, per_class=args.per_class, seed=1)
    loader = ChunkedBatchLoader(host, sampler, args.chunk, seed=1, num_workers=args.workers)
    batches = loader.epoch(1)
    before = _resident_bytes()
    kept = list(next(batches))
    touched = sum(int(x.sum()) for x, _ in kept)  # every page resident in this process
    grown = _resident_bytes() - before
    del batches, kept
    loader.close()
    return {"batch": args.batch, "image_size": args.image_size, "resident_growth_bytes": grown,
            "kept_bytes": args.batch * 3 * args.image_size**2, "float32_bytes": 4 * args.batch * 3 * args.image_size**2,
            "checksum": touched}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="recallk_bench_train_") as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "jpegs"
        if not args.root:
            started = time.perf_counter()
            n = write_jpegs(root, args.classes, args.per_class_images, args.jpeg_size)
            print(f"wrote {n} JPEGs of {args.jpeg_size} px in {time.perf_counter() - started:.1f} s to {root}")
        dataset = build_dataset("folder", root, None, transform=build_transforms("train", args.image_size))
        if args.memory_only:
            memory = kept_memory(args, dataset)
            print(f"one batch of {args.batch} at {args.image_size} px kept: resident memory grew by "
                  f"{memory['resident_growth_bytes'] / 2**20:.1f} MiB; uint8 bytes {memory['kept_bytes'] / 2**20:.1f} "
                  f"MiB, float32 would be {memory['float32_bytes'] / 2**20:.1f} MiB")
            if args.json:
                print(json.dumps(memory))
            return 0
        result: dict[str, Any] = {"settings": vars(args), "torch": torch.__version__,
                                  "threads": torch.get_num_threads(), "images": len(dataset)}
        result["loader"] = loader_only(args, dataset)
        # The step alone is timed before and after the end-to-end run (drift on a shared machine hits both).
        before = step_only(args, dataset, Path(tmp) / "step_run")
        result["end_to_end"] = end_to_end(args, dataset, Path(tmp) / "e2e_run")
        after = step_only(args, dataset, Path(tmp) / "step_run_after")
        times = before["step_s"] + after["step_s"]
        result["step"] = {**before, "step_s": times, "images_per_s": args.batch / statistics.median(times)}
    loader, step, e2e = result["loader"], result["step"], result["end_to_end"]
    floor = min(loader["images_per_s"], step["images_per_s"])
    result["ratio_end_to_end_over_min"] = e2e["images_per_s"] / floor
    result["ratio_end_to_end_over_step"] = e2e["images_per_s"] / step["images_per_s"]
    print(f"{args.model} {args.image_size}px on {args.device}, batch {args.batch}, chunk {args.chunk}, "
          f"{args.workers} worker(s), amp {args.amp}, channels_last {args.channels_last}, "
          f"{result['threads']} step thread(s), {len(dataset)} images")
    print(f"  loader-only  {loader['images_per_s']:9.1f} img/s")
    print(f"  step-only    {step['images_per_s']:9.1f} img/s")
    print(f"  end-to-end   {e2e['images_per_s']:9.1f} img/s  ({e2e['steps']} steps, "
          f"{e2e['data_wait_s_per_step']:.3f} s data wait per step)")
    print(f"  end-to-end / min(loader, step) = {result['ratio_end_to_end_over_min']:.2f}; "
          f"end-to-end / step = {result['ratio_end_to_end_over_step']:.2f}")
    print(f"  first chunk of an epoch after {loader['epoch_start_first_chunk_wait_s']:.3f} s (first epoch, with "
          f"worker start-up: {loader['first_epoch_first_chunk_wait_s']:.3f} s); one chunk by one worker "
          f"{loader['one_chunk_one_worker_s']:.3f} s, one whole batch by one worker "
          f"{loader['one_batch_one_worker_s']:.3f} s")
    print(f"  kept images of one batch: {step['kept_bytes_per_batch'] / 2**20:.1f} MiB ({step['kept_dtype']}; "
          f"float32 would be {step['float32_bytes_per_batch'] / 2**20:.1f} MiB)")
    if args.json:
        print(json.dumps(result, default=str))
    return 0

