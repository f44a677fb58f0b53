"""The benchmarks' parsers: bad numbers and unknown timm model names stop with exit 2 and one line naming the
option (no traceback from deep inside a benchmark), and every ``--help`` shows the defaults."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import bench
from recallk_bench import engine, loss, train
from recallk_bench import eval as bench_eval


def _usage_error(capsys, argv: list[str]) -> str:
    """Run ``python benchmarks/bench.py ...`` with ``argv``; assert exit 2 and return stderr's last line."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(("argv", "message"), [
    (["loss", "--sizes", "0", "--repeats", "1"], "argument --sizes: must be at least 1, got 0"),
    (["loss", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["loss", "--sizes", "2"], "--sizes 2: each batch size must be at least --per-class (4)"),
    (["loss", "--simix-size", "9"], "--simix-size 9: each size must be at least 10"),
    (["loss", "--dim", "x"], "argument --dim: expected a whole number >= 1, got 'x'"),
    (["loss", "--naive-max-gib", "-1"], "argument --naive-max-gib: must be a finite number > 0"),
    (["engine", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["engine", "--multiples", "1", "0"], "argument --multiples: must be at least 1, got 0"),
    (["eval", "--sizes", "10000", "2"], "argument --sizes: must be at least 4, got 2"),
    (["eval", "--timeout", "0"], "argument --timeout: must be a finite number > 0"),
    (["train", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
])
def test_bad_numbers_are_usage_errors(capsys, argv, message):
    assert message in _usage_error(capsys, argv)


@pytest.mark.parametrize("which", ["engine", "train"])
def test_unknown_timm_model_is_a_usage_error(capsys, which):
    line = _usage_error(capsys, [which, "--model", "nosuchmodel"])
    assert "argument --model: timm has no model 'nosuchmodel'" in line and "timm.list_models(" in line
    assert "resnet18" in _usage_error(capsys, [which, "--model", "resnet1"])  # close names are suggested


def test_known_timm_names_pass():
    assert engine.parse_args(["--model", "resnet50.a1_in1k"]).model == "resnet50.a1_in1k"  # a pretrained tag
    assert train.parse_args(["--model", "vit_base_patch16_224"]).model == "vit_base_patch16_224"


def test_run_loss_benchmark_refuses_what_would_divide_by_zero():
    with pytest.raises(ValueError, match="every size must be >= per_class"):
        loss.run_loss_benchmark([2], per_class=4, dim=8, device="cpu", methods=["torch"])
    with pytest.raises(ValueError, match="repeats and dim must be >= 1"):
        loss.run_loss_benchmark([8], per_class=4, dim=8, device="cpu", methods=["torch"], repeats=0)


@pytest.mark.parametrize("module", [engine, loss, train, bench_eval], ids=lambda m: m.__name__)
def test_every_help_shows_the_defaults(module):
    parser = module.build_parser()
    text = parser.format_help()
    assert "default" in text
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or action.default in (None, argparse.SUPPRESS) or \
                action.default is False:
            continue
        help_text = " ".join(parser._get_formatter()._expand_help(action).split())  # as --help prints it
        assert "default" in help_text, (action.option_strings, help_text)
        if action.dest != "device":  # its default depends on the machine: the help says the rule
            assert f"(default: {action.default})" in help_text, (action.option_strings, help_text)


def test_bench_eval_help_states_its_long_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_eval.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: [10000, 50000, 136093])" in out and "(default: 3600.0)" in out


def test_bench_script_runs_each_benchmark_from_any_folder(tmp_path):
    """``python benchmarks/bench.py NAME --help`` in a fresh process, started outside the repository."""
    script = bench.__file__
    for which in bench.BENCHES:
        done = subprocess.run([sys.executable, script, which, "--help"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith(f"usage: bench.py {which} ")
    done = subprocess.run([sys.executable, script, "nothing"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2 and "invalid choice: 'nothing'" in done.stderr
