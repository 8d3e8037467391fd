"""The schema's registries agree with the code that uses them, and typed values round-trip."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune.augment import BUILDERS, build_batch_transform
from finetune.config.augment import (
    AUGMENTATIONS,
    Augmentation,
    RotateArgs,
    parse_augmentation,
)
from finetune.config.sources import SOURCE_CLASSES, SOURCE_TYPES, DigitsSource, FakeSource
from finetune.errors import UserError
from finetune.recipe import Recipe
from finetune.sources import SOURCE_KINDS, count_classes
from tests.conftest import REPO, tiny_recipe


def test_every_augmentation_has_a_builder_and_every_builder_an_augmentation():
    assert list(BUILDERS) == list(AUGMENTATIONS)


def test_every_source_class_has_a_way_to_open_it():
    assert set(SOURCE_KINDS) == set(SOURCE_CLASSES)
    assert SOURCE_TYPES == ("imagefolder", "csv", "jsonl", "torchvision", "digits", "fake")


def test_augmentations_are_typed_objects_written_back_as_given():
    data = Recipe.from_dict(tiny_recipe(data={"augment": ["hflip", {"rotate": 15}]})).data
    assert data.augment == [
        parse_augmentation("hflip"),
        Augmentation("rotate", RotateArgs(degrees=15)),
    ]
    assert data.augment[1].args.degrees == 15.0 and data.augment[1].args.fill == 0
    assert [item.to_dict() for item in data.augment] == [
        {"hflip": {}},
        {"rotate": {"degrees": 15.0}},
    ]
    assert data.model_dump()["augment"] == [{"hflip": {}}, {"rotate": {"degrees": 15.0}}]


def test_python_dump_of_a_recipe_validates_back_to_it():
    recipe = Recipe.from_dict(
        tiny_recipe(
            data={
                "augment": [{"random_resized_crop": {"scale": [0.5, 1]}}, {"mixup": 0.2}],
                "eval_transforms": [{"resize": [40, 40]}],
            }
        )
    )
    assert Recipe.from_dict(recipe.model_dump()) == recipe


def test_batch_transform_takes_typed_or_plain_augmentations():
    typed = Recipe.from_dict(tiny_recipe(data={"augment": [{"mixup": 0.2}]})).data.augment
    assert build_batch_transform(typed, num_classes=3) is not None
    assert build_batch_transform(["hflip"], num_classes=3) is None
    with pytest.raises(UserError, match="data.augment.0: unknown augmentation 'mixpu'"):
        build_batch_transform(["mixpu"], num_classes=3)


def test_classes_are_counted_from_the_recipe_alone(tmp_path):
    assert count_classes(FakeSource(type="fake", num_classes=5)) == 5
    assert count_classes(DigitsSource(type="digits", classes=[3, 1, 4])) == 3
    with pytest.raises(
        UserError, match="model.num_classes: needed to plan without reading the csv data"
    ):
        count_classes(
            Recipe.from_dict(
                tiny_recipe(data={"train": {"type": "csv", "path": str(tmp_path)}})
            ).data.train
        )


def test_the_schema_does_not_import_torch():
    code = "import sys, finetune.recipe, finetune.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_an_augmentation_built_in_python_must_match_its_arguments():
    with pytest.raises(UserError, match="hflip: arguments of type RotateArgs, expected FlipArgs"):
        Recipe.from_dict(tiny_recipe(data={"augment": [Augmentation("hflip", RotateArgs())]}))
