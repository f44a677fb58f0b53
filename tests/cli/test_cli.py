import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recallk.cli.main import build_parser, main
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "recallk.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["report"]])
def test_help_explains_itself(cmd):
    out = run_cli(*cmd, "--help")
    assert out.returncode == 0
    assert "usage: recallk" in out.stdout
    assert len(out.stdout.splitlines()) > 5


def test_wrong_flag_is_one_line():
    out = run_cli("train", "--bogus")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "unrecognized arguments: --bogus" in out.stderr


def test_unknown_key_is_one_line(tmp_path):
    out = run_cli("train", "train.bogus=1", "runs_dir=" + str(tmp_path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "unknown config key 'train.bogus'" in out.stderr and "batch_size" in out.stderr


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.yaml").write_text("name: r1\n")
    code = main(["train", "--name", "r1", f"runs_dir={tmp_path}"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err


def test_resume_without_checkpoint(tmp_path, capsys):
    code = main(["train", "--name", "r2", "--resume", f"runs_dir={tmp_path}"])
    assert code == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_wrong_flag_of_a_sub_command_names_it():
    out = run_cli("eval", "--checkpoint", "x.pt", "--bogus")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("recallk eval: error: unrecognized arguments: --bogus (see 'recallk eval --help')")
    out = run_cli("--bogus")
    assert out.stderr.startswith("recallk: error: unrecognized arguments: --bogus")


def test_eval_split_takes_several_splits():
    parser = build_parser()
    assert parser.parse_args(["eval", "--split", "test", "validation"]).split == ["test", "validation"]
    assert parser.parse_args(["eval", "--split", "test", "--split", "train"]).split == ["test", "train"]
    assert parser.parse_args(["eval"]).split is None


TINY = tiny_overrides("folder", "train.epochs=1", "train.lr=1e-3", "train.tensorboard=false",
                      "train.max_steps_per_epoch=1")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(best.pt, data folder) of a one-step CLI run on a folder dataset with train/ and test/."""
    top = tmp_path_factory.mktemp("cli-eval")
    data = write_image_folder(top / "data", {"train": range(8), "test": range(8, 12)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--name", "tiny", f"runs_dir={top / 'runs'}", f"data.root={data}", *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return top / "runs" / "tiny" / "checkpoints" / "best.pt", data


def eval_json(capsys, *args):
    capsys.readouterr()
    assert main(["eval", "--no-progress", "--device", "cpu", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.usefixtures("one_thread")
def test_eval_of_several_splits_gives_each_splits_metrics(tiny_run, capsys):
    best, _ = tiny_run
    both = eval_json(capsys, "--checkpoint", str(best), "--split", "test", "train")
    assert list(both) == ["test", "train"]
    for split in ("test", "train"):  # the same numbers as the split evaluated alone
        assert both[split] == eval_json(capsys, "--checkpoint", str(best), "--split", split)[split]


@pytest.mark.usefixtures("one_thread")
def test_eval_without_a_root_says_pass_root(tiny_run, tmp_path, capsys):
    best, data = tiny_run
    state = torch.load(best, weights_only=True)
    state["config"]["data"]["root"] = None  # a run that recorded no data folder
    alone = tmp_path / "best.pt"
    torch.save(state, alone)
    capsys.readouterr()
    assert main(["eval", "--no-progress", "--device", "cpu", "--checkpoint", str(alone)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recallk eval: error: dataset 'folder' needs its data folder") and err.count("\n") == 1
    assert "pass --root DIR" in err and "root=" not in err
    assert "test" in eval_json(capsys, "--checkpoint", str(alone), "--root", str(data))  # as told: it works


def test_python_m_recallk_cli_runs():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run([sys.executable, "-m", "recallk.cli", "--version"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("recallk "), done.stderr
