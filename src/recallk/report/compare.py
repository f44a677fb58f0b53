"""Several runs side by side in one self-contained HTML page (``recallk report RUN_A RUN_B ...``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from recallk.evaluation.metrics import metric_order
from recallk.run_folder import SUMMARY_METRICS, RunFolder, write_atomic

from . import html
from .comparison import comparison_columns
from .plots import comparison_figure, figure_png
from .record import RunRecord, read_run, resume_marks

_MISSING = object()


def write_comparison(run_dirs: Sequence[str | Path], out_path: str | Path) -> Path:
    """Write one self-contained HTML page comparing the runs in ``run_dirs`` and return its path.

    The page holds: a table of each run's test metrics in percent (as ``recallk train`` prints them) for the last
    epoch, the best.pt epoch (when it differs; with the split that chose it), raw pixels (when the run wrote
    ``embeddings/raw_pixels/<split>.npz``), the pretrained network zero-shot (when the run wrote
    ``embeddings/zero_shot/<split>.npz``: a run from pretrained weights) and before training; the config keys
    whose values differ between the runs (dotted, as overrides spell them); each run's record (best.pt, wall
    time, images/s, device, versions, git commit, command line, resumes; "not recorded" for runs older than
    ``run.json``); and the training loss, recall@k, map@r and r-precision curves overlaid, one colour per run,
    resumes as dotted lines.

    Args:
        run_dirs: run folders (each holding ``metrics.jsonl``), at least one, no folder twice.
        out_path: the HTML file to write (atomically; parent folders are created).

    Raises:
        ValueError: no run folder given, a folder given twice, a folder that is not a run (no
            ``metrics.jsonl``), or a malformed file in one of them (see :func:`recallk.report.read_run`).
    """
    if not run_dirs:
        raise ValueError("give at least one run folder to compare")
    resolved = [Path(d).resolve() for d in run_dirs]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise ValueError(f"run folder given more than once: {', '.join(twice)}; give each run once")
    runs = [read_run(d) for d in run_dirs]
    labels = run_labels(runs)
    figure = comparison_figure([(label, run.records, resume_marks(run)) for label, run in zip(labels, runs)])
    sections = [
        "<h2>Test metrics (%)</h2>",
        metrics_table(runs, labels),
        "<h2>Configuration differences</h2>",
        config_differences_table(runs, labels),
        "<h2>Run records</h2>",
        records_table(runs, labels),
        "<h2>Training curves</h2>",
        f'<img class="plot" alt="training loss and evaluation metrics of each run per epoch" '
        f'src="{html.data_uri(figure_png(figure))}">',
    ]
    subtitle = (" · ".join(f"{label}: {run.path.resolve()}" for label, run in zip(labels, runs))
                + f" · generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    document = html.page(f"recallk: {len(runs)} run(s) compared", subtitle, sections)
    return write_atomic(out_path, document)


def run_labels(runs: Sequence[RunRecord]) -> list[str]:
    """Each run's name (``config.yaml``'s ``name``, else its folder's), with its folder added where names repeat."""
    names = [run.name for run in runs]
    return [name if names.count(name) == 1 else f"{name} ({run.path})" for name, run in zip(names, runs)]


def _summary_keys(runs: Sequence[RunRecord]) -> list[str]:
    keys = {k for run in runs for r in (run.last_eval, run.best_eval, run.baseline, run.zero_shot) if r
            for k, v in r.items() if k.startswith(SUMMARY_METRICS) and html._is_number(v)}
    return sorted(keys, key=metric_order)


