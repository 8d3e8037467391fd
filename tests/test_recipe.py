"""The recipe schema: defaults, extends, overrides, and errors that name the key."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from finetune.errors import UserError
from finetune.recipe import Recipe, apply_overrides, recipe_keys
from tests.conftest import REPO, tiny_recipe, write_recipe


def problems(data: dict) -> list[str]:
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(data)
    return caught.value.problems


def test_defaults_fill_every_optional_key():
    recipe = Recipe.from_dict(tiny_recipe())
    assert recipe.scheduler.name == "cosine"
    assert recipe.train.grad_accum_steps == 1
    assert recipe.freeze.patterns == []
    assert recipe.output.dir == Path("checkpoints")


def test_recipe_is_immutable():
    recipe = Recipe.from_dict(tiny_recipe())
    with pytest.raises(ValidationError, match="frozen"):
        recipe.train.epochs = 5


def test_extends_merges_nested_sections(tmp_path):
    write_recipe(tmp_path / "base.yaml", tiny_recipe())
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\noptimizer: {lr: 0.5}\n")
    recipe = Recipe.load(tmp_path / "child.yaml")
    assert recipe.name == "child"
    assert recipe.optimizer.lr == 0.5
    assert recipe.optimizer.momentum == 0.9  # kept from the base


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        Recipe.load(tmp_path / "a.yaml")


def test_set_overrides_are_yaml_typed(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    recipe = Recipe.load(path, ["optimizer.lr=3e-4", "train.epochs=5",
                                "train.clip_grad_norm=1.0", "data.augment=[vflip]"])
    assert recipe.optimizer.lr == pytest.approx(3e-4)
    assert recipe.train.epochs == 5
    assert recipe.data.augment == [{"vflip": {}}]


def test_override_creates_missing_sections():
    assert apply_overrides({}, {"a.b.c": 1}) == {"a": {"b": {"c": 1}}}


def test_typo_gets_the_closest_key():
    lines = problems(tiny_recipe(optimizer={"name": "sgd", "lr": 0.1, "momentun": 0.9}))
    assert lines == ["optimizer.momentun: unknown key; did you mean 'momentum'?"]


def test_every_error_is_listed_by_dotted_key():
    data = tiny_recipe(train={"epochs": 0, "device": "cpu"})
    data["optimizer"]["lr"] = 0
    data["data"]["val_split"] = 1.5
    del data["data"]["val"]
    lines = problems(data)
    assert any(line.startswith("train.epochs:") for line in lines)
    assert any(line.startswith("optimizer.lr:") for line in lines)
    assert any(line.startswith("data.val_split:") for line in lines)


def test_wrong_type_names_the_key():
    lines = problems(tiny_recipe(data={"batch_size": "big"}))
    assert lines[0].startswith("data.batch_size:")


def test_missing_data_root_is_an_error(tmp_path):
    lines = problems(tiny_recipe(data={"train": {"type": "imagefolder",
                                                "root": str(tmp_path / "nope")}}))
    assert lines == [f"data.train.root: path does not exist: {tmp_path / 'nope'} "
                     f"(got '{tmp_path / 'nope'}')"]


def test_unknown_augmentation_suggests_one():
    lines = problems(tiny_recipe(data={"augment": ["hflip", {"rotat": 10}]}))
    assert "did you mean 'rotate'" in lines[0]


def test_validation_source_is_required():
    data = tiny_recipe()
    del data["data"]["val"]
    assert any("data.val_split" in line for line in problems(data))


def test_resolved_recipe_round_trips(tmp_path):
    recipe = Recipe.from_dict(tiny_recipe())
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.load(path) == recipe


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    Recipe.load(path, check_paths=False)


def test_section_keys_mirror_factory_arguments():
    """`model:` -> build_model(**model), `freeze:` -> freeze(**freeze), and so on."""
    from finetune.export import export_run
    from finetune.freeze import freeze
    from finetune.model import build_model
    from finetune.optim import build_optimizer, lr_scale_factor, param_groups
    from finetune.recipe import (
        ExportConfig,
        FreezeConfig,
        ModelConfig,
        OptimizerConfig,
        SchedulerConfig,
    )
    from finetune.schedule import build_scheduler

    def arguments(function) -> set[str]:
        return set(inspect.signature(function).parameters)

    assert set(ModelConfig.model_fields) <= arguments(build_model)
    assert set(FreezeConfig.model_fields) <= arguments(freeze)
    assert set(SchedulerConfig.model_fields) <= arguments(build_scheduler)
    assert set(ExportConfig.model_fields) <= arguments(export_run)
    group_keys = {"param_groups", "no_decay", "layer_decay"}  # -> param_groups()
    scaling_keys = {"lr_scaling", "base_batch_size"}  # -> lr_scale_factor()
    optimizer_keys = set(OptimizerConfig.model_fields) - group_keys - scaling_keys
    assert optimizer_keys <= arguments(build_optimizer)
    assert {"lr", "weight_decay", "no_decay", "layer_decay", "rules"} <= arguments(param_groups)
    assert scaling_keys <= arguments(lr_scale_factor)


def test_recipe_keys_lists_nested_keys():
    keys = recipe_keys()
    assert "optimizer.param_groups" in keys and "model.load.strip_prefix" in keys


def test_interface_example_keys_are_known():
    """Keys of the documented example in the README exist in the schema."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)

    def flatten(node, prefix=""):
        for key, value in node.items():
            yield prefix + key
            if isinstance(value, dict) and key not in {"train", "val", "rename"}:
                yield from flatten(value, f"{prefix}{key}.")

    known = set(recipe_keys()) | {"extends"}
    assert [key for key in flatten(data) if key not in known] == []
