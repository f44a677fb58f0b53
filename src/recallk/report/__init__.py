"""Self-contained HTML report of a run folder: the research record (best.pt, wall time, images/s, device,
versions, git commit, command line, resumes), config, training curves, final metrics, retrieval examples.

``write_report(run_dir)`` reads the run folder described in docs/run-folder.md and writes ``report.html``
(images as base64 PNG data URIs, inline CSS, no script, nothing fetched from the network);
``write_comparison(run_dirs, out_path)`` puts several runs side by side in one such page.
"""

from __future__ import annotations

import os
import shlex
import time
import warnings
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from recallk.run_folder import RunFolder, read_embeddings_npz, read_metrics, write_atomic

from . import examples as _examples
from . import html
from .compare import write_comparison
from .comparison import comparison_columns
from .examples import (
    Example,
    answerable,
    changed_examples,
    class_name,
    compare_first_neighbours,
    select_queries,
    thumbnail_png,
)
from .plots import figure_png, history_figure, plot_history
from .record import RunRecord, read_run, resume_marks, unfinished_notice

__all__ = ["ReportWarning", "RunRecord", "plot_history", "read_metrics", "read_run", "write_comparison",
           "write_report"]

THUMB_SIZE = 96
BASELINE_NAME = "raw pixels"
#: the column of the pretrained network's own embedding (no head, no training), as ``recallk train`` names it
ZERO_SHOT_NAME = "pretrained, zero-shot"


class ReportWarning(UserWarning):
    """Part of the report was left out (e.g. the retrieval examples: no embeddings file, or the dataset could not
    be built); the page says why in a visible note and the rest of it is written. ``recallk report`` prints it on
    stderr."""


