"""Every registered RS@k backend, through both checked entry points, against the float64 loop reference.

A new backend is tested here by registering it. One that cannot run on the test device (``RECALLK_TEST_DEVICE``,
default the CPU) is skipped with the reason; on the CPU Triton runs through its interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU), so the sizes are tiny. Each backend runs in the most precise of
``RECALLK_TEST_DTYPES`` that it supports (default: float64 for torch, float32 for Triton).
"""

from __future__ import annotations

import pytest
import torch

from recallk import kernels
from recallk.kernels import RSkParams, rsk_loss_from_embeddings, rsk_loss_from_similarity
from recallk.testing.rsk import rsk_loss_reference
from tests.helpers.device_settings import TEST_DEVICE, most_precise
from tests.helpers.kernel_checks import assert_close_rel

BACKENDS = [name for name in kernels.backend_names() if name != "auto"]
KS = (1, 2, 4, 8, 16)
TAU_K = (1.0, 0.5, 1.0, 2.0, 1.0)


def runnable(name: str) -> torch.dtype:
    """The dtype to test backend ``name`` in; skips when it cannot run on the test device or in any test dtype."""
    impl = kernels.get_backend(name)
    if not impl.available(TEST_DEVICE):
        pytest.skip(f"backend {name!r} cannot run on {TEST_DEVICE} here: it needs {impl.requirement}")
    dtype = most_precise(impl.dtypes)
    if dtype is None:
        pytest.skip(f"backend {name!r} supports none of RECALLK_TEST_DTYPES (it takes {impl.dtypes})")
    return dtype


#: relative tolerance against the float64 reference; half inputs are computed in float32 but their gradients are
#: rounded back to half
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def setting(kind: str, seed: int):
    """(query_emb, ref_emb, query_labels, ref_labels, self_index), float64: a batch against itself, a separate
    reference set, or "partial": six queries are reference items (their columns excluded), six are not."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (24,), generator=g)
    emb = torch.nn.functional.normalize(torch.randn(24, 8, generator=g, dtype=torch.float64), dim=1)
    if kind == "self":
        return emb, emb, labels, labels, torch.arange(24)
    if kind == "separate":
        return emb[:10], emb[10:], labels[:10], labels[10:], None
    outside = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    query_emb = torch.cat([emb[3:9], outside])
    query_labels = torch.cat([labels[3:9], labels[:6]])
    return query_emb, emb, query_labels, labels, torch.cat([torch.arange(3, 9), torch.full((6,), -1)])


@pytest.mark.parametrize("include_query", [False, True])
@pytest.mark.parametrize("kind", ["self", "separate", "partial"])
@pytest.mark.parametrize("entry", ["similarity", "embeddings"])
@pytest.mark.parametrize("name", BACKENDS)
def test_loss_and_gradients_match_float64_reference(name: str, entry: str, kind: str, include_query: bool,
                                                     device: torch.device) -> None:  # fmt: skip
    dtype = runnable(name)
    rtol = RTOL[dtype]
    query_emb, ref_emb, query_labels, ref_labels, self_index = setting(kind, seed=3)
    same = ref_emb is query_emb
    params = RSkParams(KS, 0.01, TAU_K, include_query)
    on = {"device": device}  # the labels and self index go to the device too
    labels_on = (query_labels.to(**on), ref_labels.to(**on), None if self_index is None else self_index.to(**on))
    if entry == "similarity":
        inputs = ((query_emb @ ref_emb.T).to(device, dtype).requires_grad_(),)
        loss = rsk_loss_from_similarity(inputs[0], labels_on[0], labels_on[1], params, self_index=labels_on[2],
                                        backend=name)
    else:  # one tensor as both queries and references: its two gradients are summed
        inputs = tuple(x.to(device, dtype).requires_grad_() for x in ((query_emb,) if same else (query_emb, ref_emb)))
        loss = rsk_loss_from_embeddings(inputs[0], inputs[-1], labels_on[0], labels_on[1], params,
                                        self_index=labels_on[2], backend=name)
    grads = torch.autograd.grad(loss, inputs)
    assert loss.device == device and all(g.device == device for g in grads)
    inputs64 = [x.detach().cpu().double().requires_grad_() for x in inputs]
    sim64 = inputs64[0] if entry == "similarity" else inputs64[0] @ inputs64[-1].T
    expected = rsk_loss_reference(sim64, query_labels, ref_labels, self_index, KS, 0.01, TAU_K, include_query)
    grads64 = torch.autograd.grad(expected, inputs64)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_rel(loss, expected, rtol)
    for g, g64 in zip(grads, grads64, strict=True):
        assert g.dtype == dtype
        assert_close_rel(g, g64, rtol)


@pytest.mark.parametrize("name", BACKENDS)
def test_no_positive_and_bad_labels_are_value_errors(name: str, device: torch.device) -> None:
    dtype = runnable(name)
    emb = torch.nn.functional.normalize(torch.randn(6, 4, dtype=dtype), dim=1).to(device)
    distinct = torch.arange(6, device=device)
    with pytest.raises(ValueError, match="ClassBalancedBatchSampler"):
        rsk_loss_from_similarity(emb @ emb.T, distinct, distinct, RSkParams(), self_index=distinct, backend=name)
    with pytest.raises(ValueError, match="ClassBalancedBatchSampler"):
        rsk_loss_from_embeddings(emb, emb, distinct, distinct, RSkParams(), self_index=distinct, backend=name)
    with pytest.raises(ValueError, match="query_labels"):
        rsk_loss_from_embeddings(emb, emb, distinct[:5], distinct, RSkParams(), backend=name)


def test_registry_dispatch_and_auto_choice() -> None:
    cpu = torch.device("cpu")
    assert kernels.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.rsk_loss_from_similarity(torch.eye(2), torch.arange(2), torch.arange(2), RSkParams(), backend="cuda")
    with pytest.raises(ValueError, match="already registered"):
        kernels.register_backend(kernels.get_backend("torch"))


def test_params_are_checked_once_and_normalised() -> None:
    params = RSkParams([1, 2], 0.1, 0.5, 1)
    assert params == RSkParams((1, 2), 0.1, (0.5, 0.5), True)
    assert params.tau_k == (0.5, 0.5) and params.include_query is True
    with pytest.raises(ValueError, match="tau_k"):
        RSkParams((1, 2), 0.1, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="tau_rank"):
        RSkParams(tau_rank=0.0)

