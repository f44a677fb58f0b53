"""Where and how a run was made: versions, git commit, command line, host and device (``runs/<name>/run.json``).

Layer 0: imports only :mod:`recallk.run_folder` (the run.json path and its atomic writer; no torch), so that any
layer (and a process that never imports torch) can record it.
``recallk train`` writes ``environment_record`` to ``run.json`` on rank 0 (:func:`start_segment`); a ``--resume``
appends a segment instead of overwriting, and the end of each segment is recorded (:func:`end_segment`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recallk.run_folder import RunFolder, read_json_file, write_atomic

FORMAT = 1
PACKAGES = ("recallk", "torch", "timm", "numpy")


def package_version(name: str) -> str | None:
    """The installed version of the distribution ``name`` (``importlib.metadata``), or None when not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(directory: str | Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``directory`` (default: the working directory).

    ``commit`` is the 40-hex ``HEAD`` commit, ``dirty`` whether tracked files differ from it (``git status
    --porcelain --untracked-files=no`` is not empty). ``(None, None)`` when ``directory`` is not in a git checkout
    or git is not installed. Never raises.
    """
    cwd = str(directory) if directory is not None else None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip() or None, dirty


def device_name(device: Any = None) -> str | None:
    """A readable name of ``device`` (a ``torch.device`` or its string, e.g. ``"cuda:0"``): the GPU's model for CUDA
    (``torch.cuda.get_device_name``), the processor for the CPU; None when ``device`` is None. torch is imported
    only for a CUDA device."""
    if device is None:
        return None
    text = str(device)
    if text.startswith("cuda"):
        try:
            import torch

            index = int(text.split(":")[1]) if ":" in text else torch.cuda.current_device()
            return str(torch.cuda.get_device_name(index))
        except Exception:  # a record must not fail a run: the device string itself is kept in "device"
            return None
    if text == "cpu":
        cpu = platform.processor() or platform.machine()
        return f"{cpu}, {os.cpu_count()} logical cores" if cpu else f"{os.cpu_count()} logical cores"
    return None


def command_program(argv0: str) -> list[str]:
    """How to type the program of this process again: ``["python", "-m", "recallk"]`` when it was started as
    ``python -m recallk`` (``argv0`` is then the file of the ``__main__`` module's spec, e.g. ``.../__main__.py``),
    else the file name of ``argv0`` (``["recallk"]`` for the console script)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    origin = getattr(spec, "origin", None)
    if spec is not None and origin and argv0 and os.path.abspath(argv0) == os.path.abspath(origin):
        name = spec.name.removesuffix(".__main__")
        return ["python", "-m", name]
    return [Path(argv0).name]


def environment_record(device: Any = None) -> dict[str, Any]:
    """What made this process's run: a JSON-serialisable dict.

    Keys: ``time`` (unix seconds, float) and ``started`` (local time, ISO 8601 with offset); ``argv`` (a copy of
    ``sys.argv``) and ``command`` (it as one shell-quoted line, the program as typed: ``recallk`` or
    ``python -m recallk``, see :func:`command_program`); ``versions``
    (``{"recallk", "torch", "timm", "numpy", "python"}``: installed versions, None when absent);
    ``git_commit`` / ``git_dirty`` (the working directory's git checkout, None when it is not one, see
    :func:`git_state`); ``recallk_git_commit`` / ``recallk_git_dirty``: the same for the folder of the recallk
    package itself (an editable install run from elsewhere; None for an installed wheel); ``cwd``; ``host``
    (host name); ``platform``; ``device`` (``str(device)``, None when not given) and ``device_name``
    (:func:`device_name`); ``world_size`` (``WORLD_SIZE``, 1 without torchrun).
    """
    commit, dirty = git_state()
    source_commit, source_dirty = git_state(Path(__file__).resolve().parent)  # an editable install's checkout
    argv = list(sys.argv)
    program = command_program(argv[0]) if argv else []
    now = time.time()
    return {
        "time": now,
        "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
        "argv": argv,
        "command": shlex.join([*program, *argv[1:]]),
        "versions": {**{name: package_version(name) for name in PACKAGES}, "python": platform.python_version()},
        "git_commit": commit,
        "git_dirty": dirty,
        "recallk_git_commit": source_commit,
        "recallk_git_dirty": source_dirty,
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": None if device is None else str(device),
        "device_name": device_name(device),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def read_run_file(run_dir: str | Path) -> dict[str, Any] | None:
    """``run_dir/run.json`` as a dict with a ``segments`` list, or None when the run has none (runs made before it
    existed).

    Raises:
        ValueError: the file is not valid JSON or not an object with a ``segments`` list.
    """
    return read_json_file(RunFolder(run_dir).run_json,
                          lambda d: isinstance(d, dict) and isinstance(d.get("segments"), list),
                          "a JSON object with a 'segments' list (see docs/run-folder.md)",
                          fix="; delete it to start a new record")


def _write(run_dir: str | Path, data: dict[str, Any]) -> None:
    """``run_dir/run.json`` atomically (indented JSON, values JSON cannot hold as their ``str``)."""
    write_atomic(RunFolder(run_dir).run_json, json.dumps(data, indent=2, default=str) + "\n")


def start_segment(run_dir: str | Path, resume: bool, device: Any = None) -> dict[str, Any]:
    """Record the start of a training segment in ``run_dir/run.json`` (written atomically) and return the segment.

    A new run (``resume=False``) gets ``{"format": 1, "segments": [segment]}``, replacing any earlier file; a
    resume appends its segment to the existing list (a run older than ``run.json`` starts one holding a
    placeholder ``{"time": None, "resume": False, "recorded": False}`` for the segments before, then the resumed
    one). Each segment is :func:`environment_record` plus ``"resume": bool``.

    Raises:
        ValueError: ``run_dir`` does not exist, or an existing ``run.json`` is malformed (see
            :func:`read_run_file`).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run folder {run} does not exist: create it before recording the run")
    segment = {**environment_record(device), "resume": bool(resume)}
    data = read_run_file(run) if resume else None
    if data is None:
        # a resume of a run older than run.json: its first segment is known only to be there
        data = {"format": FORMAT, "segments": [{"time": None, "resume": False, "recorded": False}] if resume else []}
    data["segments"].append(segment)
    _write(run, data)
    return segment


def end_segment(run_dir: str | Path, outcome: str, continue_with: str | None = None) -> None:
    """Set ``end_time`` (unix seconds) and ``outcome`` (e.g. ``"finished"``, ``"stopped by SIGTERM"``,
    ``"error: ..."``) of the last segment of ``run_dir/run.json``, and ``continue_with`` (the command that
    continues a run that did not finish) when given. Does nothing when the file does not exist (a failed start
    whose run folder was removed). Raises ValueError for a malformed file."""
    data = read_run_file(run_dir)
    if data is None or not data["segments"]:
        return
    data["segments"][-1].update({"end_time": time.time(), "outcome": outcome})
    if continue_with is not None:
        data["segments"][-1]["continue_with"] = continue_with
    _write(run_dir, data)


__all__ = ["device_name", "end_segment", "environment_record", "git_state", "package_version", "read_run_file",
           "start_segment"]
