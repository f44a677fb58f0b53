"""recallk.run_folder: the one atomic writer, the readers' errors, the metrics trim of a resume, the best.pt rule."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from recallk.run_folder import (
    RunFolder,
    append_log,
    append_resume,
    read_best,
    read_config,
    read_embeddings_npz,
    read_metrics,
    read_resumes,
    selection_metric,
    trim_metrics,
    write_atomic,
    write_best,
    write_config,
    write_embeddings_npz,
)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "f.txt")


@pytest.mark.parametrize("data", ["new text", b"new bytes", lambda f: f.write(b"new by callable")])
def test_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path, data):
    path = tmp_path / "f.txt"
    path.write_text("old")
    assert write_atomic(path, data) == path
    assert path.read_bytes().startswith(b"new") and _leftovers(tmp_path) == []


def test_a_write_that_raises_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def half_then_fail(handle):
        handle.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []
    with pytest.raises(TypeError):  # a str callable's mistake is not swallowed either
        write_atomic(path, lambda handle: handle.write("text, not bytes"))
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_a_new_file_gets_the_mode_open_gives_and_parents_are_created(tmp_path):
    """0o666 less the umask, as a plain ``open(..., "w")`` makes it (tempfile.mkstemp would give 0o600); checked in
    a child process that sets its own umask, so this process's umask is not touched."""
    code = ("import os, stat, sys; from recallk.run_folder import write_atomic; os.umask(0o027); "
            "p = write_atomic(sys.argv[1], 'x'); open(sys.argv[2], 'w').close(); "
            "print(oct(stat.S_IMODE(os.stat(p).st_mode)), oct(stat.S_IMODE(os.stat(sys.argv[2]).st_mode)))")
    target, plain = tmp_path / "a" / "b" / "f.txt", tmp_path / "plain.txt"
    out = subprocess.run([sys.executable, "-c", code, str(target), str(plain)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0o640", "0o640"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_trim_metrics_cuts_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        '{"kind": "eval", "epoch": 0, "step": 0, "time": 1.0, "recall@1": 0.1}',
        '{"kind": "train", "epoch": 1, "step": 5, "time": 2.0, "loss": 0.9}',
        "",
        '{"kind": "eval", "epoch": 1, "step": 5, "time": 3.0, "recall@1": 0.2}',
        '{"kind": "train", "epoch": 2, "step": 7, "time": 4.0, "loss": 0.8}',
    ]
    path.write_text("\n".join(lines) + "\n")
    trim_metrics(path, step=5)
    assert path.read_text() == "".join(line + "\n" for line in lines[:2] + lines[3:4])  # byte for byte, no blank
    trim_metrics(tmp_path / "absent.jsonl", step=0)
    assert not (tmp_path / "absent.jsonl").exists()


def test_selection_metric_prefers_the_validation_split():
    assert selection_metric(["map@r", "val/map@r", "recall@1"], "map@r") == ("val/map@r", "validation")
    assert selection_metric(["map@r", "val/recall@1"], "map@r") == ("map@r", "test")
    assert selection_metric(iter(["recall@1"]), "recall@1") == ("recall@1", "test")


def test_read_metrics_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with pytest.raises(ValueError, match="metrics file not found"):
        read_metrics(path)
    path.write_text('{"kind": "train", "epoch": 1}\n\n{"kind": "eval"\n')
    with pytest.raises(ValueError, match=rf"{path}:3 is not valid JSON"):
        read_metrics(path)
    path.write_text('{"kind": "train", "epoch": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path}:2 must be a JSON object with 'kind' and 'epoch'"):
        read_metrics(path)


def test_resumes_round_trip_and_a_bad_line_is_named(tmp_path):
    path = tmp_path / "resumes.jsonl"
    assert read_resumes(path) == []
    append_resume(path, ["train", "--resume"], {"train.epochs": (2, 4), "data.root": (tmp_path, "x")})
    (entry,) = read_resumes(path)
    assert entry["argv"] == ["train", "--resume"] and isinstance(entry["time"], float)
    assert entry["changes"] == {"train.epochs": [2, 4], "data.root": [str(tmp_path), "x"]}
    with open(path, "a") as handle:
        handle.write('{"argv": []}\n')
    with pytest.raises(ValueError, match=rf"{path}:2 must be a JSON object with a 'time'"):
        read_resumes(path)


def test_best_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "best.json"
    assert read_best(path) is None
    write_best(path, "val/map@r", "validation", 0.5, 3, 450)
    assert json.loads(path.read_text()) == {"metric": "val/map@r", "split": "validation", "value": 0.5, "epoch": 3,
                                            "step": 450}
    assert read_best(path)["epoch"] == 3
    path.write_text("{")
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        read_best(path)
    path.write_text('{"metric": "map@r"}')
    with pytest.raises(ValueError, match="must be a JSON object with 'metric'"):
        read_best(path)


def test_config_round_trip_and_errors(tmp_path):
    path = RunFolder(tmp_path).config
    assert read_config(path) == (None, {})
    write_config({"name": "r", "data": {"root": tmp_path, "ks": (1, 2)}}, path)
    text, config = read_config(path)
    assert config == {"name": "r", "data": {"root": str(tmp_path), "ks": [1, 2]}}
    assert text.splitlines()[0] == "name: r"  # keys in their order
    path.write_text("a: [")
    with pytest.raises(ValueError, match=rf"{path} is not valid YAML"):
        read_config(path)
    path.write_text("- 1\n")
    with pytest.raises(ValueError, match=rf"{path} must hold a YAML mapping"):
        read_config(path)


def test_embeddings_round_trip_and_a_mismatch_is_named(tmp_path):
    folder = RunFolder(tmp_path)
    embeddings, labels = np.eye(3, dtype=np.float32), np.array([0, 0, 1])
    write_embeddings_npz(folder.raw_pixels("test"), embeddings, labels)
    assert folder.raw_pixels("test") == tmp_path / "embeddings" / "raw_pixels" / "test.npz"
    got, got_labels = read_embeddings_npz(folder.raw_pixels("test"))
    assert np.array_equal(got, embeddings) and got_labels.tolist() == [0, 0, 1]
    np.savez(folder.embeddings("test"), embeddings=embeddings, labels=labels[:2])
    with pytest.raises(ValueError, match="do not match"):
        read_embeddings_npz(folder.embeddings("test"))


def test_append_log_stamps_each_line(tmp_path):
    path = RunFolder(tmp_path / "run").train_log
    append_log(path, "one\ntwo")
    lines = path.read_text().splitlines()
    assert [line[20:] for line in lines] == ["one", "two"]
    assert all(len(line.split(" ", 2)[0]) == 10 and line[10] == " " for line in lines)  # YYYY-mm-dd HH:MM:SS
