"""build_model: the authors' two heads recomputed by hand, GeM, frozen BatchNorm, pooling defaults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from recallk.data import build_transforms, transforms_for_model
from recallk.models import GeM, GlobalPool, build_model


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return build_model("resnet50")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_model("vit_base_patch16_224")


def head_by_hand(model, pooled: torch.Tensor) -> torch.Tensor:
    """LayerNorm -> Linear -> L2, in float64, from the model's parameters."""
    x = pooled.double()
    x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + model.norm.eps)
    x = x * model.norm.weight.double() + model.norm.bias.double()
    x = x @ model.proj.weight.double().T + model.proj.bias.double()
    return x / x.norm(dim=1, keepdim=True)


def test_resnet50_gem_head(resnet50):
    model = resnet50.eval()
    assert model.embed_dim == 512 and model.feature_dim == 2048 and model.pool.method == "gem"
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = model(x)
        fmap = model.backbone.forward_features(x).double()
    assert out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    assert fmap.shape[1:] == (2048, 3, 3)
    gem = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)  # p starts at 3
    torch.testing.assert_close(out.double(), head_by_hand(model, gem), atol=2e-5, rtol=0)


def test_vit_cls_head(vit):
    model = vit.eval()
    assert model.embed_dim == 512 and model.feature_dim == 768 and model.pool.method == "cls"
    assert model.fixed_input_size
    captured = []
    hook = model.backbone.norm.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        with torch.no_grad():
            out = model(torch.randn(2, 3, 224, 224))
    finally:
        hook.remove()
    (tokens,) = captured  # the backbone's final token sequence, (2, 1 + 196, 768)
    assert tokens.shape == (2, 197, 768) and out.shape == (2, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), head_by_hand(model, tokens[:, 0]), atol=2e-5, rtol=0)
    # the authors' ViT weights (ImageNet-21k, timm tag augreg_in21k) normalise with mean = std = 0.5
    assert tuple(model.data_config["mean"]) == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["tag"] == "augreg_in21k"