def write_report(
    run_dir: str | Path,
    dataset: Any = None,
    out_path: str | Path | None = None,
    num_queries: int = 16,
    top: int = 8,
    *,
    split: str | None = None,
    seed: int = 0,
    root: str | Path | None = None,
) -> Path:
    """Write ``report.html`` for the run folder ``run_dir`` and return its path.

    Args:
        run_dir: run folder with ``metrics.jsonl``, usually ``config.yaml``, ``run.json``, ``best.json`` and
            ``embeddings/<split>.npz``.
        dataset: the evaluated split, items ``(image, label)`` with PIL images (``transform=None``), row i of
            the embeddings file being item i. None builds it from ``config.yaml``'s ``data`` section with
            ``recallk.data.build_dataset``; if that fails the report says why and leaves the examples out.
        root: the data root to build that dataset from (``recallk report --root``), instead of the config's
            ``data.root``; ignored when ``dataset`` is given. Default: ``data.root``, a relative one resolved
            against the directory the run was started in (``run.json``'s ``cwd``) when it exists there, else
            against the current directory.
        out_path: where to write; default ``run_dir / "report.html"``.
        num_queries: example queries shown; half are the hardest failures, half random (seeded by ``seed``).
        top: neighbours shown per query (exact inner-product kNN, leave-one-out).
        split: the split whose embeddings are shown; default ``data.test_split`` of the config, else "test".

    Warns:
        ReportWarning: once per cause, when examples are left out (no embeddings file, or the dataset could not
            be built or does not match the embeddings); the page then holds a note saying why.

    A run whose last segment stopped (``run.json``: ``stopped by SIGTERM``, ``interrupted (Ctrl-C)``, ``error:
    ...``) and was not resumed gets a note first saying so, where ``last.pt`` stands and how to continue
    (:func:`record.unfinished_notice`). The report then opens with the run's record (:func:`read_run`: which epoch
    best.pt is and which split chose it, wall time, images/s, device, versions, git commit, command line, resumed
    segments), then the comparison a reader asks for first: the trained model (last evaluation, and best.pt's epoch
    when it differs) against raw pixels (when ``embeddings/raw_pixels/<split>.npz`` exists, as ``recallk train``
    writes it with ``eval.pixel_baseline``) and against the model before training (epoch 0), in percent, then the
    queries whose first neighbour raw pixels got wrong and the model right, and the reverse (each shown with both
    neighbour lists). docs/report.md lists every section.

    Raises:
        ValueError: run_dir is not a run folder (no metrics.jsonl), a malformed metrics.jsonl, run.json,
            best.json or resumes.jsonl, config.yaml is not a YAML mapping,
            an embeddings file lacks ``embeddings``/``labels``, the raw-pixel file does not match the model's
            embeddings (rows or labels), or a given ``dataset`` does not match them (length or labels).
    """
    if num_queries < 1 or top < 1:
        raise ValueError(f"num_queries and top must be >= 1, got {num_queries} and {top}")
    record = read_run(run_dir, split=split)
    run, records, split = record.path, record.records, record.split

    epochs = [int(r["epoch"]) for r in records]
    subtitle = (
        f"run folder {run.resolve()} · {max(epochs, default=0)} epoch(s) logged · "
        f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    best_epoch = record.best.epoch if record.best is not None else None
    source = _DatasetSource(record, dataset, root)
    notice = unfinished_notice(record)
    sections = [
        *([html.note(notice)] if notice else []),  # first: a stopped run must not look finished
        html.record_section(record),
        _comparison_section(record, source, num_queries, top, seed),
        html.config_section(record.config_text),
        html.plots_section(figure_png(history_figure(records, resume_marks(record), best_epoch))),
        html.metrics_section(records, best_epoch, split),
        html.examples_section(_examples_body(run, split, source, num_queries, top, seed), split, top),
    ]
    document = html.page(f"recallk run: {record.name}", subtitle, sections)
    return write_atomic(out_path if out_path is not None else RunFolder(run).report_html, document)


def data_root(record: RunRecord, root: str | Path | None = None) -> str | None:
    """The data root the report builds the evaluated split from: ``root`` when given (``recallk report --root``),
    else the config's ``data.root``; a relative ``data.root`` is taken from the directory the run was started in
    (``run.json``'s ``cwd``) when it exists there, else left relative to the current directory. None when neither
    is set (a dataset with a default location, e.g. kanji)."""
    if root is not None:
        return str(root)
    data = record.config.get("data") or {}
    configured = data.get("root")
    if configured is None or os.path.isabs(str(configured)):
        return None if configured is None else str(configured)
    started_in = record.environment.get("cwd")
    if isinstance(started_in, str) and os.path.exists(os.path.join(started_in, str(configured))):
        return os.path.join(started_in, str(configured))
    return str(configured)


def _missing_embeddings_hint(run: Path, split: str, record: RunRecord) -> str:
    """Where ``embeddings/<split>.npz`` comes from: ``recallk train``'s final evaluation writes it; a run of the
    Python ``Trainer`` (which writes none) gets it from ``recallk.retrieval.write_embeddings``, or from
    ``recallk embed`` when its config names a dataset."""
    dataset = (record.config.get("data") or {}).get("dataset")
    hint = "`recallk train` writes it at its final evaluation; for a run of the Python Trainer, write it with "
    if not dataset:
        return hint + "recallk.retrieval.write_embeddings (the split's items in dataset order)"
    folder = RunFolder(run)
    checkpoint = next((p for p in (folder.best_pt, folder.last_pt) if p.is_file()),
                      folder.best_pt)  # a run without an evaluation has no best.pt
    command = shlex.join(["recallk", "embed", "--checkpoint", str(checkpoint), "--dataset",
                          str(dataset), "--split", split, "--out", str(folder.embeddings(split))])
    if not (record.config.get("data") or {}).get("root"):
        command += " --root DIR"  # the run records no data folder: the user names it
    return hint + f"`{command}` or recallk.retrieval.write_embeddings"


class _DatasetSource:
    """The evaluated split for the examples, built at most once: the ``dataset`` given, else from config.yaml's
    ``data`` section (and ``root``). ``get`` returns ``(dataset, None)`` or ``(None, why it could not be built)``;
    a given dataset that does not match the embeddings raises ValueError (a caller's mistake)."""

    def __init__(self, record: RunRecord, dataset: Any, root: str | Path | None) -> None:
        self.record, self.dataset, self.root = record, dataset, root
        self.given = dataset is not None
        self.failure: str | None = None
        self.checked: set[Path] = set()

    def get(self, labels: np.ndarray, emb_path: Path) -> tuple[Any, str | None]:
        if self.given:
            if emb_path not in self.checked:
                _check_dataset(self.dataset, labels, emb_path)
                self.checked.add(emb_path)
            return self.dataset, None
        if self.dataset is None and self.failure is None:
            try:
                dataset = self._build()
                _check_dataset(dataset, labels, emb_path)
                self.dataset = dataset
            except Exception as e:  # shown in the report: the rest of it is still worth writing
                self.failure = self._explain(e)
                warnings.warn(f"{self.failure}; the examples are left out of the report", ReportWarning,
                              stacklevel=4)  # get <- section <- write_report <- its caller
        return self.dataset, self.failure

    def _build(self) -> Any:
        data = self.record.config.get("data") or {}
        if not data.get("dataset"):
            raise ValueError("config.yaml has no data.dataset")
        from recallk.data import build_dataset, dataset_spec  # here: report must not need data at import time

        options = {**(data.get("options") or {}), **(data.get("test_options") or {})}
        if "progress" in dataset_spec(data["dataset"]).options:
            options["progress"] = False  # the report shows no progress bars
        return build_dataset(data["dataset"], data_root(self.record, self.root), self.record.split, transform=None,
                             **options)

    def _explain(self, error: Exception) -> str:
        data = self.record.config.get("data") or {}
        where = data_root(self.record, self.root)
        given = "--root" if self.root is not None else "data.root"
        root_text = f", {given} {where!r}" if where is not None else ""
        return (f"could not build the {self.record.split!r} dataset (data.dataset {data.get('dataset')!r}"
                f"{root_text}: {type(error).__name__}: {error}). If the data is elsewhere, give its folder with "
                f"`recallk report {self.record.path} --root DIR`")


def _examples_body(run: Path, split: str, source: _DatasetSource, num_queries: int, top: int, seed: int) -> str:
    emb_path = RunFolder(run).embeddings(split)
    if not emb_path.is_file():
        others = sorted(p.name for p in emb_path.parent.glob("*.npz")) if emb_path.parent.is_dir() else []
        found = f" (found: {', '.join(others)}; choose one with split= or `recallk report --split`)" if others else ""
        why = f"{emb_path.relative_to(run)} does not exist{found}"
        why = f"{why}. {_missing_embeddings_hint(run, split, source.record)}"
        warnings.warn(f"retrieval examples left out of the report: {why}", ReportWarning, stacklevel=3)
        return html.note(f"Retrieval examples omitted: {why}.")
    embeddings, labels = read_embeddings_npz(emb_path)
    if embeddings.shape[0] < 2:
        warnings.warn(f"retrieval examples left out of the report: {emb_path} holds fewer than 2 items",
                      ReportWarning, stacklevel=3)
        return html.note(f"Retrieval examples omitted: {emb_path.name} holds fewer than 2 items.")

    dataset, failure = source.get(labels, emb_path)
    if failure is not None:
        return html.note(f"Retrieval examples omitted: {failure}.")

    examples = select_queries(embeddings, labels, num_queries, top, seed=seed)
    thumbnail, label_name = _thumbnailer(dataset, labels)
    n_answerable = answerable(labels).size
    parts = []
    for kind, heading, explanation in (
        ("random", "Random queries", f"drawn with seed {seed}"),
        (
            "hard",
            "Hardest failures",
            "queries whose first neighbour is of another class, most confident first",
        ),
    ):
        chosen: list[Example] = [e for e in examples if e.kind == kind]
        parts.append(f"<h3>{heading} <small>({escape(explanation)})</small></h3>")
        if kind == "hard" and n_answerable > _examples.MAX_CANDIDATE_QUERIES:
            parts.append(
                html.note(
                    f"Searched among a random sample (seed {seed}) of {_examples.MAX_CANDIDATE_QUERIES} of the "
                    f"{n_answerable} answerable queries, to keep the report fast."
                )
            )
        if chosen:
            parts.append(html.example_rows(chosen, thumbnail, label_name))
        else:
            parts.append(html.note(_none_shown(kind, num_queries)))
    return "\n".join(parts)


def _none_shown(kind: str, num_queries: int) -> str:
    if kind == "hard" and num_queries // 2 > 0:
        return "None: every query's first neighbour is of its own class."
    if kind == "hard":
        return "None requested (num_queries < 2)."
    return "None: no other query left to draw."


def _check_dataset(dataset: Any, labels: np.ndarray, emb_path: Path) -> None:
    if len(dataset) != labels.shape[0]:
        raise ValueError(
            f"dataset has {len(dataset)} items but {emb_path} has {labels.shape[0]} rows; "
            "pass the split that was evaluated, in the same order"
        )
    ds_labels = getattr(dataset, "labels", None)
    if ds_labels is not None and not np.array_equal(np.asarray(ds_labels).reshape(-1), labels):
        raise ValueError(f"dataset.labels differ from the labels in {emb_path}; pass the evaluated split, in order")


def _comparison_section(record: RunRecord, source: _DatasetSource, num_queries: int, top: int, seed: int) -> str:
    """Trained (last epoch, and best.pt's epoch when it differs) vs raw pixels vs the pretrained network as it is
    (zero-shot, a run from pretrained weights) vs untrained (table, percent), then what changed against raw pixels
    (counts, examples)."""
    run, split = record.path, record.split
    versus = " vs the pretrained network (zero-shot)" if record.zero_shot is not None else ""
    heading = f"<h2>Trained model vs raw pixels{versus} vs untrained ({escape(split)} split)</h2>"
    after, before = record.last_eval, record.before_eval
    if after is None:
        return heading + "\n" + html.note(f"metrics.jsonl holds no evaluation of the {split!r} split.")
    best = record.best_eval if record.best is not None else None
    names = {"last": f"trained (epoch {after['epoch']})", "baseline": BASELINE_NAME, "before": "untrained (epoch 0)",
             "zero_shot": ZERO_SHOT_NAME,
             "best": f"best.pt (epoch {best['epoch']}, chosen on {record.best.split})" if best is not None else ""}
    names["gain"] = f"{names['last']} − {BASELINE_NAME} (points)"
    folder = RunFolder(run)
    emb_path, pix_path = folder.embeddings(split), folder.raw_pixels(split)
    pixels = None
    if record.baseline is not None and emb_path.is_file():
        model_emb, labels = read_embeddings_npz(emb_path)
        pixels, pix_labels = read_embeddings_npz(pix_path)
        if pixels.shape[0] != labels.shape[0] or not np.array_equal(pix_labels, labels):
            raise ValueError(f"{pix_path} does not match {emb_path} (rows or labels): both must embed the "
                             f"{split!r} split in dataset order")
    columns = comparison_columns(names, after, best=best, baseline=record.baseline if pixels is not None else None,
                                 before=before if before is not after else None, zero_shot=record.zero_shot)
    parts = [heading, html.comparison_table(columns, names["gain"])]
    if pixels is None:
        parts.append(html.note(f"No raw-pixel baseline: {pix_path.relative_to(run)} does not exist (recallk train "
                               "writes it with eval.pixel_baseline: true)."))
        return "\n".join(parts)

    comparison = compare_first_neighbours(model_emb, pixels, labels, seed=seed)
    c = comparison.counts()
    sample = " (a random sample of the answerable queries)" if comparison.sampled else ""
    parts.append(
        f"<p>First neighbour (leave-one-out) of {c['queries']} queries{escape(sample)}: right for both in "
        f"{c['both right']}, <b>raw pixels wrong and the model right in {c['fixed']}</b>, raw pixels right and the "
        f"model wrong in {c['broken']}, wrong for both in {c['both wrong']}.</p>")
    dataset, failure = source.get(labels, emb_path)
    if failure is not None:
        parts.append(html.note(f"Examples omitted: {failure}."))
        return "\n".join(parts)
    thumbnail, label_name = _thumbnailer(dataset, labels)
    per_group = max(1, num_queries // 4)
    for queries, title in ((comparison.fixed, "Raw pixels wrong, the model right"),
                           (comparison.broken, "Raw pixels right, the model wrong")):
        parts.append(f"<h3>{title} <small>({min(per_group, queries.size)} of {queries.size}, drawn with seed "
                     f"{seed}; top {top} under each)</small></h3>")
        pairs = changed_examples(model_emb, pixels, labels, queries, per_group, top, seed=seed)
        parts.append(html.paired_rows(pairs, ("model", BASELINE_NAME), thumbnail, label_name) if pairs
                     else html.note("None."))
    return "\n".join(parts)


def _thumbnailer(dataset: Any, labels: np.ndarray) -> tuple[Any, Any]:
    """``thumbnail(index, rgb) -> PNG`` (cached) and ``label_name(index) -> class name`` for ``dataset``."""
    classes = getattr(dataset, "classes", None)
    cache: dict[tuple[int, tuple[int, int, int]], bytes] = {}

    def thumbnail(index: int, rgb: tuple[int, int, int]) -> bytes:
        if (index, rgb) not in cache:
            cache[(index, rgb)] = thumbnail_png(dataset[index][0], THUMB_SIZE, rgb)
        return cache[(index, rgb)]

    def label_name(index: int) -> str:
        return class_name(int(labels[index]), classes)

    return thumbnail, label_name
