"""Freezing by pattern and by stage, the BatchNorm policy and gradual unfreezing, on real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import finetune
from finetune.build import build
from finetune.config.freeze import UnfreezeStep
from finetune.config.model import HeadConfig
from finetune.errors import UserError
from finetune.freezing import freeze, stage_names, unfreeze_due
from finetune.model import build_model
from finetune.optim import create_optimizer, param_groups
from finetune.recipe import Recipe
from finetune.schedule import build_scheduler
from finetune.weights import read_state_dict
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
@pytest.mark.parametrize(
    "backbone, until, frozen_prefixes",
    [
        ("test_resnet", "layer3", ("conv1.", "bn1.", "layer1.", "layer2.")),
        ("test_efficientnet", "blocks.2", ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")),
        (
            "test_vit",
            "blocks.3",
            ("cls_token", "pos_embed", "patch_embed.", "blocks.0.", "blocks.1.", "blocks.2."),
        ),
        ("test_convnext", "stages.2", ("stem.", "stages.0.", "stages.1.")),
        ("resnet18", "layer4", ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")),
        ("torchvision:resnet18", "layer2", ("conv1.", "bn1.", "layer1.")),
        ("test_vit", "head", ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")),
    ],
)
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
    model = build_model(
        backbone="test_resnet",
        num_classes=3,
        head=HeadConfig(type="mlp", hidden=[8], norm="batchnorm"),
    ).model
    report = freeze(model, batchnorm="frozen", head="fc")
    model.train()
    batchnorms = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
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
def _unfreezing_model(optimizer: str = "sgd", weight_decay: float = 0.0, **options):
    """A model frozen until layer3 whose layer2 starts training at epoch 2, and its optimizer
    holding every group from the start."""
    model = timm.create_model("test_resnet", num_classes=3)
    report = freeze(
        model, until="layer3", unfreeze=[UnfreezeStep(epoch=2, patterns=["layer2.*"], lr=0.01)]
    )
    built = create_optimizer(
        model,
        name=optimizer,
        lr=0.1,
        weight_decay=weight_decay,
        unfreeze=report.unfreeze,
        **options,
    )
    return model, report.unfreeze, built


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_unfreeze_pattern_matching_no_frozen_parameter_is_an_error():
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(UserError, match="epoch 2.*match no frozen parameter") as caught:
        freeze(model, until="layer3", unfreeze=[UnfreezeStep(epoch=2, patterns=["layer4.*"])])
    assert "layer4.*" in str(caught.value)
    assert _frozen(model) == set()  # checked before anything was frozen


def test_unfreeze_step_left_with_nothing_to_unfreeze_is_an_error():
    model = timm.create_model("test_resnet", num_classes=3)
    steps = [
        UnfreezeStep(epoch=2, patterns=["layer*"]),
        UnfreezeStep(epoch=3, patterns=["layer1.*"]),
    ]
    with pytest.raises(UserError, match="epoch 3.*already unfreezes"):
        freeze(model, until="layer4", unfreeze=steps)


def test_unfreeze_after_the_last_epoch_is_refused_by_key():
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(
            tiny_recipe(
                freeze={"until": "layer3", "unfreeze": [{"epoch": 9, "patterns": ["layer2.*"]}]},
                train={"epochs": 3},
            )
        )
    assert any("freeze.unfreeze: epoch(s) [9]" in line for line in caught.value.problems)


@pytest.mark.parametrize(
    "optimizer, options", [("sgd", {"momentum": 0.9}), ("adamw", {}), ("adam", {}), ("lamb", {})]
)
def test_a_stage_waiting_to_unfreeze_is_bit_identical_under_weight_decay(optimizer, options):
    """Its groups are in the optimizer, with weight decay, yet nothing moves it until its
    epoch: without a gradient the optimizers skip the parameter, decay included."""
    model, stages, built = _unfreezing_model(optimizer, weight_decay=0.1, **options)
    layer2 = {n: p.detach().clone() for n, p in model.named_parameters() if n in stages[0].names}
    assert {g["name"] for g in built.param_groups} >= {"default", "unfreeze@2/default"}
    for _ in range(3):
        _train_step(model, built)
    for name, param in model.named_parameters():
        if name in layer2:
            assert torch.equal(param, layer2[name]), name
    assert unfreeze_due(model, stages, epoch=1) == []
    assert unfreeze_due(model, stages, epoch=2) == stages
    assert unfreeze_due(model, stages, epoch=3) == []  # idempotent: done once
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    moving = {n for n, p in model.named_parameters() if n in layer2 and p.grad.abs().sum() > 0}
    built.step()
    assert len(moving) > len(layer2) // 2
    assert all(not torch.equal(p, layer2[n]) for n, p in model.named_parameters() if n in moving)


def test_a_stage_group_follows_the_schedule_from_the_start():
    """The schedule treats the stage's group like any other: its own base LR, the same factor."""
    model, _, optimizer = _unfreezing_model()
    schedule = build_scheduler(
        optimizer, name="cosine", epochs=4, steps_per_epoch=5, warmup_epochs=2
    )
    default, stage = optimizer.param_groups[0], optimizer.param_groups[-1]
    assert stage["name"] == "unfreeze@2/default"
    for _ in range(20):
        assert stage["lr"] / default["lr"] == pytest.approx(0.1)
        optimizer.step()
        schedule.step_update()