def test_gem_p_is_learnable(resnet50):
    gem = resnet50.pool.gem
    assert isinstance(gem, GeM) and gem.p.requires_grad
    assert any(p is gem.p for p in resnet50.parameters())
    resnet50.train().zero_grad()
    out = resnet50(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(F.normalize(out, dim=1), out)  # unit norm in train mode too
    (out * torch.randn_like(out)).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0
    resnet50.eval()


def test_gem_matches_formula_for_other_p():
    gem = GeM(p=2.0)
    x = torch.rand(3, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(gem(x, (2, 3)), x.pow(2).mean(dim=(2, 3)).sqrt())
    with torch.no_grad():
        gem.p.fill_(1.0)
    torch.testing.assert_close(gem(x, (2, 3)), x.mean(dim=(2, 3)))


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn(freeze):
    torch.manual_seed(0)
    model = build_model("resnet18", embed_dim=16, freeze_bn=freeze).train()
    before = _bn_state(model)
    x = torch.randn(4, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    after = _bn_state(model)
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert model.training
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if freeze:
        assert not changed and not any(m.training for m in bns)
        assert all(m.weight.grad is not None for m in bns)  # affine weights still train
        # each image's embedding is independent of the rest of the batch
        torch.testing.assert_close(model(x[:1]), out[:1], atol=1e-5, rtol=0)
    else:
        assert changed and all(m.training for m in bns)
    model.eval()
    assert not any(m.training for m in bns)


def test_frozen_model_pickles_whole(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", embed_dim=16).eval()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False).train()
    assert not any(m.training for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))


def test_pooling_defaults_and_overrides():
    assert build_model("vit_tiny_patch16_224", embed_dim=8).pool.method == "cls"
    assert build_model("convnext_atto", embed_dim=8).pool.method == "avg"
    m = build_model("resnet18", embed_dim=8, pooling="max").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = m.pooled_features(x)
        fmap = m.backbone.forward_features(x)
    torch.testing.assert_close(pooled, fmap.amax(dim=(2, 3)))
    t = build_model("vit_tiny_patch16_224", embed_dim=8, pooling="avg", img_size=32).eval()
    with torch.no_grad():
        tokens = t.backbone.forward_features(torch.randn(2, 3, 32, 32))
        assert t(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    assert tokens.shape[1] == 1 + 4


def test_channels_last_maps_are_pooled_over_space():
    assert build_model("swin_tiny_patch4_window7_224", embed_dim=8).pool.channels_last  # Swin gives NHWC
    x = torch.rand(2, 5, 6, 7)  # (N, H, W, C)
    torch.testing.assert_close(GlobalPool("avg", channels_last=True)(x), x.mean(dim=(1, 2)))
    torch.testing.assert_close(GlobalPool("max", channels_last=False)(x), x.amax(dim=(2, 3)))
    tokens = torch.rand(2, 1 + 9, 4)
    torch.testing.assert_close(GlobalPool("avg", num_prefix_tokens=1)(tokens), tokens[:, 1:].mean(1))
    torch.testing.assert_close(GlobalPool("cls", num_prefix_tokens=1)(tokens), tokens[:, 0])


def test_errors():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("resnet_does_not_exist")
    with pytest.raises(ValueError, match="pooling"):
        build_model("resnet18", pooling="median")
    with pytest.raises(ValueError, match="class token"):
        build_model("resnet18", pooling="cls")
    with pytest.raises(ValueError, match="embed_dim"):
        build_model("resnet18", embed_dim=0)


def test_transforms_follow_the_model_config(resnet50, vit):
    img = Image.new("RGB", (100, 80), (10, 20, 30))
    # resnet50 -> the authors' torchvision weights: ImageNet mean/std, any input size (kanji stays 64)
    t = transforms_for_model(resnet50, "test")
    ref = build_transforms("test")
    assert torch.equal(t(img), ref(img))
    assert transforms_for_model(resnet50, "train", dataset="kanji")(img).shape == (3, 64, 64)
    # ViT: mean = std = 0.5 and its fixed 224 input, also for kanji
    x = transforms_for_model(vit, "test", dataset="kanji")(img)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255 * 2 - 1)


def test_build_model_records_its_config_section():
    """``model_section``: the model's arguments as a config's ``model`` section holds them (timm's under
    ``options``), which a Trainer run writes to config.yaml and the config accepts as given."""
    from recallk.config import load_config

    model = build_model("resnet10t", embed_dim=12, pooling="avg", drop_rate=0.1)
    assert model.model_section == {"name": "resnet10t", "embed_dim": 12, "pretrained": False, "pooling": "avg",
                                   "freeze_bn": True, "in_chans": 3, "options": {"drop_rate": 0.1}}
    overrides = [f"model.{k}={v}" for k, v in model.model_section.items() if k != "options"]
    assert load_config(None, [*overrides, "model.options={drop_rate: 0.1}"])["model"] == model.model_section


@pytest.mark.parametrize("rate", [1.5, -0.1, 1.0, "0.1"])
def test_a_drop_path_rate_that_is_no_probability_is_refused_when_the_model_is_built(rate):
    # timm would take it and fail only inside the first training step (torch's bernoulli_)
    with pytest.raises(ValueError, match=r"model.options.drop_path_rate=.*in \[0, 1\)"):
        build_model("vit_tiny_patch16_224", embed_dim=8, img_size=32, drop_path_rate=rate)


def test_a_misspelt_model_option_names_the_option():
    with pytest.raises(ValueError, match=r"model option 'drop_pth_rate' \(model.options.drop_pth_rate\) is not an "
                                         r"argument of timm's vit_tiny_patch16_224"):
        build_model("vit_tiny_patch16_224", embed_dim=8, img_size=32, drop_pth_rate=0.1)
