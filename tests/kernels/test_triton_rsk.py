"""Triton RS@k kernels, run on the CPU through Triton's interpreter, against a float64 loop reference.

Loss and gradients of both entry points are in test_backend_contract.py; this file tests the kernels themselves
(tiling, output buffers), half inputs and the Triton-specific errors.

TRITON_INTERPRET=1 must be set before triton is first imported: Triton decides at a kernel's definition whether
it is compiled or interpreted. If something imported triton earlier in this pytest process (compiled mode), the
tests below cannot run here, so ``test_in_fresh_interpreter_process`` reruns this file in a new process instead.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.device_settings import ON_CPU
from tests.helpers.kernel_checks import assert_close_rel, rerun_under_interpreter

if ON_CPU:  # before the first import of triton (see the module docstring); with RECALLK_TEST_DEVICE=cuda the
    os.environ["TRITON_INTERPRET"] = "1"  # session's Triton stays compiled and this file reruns interpreted
triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'recallk[triton]')")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from recallk.kernels import Positives, RSkParams, positive_layout, rsk_loss_from_embeddings, rsk_loss_from_similarity  # noqa: E402  # noqa: E402
from recallk.kernels.triton import TritonBackend  # noqa: E402
from recallk.kernels.triton.rsk_embeddings import (  # noqa: E402
    embedding_rank_backward,
    embedding_rank_forward,
    positive_similarities,
)
from recallk.kernels.triton.rsk_similarity import (  # noqa: E402
    similarity_rank_backward,
    similarity_rank_forward,
)
from recallk.testing.rsk import rsk_loss_reference  # noqa: E402

INTERPRETED = isinstance(tl.sum, InterpretedFunction)
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported compiled (before TRITON_INTERPRET=1, or RECALLK_TEST_DEVICE=cuda); "
    "covered by the subprocess rerun under the interpreter"
)
KS = (1, 2, 4, 8, 16)


# ---------------------------------------------------------------- slow, obviously-correct float64 reference


def _sig(u: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-u.clamp(-50.0, 50.0)))


def ref_ranks(sim, q_labels, db_labels, self_index, tau_rank, include_query):
    """{(q, p): rank(q, p)} in float64 by loops over queries, positives and database items."""
    s = sim.double()
    n_q, n_db = s.shape
    ranks = {}
    for q in range(n_q):
        me = int(self_index[q])
        database = [z for z in range(n_db) if z != me or include_query]
        for p in range(n_db):
            if p == me or int(db_labels[p]) != int(q_labels[q]):
                continue
            others = [z for z in database if z != p]
            ranks[q, p] = 1.0 + _sig((s[q, others] - s[q, p]) / tau_rank).sum()
    return ranks


# ---------------------------------------------------------------- data


def positive_columns(q_labels, db_labels, self_index):
    """The Triton kernels' layout: (Q, Pmax) int32 positive columns, -1 in the padding."""
    return Positives(*positive_layout(q_labels, db_labels, self_index), self_index).padded(), None


def variable_labels(n: int, seed: int) -> torch.Tensor:
    """Shuffled labels with class sizes 1 (no positive), 2, 3, ... and one class larger than 16 > max k."""
    g = torch.Generator().manual_seed(seed)
    sizes, c = [], 1
    while sum(sizes) + c <= n - 18:
        sizes.append(c)
        c = c % 6 + 1
    sizes.append(n - sum(sizes))
    labels = torch.cat([torch.full((m,), i, dtype=torch.long) for i, m in enumerate(sizes)])
    return labels[torch.randperm(n, generator=g)]


