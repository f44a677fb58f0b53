"""The loss benchmark (``bench.py loss``) runs and reports at tiny sizes (its naive baseline,
``recallk.testing.rsk.naive_rsk_loss``, is checked in tests/kernels/test_torch_rsk.py)."""

from __future__ import annotations

import json

import pytest

from recallk_bench.loss import METHODS, default_methods, format_table, main, run_loss_benchmark


def test_benchmark_rows_and_naive_skip():
    rows = run_loss_benchmark([16], 4, 8, "cpu", simix_sizes=[40], repeats=1, naive_max_gib=1e-6,
                              methods=["naive", "torch"])
    assert [r["case"] for r in rows] == ["rsk", "rsk", "rsk+simix", "rsk+simix"]
    ours = [r for r in rows if r["method"].startswith("ours")]
    assert [(r["B"], r["real_B"], r["positives"]) for r in ours] == [(16, 16, 3), (40, 16, 9)]
    assert all(r["loss_ms"] > 0 and r["e2e_ms"] > 0 for r in ours)
    skipped = [r for r in rows if r["method"].startswith("naive")]
    assert all(r["loss_ms"] is None and "skipped" in r["note"] for r in skipped)


def test_main_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--sizes", "12", "--dim", "8", "--repeats", "1", "--json", str(out), "--methods", "naive", "torch"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "naive (B x P x B)" in text and "ours (torch blocked)" in text and "x /" in text
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and rows[0]["B"] == 12


def test_every_method_runs_and_recompute_rows_have_no_matrix_timing():
    # The Triton methods run here through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
    methods = ["naive", "torch", "torch-recompute", "triton", "triton-recompute"]
    rows = run_loss_benchmark([12], 4, 8, "cpu", repeats=1, methods=methods)
    assert [r["method"] for r in rows] == [METHODS[m] for m in methods]
    for r in rows:
        assert r["e2e_ms"] > 0
        assert (r["loss_ms"] is None) == r["method"].endswith("recompute)")
    table = format_table(rows)
    assert "ours (triton, recompute) | - | - |" in table


def test_default_methods_and_unknown_method():
    assert default_methods("cpu") == ["naive", "torch", "torch-recompute"]
    with pytest.raises(ValueError, match="unknown method"):
        run_loss_benchmark([12], 4, 8, "cpu", methods=["torch", "flash"])