@pytest.mark.parametrize(
    "schedule, cycle_momentum",
    [
        ("cyclic", False),
        ("cyclic", True),
        ("onecycle", False),
        ("onecycle", True),
        ("poly", False),
        ("plateau", False),
        ("step", False),
    ],
)
def test_stage_groups_need_no_scheduler_surgery(schedule, cycle_momentum):
    """Every schedule, its state saved and loaded into a fresh optimizer of the same build."""

    def fresh():
        model, stages, optimizer = _unfreezing_model(momentum=0.9)
        return (
            model,
            stages,
            optimizer,
            build_scheduler(
                optimizer,
                name=schedule,
                epochs=4,
                steps_per_epoch=3,
                max_lr=0.5,
                cycle_momentum=cycle_momentum,
            ),
        )

    model, stages, optimizer, scheduler = fresh()
    for step in range(8):
        if step == 4:
            unfreeze_due(model, stages, epoch=2)
        _train_step(model, optimizer)
        scheduler.step_update()
        old, new = optimizer.param_groups[0], optimizer.param_groups[-1]
        assert new["lr"] == pytest.approx(old["lr"] * 0.1)
        assert new["momentum"] == pytest.approx(old["momentum"])
    saved = optimizer.state_dict(), scheduler.state_dict()
    _, _, optimizer, scheduler = fresh()
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert scheduler.get_last_lr() == pytest.approx([g["lr"] for g in optimizer.param_groups])


def test_stage_groups_get_the_optimizer_wide_lr_scaling():
    """With every LR scaled (the linear scaling rule), the stage's group is scaled alike."""
    model = timm.create_model("test_resnet", num_classes=3)
    report = freeze(
        model, until="layer3", unfreeze=[UnfreezeStep(epoch=2, patterns=["layer2.*"], lr=0.01)]
    )
    optimizer = create_optimizer(
        model,
        lr=0.1,
        unfreeze=report.unfreeze,
        lr_scaling="linear",
        batch_size=512,
        base_batch_size=256,
    )
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.02)


# ------------------------------------------------------------------- the real run, end to end
RECIPE = tiny_recipe(
    freeze={
        "until": "layer3",
        "batchnorm": "frozen",
        "unfreeze": [{"epoch": 2, "patterns": ["layer2.*"], "lr": 0.01}],
    },
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
    initial = {
        k: v.clone()
        for k, v in build(Recipe.from_dict(RECIPE), data=False).network.model.state_dict().items()
    }
    return initial, _run(tmp, "straight")


def test_frozen_parameters_and_batchnorm_statistics_are_bit_identical_after_training(trained):
    initial, run_dir = trained
    final = read_state_dict(run_dir / "last" / "model.safetensors")
    never_trained = [k for k in initial if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert never_trained
    for key in never_trained:
        assert torch.equal(final[key], initial[key]), key
    statistics = [
        k for k in initial if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    assert len(statistics) == 3 * 15
    for key in statistics:  # every BatchNorm, in trained stages too: batchnorm: frozen
        assert torch.equal(final[key], initial[key]), key
    for prefix in ("layer2.", "layer3.", "layer4.", "fc."):  # unfrozen at epoch 2, or trainable
        assert any(not torch.equal(final[k], initial[k]) for k in initial if k.startswith(prefix))


def test_stage_group_lr_is_in_the_metrics_and_follows_the_schedule(trained):
    _, run_dir = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Its own base LR, following the same schedule as the default group (0.05), every epoch.
    for row in rows:
        assert row["lr/unfreeze@2/default"] == pytest.approx(row["lr/default"] * 0.01 / 0.05)
    assert rows[1]["lr/unfreeze@2/default"] > 0


@pytest.mark.parametrize("stop_epoch", [2, 3])  # before and after the unfreeze at epoch 2
def test_a_resume_across_the_unfreeze_epoch_is_bit_identical(
    trained, tmp_path, monkeypatch, stop_epoch
):
    _, straight = trained

    def stop(model, stages, epoch):
        if epoch == stop_epoch:
            raise KeyboardInterrupt
        return unfreeze_due(model, stages, epoch)

    monkeypatch.setattr("finetune.loop.unfreeze_due", stop)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "interrupted")
    monkeypatch.undo()
    resumed = _run(tmp_path, "ignored", resume=tmp_path / "interrupted")
    assert resumed == tmp_path / "interrupted"
    expected = read_state_dict(straight / "last" / "model.safetensors")
    actual = read_state_dict(resumed / "last" / "model.safetensors")
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
