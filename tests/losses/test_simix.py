"""SiMix on similarities against mixing the embeddings explicitly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recallk.losses import RecallAtKSurrogate, simix, simix_pairs
from recallk.testing.rsk import rsk_loss_reference, simix_embeddings_reference
from tests.helpers.rsk_batches import random_batch


def all_pairs(labels: torch.Tensor) -> list[tuple[int, int]]:
    lab = labels.tolist()
    return [(a, b) for a in range(len(lab)) for b in range(a + 1, len(lab)) if lab[a] == lab[b]]


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(-3, 6), min_size=0, max_size=25))
def test_pairs_are_every_same_class_pair_in_lexicographic_order(labels):
    lab = torch.tensor(labels, dtype=torch.long)
    a, b = simix_pairs(lab)
    assert list(zip(a.tolist(), b.tolist())) == all_pairs(lab)


@pytest.mark.parametrize("seed", [0, 1])
def test_simix_similarity_equals_similarity_of_mixed_embeddings(seed):
    emb, labels = random_batch(13, 3, 5, seed)
    n_pairs = len(all_pairs(labels))
    alphas = torch.rand(n_pairs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sim_aug, labels_aug = simix(emb @ emb.T, labels, alphas=alphas)
    emb_aug, labels_ref = simix_embeddings_reference(emb, labels, alphas)
    assert sim_aug.shape == (13 + n_pairs, 13 + n_pairs)
    assert torch.equal(labels_aug, labels_ref)
    torch.testing.assert_close(sim_aug, emb_aug @ emb_aug.T, rtol=0, atol=1e-12)


def test_loss_and_gradient_with_simix_equal_explicit_mixing():
    emb, labels = random_batch(9, 3, 6, seed=3)
    alphas = torch.rand(len(all_pairs(labels)), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    loss_fn = RecallAtKSurrogate(tau_rank=0.05)
    sim_aug, labels_aug = simix(e1 @ e1.T, labels, alphas=alphas)
    ours = loss_fn.from_similarity(sim_aug, labels_aug)
    emb_aug, labels_ref = simix_embeddings_reference(e2, labels, alphas)
    n = labels_ref.numel()
    ref = rsk_loss_reference(emb_aug @ emb_aug.T, labels_ref, labels_ref, torch.arange(n), loss_fn.ks, 0.05, 1.0)
    ours.backward()
    ref.backward()
    assert abs(ours.item() - ref.item()) < 1e-10
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-9, atol=1e-10)


def test_module_with_simix_uses_its_generator():
    emb, labels = random_batch(10, 2, 4, seed=6)
    loss_fn = RecallAtKSurrogate(simix=True, generator=torch.Generator().manual_seed(42))
    loss = loss_fn(emb, labels)
    sim_aug, labels_aug = simix(emb @ emb.T, labels, generator=torch.Generator().manual_seed(42))
    expected = RecallAtKSurrogate().from_similarity(sim_aug, labels_aug)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # the generator advances: a second call mixes with new alphas
    assert loss_fn(emb, labels).item() != loss.item()


def test_default_generator_follows_manual_seed():
    emb, labels = random_batch(10, 2, 4, seed=7)
    torch.manual_seed(123)
    first = RecallAtKSurrogate(simix=True)(emb, labels)
    torch.manual_seed(123)
    second = RecallAtKSurrogate(simix=True)(emb, labels)
    assert first.item() == second.item()


def test_simix_is_differentiable_wrt_similarity():
    emb, labels = random_batch(6, 2, 3, seed=8)
    sim = (emb @ emb.T).requires_grad_()
    alphas = torch.rand(len(all_pairs(labels)), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda s: simix(s, labels, alphas=alphas)[0], (sim,))


def test_simix_works_on_a_non_symmetric_matrix():
    g = torch.Generator().manual_seed(9)
    sim = torch.randn(6, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0, 2])
    pairs = all_pairs(labels)
    alphas = torch.rand(len(pairs), generator=g, dtype=torch.float64)
    m = torch.zeros(len(pairs), 6, dtype=torch.float64)  # the dense mixing matrix, for this check only
    for v, ((a, b), w) in enumerate(zip(pairs, alphas)):
        m[v, a], m[v, b] = w, 1 - w
    expected = torch.cat([torch.cat([sim, sim @ m.T], 1), torch.cat([m @ sim, m @ sim @ m.T], 1)], 0)
    torch.testing.assert_close(simix(sim, labels, alphas=alphas)[0], expected, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=30),
    cap=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_pair_cap_keeps_a_random_subset_in_lexicographic_order(labels, cap, seed):
    lab = torch.tensor(labels, dtype=torch.long)
    every = all_pairs(lab)
    a, b = simix_pairs(lab, max_pairs_per_class=cap, generator=torch.Generator().manual_seed(seed))
    kept = list(zip(a.tolist(), b.tolist()))
    assert kept == sorted(kept)
    assert set(kept) <= set(every)
    for c in set(labels):
        n_class = sum(1 for p in every if labels[p[0]] == c)
        assert sum(1 for p in kept if labels[p[0]] == c) == min(cap, n_class)
    again = simix_pairs(lab, max_pairs_per_class=cap, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])


def test_pair_cap_draws_different_subsets():
    lab = torch.zeros(10, dtype=torch.long)
    subsets = {tuple(simix_pairs(lab, 5, torch.Generator().manual_seed(s))[0].tolist()
                     + simix_pairs(lab, 5, torch.Generator().manual_seed(s))[1].tolist()) for s in range(6)}
    assert len(subsets) > 1


def test_capped_simix_matches_explicit_mixing_of_kept_pairs():
    emb, labels = random_batch(14, 2, 4, seed=10)
    a, b = simix_pairs(labels, 4, torch.Generator().manual_seed(3))
    alphas = torch.linspace(0.1, 0.9, a.numel(), dtype=torch.float64)
    sim_aug, labels_aug = simix(emb @ emb.T, labels, alphas=alphas, generator=torch.Generator().manual_seed(3),
                                max_pairs_per_class=4)
    emb_aug, labels_ref = simix_embeddings_reference(emb, labels, alphas, pairs=list(zip(a.tolist(), b.tolist())))
    assert torch.equal(labels_aug, labels_ref)
    torch.testing.assert_close(sim_aug, emb_aug @ emb_aug.T, rtol=0, atol=1e-12)


def test_simix_keeps_dtype_and_grows_batch_as_in_the_paper():
    # 4 items per class -> 6 virtual items per class: B grows to 2.5 B.
    emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    labels = torch.arange(4).repeat_interleave(4)
    sim_aug, labels_aug = simix(emb @ emb.T, labels)
    assert sim_aug.shape == (40, 40) and sim_aug.dtype == torch.float32
    assert torch.equal(torch.bincount(labels_aug), torch.full((4,), 10))


def test_wrong_alphas_raise():
    emb, labels = random_batch(6, 2, 3, seed=11)
    with pytest.raises(ValueError, match="one weight per same-class pair"):
        simix(emb @ emb.T, labels, alphas=torch.ones(100, dtype=torch.float64))
