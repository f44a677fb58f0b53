"""The blocked torch RS@k path: layout, dtypes, blocking, backend switch, agreement with the reference.

The losses run on ``RECALLK_TEST_DEVICE`` (default the CPU; tests/helpers/device_settings.py); the data are drawn on the
CPU, so every device sees the same numbers."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recallk.kernels import RSkParams, positive_layout, resolve_backend, rsk_loss_from_similarity
from recallk.testing.rsk import naive_rsk_loss, rsk_loss_reference
from tests.helpers.device_settings import TEST_DEVICE

KS = (1, 2, 4, 8, 16)


def batch(n: int, n_classes: int, dim: int, seed: int, dtype=torch.float32, device=TEST_DEVICE):
    """(n, n) similarity of random unit vectors (drawn in float64 on the CPU) and (n,) labels, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    emb = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return (emb @ emb.T).to(device, dtype), labels.to(device)


def loss_grad(sim, labels, **kw):
    s = sim.detach().clone().requires_grad_()
    params = RSkParams(KS, kw.pop("tau_rank", 0.01), 1.0, kw.pop("include_query", False))
    self_index = torch.arange(labels.numel(), device=labels.device)
    loss = rsk_loss_from_similarity(s, labels, labels, params, self_index=self_index, **kw)
    loss.backward()
    return loss.detach(), s.grad


@settings(max_examples=40, deadline=None)
@given(
    q_labels=st.lists(st.integers(-2, 4), min_size=1, max_size=12),
    db_labels=st.lists(st.integers(-2, 4), min_size=1, max_size=15),
    data=st.data(),
)
def test_positive_layout_against_brute_force(q_labels, db_labels, data):
    n = len(db_labels)
    self_index = data.draw(st.lists(st.integers(-1, n - 1), min_size=len(q_labels), max_size=len(q_labels)))
    pos_idx, counts = positive_layout(torch.tensor(q_labels), torch.tensor(db_labels), torch.tensor(self_index))
    for q, lab in enumerate(q_labels):
        expected = [j for j in range(n) if j != self_index[q] and db_labels[j] == lab]
        assert counts[q].item() == len(expected)
        assert pos_idx[q, : len(expected)].tolist() == expected
        assert torch.all(pos_idx[q, len(expected):] == 0)
    assert pos_idx.shape[1] == max(counts.max().item(), 0)


def test_float32_agrees_with_float64_reference_to_1e5():
    sim, labels = batch(20, 5, 8, seed=0, dtype=torch.float64)
    ref = rsk_loss_reference(sim.cpu(), labels.cpu(), labels.cpu(), torch.arange(20), KS, 0.01, 1.0)
    loss32, _ = loss_grad(sim.float(), labels)
    assert loss32.dtype == torch.float32
    assert abs(loss32.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize("include_query", [False, True])
def test_larger_batch_float32_against_float64_blocked(include_query):
    # 600 items, variable class sizes 1..~20: float32 vs float64, both through the blocked path, whose float64
    # result is checked against the loop reference in tests/losses.
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 60, (600,), generator=g).to(TEST_DEVICE)
    emb = torch.nn.functional.normalize(torch.randn(600, 32, generator=g, dtype=torch.float64), dim=1)
    sim = (emb @ emb.T).to(TEST_DEVICE)
    l64, g64 = loss_grad(sim, labels, include_query=include_query)
    l32, g32 = loss_grad(sim.float(), labels, include_query=include_query)
    assert abs(l32.item() - l64.item()) <= 1e-5 * abs(l64.item())
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-5 * g64.abs().max().item())


@pytest.mark.parametrize("include_query", [False, True])
def test_naive_vectorised_version_matches_the_loop_reference(include_query):
    sim, labels = batch(14, 4, 5, seed=21, dtype=torch.float64)
    s1 = sim.clone().requires_grad_()
    s2 = sim.clone().requires_grad_()
    naive = naive_rsk_loss(s1, labels, tau_rank=0.05, include_query=include_query)
    ref = rsk_loss_reference(s2, labels, labels, range(14), (1, 2, 4, 8, 16), 0.05, 1.0, include_query)
    naive.backward()
    ref.backward()
    torch.testing.assert_close(naive, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)


