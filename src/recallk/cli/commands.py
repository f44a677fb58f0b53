"""The sub-commands of ``recallk``: each turns parsed arguments into calls on the library."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from recallk.config import dump_config, load_config


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed command line to its sub-command; returns the exit code."""
    if args.command in ("embed", "index", "search", "export"):
        from recallk.cli import retrieval

        return getattr(retrieval, args.command)(args)
    return {"train": train, "eval": evaluate, "report": report, "bench": bench}[args.command](args)


def train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from recallk.cli import wiring

    if args.name:
        config["name"] = args.name
    run_dir = Path(config["runs_dir"]) / config["name"]
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 touches the run folder
    if main_process:
        prepare_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
        dump_config(config, run_dir / "config.yaml")
    summary = wiring.train_from_config(config, run_dir, resume=args.resume, progress=not args.no_progress)
    if main_process:
        print(summary["table"])
        print(json.dumps({"run_dir": str(run_dir), **summary["final"]}))
    return 0


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run folder; refuse to mix two runs in one folder unless told to resume or overwrite."""
    if run_dir.exists() and not resume:
        if overwrite:
            shutil.rmtree(run_dir)
        elif any(run_dir.iterdir()):
            raise ValueError(
                f"run folder {run_dir} already exists: pass --resume to continue it, --overwrite to start "
                f"again, or --name to pick another name"
            )
    if resume and not (run_dir / "checkpoints" / "last.pt").is_file():
        raise ValueError(f"--resume: no checkpoint at {run_dir / 'checkpoints' / 'last.pt'}; start without --resume")
    run_dir.mkdir(parents=True, exist_ok=True)


def evaluate(args: argparse.Namespace) -> int:
    if getattr(args, "query_embeddings", None) or getattr(args, "gallery_embeddings", None):
        from recallk.cli import retrieval

        return retrieval.evaluate_files(args)
    if not args.checkpoint:
        raise ValueError("give --checkpoint (or --query-embeddings Q.npz --gallery-embeddings G.npz)")
    from recallk.cli import wiring

    results = wiring.evaluate_checkpoint(
        Path(args.checkpoint),
        dataset=args.dataset,
        root=args.root,
        splits=args.split,
        ks=args.ks,
        query=args.query,
        gallery=args.gallery,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    from recallk.evaluation import format_metrics_table

    print(format_metrics_table(results))
    print(json.dumps(results))
    return 0


def report(args: argparse.Namespace) -> int:
    from recallk.report import write_report

    path = write_report(Path(args.run_dir), out_path=Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0


def bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"recallk.bench.{args.which}")
    sys.argv[0] = f"recallk bench {args.which}"  # the benchmark's own parser names itself after argv[0]
    result: Any = module.main(list(args.args))
    sys.stdout.flush()
    return int(result or 0)
