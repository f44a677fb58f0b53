"""The report of a run made with the Python ``Trainer`` (no CLI, issue 19): it has no run.json and no embeddings,
and the report says so in words true for such a run; following its hint (``recallk embed``) gives the examples."""

from __future__ import annotations

import re
import shlex
from html import unescape

import pytest
import torch
from tests.image_folders import write_image_folder

import recallk
from recallk.cli.main import main
from recallk.data.transforms import transforms_for_model
from recallk.engine import Trainer, TrainSettings
from recallk.losses import RecallAtKSurrogate
from recallk.models import build_model
from recallk.report import ReportWarning, write_report

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """(run folder, data folder) of a Trainer API run: build_model + build_dataset + RS@k + Trainer."""
    top = tmp_path_factory.mktemp("trainer-report")
    data = write_image_folder(top / "data", 6, cell=(13, 9))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model("resnet10t", embed_dim=8, freeze_bn=True)
    train_set = recallk.build_dataset("folder", data, None,
                                      transform=transforms_for_model(model, "train", image_size=40))
    eval_set = recallk.build_dataset("folder", data, None,
                                     transform=transforms_for_model(model, "test", image_size=40))

    def eval_fn(net, epoch):
        embeddings, labels = recallk.embed_dataset(net, eval_set, batch_size=32, device="cpu", progress=False)
        return recallk.retrieval_metrics(embeddings, labels, (1, 2))

    settings = TrainSettings(batch_size=8, chunk_size=8, per_class=2, epochs=1, lr=1e-3, device="cpu",
                             progress=False, tensorboard=False, max_steps_per_epoch=2)
    Trainer(model, RecallAtKSurrogate(ks=(1, 2), tau_rank=0.02, simix=True), train_set, top / "run", settings,
            eval_fn=eval_fn).fit()
    return top / "run", data


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