def test_blocked_equals_naive_vectorised_version_in_float64():
    sim, labels = batch(300, 40, 16, seed=2, dtype=torch.float64)
    s1 = sim.clone().requires_grad_()
    s2 = sim.clone().requires_grad_()
    ours = rsk_loss_from_similarity(s1, labels, labels, RSkParams(KS), self_index=torch.arange(300, device=s1.device),
                                    backend="torch", block_size=7)
    naive = naive_rsk_loss(s2, labels)
    ours.backward()
    naive.backward()
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_close_to_float32(dtype):
    sim, labels = batch(64, 8, 16, seed=3)
    half = sim.to(dtype)
    l_half, g_half = loss_grad(half, labels, tau_rank=0.05)
    l_32, g_32 = loss_grad(half.float(), labels, tau_rank=0.05)  # same rounded inputs, computed in float32
    assert l_half.dtype == torch.float32 and g_half.dtype == dtype
    torch.testing.assert_close(l_half, l_32, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_half.float(), g_32, rtol=2e-2, atol=1e-3 * g_32.abs().max().item())
    l_full, _ = loss_grad(sim, labels, tau_rank=0.05)  # and the rounding of the inputs costs little
    assert abs(l_half.item() - l_full.item()) < 2e-2


def test_block_size_and_default_blocking_agree():
    sim, labels = batch(200, 20, 8, seed=4, dtype=torch.float64)
    results = [loss_grad(sim, labels, block_size=bs) for bs in (None, 1, 13, 500)]
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-13, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-11, atol=1e-16)


def test_no_grad_forward_gives_same_value():
    sim, labels = batch(50, 6, 8, seed=5, dtype=torch.float64)
    with torch.no_grad():
        value = rsk_loss_from_similarity(sim, labels, labels, RSkParams(KS), self_index=torch.arange(50).to(sim.device))
    assert value.item() == pytest.approx(loss_grad(sim, labels)[0].item(), rel=1e-14)


def test_backward_twice_with_retain_graph_and_scaled_upstream():
    sim, labels = batch(30, 4, 8, seed=6, dtype=torch.float64)
    s = sim.clone().requires_grad_()
    loss = rsk_loss_from_similarity(s, labels, labels, RSkParams(KS), self_index=torch.arange(30).to(s.device))
    (3.0 * loss).backward(retain_graph=True)
    first = s.grad.clone()
    s.grad = None
    loss.backward()
    torch.testing.assert_close(first, 3.0 * s.grad)


def test_backend_switch():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", cpu)
    sim, labels = batch(12, 3, 4, seed=7, device=cpu)  # what "auto" resolves to on the CPU
    auto = rsk_loss_from_similarity(sim, labels, labels, RSkParams(KS), backend="auto")
    torch_ = rsk_loss_from_similarity(sim, labels, labels, RSkParams(KS), backend="torch")
    assert auto.item() == torch_.item()


def test_triton_backend_is_reported_clearly_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes the import fail
    sim, labels = batch(12, 3, 4, seed=8, device="cpu")
    with pytest.raises(ValueError, match="backend='torch'"):
        rsk_loss_from_similarity(sim, labels, labels, RSkParams(KS), backend="triton")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"


def test_three_backwards_accumulate_exactly():
    # backward returns the stored gradient without copying: accumulation must not modify it.
    sim, labels = batch(30, 4, 8, seed=9, dtype=torch.float64)
    s = sim.clone().requires_grad_()
    loss = rsk_loss_from_similarity(s, labels, labels, RSkParams(KS), self_index=torch.arange(30).to(s.device))
    loss.backward(retain_graph=True)
    single = s.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(s.grad, 3.0 * single, rtol=1e-15, atol=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_equal_class_sizes_sliced_and_gathered_paths(shuffle):
    # Sorted equal-size classes use the row-slice path; a shuffled batch the gather/scatter path.
    g = torch.Generator().manual_seed(10)
    labels = torch.arange(240) // 4
    if shuffle:
        labels = labels[torch.randperm(240, generator=g)]
    emb = torch.nn.functional.normalize(torch.randn(240, 16, generator=g, dtype=torch.float64), dim=1)
    emb, labels = emb.to(TEST_DEVICE), labels.to(TEST_DEVICE)
    s1 = (emb @ emb.T).requires_grad_()
    s2 = (emb @ emb.T).requires_grad_()
    ours = rsk_loss_from_similarity(s1, labels, labels, RSkParams(KS), self_index=torch.arange(240, device=s1.device),
                                    backend="torch", block_size=50)
    naive = naive_rsk_loss(s2, labels)
    ours.backward()
    naive.backward()
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-15)
