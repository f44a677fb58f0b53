"""The research record of a run folder: which epoch best.pt is and which split chose it, the test numbers of the last
and of the best.pt epoch, the raw-pixel baseline, the pretrained network's zero-shot metrics, wall time, images/s,
the segments (start and resumes) and where the run was made (``run.json``: device, versions, git commit, command
line).

Everything is read from the files of docs/run-folder.md; runs made before ``run.json`` / ``best.json`` existed
get what their ``metrics.jsonl``, ``resumes.jsonl`` and checkpoints tell, and "not recorded" for the rest.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recallk.provenance import read_run_file
from recallk.run_folder import (
    RunFolder,
    read_best,
    read_config,
    read_embeddings_npz,
    read_metrics,
    read_resumes,
    selection_metric,
)

from .plots import Record

NOT_RECORDED = "not recorded"
_DEVICE_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d device\s+(.+)$")


@dataclass
class BestChoice:
    """Which evaluation best.pt holds: ``metric`` (e.g. ``"val/recall@1"``), its ``value`` (fraction 0..1),
    ``split`` ("validation" or "test"), ``epoch``, ``step`` (None when unknown) and ``source``: the file it was
    read from (``best.json``, ``checkpoints/best.pt``) or ``metrics.jsonl`` (recomputed with
    ``train.best_metric`` the way the trainer chooses: the first epoch with the highest value)."""

    metric: str
    value: float | None
    split: str
    epoch: int
    step: int | None
    source: str


@dataclass
class Segment:
    """One start or resume of training: ``start`` / ``end`` (unix seconds, None when unknown), ``resume``, the
    ``command`` line (None when not recorded), ``outcome`` and ``from_step`` / ``from_epoch`` (the progress it
    continued from: the last metrics line written before it started)."""

    start: float | None
    end: float | None
    resume: bool
    command: str | None
    outcome: str | None
    from_step: int
    from_epoch: int
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float | None:
        """Seconds from start to end, None when either is unknown."""
        if self.start is None or self.end is None:
            return None
        return max(0.0, self.end - self.start)


@dataclass
class RunRecord:
    """A run folder as the report reads it (:func:`read_run`)."""

    path: Path
    name: str
    config_text: str | None
    config: dict[str, Any]
    records: list[Record]
    split: str
    best: BestChoice | None
    last_eval: Record | None
    best_eval: Record | None
    before_eval: Record | None
    baseline: dict[str, Any] | None
    run_file: dict[str, Any] | None
    segments: list[Segment]
    wall_source: str
    images_per_s: float | None
    log_device: str | None = None
    zero_shot: dict[str, Any] | None = None

    @property
    def environment(self) -> dict[str, Any]:
        """The environment record (``run.json``) of the first recorded segment, {} for an older run."""
        return next((s.environment for s in self.segments if s.environment.get("versions") is not None), {})

    @property
    def wall_s(self) -> float | None:
        """Training wall time: the sum over segments (pauses between a stop and its resume not counted)."""
        times = [s.wall_s for s in self.segments if s.wall_s is not None]
        return sum(times) if times else None


def check_run_folder(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path after checking that it is a run folder (a directory holding ``metrics.jsonl``).

    Raises:
        ValueError: it does not exist, is not a directory, or holds no ``metrics.jsonl``.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run folder not found: expected a directory {run} holding metrics.jsonl and config.yaml")
    if not RunFolder(run).metrics.is_file():
        raise ValueError(f"{run} is not a run folder: it has no metrics.jsonl (give a folder that recallk train "
                         "wrote, e.g. runs/<name>)")
    return run


def baseline_metrics(run: Path, split: str, ks: list[int]) -> dict[str, Any] | None:
    """Metrics of raw L2-normalised pixels (``embeddings/raw_pixels/<split>.npz``) by
    :func:`recallk.evaluation.retrieval_metrics` at recall@``ks`` (the table ``recallk train`` prints); None
    when the file does not exist."""
    from recallk.evaluation import retrieval_metrics  # only when a baseline is shown

    path = RunFolder(run).raw_pixels(split)
    if not path.is_file():
        return None
    pixels, labels = read_embeddings_npz(path)
    return retrieval_metrics(pixels, labels, ks or (1,))


def zero_shot_metrics(run: Path, split: str, ks: list[int]) -> dict[str, Any] | None:
    """Metrics of the pretrained network's own embeddings (``embeddings/zero_shot/<split>.npz``, written at the
    start of a run from pretrained weights) by :func:`recallk.evaluation.retrieval_metrics` at recall@``ks``, the
    "pretrained, zero-shot" column of the table ``recallk train`` prints; None when the file does not exist (a run
    from random weights, or one made before the file existed)."""
    path = RunFolder(run).zero_shot(split)
    if not path.is_file():
        return None
    from recallk.evaluation import retrieval_metrics

    embeddings, labels = read_embeddings_npz(path)
    return retrieval_metrics(embeddings, labels, ks or (1,))


def recall_ks_of(record: Record | None) -> list[int]:
    """Sorted k of the ``recall@k`` keys of one eval record (test keys only)."""
    if record is None:
        return []
    return sorted(int(k.split("@")[1]) for k in record if k.startswith("recall@") and k.split("@")[1].isdigit())


def read_run(run_dir: str | Path, split: str | None = None, baseline: bool = True) -> RunRecord:
    """Read the record of the run folder ``run_dir`` (docs/run-folder.md).

    Args:
        run_dir: a folder holding ``metrics.jsonl`` (and usually ``config.yaml``, ``run.json``, ``best.json``).
        split: the test split; default ``data.test_split`` of the config, else "test".
        baseline: compute the raw-pixel metrics when ``embeddings/raw_pixels/<split>.npz`` exists, and the
            pretrained network's zero-shot metrics when ``embeddings/zero_shot/<split>.npz`` exists.

    Raises:
        ValueError: not a run folder, or a malformed ``metrics.jsonl`` / ``config.yaml`` / ``run.json`` /
            ``best.json`` / ``resumes.jsonl``.
    """
    run = check_run_folder(run_dir)
    folder = RunFolder(run)
    records = read_metrics(folder.metrics)
    config_text, cfg = read_config(folder.config)
    if split is None:
        split = str((cfg.get("data") or {}).get("test_split") or "test")
    evals = [r for r in records if r.get("kind") == "eval" and str(r.get("split") or split) == split]
    last_eval = evals[-1] if evals else None
    before_eval = evals[0] if evals and int(evals[0]["epoch"]) == 0 else None
    best = best_choice(run, cfg, evals)
    best_eval = None
    if best is not None:
        best_eval = next((r for r in reversed(evals) if int(r["epoch"]) == best.epoch), None)
    run_file = read_run_file(run)
    segments = read_segments(run, run_file, records)
    wall_source = ("run.json (start and end of each segment)" if run_file is not None
                   else "metrics.jsonl timestamps (first to last line of each segment; start-up not counted)")
    return RunRecord(
        path=run, name=str(cfg.get("name") or run.resolve().name), config_text=config_text, config=cfg,
        records=records, split=split, best=best, last_eval=last_eval, best_eval=best_eval, before_eval=before_eval,
        baseline=baseline_metrics(run, split, recall_ks_of(last_eval)) if baseline else None,
        run_file=run_file, segments=segments, wall_source=wall_source, images_per_s=training_images_per_s(records),
        log_device=log_device(folder.train_log) if run_file is None else None,
        zero_shot=zero_shot_metrics(run, split, recall_ks_of(last_eval)) if baseline else None,
    )


def log_device(path: Path) -> str | None:
    """The device line of a ``train.log`` start block (``device  cpu, 1 process(es)``), for runs older than
    ``run.json``; None when there is none."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = _DEVICE_LINE.match(line)
            if match:
                return match.group(1).strip()
    return None


