"""Fine-tuning parameter groups (issue 27): the head's rate (the authors' fc_lr_mul), layer-wise learning-rate decay
over timm's layer grouping, no weight decay on biases/norms/tokens, frozen first blocks; the defaults keep the
authors' single group. Expectations are computed here from the parameter names of a real timm network, not read
from the code under test."""

from __future__ import annotations

import copy
import functools
import json
import re

import pytest
import torch
import yaml

from recallk.config import ConfigError, load_config
from recallk.engine import Trainer, TrainSettings
from recallk.engine.optim import build_optimizer, optimizer_for_groups
from recallk.engine.param_groups import freeze_blocks, parameter_groups
from recallk.engine.run_log import start_block
from recallk.losses import build_loss
from recallk.models import build_model
from tests.helpers.engine import RandomRGBImages

DEPTH = 12  # vit_tiny_patch16_224's blocks
STEM = ("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.")


@functools.cache
def _built(options: tuple[tuple[str, float], ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit_tiny_patch16_224", embed_dim=8, pretrained=False, img_size=32, **dict(options))


def tiny_vit(**options):
    """A fresh copy of one random-init ViT-Ti/16 at 32 px (building it costs seconds on a shared CPU)."""
    return copy.deepcopy(_built(tuple(sorted(options.items()))))


def expected_scale(name: str, decay: float, fc_lr_mul: float) -> float:
    """BEiT/MAE layer decay for a ViT of DEPTH blocks with the head on top: block i (0-based) decay^(DEPTH - i),
    the stem decay^(DEPTH + 1), the final norm (timm puts it with the last block) decay^1, the head fc_lr_mul."""
    if not name.startswith("backbone."):
        return fc_lr_mul
    if name.startswith(STEM):
        return decay ** (DEPTH + 1)
    block = re.match(r"backbone\.blocks\.(\d+)\.", name)
    if block:
        return decay ** (DEPTH - int(block.group(1)))
    assert name.startswith("backbone.norm."), name
    return decay


def rates(groups) -> dict[int, tuple[float, float]]:
    """{id(param): (lr, weight_decay)}, checking that no parameter is in two groups."""
    out: dict[int, tuple[float, float]] = {}
    for group in groups:
        for param in group["params"] if isinstance(group, dict) else group.params:
            assert id(param) not in out, "a parameter in two groups"
            lr, wd = (group["lr"], group["weight_decay"]) if isinstance(group, dict) else (group.lr, group.weight_decay)
            out[id(param)] = (lr, wd)
    return out


def test_layer_decay_head_rate_and_weight_decay_filter_follow_the_parameter_names():
    model, lr, decay, mul, wd = tiny_vit(), 1e-4, 0.7, 10.0, 0.05
    groups = parameter_groups(model, lr=lr, weight_decay=wd, fc_lr_mul=mul, layer_decay=decay,
                              filter_bias_and_bn=True)
    got = rates(groups)
    named = dict(model.named_parameters())
    assert set(got) == {id(p) for p in named.values()}  # every parameter in exactly one group
    no_decay = {n for n, p in named.items() if p.ndim == 1 or n.endswith(".bias")} | {
        "backbone.cls_token", "backbone.pos_embed"}
    for name, param in named.items():
        assert got[id(param)][0] == pytest.approx(lr * expected_scale(name, decay, mul), rel=1e-12), name
        assert got[id(param)][1] == (0.0 if name in no_decay else wd), name
    # blocks 0 and 11 are 11 decay steps apart; the head is 10x the top block's rate / decay
    assert got[id(named["backbone.blocks.0.attn.qkv.weight"])][0] == pytest.approx(lr * decay ** 12)
    assert got[id(named["proj.weight"])][0] == pytest.approx(1e-3)


def test_the_optimizer_takes_the_groups_rates_and_the_scheduler_scales_them_alike():
    model = tiny_vit()
    groups = parameter_groups(model, lr=1e-4, weight_decay=0.05, fc_lr_mul=5.0, layer_decay=0.75)
    optimizer = optimizer_for_groups(groups, "adamw", lr=1e-4, weight_decay=0.05)
    before = [g["lr"] for g in optimizer.param_groups]
    assert sorted(before) == sorted(g.lr for g in groups) and len(set(before)) == DEPTH + 2  # stem, 12 blocks, head
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1], gamma=0.3)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.3 * r for r in before])


