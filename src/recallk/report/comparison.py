"""The one builder of the trained-vs-raw-pixels table: the final table ``recallk train`` prints (text), the first
section of ``report.html`` and each run's rows of the comparison of several runs (HTML) are the same columns,
named by each reader.

Columns, in reading order: the trained model's last evaluation, the evaluation that chose ``checkpoints/best.pt``
(when it is another one), raw pixels and the gain of the last evaluation over them in points (when the raw-pixel
baseline exists), the pretrained network as it is (its own embedding, no head, no training: a run from pretrained
weights), the evaluation before training. Each holds the summary metrics only
(:data:`recallk.run_folder.SUMMARY_METRICS`: recall@k, map@r, r_precision).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recallk.run_folder import SUMMARY_METRICS

__all__ = ["comparison_columns", "gain_over"]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def gain_over(model: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float]:
    """``model - baseline`` for each metric both hold as a number (a fraction, as in metrics.jsonl; nan kept)."""
    return {k: model[k] - v for k, v in baseline.items() if k in model and _is_number(v) and _is_number(model[k])}


def comparison_columns(
    names: Mapping[str, str],
    last: Mapping[str, Any] | None,
    best: Mapping[str, Any] | None = None,
    baseline: Mapping[str, Any] | None = None,
    before: Mapping[str, Any] | None = None,
    zero_shot: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The columns of the comparison table, ``{column name: summary metrics}`` in reading order.

    Args:
        names: the column names the reader shows, by role: ``"last"``, ``"best"``, ``"baseline"``, ``"gain"``,
            ``"zero_shot"``, ``"before"`` (only the roles of the columns given are needed; without ``"gain"`` no
            gain column).
        last: the last evaluation's metrics (an eval line of metrics.jsonl); None when nothing was evaluated.
        best: the evaluation of best.pt's epoch; left out when None or the very record ``last`` is.
        baseline: the raw-pixel metrics; with ``last`` it also adds the gain column (:func:`gain_over`).
        zero_shot: the metrics of the pretrained network's own embedding (no head, no training; the file
            ``embeddings/zero_shot/<split>.npz`` of a run from pretrained weights), the floor a fine-tuned model is
            compared with; None leaves it out (a run from random weights).
        before: the evaluation before training (the network with the run's untrained head: on a pretrained
            backbone a random projection of its features); None leaves it out.
    """
    columns: dict[str, Mapping[str, Any]] = {}
    if last is not None:
        columns[names["last"]] = last
    if best is not None and best is not last:
        columns[names["best"]] = best
    if baseline is not None:
        columns[names["baseline"]] = baseline
        if last is not None and "gain" in names:
            columns[names["gain"]] = gain_over(last, baseline)
    if zero_shot is not None:
        columns[names["zero_shot"]] = zero_shot
    if before is not None:
        columns[names["before"]] = before
    return {name: {k: v for k, v in m.items() if k.startswith(SUMMARY_METRICS)} for name, m in columns.items()}