def batch(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return emb, variable_labels(n, seed)


def setting(kind: str, n: int, seed: int):
    """(q_emb, db_emb, q_labels, db_labels, self_index) for a batch against itself or a separate database."""
    emb, labels = batch(n, 8, seed)
    if kind == "self":
        return emb, emb, labels, labels, torch.arange(n)
    if kind == "separate":  # queries are not in the database
        q = n // 2
        return emb[:q], emb[q:], labels[:q], labels[q:], torch.full((q,), -1)
    # "mixed": the first half of the queries are database columns, the rest are not
    q = n // 2
    db_emb, db_labels = emb, labels
    q_emb = torch.cat([emb[: q // 2], batch(q - q // 2, 8, seed + 1)[0]])
    q_labels = torch.cat([labels[: q // 2], labels[torch.arange(q - q // 2) * 3 % n]])
    self_index = torch.cat([torch.arange(q // 2), torch.full((q - q // 2,), -1)])
    return q_emb, db_emb, q_labels, db_labels, self_index


# ---------------------------------------------------------------- similarity kernel


@needs_interpreter
@pytest.mark.parametrize("include_query", [False, True])
def test_similarity_kernels_tile_and_overwrite_poisoned_outputs(include_query: bool) -> None:
    """Tiny tiles (several column tiles, a partial one, several positive blocks) into NaN-filled buffers."""
    q_emb, db_emb, ql, dl, si = setting("mixed", 40, seed=7)
    sim = q_emb @ db_emb.T
    pos, _ = positive_columns(ql, dl, si)
    assert pos.shape[1] > 8  # the big class gives several positive blocks of 4
    q, pmax = pos.shape
    rank = torch.full((q, pmax), float("nan"))
    dsum = torch.full((q, pmax), float("nan"))
    similarity_rank_forward(sim, pos, si, 0.01, include_query, out_rank=rank, out_dsum=dsum, block_p=4, block_n=16)
    expected = ref_ranks(sim, ql, dl, si, 0.01, include_query)
    for (qq, p), r in expected.items():
        slot = int((pos[qq] == p).nonzero())
        assert abs(float(rank[qq, slot]) - float(r)) <= 1e-5 * float(r)
    padding = pos < 0
    assert (rank[padding] == 0).all() and (dsum[padding] == 0).all()
    assert torch.isfinite(dsum).all() and (dsum >= 0).all()

    g = torch.where(padding, 0.0, torch.randn(q, pmax, generator=torch.Generator().manual_seed(0)))
    # A transposed (column-major) output buffer checks that the output strides are honoured.
    out = torch.full((dl.numel(), q), float("nan")).T
    similarity_rank_backward(sim, pos, si, g, dsum, 0.01, include_query, out=out, block_p=4, block_n=16)
    # Independent check: autograd through the float64 reference ranks with the same upstream gradient.
    sim64 = sim.double().requires_grad_()
    ranks64 = ref_ranks(sim64, ql, dl, si, 0.01, include_query)
    total = sum(g[qq, int((pos[qq] == p).nonzero())].double() * r for (qq, p), r in ranks64.items())
    (grad64,) = torch.autograd.grad(total, sim64)
    assert_close_rel(out, grad64, 1e-5)
    default = similarity_rank_backward(sim, pos, si, g, dsum, 0.01, include_query)
    assert_close_rel(out, default, 1e-6)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_similarity_half_precision_inputs(dtype: torch.dtype) -> None:
    """Half inputs are upcast exactly, so the loss matches the reference on the same values; grads are half."""
    q_emb, db_emb, ql, dl, si = setting("self", 40, seed=11)
    sim = (q_emb @ db_emb.T).to(dtype).requires_grad_()
    loss = rsk_loss_from_similarity(sim, ql, dl, RSkParams(KS, 0.05), self_index=si, backend="triton")
    (grad,) = torch.autograd.grad(loss, sim)
    sim64 = sim.detach().double().requires_grad_()
    expected = rsk_loss_reference(sim64, ql, dl, si, KS, 0.05, 1.0, False)
    (grad64,) = torch.autograd.grad(expected, sim64)
    assert grad.dtype == dtype
    assert_close_rel(loss, expected, 1e-5)
    assert_close_rel(grad, grad64, 1e-2)  # the gradient itself is rounded to the half dtype


@needs_interpreter
def test_similarity_bad_input_raises_value_error() -> None:
    _, _, ql, dl, si = setting("self", 16, seed=1)
    sim = torch.randn(16, 16)
    params = RSkParams(KS)

    def loss(sim, ql, dl, si, params=params):
        return rsk_loss_from_similarity(sim, ql, dl, params, self_index=si, backend="triton")

    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(sim.index_fill(0, torch.tensor([3]), float("nan")), ql, dl, si)
    with pytest.raises(ValueError, match="float64"):
        loss(sim.double(), ql, dl, si)
    with pytest.raises(ValueError, match="query_labels"):
        loss(sim, ql[:-1], dl, si)
    with pytest.raises(ValueError, match="self_index"):
        loss(sim, ql, dl, si + 1)
    with pytest.raises(ValueError, match="tau_k"):
        loss(sim, ql, dl, si, RSkParams(KS, 0.01, (1.0, 2.0), False))
    with pytest.raises(ValueError, match="positive"):
        distinct = torch.arange(16)
        loss(sim, distinct, distinct, si)


# ---------------------------------------------------------------- embeddings kernel


@needs_interpreter
def test_embedding_kernels_tile_and_overwrite_poisoned_outputs() -> None:
    """Tiles of 16 rows x 16 columns x 16 dims over Q = 24, N = 50, d = 20 (partial tiles everywhere)."""
    q_emb, db_emb, ql, dl, si = setting("mixed", 50, seed=17)
    g = torch.Generator().manual_seed(2)
    q_emb = torch.nn.functional.normalize(torch.randn(q_emb.shape[0], 20, generator=g), dim=1)
    db_emb = torch.nn.functional.normalize(torch.randn(db_emb.shape[0], 20, generator=g), dim=1)
    pos, _ = positive_columns(ql, dl, si)
    q, pmax = pos.shape
    tiles = dict(block_q=16, block_n=16, block_p=2, block_k=16)
    s_pos = positive_similarities(q_emb, db_emb, pos)
    rank = torch.full((q, pmax), float("nan"))
    dsum = torch.full((q, pmax), float("nan"))
    embedding_rank_forward(q_emb, db_emb, pos, si, s_pos, 0.01, False, out_rank=rank, out_dsum=dsum, **tiles)
    sim_rank, sim_dsum = similarity_rank_forward(q_emb @ db_emb.T, pos, si, 0.01, False)
    assert_close_rel(rank, sim_rank, 1e-5)
    assert_close_rel(dsum, sim_dsum, 1e-4)

    grad_rank = torch.where(pos < 0, 0.0, torch.randn(q, pmax, generator=g))
    dq = torch.full((q, 20), float("nan"))
    ddb = torch.full((db_emb.shape[0], 20), float("nan"))
    embedding_rank_backward(q_emb, db_emb, pos, si, s_pos, grad_rank, 0.01, False, out_query=dq, out_ref=ddb,
                            block_q=16, block_n=16, block_k=16)
    # The dense part H of dL/ds is the similarity backward without the positive-pair terms (dsum = 0).
    h = similarity_rank_backward(q_emb @ db_emb.T, pos, si, grad_rank, torch.zeros_like(dsum), 0.01, False)
    assert_close_rel(dq, h @ db_emb, 1e-5)
    assert_close_rel(ddb, h.T @ q_emb, 1e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_embeddings_half_precision_inputs(dtype: torch.dtype) -> None:
    q_emb, _, ql, dl, si = setting("self", 32, seed=19)
    emb = q_emb.to(dtype).requires_grad_()
    loss = rsk_loss_from_embeddings(emb, emb, ql, dl, RSkParams(KS, 0.05), self_index=si, backend="triton")
    (grad,) = torch.autograd.grad(loss, emb)
    emb64 = emb.detach().double().requires_grad_()
    expected = rsk_loss_reference(emb64 @ emb64.T, ql, dl, si, KS, 0.05, 1.0, False)
    (grad64,) = torch.autograd.grad(expected, emb64)
    assert grad.dtype == dtype
    assert_close_rel(loss, expected, 1e-5)
    assert_close_rel(grad, grad64, 1e-2)


@needs_interpreter
def test_embeddings_bad_input_raises_value_error() -> None:
    emb, labels = batch(16, 8, seed=1)
    si = torch.arange(16)
    with pytest.raises(ValueError, match="dimensions"):
        rsk_loss_from_embeddings(emb, emb[:, :4], labels, labels, RSkParams(KS), self_index=si, backend="triton")
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = emb.clone()
        bad[2, 1] = float("inf")
        rsk_loss_from_embeddings(bad, emb, labels, labels, RSkParams(KS), self_index=si, backend="triton")
    with pytest.raises(ValueError, match="precision"):
        TritonBackend(precision="fp8")


@needs_interpreter
def test_other_precisions() -> None:
    emb, labels = batch(16, 8, seed=2)
    si = torch.arange(16)
    new = rsk_loss_from_embeddings(emb, emb, labels, labels, RSkParams(KS), self_index=si, backend="triton")
    for precision in ("tf32", "tf32x3"):  # the interpreter computes every precision exactly
        other = rsk_loss_from_embeddings(emb, emb, labels, labels, RSkParams(KS), self_index=si,
                                         backend=TritonBackend(precision=precision))
        assert_close_rel(other, new, 1e-6)


# ---------------------------------------------------------------- when triton was already imported compiled


@pytest.mark.skipif(INTERPRETED, reason="the tests above ran in this process under the interpreter")
def test_in_fresh_interpreter_process() -> None:
    rerun_under_interpreter(__file__)
