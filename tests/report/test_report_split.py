"""`recallk report RUN --split S --num-queries N --top K`: the retrieval examples of another split's embeddings;
a split without an embeddings file is named in the warning with the CLI flag that chooses another."""

from __future__ import annotations

import re

import numpy as np

from recallk.cli.main import main
from recallk.data import build_dataset
from tests.helpers.report_runs import OMITTED, make_project, write_split


def add_train_split(proj, run) -> None:
    """``train/<class>/<i>.png`` beside the test split, and ``embeddings/train.npz`` of it."""
    write_split(proj / "data" / "photos" / "train", 4)
    labels = np.asarray(build_dataset("folder", proj / "data" / "photos", "train", transform=None).labels)
    emb = np.eye(8)[labels] + 0.1 * np.random.default_rng(1).normal(size=(labels.size, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.savez(run / "embeddings" / "train.npz", embeddings=emb.astype(np.float32), labels=labels)


def shown_queries(page: str) -> int:
    return len(re.findall(r'<div class="row" data-query=', page))


def test_split_chooses_the_embeddings_and_counts_are_passed(tmp_path, monkeypatch, capsys):
    proj, run = make_project(tmp_path)
    add_train_split(proj, run)
    monkeypatch.chdir(proj)
    assert main(["report", str(run)]) == 0
    default_page = (run / "report.html").read_text(encoding="utf-8")
    assert "Retrieval examples (test split, top 8" in default_page and OMITTED not in default_page

    assert main(["report", str(run), "--split", "train", "--top", "3", "--num-queries", "4"]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Retrieval examples (train split, top 3" in page and OMITTED not in page
    assert shown_queries(page) == 4 and shown_queries(default_page) > 4
    assert "recallk report: warning" not in capsys.readouterr().err


def test_split_without_embeddings_names_the_flag(tmp_path, monkeypatch, capsys):
    proj, run = make_project(tmp_path)
    monkeypatch.chdir(proj)
    assert main(["report", str(run), "--split", "val"]) == 0  # the page is still written, without examples
    err = capsys.readouterr().err
    assert "embeddings/val.npz does not exist (found: test.npz" in err and "--split" in err


def test_split_is_refused_for_a_comparison(tmp_path, capsys):
    _, run = make_project(tmp_path)
    assert main(["report", str(run), str(run), "--split", "test"]) == 2
    assert "--split applies to one run folder" in capsys.readouterr().err
