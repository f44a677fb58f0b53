"""Foundation backbones by timm name at two image sizes: recallk's default pooling is the embedding each family was
trained to produce, checked against timm's own full forward of a model built independently (same weights); ONNX
export; weight files saved at another size or in OpenCLIP / transformers layouts.

Random weights (``pretrained=False``) and shallow variants (timm's ``depth``) keep it fast; the head structure
(class token, attention pool, CLIP projection, register tokens) is the full model's.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from recallk.data import transforms_for_model
from recallk.models import SizeError, WeightsError, build_model

# name, the two image sizes, shallow-variant options, the pooling recallk defaults to, how timm's reference
# embedding is read from the independently built timm model: "forward" = timm's full forward with the weights'
# own head (num_classes of the weights config for projection heads, 0 otherwise), "token0" = the class token.
FAMILIES = [
    ("vit_small_patch14_dinov2.lvd142m", (56, 84), {"depth": 1}, "head", "forward"),
    ("vit_small_patch14_reg4_dinov2.lvd142m", (56, 84), {"depth": 1}, "head", "forward"),
    ("vit_small_patch16_dinov3.lvd1689m", (64, 96), {"depth": 1}, "cls", "token0"),
    ("vit_base_patch32_clip_224.openai", (64, 96), {"depth": 1}, "head", "forward"),
    ("vit_base_patch16_clip_224.laion2b", (64, 96), {"depth": 1}, "head", "forward"),
    ("vit_base_patch16_siglip_224.v2_webli", (64, 96), {"depth": 1}, "head", "forward"),
    ("vit_pe_core_tiny_patch16_384.fb", (64, 96), {"depth": 1}, "head", "forward"),
    ("eva02_tiny_patch14_224.mim_in22k", (56, 84), {"depth": 1}, "head", "forward"),
    ("resnet18", (64, 80), {}, "head", "forward"),
    ("convnext_atto", (64, 96), {}, "head", "forward"),
]
# what the pooled vector must be made of, per family (a family silently losing its projection or attention pool
# would still pass the forward comparison if timm changed its default)
HEAD_POOLING = {"vit_small_patch14_dinov2.lvd142m": "cls", "vit_small_patch14_reg4_dinov2.lvd142m": "cls",
                "vit_small_patch16_dinov3.lvd1689m": "cls", "vit_base_patch32_clip_224.openai": "head",
                "vit_base_patch16_clip_224.laion2b": "head", "vit_base_patch16_siglip_224.v2_webli": "head",
                "vit_pe_core_tiny_patch16_384.fb": "head", "eva02_tiny_patch14_224.mim_in22k": "cls",
                "resnet18": "gem", "convnext_atto": "avg"}
OWN_SIZE = {"vit_base_patch32_clip_224.openai": 512, "vit_base_patch16_clip_224.laion2b": 512,
            "vit_pe_core_tiny_patch16_384.fb": 512}


def _timm_reference(name, size, options, how, state):
    cfg = timm.models.get_pretrained_cfg(name)
    classes = OWN_SIZE.get(name, 0)
    assert classes in (0, cfg.num_classes)
    kwargs = dict(options, img_size=size) if "patch" in name or "eva" in name else dict(options)
    reference = timm.create_model(name, pretrained=False, num_classes=classes, **kwargs).eval()
    reference.load_state_dict(state, strict=True)
    return reference


@pytest.mark.parametrize(("name", "sizes", "options", "pooling", "how"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_default_embedding_is_timms_own_at_two_sizes(name, sizes, options, pooling, how):
    for index, size in enumerate(sizes):
        torch.manual_seed(index)
        model = build_model(name, embed_dim=None, img_size=size, **options).eval()
        assert model.pool.method == pooling and model.model_spec["embed_dim"] is None
        assert model.data_config["input_size"] == (3, size, size)
        reference = _timm_reference(name, size, options, how, model.backbone.state_dict())
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ours = model.pooled_features(x)
            theirs = reference(x) if how == "forward" else reference.forward_features(x)[:, 0]
            out = model(x)
        assert ours.shape == theirs.shape == (2, OWN_SIZE.get(name, reference.num_features))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, F.normalize(theirs, dim=1), atol=1e-5, rtol=1e-5)
        assert model.embed_dim == theirs.shape[1]
    # with a head of ours: the authors' poolings, except for the families trained through their own head
    with_head = build_model(name, embed_dim=8, img_size=sizes[0], **options).eval()
    assert with_head.pool.method == HEAD_POOLING[name]
    assert with_head(torch.randn(1, 3, sizes[0], sizes[0])).shape == (1, 8)


# one per head type: class token with registers, attention pool, EVA-type with attention pool + projection and
# rotary embeddings (the CLIP projection is a Linear, and a CNN's average pool is exported in test_lite0_weights)
ONNX_FAMILIES = [f for f in FAMILIES if f[0] in (
    "vit_small_patch14_reg4_dinov2.lvd142m", "vit_base_patch16_siglip_224.v2_webli", "vit_pe_core_tiny_patch16_384.fb")]


@pytest.mark.parametrize(("name", "sizes", "options", "pooling", "how"), ONNX_FAMILIES,
                         ids=[f[0] for f in ONNX_FAMILIES])
def test_onnx_export_gives_the_same_embedding(name, sizes, options, pooling, how, tmp_path):
    from recallk.retrieval.checkpoint import TrainedModel, preprocessing_spec
    from recallk.retrieval.export import export_model

    torch.manual_seed(0)
    model = build_model(name, embed_dim=None, img_size=sizes[1], **options).eval()
    transform = transforms_for_model(model, "test")
    spec = preprocessing_spec(transform)
    assert spec["input_size"] == [3, sizes[1], sizes[1]]
    trained = TrainedModel(model, transform, spec, {"model": model.model_section}, "zero-shot", "", "")
    out = export_model(trained, tmp_path / "m.onnx", "onnx")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 120, 3), dtype=np.uint8))
    x = torch.stack([transform(image), transform(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, model(x).numpy(), atol=2e-5, rtol=0)


def test_preprocessing_is_the_weights_own():
    clip = build_model("vit_base_patch32_clip_224.openai", embed_dim=None, img_size=64, depth=1)
    cfg = timm.models.get_pretrained_cfg("vit_base_patch32_clip_224.openai")
    test = transforms_for_model(clip, "test")
    resize, crop = test.transforms[1], test.transforms[2]
    assert resize.size == int(64 / cfg.crop_pct) == 71 and crop.size == (64, 64)  # timm: floor(size / crop_pct)
    assert resize.interpolation.value == cfg.interpolation == "bicubic"
    normalize = test.transforms[-1]
    assert tuple(normalize.mean) == cfg.mean and tuple(normalize.std) == cfg.std
    # the authors' ResNet-50 preset keeps the method's Resize(256) for a 224 crop
    resnet = build_model("resnet50", embed_dim=8)
    assert transforms_for_model(resnet, "test", image_size=224).transforms[1].size == 256


def test_sizes_a_model_cannot_run_at_are_refused_in_one_line():
    with pytest.raises(SizeError, match=r"multiple of 16: 100 is not \(use 96 or 112\)"):
        build_model("vit_base_patch16_siglip_224.v2_webli", embed_dim=None, img_size=100, depth=1)
    model = build_model("vit_small_patch14_dinov2.lvd142m", embed_dim=None, img_size=56, depth=1)
    with pytest.raises(SizeError, match=r"built for 56x56-px images, got 70x70: .*img_size=70") as info:
        model(torch.randn(1, 3, 70, 70))
    assert "\n" not in str(info.value)
    with pytest.raises(SizeError, match="positive number of pixels"):
        build_model("resnet18", embed_dim=None, img_size=0)


def test_weights_saved_at_another_size_are_resampled_on_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=56,
                               depth=2).eval()
    path = tmp_path / "model.safetensors"  # timm's layout, as timm publishes weights on the Hugging Face hub
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build_model("vit_small_patch14_reg4_dinov2", embed_dim=None, pretrained=path, img_size=84, depth=2)
    # timm's own loading of the same file, for the same size
    theirs = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, num_classes=0, img_size=84, depth=2,
                               pretrained_cfg_overlay={"file": str(path)}).eval()
    assert source.pos_embed.shape[1] == 16 and model.backbone.pos_embed.shape[1] == 36  # 4x4 -> 6x6 patches
    torch.testing.assert_close(model.backbone.pos_embed, theirs.pos_embed)
    torch.testing.assert_close(model.backbone.reg_token, source.reg_token)
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), F.normalize(theirs(x), dim=1), atol=1e-5, rtol=1e-5)


def _openai_clip_layout(model) -> dict[str, torch.Tensor]:
    """A timm CLIP ViT's weights under the names of OpenAI's CLIP / OpenCLIP (``visual.conv1.weight``,
    ``visual.transformer.resblocks.<i>.attn.in_proj_weight``, ``visual.proj`` (width, out)), plus text-tower
    tensors that a vision model must ignore. Written from OpenCLIP's module names (open_clip/transformer.py)."""
    s = model.state_dict()
    out = {"visual.conv1.weight": s["patch_embed.proj.weight"], "visual.class_embedding": s["cls_token"][0, 0],
           "visual.positional_embedding": s["pos_embed"][0], "visual.proj": s["head.weight"].T.contiguous(),
           "token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.tensor(4.6)}
    for ours, theirs in (("norm_pre", "ln_pre"), ("norm", "ln_post")):
        for kind in ("weight", "bias"):
            out[f"visual.{theirs}.{kind}"] = s[f"{ours}.{kind}"]
    for i in range(len(model.blocks)):
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.out_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                out[f"visual.transformer.resblocks.{i}.{theirs}.{kind}"] = s[f"blocks.{i}.{ours}.{kind}"]
        out[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"] = s[f"blocks.{i}.attn.qkv.weight"]
        out[f"visual.transformer.resblocks.{i}.attn.in_proj_bias"] = s[f"blocks.{i}.attn.qkv.bias"]
    return out


def test_openclip_layout_loads_with_its_projection(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_base_patch32_clip_224.openai", pretrained=False, img_size=64, depth=1).eval()
    with torch.no_grad():
        source.head.bias.zero_()  # OpenAI's projection has no bias
    torch.save({"state_dict": _openai_clip_layout(source)}, tmp_path / "open_clip.pt")
    model = build_model("vit_base_patch32_clip_224.openai", embed_dim=None, pretrained=tmp_path / "open_clip.pt",
                        img_size=64, depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.normalize(source(x), dim=1), atol=1e-5, rtol=1e-5)
    assert model.embed_dim == 512


# transformers' attention names: the hub files' (transformers 4) and those transformers 5 saves
HF_ATTENTION = {4: ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                    "attention.output.dense"),
                5: ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")}


def _transformers_dinov2_layout(model, version: int = 4) -> dict[str, torch.Tensor]:
    """A timm DINOv2's weights under Hugging Face transformers' ``Dinov2Model`` names (modeling_dinov2.py:
    separate query / key / value, ``layer_scale1.lambda1``, ``layernorm``), with its ``mask_token``."""
    names = HF_ATTENTION[version]
    s = model.state_dict()
    dim = s["cls_token"].shape[-1]
    out = {"embeddings.cls_token": s["cls_token"], "embeddings.mask_token": torch.zeros(1, dim),
           "embeddings.position_embeddings": s["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
           "layernorm.weight": s["norm.weight"], "layernorm.bias": s["norm.bias"]}
    for i in range(len(model.blocks)):
        p, q = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            query, key, value = s[p + f"attn.qkv.{kind}"].chunk(3)
            out.update({q + f"{names[0]}.{kind}": query, q + f"{names[1]}.{kind}": key,
                        q + f"{names[2]}.{kind}": value, q + f"{names[3]}.{kind}": s[p + f"attn.proj.{kind}"]})
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[q + f"{name}.{kind}"] = s[p + f"{name}.{kind}"]
        out[q + "layer_scale1.lambda1"] = s[p + "ls1.gamma"]
        out[q + "layer_scale2.lambda1"] = s[p + "ls2.gamma"]
    return out


@pytest.mark.parametrize("version", [4, 5])
def test_transformers_dinov2_layout_loads(tmp_path, version):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56, depth=2,
                               init_values=0.5).eval()
    save_file({k: v.contiguous() for k, v in _transformers_dinov2_layout(source, version).items()},
              str(tmp_path / "model.safetensors"))
    model = build_model("vit_small_patch14_dinov2", embed_dim=None, pretrained=tmp_path / "model.safetensors",
                        img_size=56, depth=2, init_values=0.5).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.normalize(source(x), dim=1), atol=1e-5, rtol=1e-5)
    broken = _transformers_dinov2_layout(source, version)
    del broken[f"encoder.layer.1.{HF_ATTENTION[version][1]}.bias"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"block 1 .* lacks attention key bias"):
        build_model("vit_small_patch14_dinov2", embed_dim=None, pretrained=tmp_path / "broken.pth", img_size=56,
                    depth=2, init_values=0.5)


def test_wrong_layout_names_the_missing_and_unexpected_keys(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2), "blocks.0.attn.qkv.weight": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(WeightsError) as info:
        build_model("vit_small_patch14_dinov2", embed_dim=None, pretrained=tmp_path / "x.pth", img_size=56, depth=1)
    message = str(info.value)
    assert "missing keys: " in message and "cls_token" in message and "OpenCLIP" in message


def test_openclip_timm_trunk_layout_loads_siglip(tmp_path):
    """OpenCLIP's SigLIP models wrap a timm ViT as ``visual.trunk`` (attention pool inside), beside the text tower."""
    torch.manual_seed(0)
    source = timm.create_model("vit_base_patch16_siglip_224.v2_webli", pretrained=False, img_size=64, depth=1).eval()
    state = {f"visual.trunk.{k}": v for k, v in source.state_dict().items()}
    state.update({"text.token_embedding.weight": torch.randn(10, 8), "logit_bias": torch.tensor(-10.0)})
    torch.save(state, tmp_path / "open_clip_siglip.bin")
    model = build_model("vit_base_patch16_siglip_224.v2_webli", embed_dim=None, img_size=64, depth=1,
                        pretrained=tmp_path / "open_clip_siglip.bin").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.normalize(source(x), dim=1), atol=1e-5, rtol=1e-5)


def test_size_options_build_fixed_size_models_for_the_asked_size():
    from recallk.models.backbone import size_options

    assert size_options("vit_base_patch14_dinov2.lvd142m", 224) == {"img_size": 224}  # its weights say 518
    assert size_options("vit_base_patch16_224", 224) == {}  # the weights' own size: options stay as they were
    assert size_options("resnet50", 96) == {} and size_options("vit_base_patch16_224", None) == {}
    assert size_options("no_such_model", 224) == {}


def test_register_tokens_stay_out_of_patch_pooling():
    torch.manual_seed(0)
    model = build_model("vit_small_patch14_reg4_dinov2", embed_dim=None, pooling="avg", img_size=56, depth=1).eval()
    assert model.backbone.num_prefix_tokens == 5  # class token + 4 registers
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)  # (2, 5 + 16, 384)
        torch.testing.assert_close(model.pooled_features(x), tokens[:, 5:].mean(dim=1))
    assert tokens.shape[1] == 5 + (56 // 14) ** 2