def test_the_defaults_give_the_optimizer_of_one_learning_rate():
    model, criterion = tiny_vit(), build_loss("proxy_anchor", {"num_classes": 5, "embedding_size": 8})
    for multiplier in (1.0, 100.0):
        old = build_optimizer([model, criterion], "adamw", lr=3e-5, weight_decay=4e-4,
                              lr_multipliers=[1.0, multiplier])
        new = optimizer_for_groups(parameter_groups(model, criterion, lr=3e-5, weight_decay=4e-4,
                                                    loss_lr_multiplier=multiplier), "adamw", 3e-5, 4e-4)
        assert new.state_dict() == old.state_dict()
        assert [[id(p) for p in g["params"]] for g in new.param_groups] == [
            [id(p) for p in g["params"]] for g in old.param_groups]
    (one,) = parameter_groups(model, criterion, lr=3e-5, weight_decay=4e-4)
    assert one.parts == ("model", "loss") and len(one.params) == len(list(model.parameters())) + 1


def test_freezing_the_first_blocks_keeps_them_out_of_the_optimizer_and_unchanged_by_a_step():
    model = tiny_vit()
    frozen = freeze_blocks(model, 3)
    expected = [n for n, _ in model.named_parameters() if n.startswith(STEM)
                or re.match(r"backbone\.blocks\.[012]\.", n)]
    assert sorted(frozen) == sorted(expected)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in expected)
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.0, fc_lr_mul=10.0, layer_decay=0.8)
    in_groups = set(rates(groups))
    named = dict(model.named_parameters())
    assert in_groups == {id(p) for n, p in named.items() if n not in expected}
    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer = optimizer_for_groups(groups, "adamw", 1e-3, 0.0)
    loss = model(torch.randn(4, 3, 32, 32)).square().sum(0)[0]
    loss.backward()
    optimizer.step()
    for name, param in named.items():
        changed = not torch.equal(param, before[name])
        assert changed == (name not in expected and param.grad is not None and bool(param.grad.any())), name
    assert not torch.equal(named["backbone.blocks.3.attn.qkv.weight"], before["backbone.blocks.3.attn.qkv.weight"])


def test_freezing_cnn_stages():
    model = build_model("tf_efficientnet_lite0", embed_dim=8, pretrained=False)
    frozen = freeze_blocks(model, 2)  # the stem convolution and stages 0 and 1
    expected = [n for n, _ in model.named_parameters()
                if n.startswith(("backbone.conv_stem.", "backbone.bn1.")) or re.match(r"backbone\.blocks\.[01]\.", n)]
    assert sorted(frozen) == sorted(expected) and expected
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.blocks.2."))


@pytest.mark.parametrize(("call", "needle"), [
    (lambda m: freeze_blocks(m, DEPTH + 1), f"has {DEPTH} blocks"),
    (lambda m: freeze_blocks(m, -1), "integer >= 0"),
    (lambda m: parameter_groups(m, lr=1e-4, weight_decay=0.0, fc_lr_mul=0.0), "fc_lr_mul must be a positive"),
    (lambda m: parameter_groups(m, lr=1e-4, weight_decay=0.0, layer_decay=1.5), "layer_decay must be in (0, 1]"),
    (lambda m: parameter_groups(torch.nn.Linear(3, 2), lr=1e-4, weight_decay=0.0, fc_lr_mul=10.0),
     "train.fc_lr_mul needs a model with a timm backbone"),
    (lambda m: parameter_groups(torch.nn.Linear(3, 2), lr=1e-4, weight_decay=0.0, layer_decay=0.7),
     "train.layer_decay needs a model with a timm backbone"),
])
def test_bad_values_are_refused_with_what_to_do(call, needle):
    with pytest.raises(ValueError) as info:
        call(tiny_vit())
    assert needle in str(info.value)


