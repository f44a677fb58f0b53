"""recallk.provenance (contract 3): the environment record and run.json's segments."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from recallk import provenance


def test_environment_record_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/recallk", "train", "a.b=two words"])
    record = provenance.environment_record("cpu")
    assert record["argv"] == ["/usr/bin/recallk", "train", "a.b=two words"]
    assert record["command"] == "recallk train 'a.b=two words'"
    assert record["versions"]["python"] == platform.python_version()
    import timm
    import torch

    assert record["versions"]["timm"] == timm.__version__
    assert torch.__version__.startswith(record["versions"]["torch"])
    assert record["device"] == "cpu" and record["device_name"] and record["world_size"] == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert record["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    json.dumps(record)  # serialisable as it is
    package = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(provenance.__file__).parent)
    assert record["recallk_git_commit"] == (package.stdout.strip() if package.returncode == 0 else None)
    monkeypatch.chdir(tmp_path)  # not a git checkout
    assert provenance.environment_record()["git_commit"] is None
    assert provenance.environment_record()["recallk_git_commit"] == record["recallk_git_commit"]
    assert provenance.environment_record()["device"] is None


def test_segments_append_and_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        provenance.start_segment(tmp_path / "nope", resume=False)
    provenance.end_segment(tmp_path, "finished")  # no run.json: nothing written
    assert not (tmp_path / "run.json").exists()
    provenance.start_segment(tmp_path, resume=True)  # a resume of a run older than run.json
    provenance.start_segment(tmp_path, resume=True)
    data = provenance.read_run_file(tmp_path)
    assert [s["resume"] for s in data["segments"]] == [False, True, True] and data["format"] == 1
    assert data["segments"][0] == {"time": None, "resume": False, "recorded": False}  # the unrecorded start
    provenance.start_segment(tmp_path, resume=False)  # a new run replaces the record
    assert len(provenance.read_run_file(tmp_path)["segments"]) == 1
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="'segments' list"):
        provenance.start_segment(tmp_path, resume=True)
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        provenance.read_run_file(tmp_path)


@pytest.mark.parametrize("layout", ["package", "module"])
def test_command_of_python_dash_m_is_runnable_as_typed(tmp_path, layout):
    """``python -m PKG train ...`` is recorded as typed (argv[0] is then PKG's ``__main__.py``, not runnable)."""
    code = "import sys\nfrom recallk import provenance\nprint(provenance.environment_record()['command'])\n"
    if layout == "package":
        (tmp_path / "fakecli").mkdir()
        (tmp_path / "fakecli" / "__init__.py").write_text("")
        (tmp_path / "fakecli" / "__main__.py").write_text(code)
        name = "fakecli"
    else:
        (tmp_path / "fakecli_main.py").write_text(code)
        name = "fakecli_main"
    out = subprocess.run([sys.executable, "-m", name, "train", "a.b=two words"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"python -m {name} train 'a.b=two words'"
    script = subprocess.run([sys.executable, str(tmp_path / "fakecli_main.py" if layout == "module" else
                                                 tmp_path / "fakecli" / "__main__.py"), "eval"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert script.stdout.strip() == ("fakecli_main.py eval" if layout == "module" else "__main__.py eval")
