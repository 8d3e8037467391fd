"""Freezing by pattern and by stage, the BatchNorm policy and gradual unfreezing, on real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import finetune
from finetune.errors import UserError
from finetune.freeze import UnfreezeStage, apply_unfreeze, freeze, stage_names
from finetune.model import build_model
from finetune.optim import param_groups
from finetune.plan import build_plan
from finetune.recipe import HeadConfig, Recipe, UnfreezeStep
from finetune.schedule import build_scheduler
from tests.conftest import tiny_recipe


def _frozen(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


# ------------------------------------------------------------------------------------ patterns
def test_patterns_freeze_matching_parameters_only():
    model = timm.create_model("test_resnet", num_classes=3)
    report = freeze(model, patterns=["conv1.*", "layer1.*"])
    expected = {n for n, _ in model.named_parameters() if n.startswith(("conv1.", "layer1."))}
    assert _frozen(model) == expected == set(report.frozen)
    assert set(report.trainable) == {n for n, _ in model.named_parameters()} - expected


def test_a_pattern_matching_nothing_is_an_error_naming_it():
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(UserError, match="freeze.patterns: these patterns match no parameter") as e:
        freeze(model, patterns=["conv1.*", "layer9.*"])
    assert "layer9.*" in str(e.value) and "conv1.*" not in e.value.problems
    assert _frozen(model) == set()  # nothing was frozen


# -------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("backbone, until, frozen_prefixes", [
    ("test_resnet", "layer3", ("conv1.", "bn1.", "layer1.", "layer2.")),
    ("test_efficientnet", "blocks.2", ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")),
    ("test_vit", "blocks.3", ("cls_token", "pos_embed", "patch_embed.", "blocks.0.", "blocks.1.",
                              "blocks.2.")),
    ("test_convnext", "stages.2", ("stem.", "stages.0.", "stages.1.")),
    ("resnet18", "layer4", ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")),
    ("torchvision:resnet18", "layer2", ("conv1.", "bn1.", "layer1.")),
    ("test_vit", "head", ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")),
])
def test_until_freezes_everything_before_the_stage(backbone, until, frozen_prefixes):
    model = build_model(backbone=backbone, num_classes=3).model
    assert until in stage_names(model)
    report = freeze(model, until=until)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if n.startswith(frozen_prefixes)}
    assert _frozen(model) == expected and expected
    assert report.until == until


def test_stage_names_come_from_feature_info_and_children():
    model = timm.create_model("test_convnext", num_classes=3)
    stages = stage_names(model)
    assert stages[:2] == ["stem", "stages"]  # in the model's order
    assert {f"stages.{i}" for i in range(4)} <= set(stages) and "head" in stages


def test_unknown_stage_lists_the_stages():
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(UserError, match="freeze.until: 'layer5' is not a stage") as caught:
        freeze(model, until="layer5")
    assert "layer1, layer2, layer3, layer4" in str(caught.value)


# ----------------------------------------------------------------------------------- batchnorm
def test_frozen_batchnorm_stays_in_eval_mode_across_train_calls():
    model = build_model(backbone="test_resnet", num_classes=3,
                        head=HeadConfig(type="mlp", hidden=[8], norm="batchnorm")).model
    report = freeze(model, batchnorm="frozen", head="fc")
    model.train()
    batchnorms = {n: m for n, m in model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert set(report.frozen_batchnorms) == {n for n in batchnorms if not n.startswith("fc.")}
    assert all(not batchnorms[n].training for n in report.frozen_batchnorms)
    assert batchnorms["fc.1"].training  # the new head's BatchNorm has nothing to keep
    before = batchnorms["bn1"].running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(batchnorms["bn1"].running_mean, before)
    assert all(p.requires_grad for p in model.parameters())  # affine weights: up to patterns


def test_frozen_parameters_never_get_gradients_nor_reach_the_optimizer():
    model = timm.create_model("test_resnet", num_classes=3)
    freeze(model, until="layer3")
    groups = param_groups(model, lr=0.1)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in _frozen(model))
    assert model.fc.weight.grad is not None


# -------------------------------------------------------------------------- gradual unfreezing
def _stage(model: nn.Module, patterns: list[str], epoch: int, lr: float) -> UnfreezeStage:
    report = freeze(model, until="layer3", unfreeze=[UnfreezeStep(epoch=epoch, patterns=patterns,
                                                                  lr=lr)])
    names = set(report.unfreeze[0].names)
    groups = param_groups(model, lr=lr, names=names)
    return UnfreezeStage(epoch, [{**g, "name": f"unfreeze@{epoch}/{g['name']}"} for g in groups],
                         reference_lr=0.1)  # the LR the tests give the optimizer's first group


def test_unfreeze_pattern_matching_no_frozen_parameter_is_an_error():
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(UserError, match="epoch 2.*match no frozen parameter") as caught:
        freeze(model, until="layer3", unfreeze=[UnfreezeStep(epoch=2, patterns=["layer4.*"])])
    assert "layer4.*" in str(caught.value)
    assert _frozen(model) == set()  # checked before anything was frozen


def test_unfreeze_step_left_with_nothing_to_unfreeze_is_an_error():
    model = timm.create_model("test_resnet", num_classes=3)
    steps = [UnfreezeStep(epoch=2, patterns=["layer*"]),
             UnfreezeStep(epoch=3, patterns=["layer1.*"])]
    with pytest.raises(UserError, match="epoch 3.*already unfreezes"):
        freeze(model, until="layer4", unfreeze=steps)


def test_unfreeze_after_the_last_epoch_is_refused_by_key():
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(tiny_recipe(freeze={"until": "layer3", "unfreeze": [
            {"epoch": 9, "patterns": ["layer2.*"]}]}, train={"epochs": 3}))
    assert any("freeze.unfreeze: epoch(s) [9]" in line for line in caught.value.problems)


def test_unfreeze_adds_a_group_that_the_scheduler_knows():
    """A scheduler built before add_param_group: warmup then cosine, stepped across the switch."""
    model = timm.create_model("test_resnet", num_classes=3)
    stage = _stage(model, ["layer2.*"], epoch=2, lr=0.01)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    scheduler = build_scheduler(optimizer, name="cosine", epochs=4, steps_per_epoch=5,
                                warmup_epochs=2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert apply_unfreeze(optimizer, scheduler, [stage], epoch=1) == []
    assert apply_unfreeze(optimizer, scheduler, [stage], epoch=2) == [stage]
    assert apply_unfreeze(optimizer, scheduler, [stage], epoch=3) == []  # applied once
    new = optimizer.param_groups[-1]
    assert len(optimizer.param_groups) == 2 and new["name"] == "unfreeze@2/default"
    assert all(p.requires_grad for p in new["params"])
    assert new["initial_lr"] == pytest.approx(0.01)
    for _ in range(16):  # through the end of warmup, where cosine restarts from base_lrs
        assert new["lr"] / optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
        optimizer.step()
        scheduler.step()
    assert [s.base_lrs for s in scheduler._schedulers] == [[0.1, 0.01], [0.1, 0.01]]
    assert len(scheduler.get_last_lr()) == 2


@pytest.mark.parametrize("schedule, cycle_momentum", [
    ("cyclic", False), ("cyclic", True), ("onecycle", False), ("onecycle", True), ("poly", False)])
def test_unfreeze_group_follows_schedules_that_keep_lrs_per_group(schedule, cycle_momentum):
    """CyclicLR keeps base and max LRs (and momentums) per group, OneCycleLR in the groups."""
    model = timm.create_model("test_resnet", num_classes=3)
    stage = _stage(model, ["layer2.*"], epoch=2, lr=0.01)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    scheduler = build_scheduler(optimizer, name=schedule, epochs=4, steps_per_epoch=3,
                                max_lr=0.5, cycle_momentum=cycle_momentum)
    for step in range(10):
        if step == 4:
            apply_unfreeze(optimizer, scheduler, [stage], epoch=2)
        optimizer.step()
        scheduler.step()
        if step >= 4:
            old, new = optimizer.param_groups
            assert new["lr"] == pytest.approx(old["lr"] * 0.1)
            assert new["momentum"] == pytest.approx(old["momentum"])


def test_resumed_optimizer_and_scheduler_need_the_group_first():
    model = timm.create_model("test_resnet", num_classes=3)
    stage = _stage(model, ["layer2.*"], epoch=2, lr=0.01)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    scheduler = build_scheduler(optimizer, name="cosine", epochs=3, steps_per_epoch=2)
    apply_unfreeze(optimizer, scheduler, [stage], epoch=2)
    optimizer.step()
    scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()

    for param in stage.groups[0]["params"]:
        param.requires_grad_(False)  # a fresh process: frozen again
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    scheduler = build_scheduler(optimizer, name="cosine", epochs=3, steps_per_epoch=2)
    with pytest.raises(ValueError):
        optimizer.load_state_dict(saved[0])
    apply_unfreeze(optimizer, scheduler, [stage], epoch=2)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert scheduler.get_last_lr() == pytest.approx([g["lr"] for g in optimizer.param_groups])


def test_unfreeze_group_gets_the_optimizer_wide_lr_scaling():
    """With every LR scaled (the linear scaling rule), the new group is scaled alike."""
    model = timm.create_model("test_resnet", num_classes=3)
    stage = _stage(model, ["layer2.*"], epoch=2, lr=0.01)
    groups = [{**g, "lr": g["lr"] * 2} for g in param_groups(model, lr=0.1)]
    optimizer = torch.optim.SGD(groups, lr=0.2)
    apply_unfreeze(optimizer, None, [stage], epoch=2)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.02)


# ------------------------------------------------------------------- the real run, end to end
RECIPE = tiny_recipe(
    freeze={"until": "layer3", "batchnorm": "frozen",
            "unfreeze": [{"epoch": 2, "patterns": ["layer2.*"], "lr": 0.01}]},
    scheduler={"name": "cosine", "warmup_epochs": 1},
    train={"epochs": 3, "device": "cpu"},
)


def _run(tmp: Path, name: str, **kwargs) -> Path:
    recipe = Recipe.from_dict(RECIPE)
    return finetune.run(recipe, run_dir=tmp / name, **kwargs).run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """The model a tiny recipe starts from, and its run folder after 3 epochs."""
    tmp = tmp_path_factory.mktemp("freeze-run")
    initial = {k: v.clone() for k, v in build_plan(Recipe.from_dict(RECIPE)).built.model
               .state_dict().items()}
    return initial, _run(tmp, "straight")


def test_frozen_parameters_and_batchnorm_statistics_are_bit_identical_after_training(trained):
    initial, run_dir = trained
    final = load_file(run_dir / "last" / "model.safetensors")
    never_trained = [k for k in initial if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert never_trained
    for key in never_trained:
        assert torch.equal(final[key], initial[key]), key
    statistics = [k for k in initial if k.endswith(("running_mean", "running_var",
                                                    "num_batches_tracked"))]
    assert len(statistics) == 3 * 15
    for key in statistics:  # every BatchNorm, in trained stages too: batchnorm: frozen
        assert torch.equal(final[key], initial[key]), key
    for prefix in ("layer2.", "layer3.", "layer4.", "fc."):  # unfrozen at epoch 2, or trainable
        assert any(not torch.equal(final[k], initial[k]) for k in initial if k.startswith(prefix))


def test_unfrozen_group_shows_in_the_metrics_from_its_epoch(trained):
    _, run_dir = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [{k for k in row if k.startswith("lr/unfreeze@2")} for row in rows]
    assert keys[0] == set() and keys[1] == keys[2] == {"lr/unfreeze@2/default"}
    # Its own base LR, following the same schedule as the default group (0.05).
    for row in rows[1:]:
        assert row["lr/unfreeze@2/default"] == pytest.approx(row["lr/default"] * 0.01 / 0.05)
    assert rows[1]["lr/unfreeze@2/default"] > 0


def test_resume_after_the_unfreeze_epoch_reaches_the_same_weights(trained, tmp_path, monkeypatch):
    _, straight = trained

    def stop_at_epoch_3(optimizer, scheduler, stages, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return apply_unfreeze(optimizer, scheduler, stages, epoch)

    monkeypatch.setattr("finetune.loop.apply_unfreeze", stop_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "interrupted")
    monkeypatch.undo()
    resumed = _run(tmp_path, "ignored", resume=tmp_path / "interrupted")
    assert resumed == tmp_path / "interrupted"
    expected = load_file(straight / "last" / "model.safetensors")
    actual = load_file(resumed / "last" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
