"""`python benchmarks/bench.py train` runs end to end on the CPU at a tiny size and reports consistent figures."""

from __future__ import annotations

import json

import pytest

from recallk_bench import train as bench_train


def test_bench_train_tiny_run(capsys):
    argv = ["--model", "resnet18", "--image-size", "32", "--jpeg-size", "40", "--classes", "8",
            "--per-class-images", "4", "--batch", "16", "--chunk", "8", "--epochs", "2", "--step-repeats", "1",
            "--workers", "1", "--embed-dim", "16", "--json"]
    assert bench_train.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(lines[-1])
    loader, step, e2e = result["loader"], result["step"], result["end_to_end"]
    assert result["images"] == 32 and e2e["steps"] == 2  # epoch 2 of 2 batches
    assert step["kept_dtype"] == "torch.uint8" and step["kept_bytes_per_batch"] == 16 * 3 * 32 * 32
    assert step["float32_bytes_per_batch"] == 4 * step["kept_bytes_per_batch"]
    floor = min(loader["images_per_s"], step["images_per_s"])
    assert abs(result["ratio_end_to_end_over_min"] - e2e["images_per_s"] / floor) < 1e-9
    assert any("end-to-end / min(loader, step)" in line for line in lines)


def test_bench_train_refuses_one_epoch(capsys):
    """--epochs 1 leaves nothing to time (epoch 1 is the warm-up): the parser refuses it with the reason."""
    with pytest.raises(SystemExit) as exit_info:
        bench_train.parse_args(["--epochs", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--epochs must be >= 2: the first epoch is the warm-up" in err
    assert bench_train.parse_args(["--epochs", "2"]).epochs == 2
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--help"])
    assert "at least 2" in " ".join(capsys.readouterr().out.split())
