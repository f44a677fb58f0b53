"""Offline, ``pretrained=True`` (a preset's ``model.pretrained: true``) fails within seconds with its message,
instead of a minute of hub retries first (issue 24, item 9d). The hub is made unreachable for real in a child
process: ``HF_ENDPOINT`` on the reserved ``.invalid`` domain (RFC 2606: never resolves) and an empty HF cache;
before the fix the same call spent about a minute in huggingface_hub's retries (1+2+4+8+8 s per file, two files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from recallk.models.weights import hub_reachable

CHILD = """
import json, time
from recallk.models import build_model
start = time.perf_counter()
try:
    build_model("resnet10t", embed_dim=8, pretrained=True)
    outcome = "built"
except ValueError as e:
    outcome = str(e)
print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome}))
"""


def test_an_unreachable_hub_fails_fast_with_the_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="https://hub.recallk-test.invalid", HF_HOME=str(tmp_path / "hf"),
               TORCH_HOME=str(tmp_path / "torch"))
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["seconds"] < 10, result
    message = result["outcome"]
    assert message.startswith("could not get pretrained weights for resnet10t"), message
    assert "no connection to https://hub.recallk-test.invalid within 3 s: only the local cache was read" in message
    assert "pass pretrained='path/to/weights.pth' or pretrained=False" in message
    assert "Retry" not in done.stderr  # no hub retries were attempted


def test_hub_reachable_answers_quickly_for_a_host_that_does_not_resolve(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert hub_reachable("https://hub.recallk-test.invalid", timeout=3.0) is False


def test_a_proxy_is_left_to_decide(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_reachable("https://hub.recallk-test.invalid") is True
