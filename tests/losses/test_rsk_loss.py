"""RS@k: loss and gradients of the blocked path against the loop reference, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recallk.kernels import RSkParams, rsk_loss_from_similarity
from recallk.losses import RecallAtKSurrogate
from recallk.testing.rsk import rsk_loss_reference
from tests.helpers.rsk_batches import random_batch

KS = (1, 2, 4, 8, 16)


def loss_and_grad(fn, sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = sim.detach().clone().requires_grad_()
    loss = fn(s)
    if not loss.requires_grad:  # the reference builds no graph when no rank has a term (e.g. B = 2)
        return loss.detach(), torch.zeros_like(s)
    loss.backward()
    return loss.detach(), s.grad


def assert_matches_reference(sim, q_labels, db_labels, self_index, ks, tau_rank, tau_k, include_query,
                             block_size=None):
    ours, g_ours = loss_and_grad(
        lambda s: rsk_loss_from_similarity(s, q_labels, db_labels, RSkParams(ks, tau_rank, tau_k, include_query),
                                           self_index=self_index, block_size=block_size), sim)
    ref, g_ref = loss_and_grad(
        lambda s: rsk_loss_reference(s, q_labels, db_labels, self_index, ks, tau_rank, tau_k, include_query), sim)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("include_query", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_against_reference_variable_class_sizes(include_query, seed):
    emb, labels = random_batch(18, 5, 6, seed)
    sim = emb @ emb.T
    n = labels.numel()
    assert_matches_reference(sim, labels, labels, torch.arange(n), KS, 0.05, 1.0, include_query)


@pytest.mark.parametrize("include_query", [False, True])
def test_per_k_tau_and_custom_ks(include_query):
    emb, labels = random_batch(15, 3, 4, seed=7)
    sim = emb @ emb.T
    assert_matches_reference(sim, labels, labels, torch.arange(15), (1, 3, 5), 0.1, (0.5, 1.0, 2.5), include_query)


def test_paper_temperatures_with_saturated_sigmoids():
    # tau_rank = 0.01 and similarities far apart: many |u| > 50, where the reference clamps.
    emb, labels = random_batch(16, 4, 3, seed=3)
    sim = 3.0 * (emb @ emb.T)
    assert_matches_reference(sim, labels, labels, torch.arange(16), KS, 0.01, 1.0, False)


@pytest.mark.parametrize("block_size", [1, 2, 5, 1000])
def test_block_size_does_not_change_result(block_size):
    emb, labels = random_batch(17, 4, 5, seed=11)
    sim = emb @ emb.T
    assert_matches_reference(sim, labels, labels, torch.arange(17), KS, 0.05, 1.0, False, block_size=block_size)


@pytest.mark.parametrize("include_query", [False, True])
def test_separate_database_against_reference(include_query):
    q_emb, q_labels = random_batch(7, 3, 5, seed=4)
    db_emb, db_labels = random_batch(13, 4, 5, seed=5)
    sim = q_emb @ db_emb.T
    assert_matches_reference(sim, q_labels, db_labels, None, KS, 0.05, 1.0, include_query)


def test_ref_emb_mode_of_module_matches_reference_and_ignores_include_query():
    q_emb, q_labels = random_batch(6, 3, 5, seed=8)
    db_emb, db_labels = random_batch(12, 3, 5, seed=9)
    ref = rsk_loss_reference(q_emb @ db_emb.T, q_labels, db_labels, None, KS, 0.01, 1.0)
    for include_query in (False, True):
        loss = RecallAtKSurrogate(include_query=include_query)(q_emb, q_labels, ref_emb=db_emb, ref_labels=db_labels)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)


def test_partial_self_index():
    # Some queries are in the database (at arbitrary columns), some are not.
    emb, labels = random_batch(12, 3, 5, seed=12)
    sim = emb[:6] @ emb.T
    self_index = torch.tensor([0, -1, 2, -1, 4, 5])
    for include_query in (False, True):
        assert_matches_reference(sim, labels[:6], labels, self_index, KS, 0.05, 1.0, include_query)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 12),
    n_classes=st.integers(1, 5),
    dim=st.integers(1, 6),
    tau_rank=st.sampled_from([0.01, 0.1, 1.0]),
    include_query=st.booleans(),
    block_size=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 10_000),
)
def test_hypothesis_shapes_against_reference(n, n_classes, dim, tau_rank, include_query, block_size, seed):
    emb, labels = random_batch(n, n_classes, dim, seed)
    if not any((labels == c).sum() >= 2 for c in labels.unique()):
        labels[1] = labels[0]
    sim = emb @ emb.T
    assert_matches_reference(sim, labels, labels, torch.arange(n), (1, 2, 4), tau_rank, 1.0, include_query,
                             block_size=block_size)


def test_gradcheck():
    emb, labels = random_batch(9, 3, 4, seed=13)
    sim = (emb @ emb.T).requires_grad_()

    def fn(s):
        return rsk_loss_from_similarity(s, labels, labels, RSkParams((1, 2, 4), 0.1, (1.0, 0.7, 1.3)),
                                        self_index=torch.arange(9))

    assert torch.autograd.gradcheck(fn, (sim,), eps=1e-6, atol=1e-8)


def test_gradcheck_rectangular_include_query():
    q_emb, q_labels = random_batch(5, 2, 4, seed=14)
    db_emb, db_labels = random_batch(9, 2, 4, seed=15)
    sim = (q_emb @ db_emb.T).requires_grad_()

    def fn(s):
        return rsk_loss_from_similarity(s, q_labels, db_labels, RSkParams((1, 2), 0.2, 1.0, True),
                                        self_index=torch.tensor([0, -1, 3, -1, 8]))

    assert torch.autograd.gradcheck(fn, (sim,), eps=1e-6, atol=1e-8)


def test_module_forward_and_gradient_through_embeddings():
    emb, labels = random_batch(14, 4, 6, seed=16)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    loss = RecallAtKSurrogate(tau_rank=0.05)(e1, labels)
    ref = rsk_loss_reference(e2 @ e2.T, labels, labels, torch.arange(14), KS, 0.05, 1.0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-9, atol=1e-12)


def test_queries_without_positive_are_left_out_and_get_no_gradient():
    emb, _ = random_batch(6, 1, 4, seed=17)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    s = (emb @ emb.T).requires_grad_()
    loss = rsk_loss_from_similarity(s, labels, labels, RSkParams(KS, 0.05), self_index=torch.arange(6))
    loss.backward()
    assert torch.all(s.grad[[2, 5]] == 0)
    ref = rsk_loss_reference(s.detach(), labels, labels, torch.arange(6), KS, 0.05, 1.0)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-10, atol=1e-12)


def _sig(u: float) -> float:
    return 1.0 / (1.0 + math.exp(-u))


@pytest.mark.parametrize("include_query", [False, True])
def test_hand_computed_three_items(include_query):
    # Labels (0, 0, 1); only items 0 and 1 have a positive (each other). k = 1, tau_k = 1, tau_rank = 0.1.
    sim = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    self_term = 1.0 if include_query else 0.0  # authors' code: s_qq = 1 ranks above the positive at 0.5
    rank0 = 1 + self_term * _sig((1.0 - 0.5) / 0.1) + _sig((0.2 - 0.5) / 0.1)
    rank1 = 1 + self_term * _sig((1.0 - 0.5) / 0.1) + _sig((0.3 - 0.5) / 0.1)
    expected = 1 - (_sig(1 - rank0) + _sig(1 - rank1)) / 2
    loss = rsk_loss_from_similarity(sim, labels, labels, RSkParams((1,), 0.1, 1.0, include_query),
                                    self_index=torch.arange(3))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    if include_query:
        assert rank0 > 1.99  # the query pushes its positive down by about one place


def test_minimum_of_the_loss_is_not_zero():
    # Two identical items per class, classes orthogonal: every positive is at rank 1, negatives far away.
    emb = torch.eye(4, dtype=torch.float64).repeat_interleave(2, dim=0)
    labels = torch.arange(4).repeat_interleave(2)
    loss = RecallAtKSurrogate()(emb, labels)
    expected = 1 - sum(_sig(k - 1) for k in KS) / len(KS)  # R^k = sigma(k - 1) with |P| = 1
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert loss.item() > 0.05