def best_choice(run: Path, cfg: dict[str, Any], evals: list[Record]) -> BestChoice | None:
    """Which evaluation ``checkpoints/best.pt`` holds: from ``best.json``, else the ``best`` entry of best.pt, else
    recomputed from the eval lines with ``train.best_metric`` (default ``map@r``; ``val/<best_metric>`` when the
    lines hold it) as the trainer chooses; None when nothing was evaluated.

    Raises:
        ValueError: ``best.json`` is not a JSON object with ``metric`` and ``epoch``.
    """
    folder = RunFolder(run)
    data = read_best(folder.best_json)
    if data is not None:
        return BestChoice(str(data["metric"]), _float(data.get("value")), str(data.get("split") or "test"),
                          int(data["epoch"]), _int(data.get("step")), "best.json")
    if folder.best_pt.is_file():
        try:
            from recallk.engine import load_checkpoint

            state = load_checkpoint(folder.best_pt)
        except Exception:  # an unreadable checkpoint: the eval lines still tell
            state = {}
        entry = state.get("best") if isinstance(state, dict) else None
        if isinstance(entry, dict) and entry.get("epoch") is not None and entry.get("metric"):
            return BestChoice(str(entry["metric"]), _float(entry.get("value")), str(entry.get("split") or "test"),
                              int(entry["epoch"]), _int(state.get("step")), "checkpoints/best.pt")
    # the trainer's rule: on the validation split when the lines hold it
    metric, split = selection_metric({k for r in evals for k in r},
                                     str(((cfg.get("train") or {}).get("best_metric")) or "map@r"))
    best: Record | None = None
    for r in evals:
        value = r.get(metric)
        if isinstance(value, int | float) and (best is None or value > best[metric]):
            best = r
    if best is None:
        return None
    return BestChoice(metric, float(best[metric]), split, int(best["epoch"]), _int(best.get("step")),
                      "metrics.jsonl")


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_segments(run: Path, run_file: dict[str, Any] | None, records: list[Record]) -> list[Segment]:
    """The training segments of a run, in order: from ``run.json`` when it exists, else the first metrics line and
    the lines of ``resumes.jsonl``. Each segment ends at its recorded ``end_time``, else at the last metrics line
    written before the next segment started."""
    times = sorted(float(r["time"]) for r in records if isinstance(r.get("time"), int | float))
    if run_file is not None:
        raw = [(s.get("time"), s.get("end_time"), bool(s.get("resume")), s.get("command"), s.get("outcome"), s)
               for s in run_file["segments"] if isinstance(s, dict)]
    else:
        raw = [(times[0] if times else None, None, False, None, None, {})]
        for entry in read_resumes(RunFolder(run).resumes):
            argv = entry.get("argv")
            command = "recallk " + " ".join(map(str, argv)) if isinstance(argv, list) else None
            raw.append((entry["time"], None, True, command, None, {}))
    segments: list[Segment] = []
    for index, (start, end, resume, command, outcome, env) in enumerate(raw):
        start = _float(start)
        if start is None and index == 0 and times:  # the first segment of a run older than run.json
            start = times[0]
        following = _float(raw[index + 1][0]) if index + 1 < len(raw) else None
        if _float(end) is None:
            inside = [t for t in times if (start is None or t >= start) and (following is None or t < following)]
            end = inside[-1] if inside else None
        previous = [r for r in records if start is not None and isinstance(r.get("time"), int | float)
                    and r["time"] < start]
        last = previous[-1] if previous else None
        segments.append(Segment(start, _float(end), resume, command if isinstance(command, str) else None,
                                outcome if isinstance(outcome, str) else None,
                                int(last["step"]) if last is not None and "step" in last else 0,
                                int(last["epoch"]) if last is not None else 0, env))
    return segments


