"""After ``import recallk`` alone the advice of recallk's own messages works as written (issue 24, item 9a):
``recallk.models.freeze_batchnorm(model)`` (the ghost-BatchNorm warning), and ``dir(recallk)`` lists the public
API for completion. Each check runs in a fresh interpreter: in this one other tests have imported the
sub-packages already, which makes them attributes whatever ``recallk/__init__.py`` does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import torch

import recallk
from recallk.engine.cached import _warn_ghost_batchnorm


def fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ghost_batchnorm_advice() -> str:
    """The call the ghost-BatchNorm warning tells users to make, read from the warning itself."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_ghost_batchnorm(model, [model[0]], 4)
    (call,) = re.findall(r"recallk\.[\w.]+\(model\)", str(caught[0].message))
    return call


def test_the_ghost_batchnorm_advice_works_after_import_recallk():
    call = ghost_batchnorm_advice()
    assert call == "recallk.models.freeze_batchnorm(model)"
    out = fresh(
        "import torch, recallk\n"
        "model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))\n"
        f"{call}\n"
        "model.train()\n"
        "print(model[1].training, type(model[1]).__name__)"
    )
    assert out.split() == ["False", "FrozenBatchNorm1d"]  # frozen: eval mode even after model.train()


def test_dir_lists_the_public_api_and_the_subpackages():
    listed = set(json.loads(fresh("import json, recallk; print(json.dumps(dir(recallk)))")))
    assert set(recallk.__all__) <= listed
    assert {"models", "losses", "retrieval", "evaluation", "data"} <= listed
    assert "RecallAtKSurrogate" in listed and "load_model" in listed


def test_every_listed_name_resolves_in_a_fresh_interpreter():
    out = fresh("import recallk\nfor name in dir(recallk):\n    getattr(recallk, name)\nprint('ok')")
    assert out.strip() == "ok"
