"""The construct step: one build per run, every group in the optimizer, lr: auto built once."""

from __future__ import annotations

import math

import pytest
import torch

import finetune.build
import finetune.stats
from finetune import lr_find
from finetune.build import build
from finetune.errors import UserError
from finetune.recipe import Recipe
from tests.conftest import tiny_recipe

UNFREEZING = tiny_recipe(
    freeze={"until": "layer3", "unfreeze": [{"epoch": 2, "patterns": ["layer2.*"], "lr": 0.01}]},
    train={"epochs": 3, "device": "cpu", "grad_accum_steps": 2},
)


def test_build_holds_every_group_the_run_will_train_from_the_start():
    built = build(Recipe.from_dict(UNFREEZING))
    names = [group["name"] for group in built.optimizer.param_groups]
    assert names == ["default", "unfreeze@2/default"]
    stage = built.unfreeze[0]
    parameters = dict(built.model.named_parameters())
    assert stage.names and all(not parameters[name].requires_grad for name in stage.names)
    in_stage_group = {id(p) for p in built.optimizer.param_groups[1]["params"]}
    assert in_stage_group == {id(parameters[name]) for name in stage.names}
    assert built.optimizer.param_groups[1]["lr"] == pytest.approx(0.01)
    # 24 images in batches of 8, two batches a step: the last window holds one batch.
    assert len(built.train_loader) == 3 and built.steps_per_epoch == 2
    assert built.effective_batch_size == 16


def test_build_without_data_reads_no_image_and_takes_the_class_count_from_the_recipe():
    data = tiny_recipe(model={"backbone": "test_resnet"})  # no num_classes: the fake source's 3
    built = build(Recipe.from_dict(data), data=False, steps_per_epoch=5)
    assert built.datasets is None and built.train_loader is None and built.val_loader is None
    assert built.num_classes == 3 and built.network.model.fc.out_features == 3
    assert built.steps_per_epoch == 5


def test_the_same_recipe_builds_the_same_head_with_or_without_data():
    recipe = Recipe.from_dict(tiny_recipe())
    planned = build(recipe, data=False).network.model.state_dict()
    trained = build(recipe).network.model.state_dict()
    for key, value in planned.items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"model": {"backbone": "test_resnet", "num_classes": 4}},
            "model.num_classes is 4 but data.train has 3 classes",
        ),
        (
            {"scheduler": {"name": "plateau", "monitor": "val/top5"}},
            "scheduler.monitor: val/top5 is only logged with 5 or more classes",
        ),
    ],
)
def test_build_refuses_what_does_not_fit_the_data(sections, message):
    with pytest.raises(UserError, match=message):
        build(Recipe.from_dict(tiny_recipe(**sections)))


def test_a_plan_needs_a_number_for_the_lr():
    recipe = Recipe.from_dict(tiny_recipe(optimizer={"lr": "auto"}))
    with pytest.raises(UserError, match="optimizer.lr: 'auto' is found when training starts"):
        build(recipe, data=False, auto_lr=False)


def test_auto_lr_builds_the_model_once_and_measures_the_data_once(monkeypatch):
    """lr: auto runs the range test on what was built, then rebuilds only the optimizer and
    the schedule; normalize: dataset is measured once, and both land in the recipe."""
    monkeypatch.setattr(lr_find, "STEPS", 12)  # 100 by default
    calls = {"build_model": 0, "image_statistics": 0}

    def count(module, name):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    count(finetune.build, "build_model")
    count(finetune.stats, "image_statistics")
    data = tiny_recipe(optimizer={"lr": "auto"})
    data["optimizer"]["param_groups"] = [{"match": "fc.*", "lr_mult": 10}]
    data["data"]["normalize"] = "dataset"
    built = build(Recipe.from_dict(data))
    assert calls == {"build_model": 1, "image_statistics": 1}
    lr = built.recipe.optimizer.lr
    assert isinstance(lr, float) and lr == float(f"{built.lr_found.suggestion:.3g}")
    groups = {group["name"]: group["lr"] for group in built.optimizer.param_groups}
    assert groups["fc.*"] == pytest.approx(10 * lr) and groups["default"] == pytest.approx(lr)
    assert built.schedule.optimizer is built.optimizer
    assert not isinstance(built.recipe.data.normalize, str)  # the measured mean and std
    assert all(math.isfinite(v) for v in built.recipe.data.normalize.mean)


def test_a_batch_of_one_with_training_batchnorm_is_refused_with_a_hint():
    with pytest.raises(UserError, match="data.batch_size: 1 cannot train") as caught:
        build(Recipe.from_dict(tiny_recipe(data={"batch_size": 1})), data=False)
    assert "freeze.batchnorm: frozen" in str(caught.value)
    frozen = tiny_recipe(data={"batch_size": 1}, freeze={"batchnorm": "frozen"})
    assert build(Recipe.from_dict(frozen), data=False).recipe.data.batch_size == 1
