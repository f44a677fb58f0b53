"""`recallk report RUN --root DIR` (issue 19): a run whose config.yaml has a relative data.root, reported from another
directory, gets its retrieval examples from --root (or from the directory the run was started in, run.json's cwd);
when they are left out the page says how to fix it in CLI words and stderr has a warning, and the exit code is 0."""

from __future__ import annotations

import warnings

import pytest

from recallk import provenance
from recallk.cli.main import main
from recallk.report import ReportWarning, write_report
from tests.helpers.report_runs import OMITTED, make_project


def test_relative_root_elsewhere_warns_and_says_pass_root(tmp_path, monkeypatch, capsys):
    proj, run = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)  # not the directory the run's relative data.root is relative to
    assert main(["report", str(run)]) == 0  # the report is still written
    captured = capsys.readouterr()
    assert "wrote" in captured.out
    assert "recallk report: warning:" in captured.err and "--root" in captured.err
    page = (run / "report.html").read_text(encoding="utf-8")
    assert OMITTED in page
    assert f"recallk report {run} --root DIR" in page and "dataset=" not in page  # CLI words, not Python's

    # --root: the examples are there, and nothing is warned
    assert main(["report", str(run), "--root", str(proj / "data" / "photos")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    page = (run / "report.html").read_text(encoding="utf-8")
    assert OMITTED not in page and "class3" in page  # the class names come from the built folder dataset

    # relative --root is taken from the current directory
    monkeypatch.chdir(proj / "data")
    assert main(["report", str(run), "--root", "photos"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_relative_root_is_taken_from_the_directory_the_run_started_in(tmp_path, monkeypatch, capsys):
    proj, run = make_project(tmp_path)
    monkeypatch.chdir(proj)
    provenance.start_segment(run, resume=False, device="cpu")  # run.json records cwd = proj
    provenance.end_segment(run, "finished")
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert OMITTED not in (run / "report.html").read_text(encoding="utf-8")


def test_write_report_warns_once_per_cause_and_root_argument(tmp_path, monkeypatch):
    proj, run = make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(run)
    messages = [str(w.message) for w in caught if issubclass(w.category, ReportWarning)]
    assert len(messages) == 1 and "could not build the 'test' dataset" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportWarning)
        page = write_report(run, root=proj / "data" / "photos").read_text(encoding="utf-8")
    assert OMITTED not in page
    (run / "embeddings" / "test.npz").unlink()
    with pytest.warns(ReportWarning, match=r"embeddings/test\.npz does not exist"):
        write_report(run, root=proj / "data" / "photos")


def test_root_with_several_runs_is_a_one_line_error(tmp_path, capsys):
    _, run = make_project(tmp_path)
    assert main(["report", str(run), str(tmp_path), "--root", str(tmp_path)]) == 2
    assert "--root applies to one run folder" in capsys.readouterr().err
