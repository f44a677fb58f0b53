"""The sub-commands of ``recallk``: each turns parsed arguments into calls on the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from recallk import provenance
from recallk.config import check_startable, load_config, resume_changes, with_absolute_root
from recallk.run_folder import RunFolder, RunLock, append_resume, write_config


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed command line to its sub-command; returns the exit code."""
    if args.command in ("embed", "index", "search", "export"):
        from recallk.cli import retrieval

        return getattr(retrieval, args.command)(args)
    return {"train": train, "eval": evaluate, "report": report}[args.command](args)


def train(args: argparse.Namespace) -> int:
    """``recallk train``: check everything cheap first (config, data folder and splits, best_metric, batch split,
    device) so that a mistake leaves no run folder behind; with ``--resume`` the run's own ``config.yaml`` is the
    configuration (overrides of other keys than ``config.RESUME_SAFE_KEYS`` are refused with a diff). Rank 0
    holds the run folder's lock (:class:`recallk.run_folder.RunLock`) from before it touches the folder to the end:
    a second process of the same run stops there (RunFolderBusyError, exit 2), having changed nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 touches the run folder
    config = with_absolute_root(load_config(args.config, args.overrides))  # data.root as typed -> absolute
    if args.name:
        config["name"] = args.name
    run_dir = Path(config["runs_dir"]) / config["name"]
    changes: dict[str, tuple[Any, Any]] = {}
    if args.resume:
        config, changes = resumed_config(run_dir, args, config)
    check_startable(config, world_size)
    from recallk.cli.run import finished_run_message, resume_command, train_from_config

    if args.resume and (done := finished_run_message(config, run_dir)):
        if main_process:  # nothing to train: no segment in run.json, no resumes.jsonl line, nothing rewritten
            print(f"recallk train: {done}")
        return 0
    with contextlib.ExitStack() as held:
        fresh = False
        if main_process:
            created = not run_dir.exists()
            held.enter_context(RunLock(run_dir))  # first: a second process stops here, having touched nothing
            try:
                prepare_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
            except BaseException:
                if created:  # the lock made the folder: leave none behind
                    held.callback(shutil.rmtree, run_dir, ignore_errors=True)
                raise
            fresh = not args.resume
            provenance.start_segment(run_dir, resume=args.resume, device=record_device(config))  # run.json
            if args.resume:
                record_resume(run_dir, config, changes)  # a new run's config.yaml is written by the Trainer
        log_to_stdout(main_process)
        try:
            summary = train_from_config(config, run_dir, resume=args.resume, progress=not args.no_progress)
        except BaseException as stop:
            if fresh:
                remove_unstarted_run(run_dir)
            if main_process:
                provenance.end_segment(run_dir, outcome(stop), continue_with=resume_command(config))
            if isinstance(stop, KeyboardInterrupt) and hasattr(stop, "saved_to"):  # engine.Stopped, after its save
                return 128 + stop.signum  # the trainer said (once) what it saved and how to continue
            raise
        if main_process:
            from recallk.report import write_report

            provenance.end_segment(run_dir, "finished")
            write_report(run_dir)  # after the segment's end, so the record shows it finished
            print(summary["table"])
            print(json.dumps({"run_dir": str(run_dir), **summary["final"]}))
    return 0


def record_device(config: dict[str, Any]) -> str:
    """The device rank 0 trains on, as ``run.json`` records it (``cuda:<LOCAL_RANK>`` under torchrun)."""
    from recallk.utils import resolve_device

    device = resolve_device(config["train"]["device"])
    if device.type == "cuda" and device.index is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(device)


def outcome(stop: BaseException) -> str:
    """How a training segment ended, in words, for ``run.json``."""
    if isinstance(stop, KeyboardInterrupt):  # engine.Stopped is one, naming its signal
        name = getattr(stop, "signal_name", "SIGINT")
        return "interrupted (Ctrl-C)" if name == "SIGINT" else f"stopped by {name}"
    return f"error: {type(stop).__name__}: {stop}"


def log_to_stdout(main_process: bool) -> None:
    """Progress lines of the trainer (logger ``recallk.train``) go to stdout on rank 0, with or without bars."""
    log = logging.getLogger("recallk.train")
    log.setLevel(logging.INFO if main_process else logging.WARNING)
    log.propagate = False
    for old in [h for h in log.handlers if getattr(h, "_recallk_cli", False)]:  # an earlier main() in-process
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stdout)  # the current stdout
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._recallk_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)


def remove_unstarted_run(run_dir: Path) -> None:
    """Remove a run folder this command created when the run stopped before it had anything to keep (no
    checkpoint, no metrics): a failed start must not block the corrected command."""
    folder = RunFolder(run_dir)
    if run_dir.is_dir() and not folder.checkpoints.exists() and not folder.metrics.exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def resumed_config(run_dir: Path, args: argparse.Namespace,
                   requested: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """The configuration of ``--resume``: the run's own ``config.yaml`` plus the command's overrides, of which only
    ``RESUME_SAFE_KEYS`` may differ from it; returns (config, {key: (saved, new)}).

    Raises:
        ValueError: no ``config.yaml`` or checkpoint in ``run_dir``; ConfigError (a ValueError) with the diff
            when the command would change the run.
    """
    saved_path = RunFolder(run_dir).config
    check_resumable(run_dir)
    if not saved_path.is_file():
        raise ValueError(f"--resume: {saved_path} is missing: it is the configuration of the run to continue")
    saved = with_absolute_root(load_config(saved_path))  # a relative root of an older run: from here
    if args.config is None:
        requested = with_absolute_root(load_config(saved_path, args.overrides))
    requested["name"], requested["runs_dir"] = saved["name"], saved["runs_dir"]
    return requested, resume_changes(saved, requested)


def record_resume(run_dir: Path, config: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the resume (time, command line, changed keys) to ``resumes.jsonl``; with changes, rewrite
    ``config.yaml`` (atomically) with the new values and say so."""
    folder = RunFolder(run_dir)
    append_resume(folder.resumes, sys.argv[1:], changes)
    if changes:
        write_config(config, folder.config)
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        print(f"resume: {shown} (recorded in {folder.config} and resumes.jsonl)")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run folder; refuse to mix two runs in one folder unless told to resume or overwrite. The lock
    file (``.lock``, held by this process: :class:`recallk.run_folder.RunLock`) is not part of the run: it is
    kept when ``overwrite`` clears the folder, and a folder holding only it counts as empty."""
    lock = RunFolder(run_dir).lock
    if run_dir.exists() and not resume:
        contents = [path for path in run_dir.iterdir() if path != lock]
        if overwrite:
            for path in contents:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        elif contents:
            raise ValueError(
                f"run folder {run_dir} already exists: pass --resume to continue it, --overwrite to start "
                f"again, or --name to pick another name"
            )
    if resume:
        check_resumable(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def check_resumable(run_dir: Path) -> None:
    """Raise ValueError, saying what to run instead, when ``run_dir`` has no ``checkpoints/last.pt``."""
    last = RunFolder(run_dir).last_pt
    if last.is_file():
        return
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ValueError(f"--resume: no checkpoint at {last} (the run stopped or failed before it saved one); "
                         f"start it again with --overwrite (this deletes {run_dir}) or under another --name")
    raise ValueError(f"--resume: no checkpoint at {last}; start without --resume")


def evaluate(args: argparse.Namespace) -> int:
    from recallk.cli.evaluate import check_eval_sources, evaluate_checkpoint, evaluate_zero_shot, parse_data_options

    check_eval_sources(args)  # one of --checkpoint, --model, --query/--gallery-embeddings, and their own flags
    if getattr(args, "query_embeddings", None) or getattr(args, "gallery_embeddings", None):
        from recallk.cli import retrieval

        return retrieval.evaluate_files(args)
    common = dict(dataset=args.dataset, root=args.root, splits=args.split, ks=args.ks, query=args.query,
                  gallery=args.gallery, batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    if args.model is not None:
        results = evaluate_zero_shot(args.model, pretrained=True if args.pretrained is None else args.pretrained,
                                     pooling=args.pooling, image_size=args.image_size,
                                     dataset_options=parse_data_options(args.data_option), **common)
    else:
        results = evaluate_checkpoint(Path(args.checkpoint), **common)
    from recallk.evaluation import format_metrics_table

    print(format_metrics_table(results))
    print(json.dumps(results))
    return 0


def report(args: argparse.Namespace) -> int:
    """``recallk report RUN_DIR`` writes the run's report.html; ``recallk report RUN_A RUN_B ...`` one page
    comparing the runs (``--out``, default ``report-compare.html`` in the current directory)."""
    import warnings

    from recallk.report import ReportWarning, write_comparison, write_report

    root = getattr(args, "root", None)
    if len(args.run_dirs) == 1:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReportWarning)
            path = write_report(Path(args.run_dirs[0]), out_path=Path(args.out) if args.out else None,
                                root=Path(root) if root is not None else None, split=args.split,
                                num_queries=args.num_queries, top=args.top)
        for w in caught:  # the report is written (exit 0), but say on stderr what it left out
            if issubclass(w.category, ReportWarning):
                print(f"recallk report: warning: {w.message}", file=sys.stderr)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        from recallk.report.record import read_run, unfinished_notice

        if notice := unfinished_notice(read_run(Path(args.run_dirs[0]), baseline=False)):
            print(notice)  # as the page's first line says it
    elif given := [flag for flag, value in (("--root", root), ("--split", args.split)) if value is not None]:
        flags, verb = " and ".join(given), "apply" if len(given) > 1 else "applies"
        raise ValueError(f"{flags} {verb} to one run folder (the retrieval examples of its report.html); the "
                         f"comparison of several runs has no examples: drop {flags}")
    else:
        path = write_comparison([Path(d) for d in args.run_dirs], Path(args.out or "report-compare.html"))
    print(f"wrote {path}")
    return 0

