"""benchmarks/gpu_check.py runs end to end in its --smoke mode (tiny sizes, Triton interpreter on the CPU): every
method agrees with the float64 references, every case runs, and the JSON it writes holds every section.
About 20 s, so marked slow (``make test-slow``); the GPU run itself is in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_mode(tmp_path: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path))
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {r["method"] for r in data["correctness"]} >= {"triton-fused", "triton-fused-d512", "torch-recompute"}
    assert all(r["status"] == "ok" and r["within_1e-5"] for r in data["correctness"])
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in data["kernels"] + data["api"])
    assert any(r["setting"] == "triton_fused, recompute" and r["status"] == "ok" for r in data["api"])
    assert "### Issue 14 targets" in done.stdout
