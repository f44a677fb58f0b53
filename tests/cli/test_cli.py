import subprocess
import sys

import pytest

from recallk.cli.main import build_parser, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "recallk.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["report"], ["bench"]])
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


def test_unknown_bench_is_rejected():
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["bench", "nothing"])
    assert info.value.code == 2


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
