"""The foundation-backbone presets (issue 27): one per dataset for DINOv2 ViT-B/14, CLIP ViT-B/16 and SigLIP-2
ViT-B/16; each loads, passes check_startable, states where its settings come from, and builds (random weights)
into a network that runs at the preset's image size with the fine-tuning groups it asks for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from recallk.cli.wiring import model_from_config
from recallk.config import check_startable, load_config
from recallk.engine.param_groups import freeze_blocks, parameter_groups

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATASETS = ("sop", "inaturalist", "cars196", "cub", "inshop")
FAMILIES = {"dinov2_b14": "vit_base_patch14_dinov2.lvd142m", "clip_b16": "vit_base_patch16_clip_224.openai",
            "siglip2_b16": "vit_base_patch16_siglip_224.v2_webli"}
PRESETS = [f"{d}_{f}" for f in FAMILIES for d in DATASETS]
#: the authors' CVPR 2022 ViT-B/16 schedule of each dataset (method.md section 4; In-Shop: configs/inshop_vit_b16.yaml)
SCHEDULE = {d: f"{d}_vit_b16" for d in DATASETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_loads_passes_check_startable_and_says_where_its_settings_come_from(preset, tmp_path):
    config = load_config(CONFIGS / f"{preset}.yaml", [f"data.root={tmp_path}"])
    check_startable(config)
    family = preset.split("_", 1)[1]
    assert config["model"]["name"] == FAMILIES[family] and config["model"]["pretrained"] is True
    train = config["train"]
    assert (train["optimizer"], train["fc_lr_mul"], train["layer_decay"], train["filter_bias_and_bn"]) == (
        "adamw", 10.0, 0.75, True)
    assert config["model"]["options"] == {"drop_path_rate": 0.1} and config["data"]["image_size"] == 224
    authors = load_config(CONFIGS / f"{SCHEDULE[preset.split('_')[0]]}.yaml")
    for key in ("batch_size", "chunk_size", "epochs", "milestones", "lr", "gamma", "per_class"):
        assert train[key] == authors["train"][key], key
    assert config["eval"]["ks"] == authors["eval"]["ks"] and config["loss"] == authors["loss"]
    comment = " ".join(line.lstrip("#").strip() for line in (CONFIGS / f"{preset}.yaml").read_text().splitlines()
                       if line.startswith("#"))
    for source in ("arXiv 2412.12432", "BEiT", "MAE", "train.fc_lr_mul", "not available to this project",
                   "standard practice"):
        assert source in comment, (preset, source)
    assert re.search(r"method\.md section 4|configs/inshop_vit_b16\.yaml", comment)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_builds_runs_at_the_preset_size_and_takes_the_groups(family):
    config = load_config(CONFIGS / f"cub_{family}.yaml", ["model.pretrained=false"])
    model = model_from_config(config).eval()  # DINOv2 (518 px weights) built for the preset's 224 px
    size = config["data"]["image_size"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 512) and torch.allclose(out.norm(dim=1), torch.ones(1))
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    train = config["train"]
    groups = parameter_groups(model, lr=train["lr"], weight_decay=train["weight_decay"],
                              fc_lr_mul=train["fc_lr_mul"], layer_decay=train["layer_decay"],
                              filter_bias_and_bn=train["filter_bias_and_bn"])
    rates = {id(p): g.lr for g in groups for p in g.params}
    assert rates[id(model.proj.weight)] == pytest.approx(train["lr"] * 10)
    blocks = [rates[id(block.attn.qkv.weight)] for block in model.backbone.blocks]
    assert blocks == pytest.approx([train["lr"] * 0.75 ** (12 - i) for i in range(12)])
    assert len(freeze_blocks(model, 12)) == len([p for p in model.backbone.parameters() if not p.requires_grad])
