"""RS@k from embeddings without the similarity matrix: against the float64 loop reference and the matrix path."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from recallk import kernels
from recallk.kernels import RSkParams, rsk_loss_from_embeddings
from recallk.losses import RecallAtKSurrogate, rsk, simix, simix_pairs
from recallk.losses.simix import simix_embeddings
from recallk.testing.rsk import rsk_loss_reference, simix_embeddings_reference
from tests.helpers.rsk_batches import random_batch

KS = (1, 2, 4, 8, 16)


def reference_loss_and_grads(q_emb, db_emb, q_labels, db_labels, self_index, include_query, tau_k=1.0):
    """The loop reference on q_emb @ db_emb^T in float64; gradients by autograd through the matmul."""
    q = q_emb.detach().double().clone().requires_grad_()
    same = db_emb is q_emb
    d = q if same else db_emb.detach().double().clone().requires_grad_()
    loss = rsk_loss_reference(q @ d.T, q_labels, db_labels, self_index, KS, 0.01, tau_k, include_query)
    loss.backward()
    return loss.detach(), q.grad, (None if same else d.grad)


def ours_loss_and_grads(q_emb, db_emb, q_labels, db_labels, self_index, include_query, tau_k=1.0, **kw):
    q = q_emb.detach().clone().requires_grad_()
    same = db_emb is q_emb
    d = q if same else db_emb.detach().clone().requires_grad_()
    loss = rsk_loss_from_embeddings(q, d, q_labels, db_labels, RSkParams(KS, 0.01, tau_k, include_query),
                                    self_index=self_index, **kw)
    loss.backward()
    return loss.detach(), q.grad, (None if same else d.grad)


@pytest.mark.parametrize("include_query", [False, True])
@pytest.mark.parametrize("block_size", [None, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_against_itself_matches_reference(include_query, block_size, seed):
    emb, labels = random_batch(32, 6, 8, seed)  # shuffled, variable class sizes (some singletons)
    self_index = torch.arange(32)
    ref = reference_loss_and_grads(emb, emb, labels, labels, self_index, include_query)
    ours = ours_loss_and_grads(emb, emb, labels, labels, self_index, include_query, block_size=block_size)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("self_index", [None, "partial"])
def test_separate_database_matches_reference_for_both_gradients(self_index):
    q_emb, q_labels = random_batch(15, 4, 6, seed=3)
    db_emb, db_labels = random_batch(33, 4, 6, seed=4)
    si = None
    if self_index == "partial":  # some queries are database items (their own column is excluded)
        si = torch.full((15,), -1)
        si[:5] = torch.tensor([0, 4, 9, 20, 32])
        q_emb[:5], q_labels[:5] = db_emb[si[:5]], db_labels[si[:5]]
    ref = reference_loss_and_grads(q_emb, db_emb, q_labels, db_labels, si, False, tau_k=(1.0, 0.5, 1.0, 2.0, 1.0))
    ours = ours_loss_and_grads(q_emb, db_emb, q_labels, db_labels, si, False, tau_k=(1.0, 0.5, 1.0, 2.0, 1.0),
                               block_size=4)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_agrees_with_float64_to_1e5():
    # Against the float64 matrix path (itself checked against the loop reference in test_rsk_loss.py), at a size
    # where the loop reference would take minutes.
    emb, labels = random_batch(300, 50, 32, seed=5)
    self_index = torch.arange(300)
    e64 = emb.clone().requires_grad_()
    loss64 = RecallAtKSurrogate(memory="matrix")(e64, labels)
    loss64.backward()
    ref = (loss64.detach(), e64.grad)
    emb32 = emb.float()
    ours = ours_loss_and_grads(emb32, emb32, labels, labels, self_index, False)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert abs(ours[0].item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())
    torch.testing.assert_close(ours[1].double(), ref[1], rtol=1e-3, atol=1e-5 * ref[1].abs().max().item())


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_batch_squared_size_is_ever_created():
    b, dim = 600, 16
    emb, labels = random_batch(b, 150, dim, seed=6, dtype=torch.float32)
    e = emb.clone().requires_grad_()
    with _LargestTensor() as spy:
        rsk_loss_from_embeddings(e, e, labels, labels, RSkParams(KS), self_index=torch.arange(b),
                                 block_size=10).backward()
    # The largest is the (10, Pmax, B) block buffer: a quarter of B x B here.
    assert e.grad is not None and spy.largest < b * b / 4, spy.largest
    # The matrix path does create one (the spy can see it).
    e.grad = None
    with _LargestTensor() as spy:
        RecallAtKSurrogate(memory="matrix")(e, labels).backward()
    assert spy.largest >= b * b


def test_simix_embeddings_against_reference_and_matrix_simix():
    emb, labels = random_batch(14, 3, 5, seed=7)
    gen = torch.Generator().manual_seed(11)
    aug, aug_labels = simix_embeddings(emb, labels, generator=gen, max_pairs_per_class=4)
    # The same generator state gives the same pairs and alphas as the matrix version.
    gen.manual_seed(11)
    a, b = simix_pairs(labels, 4, gen)
    alphas = torch.rand(a.numel(), generator=gen, dtype=torch.float64)
    ref, ref_labels = simix_embeddings_reference(emb, labels, alphas, list(zip(a.tolist(), b.tolist())))
    torch.testing.assert_close(aug, ref, rtol=1e-14, atol=1e-15)
    assert torch.equal(aug_labels, ref_labels)
    # ... and its similarity is the matrix SiMix of the batch similarity, drawn from the same generator state.
    gen.manual_seed(11)
    sim_aug, sim_labels = simix(emb @ emb.T, labels, generator=gen, max_pairs_per_class=4)
    torch.testing.assert_close(aug @ aug.T, sim_aug, rtol=1e-12, atol=1e-14)
    assert torch.equal(sim_labels, aug_labels)


@pytest.mark.parametrize("simix", [False, True])
def test_module_recompute_equals_matrix(simix):
    emb, labels = random_batch(48, 8, 8, seed=8)
    results = []
    for mode in ("matrix", "recompute"):
        loss_fn = RecallAtKSurrogate(simix=simix, memory=mode, generator=torch.Generator().manual_seed(2))
        e = emb.clone().requires_grad_()
        loss = loss_fn(e, labels)
        loss.backward()
        results.append((loss.detach(), e.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-8, atol=1e-12)


def test_module_recompute_with_separate_database():
    q, ql = random_batch(10, 3, 6, seed=9)
    db, dl = random_batch(25, 3, 6, seed=10)
    matrix = RecallAtKSurrogate(memory="matrix")(q, ql, db, dl)
    recompute = RecallAtKSurrogate(memory="recompute")(q, ql, db, dl)
    torch.testing.assert_close(recompute, matrix, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("simix", [False, True])
def test_auto_switches_on_the_size_of_the_augmented_matrix(monkeypatch, simix):
    calls = []
    real = kernels.rsk_loss_from_embeddings
    monkeypatch.setattr(kernels, "rsk_loss_from_embeddings", lambda *a, **k: calls.append(1) or real(*a, **k))
    emb, labels = torch.randn(40, 4, dtype=torch.float64), torch.arange(40) // 4  # 10 classes of 4: V = 60
    size = 40 + (60 if simix else 0)
    loss_fn = RecallAtKSurrogate(simix=simix)
    monkeypatch.setattr(rsk, "RECOMPUTE_ABOVE_BYTES", size * size * 4)  # exactly at the limit: matrix
    loss_fn(emb, labels)
    assert calls == []
    monkeypatch.setattr(rsk, "RECOMPUTE_ABOVE_BYTES", size * size * 4 - 1)
    loss_fn(emb, labels)
    assert calls == [1]


def test_bad_inputs_say_what_to_fix():
    emb, labels = random_batch(10, 3, 4, seed=12)
    args = (RSkParams(KS, 0.01, 1.0, False),)
    with pytest.raises(ValueError, match="dimensions"):
        rsk_loss_from_embeddings(emb, emb[:, :3], labels, labels, *args)
    with pytest.raises(ValueError, match="share dtype"):
        rsk_loss_from_embeddings(emb, emb.float(), labels, labels, *args)
    with pytest.raises(ValueError, match="ref_labels"):
        rsk_loss_from_embeddings(emb, emb, labels, labels[:5], *args)
    with pytest.raises(ValueError, match="NaN"):
        rsk_loss_from_embeddings(emb, torch.full_like(emb, float("nan")), labels, labels, *args)
    with pytest.raises(ValueError, match="memory must be one of"):
        RecallAtKSurrogate(memory="tiles")
    with pytest.raises(ValueError, match="simix=True"):
        RecallAtKSurrogate(simix=True, memory="recompute")(emb, labels, emb, labels)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_embeddings_are_computed_in_float32(dtype):
    emb, labels = random_batch(64, 10, 16, seed=13, dtype=torch.float32)
    half = emb.to(dtype)
    # The same (rounded) values in float32 are the exact expectation: half input is widened, not computed in half.
    ours = ours_loss_and_grads(half, half, labels, labels, torch.arange(64), False)
    widened = half.float()
    expected = ours_loss_and_grads(widened, widened, labels, labels, torch.arange(64), False)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-6, atol=0)
    # One gradient, summed in float32 and rounded once (the tensor is both queries and database).
    torch.testing.assert_close(ours[1], expected[1].to(dtype), rtol=0, atol=0)