def metrics_table(runs: Sequence[RunRecord], labels: Sequence[str]) -> str:
    """One row per (run, evaluation): last epoch, best.pt epoch, raw pixels, pretrained zero-shot (a run from
    pretrained weights), before training; test metrics in percent."""
    keys = _summary_keys(runs)
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    lines = ['<table class="metrics">', f"<thead><tr><th>run</th><th>evaluation</th>{head}</tr></thead>", "<tbody>"]
    for label, run in zip(labels, runs):
        last, best = run.last_eval, run.best_eval if run.best is not None else None
        names = {"baseline": "raw pixels", "before": "untrained (epoch 0)",  # no gain column: runs side by side
                 "zero_shot": "pretrained, zero-shot"}
        if last is not None:
            names["last"] = f"last epoch ({last['epoch']})" + (" = best.pt" if best is last else "")
        if best is not None:
            names["best"] = f"best.pt (epoch {best['epoch']}, chosen on {run.best.split})"
        columns = comparison_columns(names, last, best=best, baseline=run.baseline,
                                     before=run.before_eval if run.before_eval is not last else None,
                                     zero_shot=run.zero_shot)
        rows = list(columns.items()) or [(f"no evaluation of the {run.split!r} split", {})]
        for i, (what, metrics) in enumerate(rows):
            name = f'<td class="label" rowspan="{len(rows)}">{escape(label)}</td>' if i == 0 else ""
            cells = "".join(f"<td>{html.percent(k, metrics.get(k))}</td>" for k in keys)
            lines.append(f'<tr>{name}<td class="label">{escape(what)}</td>{cells}</tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Dotted config keys whose values are not the same in every config (a key absent from some counts as
    differing), each with its value per config (``None`` written as null, absent as a missing marker), sorted."""
    flats = [flatten(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    out: dict[str, list[Any]] = {}
    for key in keys:
        values = [f.get(key, _MISSING) for f in flats]
        if any(not _same(values[0], v) for v in values[1:]):
            out[key] = values
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal config values: numbers by value (1 == 1.0, nan == nan), anything else by type and value."""
    if a is _MISSING or b is _MISSING:
        return a is b
    if _is_num(a) and _is_num(b):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and bool(a == b)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _value_text(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    return json.dumps(value, default=str)


def config_differences_table(runs: Sequence[RunRecord], labels: Sequence[str]) -> str:
    """The config keys that differ between the runs, one column per run; a note when the configs are equal."""
    missing = [label for label, run in zip(labels, runs) if run.config_text is None]
    diff = differing_keys([run.config for run in runs])
    parts = []
    if missing:
        parts.append(html.note(f"config.yaml not found for {', '.join(missing)}: compared as an empty config."))
    if not diff:
        parts.append(html.note("The runs' configurations are identical." if len(runs) > 1
                               else "One run: nothing to compare."))
        return "\n".join(parts)
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    lines = ['<table class="metrics config-diff">', f"<thead><tr><th>config key</th>{head}</tr></thead>", "<tbody>"]
    for key, values in diff.items():
        cells = "".join(f"<td><code>{escape(_value_text(v))}</code></td>" for v in values)
        lines.append(f"<tr><td>{escape(key)}</td>{cells}</tr>")
    lines.append("</tbody></table>")
    parts.append("\n".join(lines))
    return "\n".join(parts)


def records_table(runs: Sequence[RunRecord], labels: Sequence[str]) -> str:
    """One column per run: best.pt, epochs, wall time, images/s, device, versions, git commit, command, resumes."""
    columns = []
    for run in runs:
        speed = f"{run.images_per_s:.1f} images/s" if run.images_per_s is not None else "not logged"
        resumes = sum(seg.resume for seg in run.segments)
        epochs = max((int(r["epoch"]) for r in run.records), default=0)
        rows = [("best.pt", html.best_text(run.best, RunFolder(run.path).best_pt.is_file())),
                ("epochs logged", str(epochs)),
                ("wall time", escape(html.duration(run.wall_s))),
                ("training speed", escape(speed)),
                *html.environment_rows(run.environment, run.log_device),
                ("resumed", f"{resumes} time(s)" if resumes else "no")]
        columns.append(rows)
    head = "".join(f"<th>{escape(label)}</th>" for label in labels)
    lines = ['<table class="record">', f"<thead><tr><th></th>{head}</tr></thead>", "<tbody>"]
    for i, (name, _) in enumerate(columns[0]):
        cells = "".join(f"<td>{column[i][1]}</td>" for column in columns)
        lines.append(f"<tr><th>{escape(name)}</th>{cells}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)
