"""Atomic checkpoint writes and the RNG capture/restore they carry."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from recallk.engine import capture_all_rng, load_checkpoint, restore_all_rng, save_checkpoint


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
