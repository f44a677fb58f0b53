"""The "auto" rule picks, for every measured case, the fastest path that fits the memory budget, and the loss
module follows it."""

from __future__ import annotations

import pytest
import torch

from recallk.kernels import dispatch
from recallk.kernels.dispatch import MATRIX_BUDGET_BYTES, MEASURED, choose_path
from recallk.losses import RecallAtKSurrogate


def _fastest_that_fits(device: str, n: int, paths: dict[tuple[str, str], float], triton: bool) -> tuple[str, str]:
    fits = {p: t for p, t in paths.items() if (p[1] == "recompute" or n * n * 4 <= MATRIX_BUDGET_BYTES)
            and (triton or p[0] != "triton")}
    return min(fits, key=fits.get)


#: a choice within this fraction of the fastest is a tie (the spread of repeated runs is larger)
TIE = 0.01


@pytest.mark.parametrize("case", sorted(MEASURED), ids=lambda c: f"{c[0]}-{c[1]}-d{c[2]}")
@pytest.mark.parametrize("triton", [True, False])
def test_auto_picks_the_fastest_measured_path(case, triton):
    device, n, dim = case
    chosen = choose_path(torch.device(device), n, n, triton_usable=triton, dim=dim)
    fastest = _fastest_that_fits(device, n, MEASURED[case], triton and device == "cuda")
    assert chosen == fastest or MEASURED[case][chosen] <= (1 + TIE) * MEASURED[case][fastest]


def test_cpu_rule_by_dimension():
    cpu = torch.device("cpu")
    assert choose_path(cpu, 4_000, 4_000, dim=128) == ("torch", "recompute")
    assert choose_path(cpu, 4_000, 4_000, dim=512) == ("torch", "matrix")
    assert choose_path(cpu, 2_000, 2_000, dim=64) == ("torch", "matrix")
    assert choose_path(cpu, 4_000, 4_000) == ("torch", "matrix")  # dimension unknown: the matrix, as before


@pytest.mark.parametrize("case", sorted(k for k in MEASURED if k[0] == "cuda"), ids=lambda c: str(c[1]))
def test_a_fixed_choice_gets_the_fastest_rest(case):
    device, n = torch.device("cuda"), case[1]
    paths = MEASURED[case]
    for memory in ("matrix", "recompute"):
        options = {p: t for p, t in paths.items() if p[1] == memory}
        if options:
            assert choose_path(device, n, n, memory=memory, triton_usable=True) == min(options, key=options.get)
    for backend in ("torch", "triton"):
        options = {p: t for p, t in paths.items() if p[0] == backend
                   and (p[1] == "recompute" or n * n * 4 <= MATRIX_BUDGET_BYTES)}
        if options:
            assert choose_path(device, n, n, backend=backend, triton_usable=True) == min(options, key=options.get)


def test_never_a_matrix_above_the_budget():
    side = 16_385  # one row past 1 GiB of float32 similarity
    for device in ("cpu", "cuda"):
        for backend in ("auto", "torch", "triton"):
            assert choose_path(torch.device(device), side, side, backend, triton_usable=True)[1] == "recompute"


def test_the_loss_module_follows_the_rule(monkeypatch):
    calls = []
    real = dispatch.choose_path

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr("recallk.kernels.rsk.choose_path", spy)
    emb = torch.nn.functional.normalize(torch.randn(24, 8), dim=1)
    labels = torch.arange(24) // 4
    RecallAtKSurrogate()(emb, labels)
    RecallAtKSurrogate(simix=True)(emb, labels)
    assert calls == [("torch", "matrix"), ("torch", "matrix")]  # the CPU, a small batch: the matrix
    calls.clear()
    big = torch.nn.functional.normalize(torch.randn(4_000, 64), dim=1)
    RecallAtKSurrogate()(big, torch.arange(4_000) // 4)
    assert calls == [("torch", "recompute")]  # d = 64 from 4,000^2: the recompute path (measured faster)
