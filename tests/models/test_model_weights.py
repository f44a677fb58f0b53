"""Loading local weights: timm and torchvision layouts, .pth and .safetensors, and clear key errors."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from recallk.models import WeightsError, build_model


def assert_backbone_equals(model, state):
    own = model.backbone.state_dict()
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


def test_torchvision_resnet_layout(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    torch.nn.init.normal_(tv.bn1.running_mean)  # make buffers distinguishable from a fresh model
    path = tmp_path / "tv_resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("resnet18", embed_dim=8, pretrained=path).eval()
    assert_backbone_equals(model, tv.state_dict())
    # same features as torchvision's own forward up to layer4
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(model.backbone.forward_features(x), ref)


def test_timm_layout_safetensors_with_classifier(tmp_path):
    torch.manual_seed(2)
    source = timm.create_model("resnet18", pretrained=False)  # keeps its fc classifier: dropped on load
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    model = build_model("resnet18", embed_dim=8, pretrained=str(path))
    assert_backbone_equals(model, state)


def test_wrapped_checkpoint_with_module_prefix(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=0)
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}}
    path = tmp_path / "ckpt.pt"
    torch.save(wrapped, path)
    assert_backbone_equals(build_model("resnet18", embed_dim=8, pretrained=path), source.state_dict())


def test_vit_timm_layout(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit_tiny.pth"
    torch.save(source.state_dict(), path)
    model = build_model("vit_tiny_patch16_224", embed_dim=8, pretrained=path)
    assert_backbone_equals(model, source.state_dict())


def test_mismatched_keys_are_listed(tmp_path):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.layer.weight"] = torch.zeros(3)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        build_model("resnet18", pretrained=path)
    msg = str(err.value)
    assert "missing keys: layer1.0.conv1.weight" in msg
    assert "unexpected keys: extra.layer.weight" in msg
    assert "conv1.weight (file (64, 3, 3, 3), model (64, 3, 7, 7))" in msg
    assert isinstance(err.value, ValueError)


def test_other_architecture_is_rejected(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=re.escape("unexpected keys: layer1.2")):
        build_model("resnet18", pretrained=path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_model("resnet18", pretrained=tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_model("resnet18", pretrained=junk)
