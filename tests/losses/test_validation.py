"""Every bad input raises ValueError with a message that says how to fix it."""

from __future__ import annotations

import pytest
import torch

from recallk.kernels import RSkParams, rsk_loss_from_similarity
from recallk.losses import RecallAtKSurrogate, build_loss, simix

EMB = torch.nn.functional.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=1)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
K1 = RSkParams((1,), 0.01, 1.0, False)


def loss(emb=EMB, labels=LABELS, **kw):
    return RecallAtKSurrogate()(emb, labels, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_embeddings(bad):
    emb = EMB.clone()
    emb[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(emb)


def test_non_finite_similarity():
    sim = EMB @ EMB.T
    sim[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        RecallAtKSurrogate().from_similarity(sim, LABELS)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rsk_loss_from_similarity(sim, LABELS, LABELS, K1)


def test_huge_finite_values_are_not_mistaken_for_inf():
    # Every entry is finite but their float32 sum overflows: the fast check must fall back, not raise.
    sim = 1e37 * (1.0 + (EMB @ EMB.T))
    assert not torch.isfinite(sim.sum())
    out = RecallAtKSurrogate(tau_rank=1e36).from_similarity(sim, LABELS)
    assert torch.isfinite(out)


def test_mismatched_labels_length():
    with pytest.raises(ValueError, match="one label per item"):
        loss(labels=LABELS[:-1])


def test_float_labels():
    with pytest.raises(ValueError, match="integer class ids"):
        loss(labels=LABELS.float())


def test_bool_labels():
    with pytest.raises(ValueError, match="integer class ids"):
        loss(labels=LABELS > 1)


def test_labels_not_a_tensor():
    with pytest.raises(ValueError, match=r"torch\.as_tensor"):
        loss(labels=[0, 0, 1, 1, 2, 2, 3, 3])


def test_integer_embeddings():
    with pytest.raises(ValueError, match="floating"):
        loss(emb=torch.ones(8, 4, dtype=torch.long))


def test_embeddings_wrong_rank():
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        loss(emb=EMB[None])


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        loss(emb=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))


def test_no_query_with_a_positive():
    with pytest.raises(ValueError, match="ClassBalancedBatchSampler"):
        loss(labels=torch.arange(8))


def test_no_positive_in_separate_database():
    # a reference set without the queries' labels: say so, with the labels on both sides, not the sampler advice
    for call in (lambda: loss(ref_emb=EMB, ref_labels=LABELS + 100),
                 lambda: RecallAtKSurrogate().from_similarity(EMB @ EMB.T, LABELS, LABELS + 100),
                 lambda: rsk_loss_from_similarity(EMB[:3] @ EMB.T, LABELS[:3], LABELS + 100, K1)):
        with pytest.raises(ValueError, match="no reference item shares a query's label") as err:
            call()
        message = str(err.value)
        assert "ref_labels 100, 101, 102, 103" in message and "labels 0, 1" in message
        assert "queries" in message and "ClassBalancedBatchSampler" not in message and "per_class" not in message
    with pytest.raises(ValueError, match=r"none of the 8 queries .* among the 12 reference items"):
        loss(ref_emb=torch.cat([EMB, EMB[:4]]), ref_labels=torch.arange(12) + 100)
    # the batch against itself keeps the sampler advice
    with pytest.raises(ValueError, match="per_class >= 2"):
        rsk_loss_from_similarity(EMB @ EMB.T, torch.arange(8), torch.arange(8), K1, self_index=torch.arange(8))


def test_non_square_similarity_without_ref_labels():
    with pytest.raises(ValueError, match="square"):
        RecallAtKSurrogate().from_similarity(EMB[:5] @ EMB.T, LABELS[:5])


def test_ref_emb_without_labels_and_dim_mismatch():
    with pytest.raises(ValueError, match="together"):
        loss(ref_emb=EMB)
    with pytest.raises(ValueError, match="dimensions"):
        loss(ref_emb=torch.ones(3, 5), ref_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(ref_emb=EMB, ref_labels=LABELS[:3])


def test_simix_with_separate_database():
    with pytest.raises(ValueError, match="simix"):
        RecallAtKSurrogate(simix=True)(EMB, LABELS, ref_emb=EMB, ref_labels=LABELS)


@pytest.mark.parametrize("kw, match", [
    ({"ks": ()}, "ks"),
    ({"ks": (0, 1)}, "ks"),
    ({"ks": (1.5,)}, "ks"),
    ({"tau_rank": 0.0}, "tau_rank"),
    ({"tau_rank": float("nan")}, "tau_rank"),
    ({"tau_k": (1.0, 2.0)}, "one per k"),
    ({"tau_k": -1.0}, "tau_k"),
    ({"backend": "cuda"}, "backend"),
    ({"max_pairs_per_class": 0}, "max_pairs_per_class"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        RecallAtKSurrogate(**kw)


def test_bad_self_index_and_block_size():
    sim = EMB @ EMB.T
    with pytest.raises(ValueError, match="self_index"):
        rsk_loss_from_similarity(sim, LABELS, LABELS, K1, self_index=torch.full((8,), 8))
    with pytest.raises(ValueError, match="self_index"):
        rsk_loss_from_similarity(sim, LABELS, LABELS, K1, self_index=torch.arange(7))
    with pytest.raises(ValueError, match="block_size"):
        rsk_loss_from_similarity(sim, LABELS, LABELS, K1, block_size=0)
    with pytest.raises(ValueError, match="ref_labels"):
        rsk_loss_from_similarity(sim, LABELS, LABELS[:4], K1)


def test_simix_bad_inputs():
    with pytest.raises(ValueError, match="square"):
        simix(EMB[:3] @ EMB.T, LABELS[:3])
    with pytest.raises(ValueError, match="one label per item"):
        simix(EMB @ EMB.T, LABELS[:3])


def test_build_loss_bad_name_and_options():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("triplet")
    with pytest.raises(ValueError, match="bad options"):
        build_loss("contrastive", not_an_option=1)
    with pytest.raises(ValueError, match="bad options"):
        build_loss("rsk", not_an_option=1)
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("proxy_anchor")
