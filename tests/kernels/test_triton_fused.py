"""The tensor-core RS@k kernels from embeddings (``recallk.kernels.triton.rsk_fused``, ``TritonBackend(kernel=
"fused")``), run on the CPU through Triton's interpreter, against the float64 loop reference of recallk.testing.

Small tiles (16 x 16, BLOCK_K 16, 8 positive slots per forward program, d chunks of 16) over sizes that are no
multiple of them, so every partial tile, the forward's grid over positive blocks (a class of 21 items: 20
positives), the backward's grid over d chunks (d = 20) and the split inner loops (at least 8 programs per
launch, partial sums added on the host) run; the default-tiles test runs the unsplit path.

TRITON_INTERPRET=1 must be set before triton is first imported; when it was imported compiled earlier in this
process, the last test reruns this file in a fresh interpreter process.
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

from recallk.kernels import Positives, RSkParams, positive_layout, rsk_loss_from_embeddings  # noqa: E402
from recallk.kernels.triton import TritonBackend  # noqa: E402
from recallk.kernels.triton import rsk_fused as fused  # noqa: E402
from recallk.kernels.triton.rsk_similarity import similarity_rank_forward  # noqa: E402
from recallk.testing.rsk import rsk_loss_reference  # noqa: E402

INTERPRETED = isinstance(tl.sum, InterpretedFunction)
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported compiled (before TRITON_INTERPRET=1, or RECALLK_TEST_DEVICE=cuda); "
    "covered by the subprocess rerun under the interpreter"
)
SMALL = fused.FusedConfig(fwd=(16, 16, 16, 4, 1), dq=(16, 16, 16, 4, 1), dref=(16, 32, 16, 4, 1), max_block_p=8,
                           max_block_d=16, programs=8)  # fmt: skip
#: class sizes of the reference set: a singleton (no positive) up to 21 items (20 or 21 positives, more than the
#: largest k); a batch against itself has classes up to 13 (the float64 loop reference is slow)
CLASS_SIZES = (1, 2, 3, 5, 8, 21)
SELF_CLASS_SIZES = (1, 2, 3, 5, 8, 13)


def small_fused() -> TritonBackend:
    """TritonBackend(kernel="fused") with the small test tiles and exact float32 ("ieee") tile products."""
    return TritonBackend(precision="ieee", kernel="fused", fused_config=SMALL)


def labels_of(sizes: tuple[int, ...], seed: int) -> torch.Tensor:
    labels = torch.cat([torch.full((m,), i, dtype=torch.long) for i, m in enumerate(sizes)])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def setting(kind: str, seed: int, d: int = 20):
    """(query_emb, ref_emb, query_labels, ref_labels, self_index), float32.

    "self": 32 items (SELF_CLASS_SIZES) against themselves. "separate": 16 outside queries, two of every class
    of CLASS_SIZES and four more, against those 40 references (N = 2.5 Q, as SiMix gives). "partial": 16
    queries, the first 8 of them reference items (their columns excluded), the rest outside.
    """
    g = torch.Generator().manual_seed(seed)
    labels = labels_of(SELF_CLASS_SIZES if kind == "self" else CLASS_SIZES, seed)
    emb = torch.nn.functional.normalize(torch.randn(labels.numel(), d, generator=g), dim=1)
    if kind == "self":
        return emb, emb, labels, labels, torch.arange(labels.numel())
    outside = torch.nn.functional.normalize(torch.randn(16, d, generator=g), dim=1)
    outside_labels = torch.arange(16) % len(CLASS_SIZES)
    if kind == "separate":
        return outside, emb, outside_labels, labels, torch.full((16,), -1)
    query = torch.cat([emb[5:13], outside[:8]])
    query_labels = torch.cat([labels[5:13], outside_labels[:8]])
    return query, emb, query_labels, labels, torch.cat([torch.arange(5, 13), torch.full((8,), -1)])


def check_against_reference(kind: str, params: RSkParams, backend: TritonBackend, seed: int = 3) -> None:
    query_emb, ref_emb, query_labels, ref_labels, self_index = setting(kind, seed)
    same = kind == "self"
    inputs = tuple(x.clone().requires_grad_() for x in ((query_emb,) if same else (query_emb, ref_emb)))
    loss = rsk_loss_from_embeddings(inputs[0], inputs[-1], query_labels, ref_labels, params, self_index=self_index,
                                    backend=backend)  # fmt: skip
    grads = torch.autograd.grad(loss, inputs)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    expected = rsk_loss_reference(inputs64[0] @ inputs64[-1].T, query_labels, ref_labels, self_index, params.ks,
                                  params.tau_rank, params.tau_k, params.include_query)  # fmt: skip
    grads64 = torch.autograd.grad(expected, inputs64)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_rel(loss, expected, 1e-5)
    for g, g64 in zip(grads, grads64, strict=True):
        assert g.dtype == torch.float32
        assert_close_rel(g, g64, 1e-5)


@needs_interpreter
@pytest.mark.parametrize(
    ("kind", "include_query", "ks", "tau_k"),
    [
        ("self", False, (1, 2, 4, 8, 16), (1.0,)),
        ("self", True, (1, 3, 25), (1.0, 0.5, 2.0)),
        ("separate", False, (1, 2, 4, 8, 16), (1.0,)),
        ("separate", True, (2, 5), (1.0,)),
        ("partial", False, (1, 4, 16), (0.5, 1.0, 1.0)),
        ("partial", True, (1, 2, 4, 8, 16), (1.0,)),
    ],
)
def test_loss_and_gradients_match_float64_reference(kind, include_query, ks, tau_k) -> None:
    check_against_reference(kind, RSkParams(ks, 0.01, tau_k, include_query), small_fused())


@needs_interpreter
def test_default_tiles_and_backend_option() -> None:
    """The default tiles (128 x 128 forward, one program for all 40 rows) through ``TritonBackend(kernel="fused",
    precision="ieee")`` itself; the default precision of the fused kernels is tf32x3."""
    assert TritonBackend(kernel="fused").precision == "tf32x3" and TritonBackend().precision == "ieee"
    check_against_reference("partial", RSkParams((1, 2, 4, 8, 16)), TritonBackend(kernel="fused", precision="ieee"))


@needs_interpreter
@pytest.mark.parametrize("include_query", [False, True])
def test_forward_ranks_match_the_similarity_kernel_without_gradient(include_query: bool) -> None:
    """Ranks (no dsum asked) of every positive slot equal those of the similarity kernel on ``q @ r^T``; the
    padding slots are 0."""
    query_emb, ref_emb, ql, rl, si = setting("partial", seed=5)
    pos = Positives(*positive_layout(ql, rl, si), si).padded()
    s_pos = fused.positive_similarities(query_emb, ref_emb, pos)
    rank, dsum = fused.fused_rank_forward(query_emb, ref_emb, pos, si, s_pos, 0.01, include_query,
                                          precision="ieee", want_dsum=False, config=SMALL)  # fmt: skip
    expected, _ = similarity_rank_forward(query_emb @ ref_emb.T, pos, si, 0.01, include_query)
    assert dsum is None
    assert_close_rel(rank, expected, 1e-6)
    assert (rank[pos < 0] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    """Half embeddings are multiplied natively (exact products): the loss matches the reference on the rounded
    values; the gradients come back in the half dtype."""
    query_emb, ref_emb, ql, rl, si = setting("separate", seed=7)
    inputs = (query_emb.to(dtype).requires_grad_(), ref_emb.to(dtype).requires_grad_())
    params = RSkParams((1, 2, 4, 8, 16), 0.05)
    loss = rsk_loss_from_embeddings(*inputs, ql, rl, params, self_index=si, backend=small_fused())
    grads = torch.autograd.grad(loss, inputs)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    expected = rsk_loss_reference(inputs64[0] @ inputs64[1].T, ql, rl, si, params.ks, 0.05, 1.0, False)
    grads64 = torch.autograd.grad(expected, inputs64)
    assert_close_rel(loss, expected, 1e-5)
    for g, g64 in zip(grads, grads64, strict=True):
        assert g.dtype == dtype
        assert_close_rel(g, g64, 1e-2)  # the gradient itself is rounded to the half dtype


@pytest.mark.parametrize(("programs", "launched", "length", "block", "expected"),
                         [(8, 3, 40, 16, 3), (264, 32, 4000, 64, 9), (264, 1024, 65_536, 64, 1), (9, 2, 1, 16, 1)])
def test_splits_give_enough_programs_and_no_empty_part(programs, launched, length, block, expected) -> None:
    assert fused.FusedConfig(programs=programs).splits(torch.device("cpu"), launched, length, block) == expected
    assert fused.FusedConfig().splits(torch.device("cpu"), launched, length, block) == 1  # CPU default: no split


def test_bad_options_raise_value_error() -> None:
    with pytest.raises(ValueError, match="kernel must be one of"):
        TritonBackend(kernel="flash")
    with pytest.raises(ValueError, match="precision"):
        TritonBackend(kernel="fused", precision="bf16")
    with pytest.raises(ValueError, match="fused_config"):
        TritonBackend(fused_config=SMALL)
    with pytest.raises(ValueError, match="power of two"):
        fused.FusedConfig(max_block_p=12)
    with pytest.raises(ValueError, match="programs"):
        fused.FusedConfig(programs=0)
    with pytest.raises(ValueError, match="BLOCK_Q"):
        fused.FusedConfig(fwd=(128, 100, 32, 8, 2))
    with pytest.raises(ValueError, match="precision"):
        fused.rank_from_embeddings_fused(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int32),
                                         torch.arange(2), 0.01, False, precision="fp8")  # fmt: skip


# ---------------------------------------------------------------- when triton was already imported compiled


@pytest.mark.skipif(INTERPRETED, reason="the tests above ran in this process under the interpreter")
def test_in_fresh_interpreter_process() -> None:
    rerun_under_interpreter(__file__)
