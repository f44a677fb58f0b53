"""The report of a run made with the Python ``Trainer`` (no CLI, issue 19): it has no run.json and no embeddings,
and the report says so in words true for such a run; following its hint (``recallk embed``) gives the examples."""

from __future__ import annotations

import re
import shlex
from html import unescape

import pytest

from recallk.cli.main import main
from recallk.report import ReportWarning, write_report
from tests.helpers.trainer_runs import trainer_api_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """(run folder, data folder) of a Trainer API run: build_model + build_dataset + RS@k + Trainer."""
    _, run, data = trainer_api_run(tmp_path_factory.mktemp("trainer-report"))
    return run, data


def notes(text: str) -> list[str]:
    return [unescape(n) for n in re.findall(r'<p class="note">(.*?)</p>', text, flags=re.S)]


def test_report_of_a_trainer_run_says_what_writes_run_json_and_embeddings(api_run, tmp_path, capsys):
    run, data = api_run
    assert not (run / "run.json").exists() and not (run / "embeddings").exists()  # what the notes explain
    with pytest.warns(ReportWarning, match="retrieval examples left out"):
        text = write_report(run, out_path=tmp_path / "report.html", split="all").read_text(encoding="utf-8")
    found = notes(text)
    assert ("run.json not found: it is written by `recallk train` (runs of the Python Trainer and older runs have "
            "none): versions, git commit and command line are not recorded.") in found
    assert not any("made before recallk" in n or "final evaluation of a run" in n for n in found)
    [omitted] = [n for n in found if n.startswith("Retrieval examples omitted")]
    assert "embeddings/all.npz does not exist" in omitted  # the split trained and evaluated on (a flat folder)
    assert "`recallk train` writes it at its final evaluation; for a run of the Python Trainer" in omitted
    assert "recallk.retrieval.write_embeddings" in omitted
    # the hint's command, run as written (DIR: the data folder, which the run does not record), gives the examples
    command = re.search(r"`(recallk embed [^`]+)`", omitted).group(1).replace(" --root DIR", f" --root {data}")
    argv = shlex.split(command)
    assert argv[:3] == ["recallk", "embed", "--checkpoint"] and "--no-progress" not in argv
    assert main([*argv[1:], "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    text = write_report(run, out_path=tmp_path / "report.html", split="all", root=data).read_text(encoding="utf-8")
    assert "data-query" in text and not any(n.startswith("Retrieval examples omitted") for n in notes(text))


def test_hint_names_last_pt_when_the_run_has_no_best_pt(api_run, tmp_path, capsys):
    """A Trainer run without ``eval_fn`` keeps no best.pt: the hint's command must name last.pt, and run."""
    import shutil

    run, data = api_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "best.pt").unlink()
    shutil.rmtree(copy / "embeddings", ignore_errors=True)  # written by the test above
    with pytest.warns(ReportWarning, match="retrieval examples left out"):
        text = write_report(copy, split="all").read_text(encoding="utf-8")
    [omitted] = [n for n in notes(text) if n.startswith("Retrieval examples omitted")]
    command = re.search(r"`(recallk embed [^`]+)`", omitted).group(1).replace(" --root DIR", f" --root {data}")
    assert f"--checkpoint {copy / 'checkpoints' / 'last.pt'}" in command
    assert main([*shlex.split(command)[1:], "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
