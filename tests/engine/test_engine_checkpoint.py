"""Atomic checkpoint writes and the RNG capture/restore they carry."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch

from recallk.engine import capture_all_rng, load_checkpoint, restore_all_rng, save_checkpoint
from recallk.engine.checkpoint import WEIGHTS_ONLY_KEYS, is_weights_only, weights_only_state
from recallk.run_folder import plain_config


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_round_trip_leaves_no_temporary_file(tmp_path):
    state = {"model": {"w": torch.arange(5.0)}, "epoch": 3, "rng": capture_all_rng()}
    path = save_checkpoint(state, tmp_path / "checkpoints" / "last.pt")
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3), "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 1


def test_load_refuses_code_and_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"f": random.Random}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        load_checkpoint(tmp_path / "evil.pt")


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_all_rng()
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_all_rng(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


@pytest.mark.parametrize("umask", [0o022, 0o007, 0o077])
def test_checkpoint_files_get_the_umask_mode_like_other_files(tmp_path, umask):
    """0o666 & ~umask, as open() gives every other file of a run (mkstemp would make them 0600)."""
    previous = os.umask(umask)
    try:
        path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "c.pt")
        (tmp_path / "other.txt").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE((tmp_path / "other.txt").stat().st_mode)


def test_weights_only_state_drops_what_only_a_resume_needs():
    full = {"format": 2, "model": {"w": torch.ones(1)}, "config": {"a": 1}, "model_spec": {"name": "m"},
            "recallk_version": "0", "best": {"value": 0.5}, "epoch": 3, "step": 9, "optimizer": {}, "scheduler": {},
            "scaler": None, "rng": {}, "criterion": {}, "position": 0}
    light = weights_only_state(full)
    assert set(light) == set(WEIGHTS_ONLY_KEYS) and light["model"] is full["model"]
    assert is_weights_only(light) and not is_weights_only(full)


def test_plain_config_is_what_yaml_gives_back():
    assert plain_config({"b": (1, 2), "a": {"c": [3, (4,)]}, "d": None}) == {"b": [1, 2], "a": {"c": [3, [4]]},
                                                                              "d": None}
    assert list(plain_config({"z": 1, "a": 2})) == ["z", "a"]  # order kept, as config.yaml writes it
