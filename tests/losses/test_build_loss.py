"""build_loss: RS@k by name and the pytorch-metric-learning baselines, checked against brute-force formulas."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from recallk.losses import LOSSES, RecallAtKSurrogate, build_loss
from tests.helpers.device_settings import TEST_DEVICE


def batch(n_classes: int, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    perm = torch.randperm(labels.numel(), generator=g)
    emb = torch.nn.functional.normalize(torch.randn(labels.numel(), 6, generator=g, dtype=torch.float64), dim=1)
    return emb.to(TEST_DEVICE), labels[perm].to(TEST_DEVICE)  # RECALLK_TEST_DEVICE, drawn on the CPU


def smooth_ap_brute_force(emb: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    """1 - mean_q AP_q of Smooth-AP (Brown et al.), as in its authors' code: the query is one of its class's
    items and is ranked too; rank(p) = 1 + sum_{z != p} sig((s_qz - s_qp) / tau)."""
    s = (emb @ emb.T).cpu()
    lab = labels.tolist()
    n = len(lab)
    aps = []
    for q in range(n):
        cls = [j for j in range(n) if lab[j] == lab[q]]
        ap = 0.0
        for p in cls:
            r_pos = 1 + sum(torch.sigmoid((s[q, j] - s[q, p]) / tau).item() for j in cls if j != p)
            r_all = 1 + sum(torch.sigmoid((s[q, j] - s[q, p]) / tau).item() for j in range(n) if j != p)
            ap += r_pos / r_all
        aps.append(ap / len(cls))
    return 1 - sum(aps) / n


def contrastive_brute_force(emb, labels, pos_margin, neg_margin):
    """pml's ContrastiveLoss with its defaults: Euclidean distance, mean over the non-zero pair losses."""
    d = torch.cdist(emb, emb)
    n = labels.numel()
    pos = [max(0.0, d[i, j].item() - pos_margin) for i in range(n) for j in range(n) if i != j
           and labels[i] == labels[j]]
    neg = [max(0.0, neg_margin - d[i, j].item()) for i in range(n) for j in range(n) if labels[i] != labels[j]]
    return sum(pos) / max(1, sum(x > 0 for x in pos)) + sum(neg) / max(1, sum(x > 0 for x in neg))


def test_rsk_by_name():
    loss = build_loss("rsk", ks=(1, 2), tau_rank=0.05)
    assert isinstance(loss, RecallAtKSurrogate) and loss.ks == (1, 2) and loss.tau_rank == 0.05
    assert set(LOSSES) == {"rsk", "smooth_ap", "contrastive", "multi_similarity", "proxy_anchor"}


@pytest.mark.parametrize("n_classes, per_class", [(3, 4), (4, 3), (2, 5), (3, 3)])
def test_smooth_ap_matches_formula_for_any_balanced_layout(n_classes, per_class):
    emb, labels = batch(n_classes, per_class, seed=n_classes * 10 + per_class)
    value = build_loss("smooth_ap", temperature=0.1)(emb, labels)
    assert value.item() == pytest.approx(smooth_ap_brute_force(emb, labels, 0.1), rel=1e-5)


def test_smooth_ap_rejects_unbalanced_batch():
    emb = torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    with pytest.raises(ValueError, match="same number"):
        build_loss("smooth_ap")(emb, torch.tensor([0, 0, 0, 1, 1, 2, 2]))


def test_contrastive_passes_options_and_matches_formula():
    emb, labels = batch(3, 3, seed=1)
    value = build_loss("contrastive", pos_margin=0.1, neg_margin=1.2)(emb, labels)
    assert value.item() == pytest.approx(contrastive_brute_force(emb, labels, 0.1, 1.2), rel=1e-9)


def test_multi_similarity_is_pml():
    emb, labels = batch(3, 4, seed=2)
    value = build_loss("multi_similarity", alpha=3.0, beta=40.0, base=0.4)(emb, labels)
    expected = pml_losses.MultiSimilarityLoss(alpha=3.0, beta=40.0, base=0.4)(emb, labels)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert value.item() != pytest.approx(pml_losses.MultiSimilarityLoss()(emb, labels).item(), rel=1e-6)


def test_proxy_anchor_exposes_its_proxies_to_the_optimiser():
    loss = build_loss("proxy_anchor", num_classes=5, embedding_size=6)
    params = list(loss.parameters())
    assert len(params) == 1 and params[0].shape == (5, 6)
    emb, labels = batch(5, 2, seed=3)
    out = loss(emb.float(), labels)
    out.backward()
    assert params[0].grad is not None and bool(params[0].grad.abs().sum() > 0)


def test_run_context_goes_only_to_the_losses_that_name_it():
    """``build_loss(name, context, **arguments)``: Proxy-Anchor takes its number of classes and embedding size from
    the run; RS@k, which names neither, is built as without it; a given value that contradicts the run is refused
    with the fix; the context is not recorded as configuration."""
    context = {"num_classes": 5, "embedding_size": 6}
    proxies = build_loss("proxy_anchor", context, alpha=16.0)
    assert proxies.loss.proxies.shape == (5, 6) and proxies.loss.alpha == 16.0
    assert build_loss("proxy_anchor", context, num_classes=5).loss.proxies.shape == (5, 6)  # agreeing: fine
    assert build_loss("rsk", context, ks=(1, 2)).loss_spec == build_loss("rsk", ks=(1, 2)).loss_spec
    with pytest.raises(ValueError, match=r"^loss\.num_classes=4 but the training split has 5 classes: set it to 5 or "
                                         r"leave it out \(recallk fills it in\)$"):
        build_loss("proxy_anchor", context, num_classes=4)
    with pytest.raises(ValueError, match=r"loss\.embedding_size=7 but the model's model\.embed_dim is 6"):
        build_loss("proxy_anchor", context, embedding_size=7)


def test_rsk_and_kernels_work_without_pytorch_metric_learning():
    # A GPU machine may have torch and triton but not pytorch-metric-learning (benchmarks/gpu_check.py runs there).
    script = (
        "import sys\n"
        "sys.modules['pytorch_metric_learning'] = None  # any import of it now fails\n"
        "import torch\n"
        "from recallk.losses import RecallAtKSurrogate\n"
        "from recallk.kernels import RSkParams, rsk_loss_from_embeddings\n"
        "e = torch.nn.functional.normalize(torch.randn(12, 4), dim=1).requires_grad_()\n"
        "labels = torch.arange(12) // 3\n"
        "RecallAtKSurrogate()(e, labels).backward()\n"
        "rsk_loss_from_embeddings(e, e, labels, labels, RSkParams((1, 2)), self_index=torch.arange(12))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