def training_images_per_s(records: list[Record]) -> float | None:
    """Images per second of training over the whole run: total steps / total seconds, from the ``images_per_s``
    of the train lines of ``metrics.jsonl`` (interval lines when logged, else epoch lines): each line covers
    ``step - previous step`` steps at its rate, so the mean is weighted by time (a harmonic mean weighted by steps).
    None when no train line carries ``images_per_s``."""
    for scope in ("interval", "epoch"):
        steps = seconds = 0.0
        previous = 0
        for r in records:
            if r.get("kind") != "train":
                continue
            if r.get("scope", "epoch") != scope:
                continue
            rate, step = r.get("images_per_s"), int(r.get("step", 0))
            n = step - previous
            previous = step
            if isinstance(rate, int | float) and rate > 0 and n > 0:
                steps += n
                seconds += n / rate
        if steps:
            return steps / seconds
    return None


def resume_marks(run: RunRecord) -> list[float]:
    """x positions (fractional epochs, as the training curves place the train lines) of each resume: the progress
    the resumed segment continued from."""
    from .plots import step_position

    return [step_position(run.records, s.from_step, s.from_epoch) for s in run.segments if s.resume]


def unfinished_notice(run: RunRecord) -> str | None:
    """What to say at the top of the report of a run whose last training segment did not finish (``run.json``
    records another outcome than ``finished``: ``stopped by SIGTERM``, ``interrupted (Ctrl-C)``, ``error: ...``)
    and that was not resumed since: how it ended and when, where ``checkpoints/last.pt`` stands, and the command
    that continues it. None for a finished run, a run still running (no outcome yet) and a run without
    ``run.json``.

    E.g. ``This run did not finish: stopped by SIGTERM at 2026-12-07 19:40:01, checkpoints/last.pt saved after
    epoch 1 (step 2); continue with: recallk train --name r --resume``.
    """
    last = run.segments[-1] if run.segments else None
    if run.run_file is None or last is None or last.outcome is None or last.outcome == "finished":
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.end)) if last.end is not None else None
    if last.outcome.startswith("error: "):
        how = f"it failed{f' at {when}' if when else ''} with {last.outcome.removeprefix('error: ')}"
    else:
        how = f"{last.outcome}{f' at {when}' if when else ''}"
    folder = RunFolder(run.path)
    position = checkpoint_position(folder.last_pt)
    name = str(run.config.get("name") or run.path.resolve().name)
    # the command recallk train recorded when the segment ended (cli.run.resume_command: runs_dir, torchrun)
    command = last.environment.get("continue_with") or shlex.join(["recallk", "train", "--name", name, "--resume"])
    if position is None:
        return (f"This run did not finish: {how}, and saved no checkpoint to continue from; start it again with "
                f"its command line plus --overwrite (this deletes {run.path})")
    return f"This run did not finish: {how}, checkpoints/last.pt saved {position}; continue with: {command}"


def checkpoint_position(path: Path) -> str | None:
    """Where the checkpoint ``path`` stands, as the trainer says it: ``after epoch 5 (step 50)`` at an epoch's
    end, ``in epoch 6 after batch 3 (step 53)`` inside one; None when there is no readable checkpoint."""
    if not path.is_file():
        return None
    try:
        from recallk.engine import load_checkpoint

        state = load_checkpoint(path)
        epoch, step, position = int(state["epoch"]), int(state["step"]), int(state.get("position") or 0)
    except Exception:  # an unreadable checkpoint: the report still says the run did not finish
        return "(this report could not read where)"
    if position == 0:
        return f"after epoch {epoch} (step {step})"
    return f"in epoch {epoch + 1} after batch {position} (step {step})"
