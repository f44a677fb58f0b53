"""HTML pieces of the report: a self-contained page, inline CSS, images as base64 PNG data URIs, no script."""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from recallk.evaluation.metrics import COUNT_KEYS, metric_order
from recallk.run_folder import SUMMARY_METRICS, RunFolder

from .examples import HIT_RGB, MISS_RGB, QUERY_RGB, Example
from .plots import Record, eval_records, eval_splits
from .record import NOT_RECORDED, BestChoice, RunRecord

_NOT_METRICS = {"kind", "epoch", "step", "time", "split"}


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*colour)


CSS = f"""
body {{ font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 24px auto;
  max-width: 1200px; padding: 0 16px; color: #1b1b1b; background: #fff; line-height: 1.4; }}
h1 {{ font-size: 1.6em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }}
h3 {{ font-size: 1.05em; margin-bottom: 0.4em; }}
.meta {{ color: #555; margin-top: 0; }}
.note {{ background: #fff6d5; border-left: 4px solid #e0b000; padding: 8px 12px; margin: 8px 0; }}
details {{ margin: 8px 0; }}
summary {{ cursor: pointer; font-weight: 600; }}
pre {{ background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px; overflow-x: auto; font-size: 0.85em; }}
img.plot {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
table.metrics {{ border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }}
table.metrics th, table.metrics td {{ border: 1px solid #d0d7de; padding: 4px 12px; text-align: right; }}
table.metrics th:first-child, table.metrics td:first-child {{ text-align: left; font-family: monospace; }}
table.metrics thead th {{ background: #f0f3f6; }}
td.up {{ color: {_rgb(HIT_RGB)}; }}
td.down {{ color: {_rgb(MISS_RGB)}; }}
table.record {{ border-collapse: collapse; margin: 8px 0 16px; }}
table.record th, table.record td {{ border: 1px solid #d0d7de; padding: 4px 12px; text-align: left;
  vertical-align: top; }}
table.record th {{ background: #f0f3f6; font-weight: 600; white-space: nowrap; }}
table.record code {{ font-size: 0.85em; word-break: break-all; }}
table.metrics td.label {{ text-align: left; font-family: monospace; }}
table.segments td {{ text-align: left; vertical-align: top; }}
table.segments code {{ font-size: 0.85em; word-break: break-all; }}
.legend span {{ display: inline-block; padding: 1px 8px; margin-right: 8px; color: #fff;
  border-radius: 3px; }}
.row {{ display: flex; align-items: flex-start; gap: 6px; margin: 0 0 10px; }}
.row .arrow {{ align-self: center; font-size: 1.4em; color: #888; }}
figure.thumb {{ margin: 0; width: 106px; text-align: center; }}
figure.thumb img {{ display: block; width: 106px; height: 106px; image-rendering: auto; }}
figcaption {{ font-size: 0.72em; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }}
figure.query figcaption {{ font-weight: 600; }}
.pair {{ border-left: 3px solid #d0d7de; padding-left: 8px; margin: 0 0 14px; }}
.pair-name {{ margin: 2px 0; font-size: 0.85em; font-weight: 600; color: #555; }}
"""


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def note(text: str) -> str:
    """A visible highlighted note (used wherever a part of the report had to be left out)."""
    return f'<p class="note">{escape(text)}</p>'


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole HTML document."""
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<h1>{escape(title)}</h1>\n<p class="meta">{escape(subtitle)}</p>\n{body}\n</body>\n</html>\n'
    )


def config_section(config_text: str | None) -> str:
    """The resolved configuration as YAML text in a collapsible block."""
    if config_text is None:
        return "<h2>Configuration</h2>\n" + note("config.yaml not found in the run folder.")
    return (
        "<h2>Configuration</h2>\n<details>\n<summary>resolved config.yaml</summary>\n"
        f"<pre>{escape(config_text)}</pre>\n</details>"
    )


def plots_section(png: bytes) -> str:
    """The training-curve figure."""
    return (
        "<h2>Training curves</h2>\n"
        f'<img class="plot" alt="loss, learning rate and evaluation metrics per epoch" src="{data_uri(png)}">'
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def percent(key: str, value: Any) -> str:
    """A metric as ``recallk train`` and ``recallk eval`` print it: fractions in percent with two decimals, the
    query counts (``COUNT_KEYS``) as integers, "—" when missing."""
    if not _is_number(value):
        return "—"
    if key in COUNT_KEYS or key.rpartition("/")[2] in COUNT_KEYS:
        return str(int(value))
    return "nan" if math.isnan(value) else f"{100.0 * float(value):.2f}"


def metrics_table(before: Record | None, after: Record | None, best: Record | None = None) -> str:
    """Table of every numeric metric in percent (counts as integers): before training (epoch 0), the best.pt epoch
    (``best``, when it is not the last one), the last evaluation, and the change from before to last in points."""
    shown = [r for r in (before, best, after) if r is not None]
    keys = sorted({k for r in shown for k, v in r.items() if k not in _NOT_METRICS and _is_number(v)},
                  key=_metric_key)
    columns = [("before (epoch 0)" if before is not None else "before (not logged)", before)]
    if best is not None and best is not after:
        columns.append((f"best.pt (epoch {best['epoch']})", best))
    columns.append((f"last epoch ({after['epoch']})" if after is not None else "last (not logged)", after))
    head = "".join(f"<th>{escape(name)}</th>" for name, _ in columns)
    lines = ['<table class="metrics">',
             f"<thead><tr><th>metric (%)</th>{head}<th>change (points)</th></tr></thead>", "<tbody>"]
    for key in keys:
        b = before.get(key) if before is not None else None
        a = after.get(key) if after is not None else None
        change, css = "", ""
        is_count = key in COUNT_KEYS or key.rpartition("/")[2] in COUNT_KEYS
        if _is_number(a) and _is_number(b) and not is_count and math.isfinite(a - b):
            change = f"{100.0 * (a - b):+.2f}"
            css = ' class="up"' if a > b else ' class="down"' if a < b else ""
        cells = "".join(f"<td>{percent(key, r.get(key) if r is not None else None)}</td>" for _, r in columns)
        lines.append(f"<tr><td>{escape(key)}</td>{cells}<td{css}>{change}</td></tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _metric_key(name: str) -> tuple[int, tuple[int, int, str]]:
    """Test metrics first (``metric_order``), then the validation ones (``val/...``) in the same order."""
    prefix, _, base = name.rpartition("/")
    return (1 if prefix else 0), metric_order(base)


def metrics_section(records: Sequence[Record], best_epoch: int | None = None, best_split: str | None = None) -> str:
    """The final metrics of each evaluated split (last eval line) next to the epoch-0 line and, for ``best_split``
    (the split whose lines hold best.pt's epoch ``best_epoch``), the line of that epoch."""
    parts = ["<h2>Final metrics</h2>"]
    splits = eval_splits(records)
    if not splits:
        return parts[0] + "\n" + note("metrics.jsonl holds no evaluation records.")
    for split in splits:
        rows = eval_records(records, split)
        before = next((r for r in rows if int(r["epoch"]) == 0), None)
        after = rows[-1] if rows[-1] is not before else None
        best = None
        if best_epoch is not None and split == best_split:
            best = next((r for r in reversed(rows) if int(r["epoch"]) == best_epoch), None)
        parts.append(f"<h3>split: {escape(split or '(unnamed)')}</h3>")
        if after is None:
            parts.append(note("only the evaluation before training was logged for this split."))
        parts.append(metrics_table(before, after, best))
    return "\n".join(parts)


def duration(seconds: float | None) -> str:
    """``1h02m03s`` / ``4m05s`` / ``6.2s``; "not recorded" for None."""
    if seconds is None:
        return "not recorded"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    h, m, s = whole // 3600, whole // 60 % 60, whole % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def key_value_table(rows: Sequence[tuple[str, str]], css: str = "record") -> str:
    """A two-column table of (label, HTML) rows; labels are escaped, values are inserted as given."""
    body = "\n".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{css}">\n<tbody>\n{body}\n</tbody></table>'


def _thumb(png: bytes, caption: tuple[str, str], title: str, css: str) -> str:
    lines = "<br>".join(escape(line) for line in caption)
    return (
        f'<figure class="thumb {css}"><img alt="{escape(title)}" src="{data_uri(png)}">'
        f'<figcaption title="{escape(title)}">{lines}</figcaption></figure>'
    )


def example_rows(
    examples: Sequence[Example],
    thumbnail: Callable[[int, tuple[int, int, int]], bytes],
    label_name: Callable[[int], str],
) -> str:
    """One flex row per example: the query (blue frame), then its neighbours framed green (hit) or red (miss).

    ``thumbnail(index, rgb)`` gives the framed PNG of a dataset item; ``label_name(index)`` its class name.
    """
    rows = []
    for ex in examples:
        q_name = label_name(ex.query)
        cells = [
            _thumb(
                thumbnail(ex.query, QUERY_RGB),
                ("query", q_name),
                f"query #{ex.query}, class {q_name}",
                "query",
            )
        ]
        cells.append('<span class="arrow">→</span>')
        for rank, (j, score, hit) in enumerate(zip(ex.neighbours, ex.scores, ex.hits), start=1):
            name = label_name(j)
            mark = "✓" if hit else "✗"
            cells.append(
                _thumb(
                    thumbnail(j, HIT_RGB if hit else MISS_RGB),
                    (f"{mark} {score:.3f}", name),
                    f"rank {rank}: #{j}, class {name}, similarity {score:.4f}",
                    "hit" if hit else "miss",
                )
            )
        rows.append(f'<div class="row" data-query="{ex.query}">' + "".join(cells) + "</div>")
    return "\n".join(rows)


def examples_section(body: str, split: str, top: int) -> str:
    """Heading and legend around the example rows (or heading and the note explaining why there are none)."""
    heading = f"<h2>Retrieval examples ({escape(split)} split, top {top}, leave-one-out)</h2>"
    if 'class="row"' not in body:
        return f"{heading}\n{body}"
    legend = (
        f'<p class="legend"><span style="background:{_rgb(QUERY_RGB)}">query</span>'
        f'<span style="background:{_rgb(HIT_RGB)}">✓ same class</span>'
        f'<span style="background:{_rgb(MISS_RGB)}">✗ other class</span> '
        "caption: inner-product similarity and class</p>"
    )
    return f"{heading}\n{legend}\n{body}"


def comparison_table(columns: dict[str, Record], gain: str | None) -> str:
    """The lead table: one column per evaluated embedding (``columns``: name -> metrics, in reading order, as
    :func:`recallk.report.comparison.comparison_columns` builds them), recall@k, MAP@R and R-precision in percent;
    the column named ``gain`` holds differences, shown in points with a sign (as in the table ``recallk train``
    prints)."""
    keys = sorted({k for m in columns.values() for k, v in m.items() if k.startswith(SUMMARY_METRICS)
                   and _is_number(v)}, key=metric_order)
    head = "".join(f"<th>{escape(n)}</th>" for n in columns)
    lines = ['<table class="metrics">', f"<thead><tr><th>metric (%)</th>{head}</tr></thead>", "<tbody>"]
    for key in keys:
        cells = ""
        for name, metrics in columns.items():
            value = metrics.get(key)
            if name != gain:
                cells += f"<td>{100 * value:.2f}</td>" if _is_number(value) else "<td>—</td>"
            elif _is_number(value) and math.isfinite(value):
                css = ' class="up"' if value > 0 else ' class="down"' if value < 0 else ""
                cells += f"<td{css}>{100 * value:+.2f}</td>"
            else:
                cells += "<td>—</td>"
        lines.append(f'<tr class="lead"><td>{escape(key)}</td>{cells}</tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def paired_rows(
    pairs: Sequence[tuple[Example, Example]],
    names: tuple[str, str],
    thumbnail: Callable[[int, tuple[int, int, int]], bytes],
    label_name: Callable[[int], str],
) -> str:
    """Each query twice: its neighbours under the first embedding (``names[0]``), then under the second."""
    blocks = []
    for first, second in pairs:
        rows = [f'<p class="pair-name">{escape(name)}</p>\n{example_rows([ex], thumbnail, label_name)}'
                for name, ex in zip(names, (first, second))]
        blocks.append('<div class="pair">\n' + "\n".join(rows) + "\n</div>")
    return "\n".join(blocks)


def _code(text: str) -> str:
    return f"<code>{escape(text)}</code>"


def best_text(best: BestChoice | None, checkpoint_exists: bool) -> str:
    """HTML of which epoch best.pt is, by which metric, value (percent) and split, and where that was read."""
    if best is None:
        return "no evaluation logged: no best.pt"
    value = f" = {percent(best.metric, best.value)}" if best.value is not None else ""
    step = f", step {best.step}" if best.step is not None else ""
    text = (f"epoch {best.epoch}{step}, chosen by {_code(best.metric)}{escape(value)} on the "
            f"<b>{escape(best.split)}</b> split <small>(from {escape(best.source)})</small>")
    if best.split == "test":
        text += ("<br><small>selected with test-set feedback (Musgrave et al., ECCV 2020): its test numbers are "
                 "optimistic; a validation split (data.val_classes) chooses best.pt without it</small>")
    if not checkpoint_exists:
        text += "<br><small>checkpoints/best.pt is not in the run folder</small>"
    return text


def environment_rows(env: dict[str, Any], log_device: str | None = None) -> list[tuple[str, str]]:
    """(label, HTML) rows of a ``run.json`` segment: device, versions, git commit, command line, host. Without one
    (an older run) each says "not recorded", except the device when ``log_device`` (from train.log) is given."""
    if not env:
        rows = [(label, NOT_RECORDED) for label in ("device", "versions", "git commit", "command line", "host")]
        if log_device:
            rows[0] = ("device", f"{escape(log_device)} <small>(from train.log)</small>")
        return rows
    device = str(env.get("device") or NOT_RECORDED)
    if env.get("device_name"):
        device += f" ({env['device_name']})"
    device += f", {env.get('world_size', 1)} process(es)"
    versions = env.get("versions") or {}
    version_text = ", ".join(f"{name} {versions[name] or 'not installed'}" for name in versions) or NOT_RECORDED
    commit = env.get("git_commit")
    if commit:
        commit_html = _code(commit) + (" <b>with uncommitted changes</b>" if env.get("git_dirty") else "")
    else:
        commit_html = escape(f"none: {env.get('cwd') or 'the working directory'} is not a git checkout")
    source = env.get("recallk_git_commit")
    if source and source != commit:
        commit_html += (f"<br>recallk's own checkout: {_code(source)}"
                        + (" <b>with uncommitted changes</b>" if env.get("recallk_git_dirty") else ""))
    return [
        ("device", escape(device)),
        ("versions", escape(version_text)),
        ("git commit", commit_html),
        ("command line", _code(env["command"]) if env.get("command") else NOT_RECORDED),
        ("host", escape(f"{env.get('host') or NOT_RECORDED} · {env.get('platform') or ''}".rstrip(" ·"))),
    ]


def segments_table(run: RunRecord) -> str:
    """One row per training segment (start, then each resume): when, from where, how long, how it ended, the
    command."""
    lines = ['<table class="metrics segments">',
             "<thead><tr><th>segment</th><th>started</th><th>continued from</th><th>wall time</th><th>outcome</th>"
             "<th>command line</th></tr></thead>", "<tbody>"]
    for i, seg in enumerate(run.segments, start=1):
        kind = "resume" if seg.resume else "start"
        started = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seg.start)) if seg.start is not None
                   else NOT_RECORDED)
        origin = f"epoch {seg.from_epoch}, step {seg.from_step}" if seg.resume else "—"
        command = _code(seg.command) if seg.command else NOT_RECORDED
        ended = seg.outcome or NOT_RECORDED
        if seg.outcome is None and run.run_file is not None and i == len(run.segments):
            ended = "running when this report was written"  # the report written at the end of training
        lines.append(f"<tr><td>{i} ({kind})</td><td>{escape(started)}</td><td>{escape(origin)}</td>"
                     f"<td>{escape(duration(seg.wall_s))}</td><td>{escape(ended)}</td>"
                     f"<td>{command}</td></tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def record_section(run: RunRecord) -> str:
    """The research record: best.pt, wall time, images/s, device, versions, git commit, command line, segments."""
    resumes = sum(seg.resume for seg in run.segments)
    wall = duration(run.wall_s)
    if run.wall_s is not None:
        wall += f" over {len(run.segments)} segment(s)" if len(run.segments) > 1 else ""
    speed = f"{run.images_per_s:.1f} images/s" if run.images_per_s is not None else "not logged"
    rows = [("best.pt", best_text(run.best, RunFolder(run.path).best_pt.is_file())),
            ("wall time", f"{escape(wall)} <small>(from {escape(run.wall_source)})</small>"),
            ("training speed", f"{escape(speed)} <small>(mean over the logged training steps)</small>"),
            *environment_rows(run.environment, run.log_device),
            ("resumed", f"{resumes} time(s)" if resumes else "no")]
    parts = ["<h2>Run record</h2>", key_value_table(rows)]
    if run.run_file is None:
        parts.append(note("run.json not found: it is written by `recallk train` (runs of the Python Trainer and "
                          "older runs have none): versions, git commit and command line are not recorded."))
    if len(run.segments) > 1 or resumes:
        parts.append("<h3>Segments <small>(resumes are the dashed lines on the curves)</small></h3>")
        parts.append(segments_table(run))
    return "\n".join(parts)
