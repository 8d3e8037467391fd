"""Parameter groups: ordered rules, no_decay, layer decay (against timm's), and the scheduler."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from finetune.config.optim import ParamGroupRule
from finetune.errors import UserError
from finetune.freezing import freeze
from finetune.model import build_model
from finetune.optim import layer_ids, param_groups
from finetune.schedule import build_scheduler


def _by_name(groups: list[dict]) -> dict[str, dict]:
    """Parameter name -> its group (and every parameter is in exactly one)."""
    owner: dict[str, dict] = {}
    for group in groups:
        for name in group["param_names"]:
            assert name not in owner, f"{name} is in two groups"
            owner[name] = group
    return owner


def _per_param(groups: list[dict], key: str) -> dict[int, float]:
    return {id(p): group[key] for group in groups for p in group["params"]}


@pytest.fixture
def resnet() -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=3)


def test_first_matching_rule_wins_and_unmatched_take_the_defaults(resnet):
    rules = [
        ParamGroupRule(match="fc.*", lr=0.1),
        ParamGroupRule(match="layer4.*", lr_mult=0.5, weight_decay=0.0),
        ParamGroupRule(match="*.weight", weight_decay=1e-3),
        ParamGroupRule(match="layer4.0.conv1.*", lr=9.0),
    ]  # shadowed by layer4.*
    groups = param_groups(resnet, lr=0.01, weight_decay=1e-4, rules=rules)
    owner = _by_name(groups)
    assert set(owner) == {n for n, _ in resnet.named_parameters()}
    assert (owner["fc.weight"]["name"], owner["fc.weight"]["lr"]) == ("fc.*", 0.1)
    assert owner["fc.weight"]["weight_decay"] == 1e-4
    assert owner["layer4.0.conv1.weight"]["name"] == "layer4.*"
    assert owner["layer4.0.conv1.weight"]["lr"] == pytest.approx(0.005)
    assert owner["layer4.0.conv1.weight"]["weight_decay"] == 0.0
    assert (
        owner["layer1.0.conv1.weight"]["name"],
        owner["layer1.0.conv1.weight"]["lr"],
        owner["layer1.0.conv1.weight"]["weight_decay"],
    ) == ("*.weight", 0.01, 1e-3)
    assert (owner["layer1.0.bn1.bias"]["name"], owner["layer1.0.bn1.bias"]["lr"]) == (
        "default",
        0.01,
    )
    assert [g["name"] for g in groups] == ["*.weight", "default", "layer4.*", "fc.*"]


def test_frozen_parameters_are_left_out_and_empty_groups_dropped(resnet):
    freeze(resnet, patterns=["layer1.*", "conv1.*"])
    groups = param_groups(resnet, lr=0.01, rules=[ParamGroupRule(match="layer1.*", lr=1.0)])
    owner = _by_name(groups)
    assert set(owner) == {n for n, p in resnet.named_parameters() if p.requires_grad}
    assert "layer1.*" not in {g["name"] for g in groups}
    assert all(g["params"] for g in groups)


def test_a_rule_matching_no_parameter_is_an_error(resnet):
    with pytest.raises(UserError, match=r"optimizer.param_groups.1.match: 'lyer4.\*' matches no"):
        param_groups(
            resnet,
            lr=0.01,
            rules=[ParamGroupRule(match="fc.*", lr=0.1), ParamGroupRule(match="lyer4.*", lr=0.1)],
        )


def test_no_decay_is_timm_weight_decay_rule():
    model = timm.create_model("test_vit", num_classes=3)
    ours = _per_param(param_groups(model, lr=0.1, weight_decay=0.05, no_decay=True), "weight_decay")
    reference = _per_param(
        param_groups_weight_decay(
            model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay()
        ),
        "weight_decay",
    )
    assert ours == reference
    owner = _by_name(param_groups(model, lr=0.1, weight_decay=0.05, no_decay=True))
    assert owner["pos_embed"]["name"] == "default/no_decay"  # from model.no_weight_decay()
    assert owner["blocks.0.norm1.weight"]["weight_decay"] == 0.0


def test_no_decay_kinds_separately():
    model = timm.create_model("test_vit", num_classes=3)
    owner = _by_name(param_groups(model, lr=0.1, weight_decay=0.05, no_decay=["bias"]))
    assert owner["head.bias"]["weight_decay"] == 0.0
    assert owner["blocks.0.norm1.weight"]["weight_decay"] == 0.05
    assert owner["pos_embed"]["weight_decay"] == 0.05
    owner = _by_name(param_groups(model, lr=0.1, weight_decay=0.05, no_decay=["norm", "embed"]))
    assert owner["head.bias"]["weight_decay"] == 0.05
    assert owner["blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert owner["cls_token"]["weight_decay"] == 0.0
    with pytest.raises(UserError, match="optimizer.no_decay: unknown"):
        param_groups(model, lr=0.1, weight_decay=0.05, no_decay=["biases"])


def test_no_decay_without_weight_decay_makes_no_twin_groups(resnet):
    groups = param_groups(resnet, lr=0.1, no_decay=True)
    assert [g["name"] for g in groups] == ["default"]


@pytest.mark.parametrize(
    "backbone", ["test_vit", "test_convnext", "test_efficientnet", "test_resnet"]
)
def test_layer_decay_matches_timm(backbone):
    model = build_model(backbone=backbone, num_classes=3).model
    ours = param_groups(model, lr=1.0, weight_decay=0.05, no_decay=True, layer_decay=0.75)
    reference = param_groups_layer_decay(
        model,
        weight_decay=0.05,
        layer_decay=0.75,
        no_weight_decay_list=getattr(model, "no_weight_decay", lambda: ())(),
    )
    assert _per_param(ours, "lr") == pytest.approx(_per_param(reference, "lr_scale"))
    assert _per_param(ours, "weight_decay") == _per_param(reference, "weight_decay")
    _by_name(ours)


def test_layer_decay_with_rules_and_a_torchvision_model():
    model = build_model(backbone="torchvision:resnet18", num_classes=3).model
    ids, count = layer_ids(model)
    assert count == 7 and ids["conv1.weight"] == 0 and ids["fc.weight"] == 6
    rules = [ParamGroupRule(match="fc.*", lr=0.5), ParamGroupRule(match="layer4.*", lr_mult=2.0)]
    owner = _by_name(param_groups(model, lr=0.1, rules=rules, layer_decay=0.5))
    assert (owner["fc.weight"]["name"], owner["fc.weight"]["lr"]) == ("fc.*", 0.5)  # absolute
    assert owner["layer4.0.conv1.weight"]["lr"] == pytest.approx(0.1 * 2.0 * 0.5)
    assert owner["conv1.weight"]["lr"] == pytest.approx(0.1 * 0.5**6)
    assert owner["conv1.weight"]["name"] == "default/depth0"


def test_each_group_keeps_its_own_base_lr_through_the_schedule(resnet):
    groups = param_groups(
        resnet,
        lr=0.01,
        weight_decay=1e-4,
        no_decay=True,
        rules=[ParamGroupRule(match="fc.*", lr=0.1)],
        layer_decay=0.8,
    )
    base = [g["lr"] for g in groups]
    optimizer = torch.optim.SGD(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=0.01, momentum=0.9
    )
    scheduler = build_scheduler(
        optimizer, name="cosine", epochs=3, steps_per_epoch=4, warmup_epochs=1
    )
    assert [s.base_lrs for s in scheduler.scheduler._schedulers] == [base, base]
    for _ in range(11):
        lrs = [g["lr"] for g in optimizer.param_groups]
        factor = lrs[0] / base[0]
        assert lrs == pytest.approx([b * factor for b in base])
        optimizer.step()
        scheduler.step_update()
    assert [g["weight_decay"] for g in optimizer.param_groups] == [
        g["weight_decay"] for g in groups
    ]
