"""Mixed precision and overflow (issue 13, sections 3 and 6): the loss computes in float32 whatever autocast is
active and whatever half dtype the embeddings have, in every memory mode; embeddings whose inner products would
overflow get the same clear ValueError on every path, the metrics included. Expected values: the float64
reference ``recallk.testing.rsk`` or the float32 loss computed without autocast."""

from __future__ import annotations

import pytest
import torch

from recallk import kernels
from recallk.evaluation import exact_knn, retrieval_metrics
from recallk.losses import RecallAtKSurrogate, build_loss
from recallk.testing.rsk import rsk_loss_reference
from tests.helpers.device_settings import TEST_DEVICE

HALVES = (torch.bfloat16, torch.float16)
MEMORIES = ("matrix", "recompute")


def _batch(b: int, d: int = 16, per_class: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return emb.to(TEST_DEVICE, dtype), (torch.arange(b) // per_class).to(TEST_DEVICE)


def _reference(emb: torch.Tensor, labels: torch.Tensor) -> float:
    e = emb.detach().cpu().double()
    return float(rsk_loss_reference(e @ e.T, labels.cpu(), labels.cpu(), self_index=torch.arange(len(labels))))


@pytest.mark.parametrize("amp", HALVES)
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("b", [8, 24, 400])
def test_autocast_computes_the_float32_loss(amp, memory, b):
    """The standard AMP recipe: the loss called inside torch.autocast (on the test device)."""
    emb, labels = _batch(b)
    emb32 = emb.clone().requires_grad_()
    want = RecallAtKSurrogate(memory=memory)(emb32, labels)
    want.backward()
    emb_amp = emb.clone().requires_grad_()
    with torch.autocast(TEST_DEVICE.type, dtype=amp):
        got = RecallAtKSurrogate(memory=memory)(emb_amp, labels)
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb_amp.grad, emb32.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("amp", HALVES)
def test_autocast_with_simix_and_kernel_entry_points(amp):
    emb, labels = _batch(24)
    want = RecallAtKSurrogate(simix=True, memory="matrix", generator=torch.Generator().manual_seed(3))(emb, labels)
    params = kernels.RSkParams()
    self_index = torch.arange(24)
    direct = kernels.rsk_loss_from_embeddings(emb, emb, labels, labels, params, self_index=self_index)
    with torch.autocast(TEST_DEVICE.type, dtype=amp):
        for memory in MEMORIES:
            loss = RecallAtKSurrogate(simix=True, memory=memory, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(loss(emb, labels), want, rtol=0, atol=1e-6)
        got = kernels.rsk_loss_from_embeddings(emb, emb, labels, labels, params, self_index=self_index)
        torch.testing.assert_close(got, direct, rtol=0, atol=1e-6)


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_half_embeddings_are_computed_in_float32(half, memory):
    """bf16/fp16 embeddings: the similarity is not rounded to half before the tau = 0.01 sigmoid (the matrix path
    was off by about 1e-4 from the float64 loss of the same half values)."""
    emb, labels = _batch(48, seed=1, dtype=half)
    emb.requires_grad_()
    loss = RecallAtKSurrogate(memory=memory)(emb, labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - _reference(emb.detach(), labels)) < 2e-6
    loss.backward()
    assert emb.grad.dtype == half and bool(torch.isfinite(emb.grad).all())


@pytest.mark.parametrize("memory", MEMORIES)
def test_large_norm_fp16_does_not_overflow_on_one_path_only(memory):
    """fp16 embeddings of norm 400: inner products up to 1.6e5 exceed the fp16 maximum (65504). Taken as given
    (normalize_embeddings=False: by default the loss would divide them by 400 first)."""
    emb, labels = _batch(24, seed=2)
    emb = (emb * 400).half()
    loss = RecallAtKSurrogate(memory=memory, normalize_embeddings=False)(emb, labels)
    assert bool(torch.isfinite(loss))
    assert abs(float(loss) - _reference(emb, labels)) < 2e-6


def test_baseline_loss_under_autocast_matches_float32():
    emb, labels = _batch(24)
    want = build_loss("contrastive")(emb, labels)
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        got = build_loss("contrastive")(emb, labels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# --- overflow: finite embeddings whose inner products overflow ---------------------------------------------


def _huge(norm: float = 1e19):
    emb, labels = _batch(24, seed=4)
    return emb * norm, labels


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("simix", [False, True])
def test_overflowing_embeddings_same_error_in_every_loss_path(memory, simix):
    emb, labels = _huge()
    with pytest.raises(ValueError, match=r"overflow.*L2-normalise"):
        RecallAtKSurrogate(memory=memory, simix=simix)(emb, labels)
    with pytest.raises(ValueError, match=r"overflow.*L2-normalise"):
        RecallAtKSurrogate(memory=memory)(emb[:12], labels[:12], ref_emb=emb[12:], ref_labels=labels[12:])


def test_overflowing_embeddings_same_error_in_kernels_and_metrics():
    emb, labels = _huge()
    params = kernels.RSkParams()
    with pytest.raises(ValueError, match=r"overflow.*L2-normalise"):
        kernels.rsk_loss_from_embeddings(emb, emb, labels, labels, params, self_index=torch.arange(24))
    with pytest.raises(ValueError, match="overflow"):
        kernels.rsk_loss_from_similarity(torch.full((24, 24), 1e38), labels, labels, params)
    with pytest.raises(ValueError, match=r"overflow.*L2-normalise"):
        retrieval_metrics(emb.cpu(), labels.cpu())  # the metrics take host arrays
    with pytest.raises(ValueError, match=r"overflow.*L2-normalise"):
        exact_knn(emb.cpu(), emb.cpu(), k=2, exclude_self=True)
    with pytest.raises(ValueError, match=r"overflow.*L2-normalise"):
        build_loss("contrastive")(emb, labels)


def test_large_but_safe_norms_still_work():
    """Norm 1e6 (inner products 1e12) is far from overflow: accepted as given (normalize_embeddings=False), and
    equal to the float64 loss."""
    emb, labels = _huge(1e6)
    loss = RecallAtKSurrogate(memory="recompute", normalize_embeddings=False)(emb, labels)
    assert abs(float(loss) - _reference(emb, labels)) < 1e-5
    assert retrieval_metrics(emb, labels)["recall@1"] >= 0.0
