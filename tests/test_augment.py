"""Augmentations from the recipe: validation, the v2 pipeline and its order, mixup/cutmix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from finetune.augment import (
    BATCH,
    RejectNormalized,
    build_batch_transform,
    build_transforms,
    hard_labels,
)
from finetune.errors import UserError
from finetune.recipe import AUGMENTATIONS, DataConfig, Recipe
from tests.conftest import tiny_recipe

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)


def data_config(**data) -> DataConfig:
    return Recipe.from_dict(tiny_recipe(data=data)).data


def image(width: int = 40, height: int = 30) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def problems(**data) -> list[str]:
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(tiny_recipe(data=data))
    return caught.value.problems


@pytest.mark.parametrize("name", [name for name in AUGMENTATIONS if name not in BATCH])
def test_every_augmentation_runs_with_its_defaults(name):
    torch.manual_seed(0)
    transform = build_transforms(data_config(augment=[name]), MEAN, STD, train=True)
    out = transform(image())
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)


@pytest.mark.parametrize("item", [
    {"hflip": 1.0}, {"rotate": [-30, 30]}, {"rotate90": [90, 270]}, {"resize": [48, 48]},
    {"random_crop": {"padding": 4, "padding_mode": "reflect"}},
    {"random_resized_crop": {"scale": [0.5, 1.0], "ratio": [0.9, 1.1]}},
    {"color_jitter": {"brightness": 0.3, "hue": 0.1}}, {"autoaugment": "cifar10"},
    {"randaugment": {"num_ops": 3, "magnitude": 5}}, {"gaussian_blur": {"kernel_size": 5}},
    {"gaussian_noise": {"sigma": 0.05, "p": 0.5}},
    {"random_erasing": {"p": 1.0, "value": "random"}},
])
def test_augmentations_take_their_usual_parameters(item):
    data = data_config(augment=[item])
    assert build_transforms(data, MEAN, STD, train=True)(image()).shape == (3, 32, 32)


def test_stages_run_in_a_fixed_order_whatever_the_list_order():
    data = data_config(augment=["random_erasing", "gaussian_noise", "color_jitter", "hflip",
                                "random_resized_crop"])
    kinds = [type(step).__name__ for step in build_transforms(data, MEAN, STD, True).transforms]
    assert kinds[:3] == ["ToImage", "RejectNormalized", "RandomResizedCrop"]
    order = {kind: kinds.index(kind) for kind in kinds}
    assert order["RandomResizedCrop"] < order["ColorJitter"] < order["ToDtype"]
    assert order["ToDtype"] < order["GaussianNoise"] < order["Normalize"] < order["RandomErasing"]
    assert kinds.count("Normalize") == 1


def test_eval_transforms_are_derived_or_given():
    derived = build_transforms(data_config(augment=["trivialaugment"]), MEAN, STD, train=False)
    kinds = [type(step).__name__ for step in derived.transforms]
    assert kinds == ["ToImage", "RejectNormalized", "Resize", "CenterCrop", "ToDtype", "Normalize"]
    assert derived.transforms[2].size == [round(32 / 0.875)]
    squash = build_transforms(data_config(eval_transforms=[{"resize": [32, 32]}]), MEAN, STD, False)
    out = squash(image(80, 20))  # squashed to 32 x 32: nothing cropped away
    assert out.shape == (3, 32, 32)
    assert build_transforms(data_config(), None, None, False)(image()).max() <= 1.0


def test_rotate90_turns_exactly():
    data = data_config(augment=[{"rotate90": [90]}], crop_pct=1.0, image_size=30)
    square = image(30, 30)
    out = build_transforms(data, None, None, train=True)(square)
    plain = build_transforms(data_config(augment=[], crop_pct=1.0, image_size=30), None, None,
                             train=True)(square)
    assert torch.equal(out, torch.rot90(plain, k=1, dims=(-2, -1)))


def test_mixup_and_cutmix_mix_the_batch_in_collate():
    torch.manual_seed(0)
    collate = build_batch_transform([{"hflip": {}}, {"mixup": {"alpha": 0.4}}, {"cutmix": {}}],
                                    num_classes=4)
    batch = [(torch.rand(3, 8, 8), label) for label in (0, 1, 2, 3, 1, 2)]
    images, labels = collate(batch)
    assert images.shape == (6, 3, 8, 8) and labels.shape == (6, 4)
    assert torch.allclose(labels.sum(dim=1), torch.ones(6))
    assert labels.max(dim=1).values.min() >= 0.5 - 1e-6  # the image's own class keeps the most
    assert hard_labels(labels).shape == (6,)
    assert build_batch_transform([{"hflip": {}}], num_classes=4) is None
    hard = torch.tensor([2, 0])
    assert hard_labels(hard) is hard


def test_soft_labels_with_label_smoothing_give_a_finite_loss():
    _, labels = build_batch_transform([{"mixup": {}}], 3)([(torch.rand(3, 4, 4), i % 3)
                                                            for i in range(4)])
    loss = torch.nn.functional.cross_entropy(torch.randn(4, 3), labels, label_smoothing=0.1,
                                             weight=torch.tensor([1.0, 2.0, 0.5]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("augment, message", [
    ([{"hflip": {"p": 2}}], "data.augment: hflip.p: Input should be less than or equal to 1"),
    ([{"rotate": [30, 10]}], "rotate.degrees: a range is [min, max] with min <= max"),
    ([{"rotate90": [0, 45]}], "rotate90.angles.1: Input should be 0, 90, 180 or 270"),
    ([{"gaussian_blur": {"kernel_size": 4}}], "gaussian_blur.kernel_size: the kernel size must"),
    ([{"color_jitter": {"hue": 0.7}}], "color_jitter.hue: Input should be less than or equal"),
    ([{"random_erasing": {"area": 0.1}}], "random_erasing has no option ['area']"),
    (["random_resized_crop", {"random_crop": 4}], "random_resized_crop already resizes and "
                                                   "crops; drop random_crop"),
    (["hflip", "hflip"], "listed more than once: hflip"),
    (["normalize"], "normalize is not an augmentation: data.normalize applies it once"),
])
def test_bad_augmentations_name_the_key(augment, message):
    lines = problems(augment=augment)
    assert len(lines) == 1 and message in lines[0], lines


def test_eval_transforms_must_be_deterministic_and_stats_on_the_unit_scale():
    assert "evaluation transforms must be deterministic" in problems(
        eval_transforms=["hflip"])[0]
    line = problems(normalize={"mean": [124, 116, 104], "std": [58, 57, 57]})[0]
    assert line.startswith("data.normalize: mean and std are on the 0-1 pixel scale")
    assert "data.normalize: expected auto | imagenet | dataset | none" in problems(
        normalize="datset")[0]


def test_already_normalised_input_is_refused():
    transform = build_transforms(data_config(augment=[]), MEAN, STD, train=False)
    normalised = v2.Normalize(MEAN, STD)(torch.rand(3, 32, 32))
    with pytest.raises(UserError, match="already normalised"):
        transform(normalised)
    assert transform(torch.rand(3, 32, 32)).shape == (3, 32, 32)  # floats in [0, 1] are pixels
    assert RejectNormalized()(image()).size == (40, 30)