def test_the_weight_decay_filter_needs_no_backbone():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    got = rates(parameter_groups(net, lr=1e-3, weight_decay=0.1, filter_bias_and_bn=True))
    assert [got[id(p)] for p in net.parameters()] == [(1e-3, 0.1), (1e-3, 0.0), (1e-3, 0.0), (1e-3, 0.0)]


def test_every_depth_up_to_the_backbone_s_freezes():
    model = tiny_vit()
    frozen = freeze_blocks(model, DEPTH)  # every block (the final norm with the last one); the head trains
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if not n.startswith("backbone.")}
    assert len(frozen) == len(list(model.backbone.parameters()))


@pytest.mark.parametrize(("override", "needle"), [
    ("train.fc_lr_mul=0", "train.fc_lr_mul must be a positive number"),
    ("train.layer_decay=1.2", "train.layer_decay must be in (0, 1]"),
    ("train.freeze_blocks=-2", "train.freeze_blocks must be an integer >= 0"),
    ("train.freeze_blocks=1.5", "'train.freeze_blocks' must be int"),
    ("train.filter_bias_and_bn=yes please", "'train.filter_bias_and_bn' must be bool"),
    ("train.loss_lr_multiplier=-1", "train.loss_lr_multiplier must be a positive number"),
])
def test_the_config_refuses_bad_values_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)
    with pytest.raises(ValueError):
        TrainSettings(batch_size=8, chunk_size=8, epochs=1, **{override.split("=")[0][6:]: yaml.safe_load(
            override.split("=")[1])})


def test_drop_path_rate_reaches_timm():
    model = tiny_vit(drop_path_rate=0.2)
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.model_section["options"] == {"img_size": 32, "drop_path_rate": 0.2}



def test_a_trainer_run_trains_the_groups_records_the_keys_says_the_rates_and_resumes_them(tmp_path):
    model = tiny_vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = dict(batch_size=16, chunk_size=8, per_class=4, epochs=2, milestones=(1,), device="cpu", progress=False,
                    tensorboard=False, optimizer="adamw", lr=1e-3, weight_decay=0.05, fc_lr_mul=10.0, layer_decay=0.75,
                    filter_bias_and_bn=True, freeze_blocks=2)
    # 1 step per epoch
    trainer = Trainer(model, build_loss("rsk"), RandomRGBImages(), tmp_path, max_steps=1, **settings)
    line = next(x for x in start_block(trainer, resumed=False).splitlines() if x.startswith("precision"))
    assert "optimizer adamw, 22 groups: backbone lr 0.00075..5.63e-05, head lr 0.01" in line, line  # 2: 0.75^10
    assert "weights frozen (train.freeze_blocks)" in line
    initial = [g["lr"] for g in trainer.optimizer.param_groups]
    trainer.fit()  # stops after epoch 1's step; the resumed run trains epoch 2 with every group's rate x 0.3
    resumed = Trainer(model, build_loss("rsk"), RandomRGBImages(), tmp_path, **settings)
    resumed.fit(resume=True)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([0.3 * r for r in initial])
    named = dict(model.named_parameters())
    for name, param in named.items():
        frozen = name.startswith(STEM) or re.match(r"backbone\.blocks\.[01]\.", name)
        assert torch.equal(param, before[name]) == bool(frozen), name
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in logged if "lr" in r} == {1e-3, 3e-4}  # train.lr, not the first group's (block 2)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]
    assert {k: saved[k] for k in ("fc_lr_mul", "layer_decay", "filter_bias_and_bn", "freeze_blocks")} == {
        "fc_lr_mul": 10.0, "layer_decay": 0.75, "filter_bias_and_bn": True, "freeze_blocks": 2}


def test_one_group_with_frozen_weights_is_one_group_in_words():
    from recallk.engine.param_groups import ParamGroup, groups_text

    group = ParamGroup(("head",), (torch.nn.Parameter(torch.zeros(3)),), 0.01, 0.0)
    assert groups_text([group], frozen=2_000_000).startswith("1 group: head lr 0.01; ")
