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
from finetune.config.augment import AUGMENTATIONS
from finetune.config.data import DataConfig
from finetune.errors import UserError
from finetune.recipe import Recipe
from tests.conftest import make_image_folder, tiny_recipe

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


@pytest.mark.parametrize(
    "item",
    [
        {"hflip": 1.0},
        {"rotate": [-30, 30]},
        {"rotate90": [90, 270]},
        {"resize": [48, 48]},
        {"random_crop": {"padding": 4, "padding_mode": "reflect"}},
        {"random_resized_crop": {"scale": [0.5, 1.0], "ratio": [0.9, 1.1]}},
        {"color_jitter": {"brightness": 0.3, "hue": 0.1}},
        {"autoaugment": "cifar10"},
        {"randaugment": {"num_ops": 3, "magnitude": 5}},
        {"gaussian_blur": {"kernel_size": 5}},
        {"gaussian_noise": {"sigma": 0.05, "p": 0.5}},
        {"random_erasing": {"p": 1.0, "value": "random"}},
    ],
)
def test_augmentations_take_their_usual_parameters(item):
    data = data_config(augment=[item])
    assert build_transforms(data, MEAN, STD, train=True)(image()).shape == (3, 32, 32)


def test_stages_run_in_a_fixed_order_whatever_the_list_order():
    data = data_config(
        augment=["random_erasing", "gaussian_noise", "color_jitter", "hflip", "random_resized_crop"]
    )
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
    plain = build_transforms(
        data_config(augment=[], crop_pct=1.0, image_size=30), None, None, train=True
    )(square)
    assert torch.equal(out, torch.rot90(plain, k=1, dims=(-2, -1)))


def test_mixup_and_cutmix_mix_the_batch_in_collate():
    torch.manual_seed(0)
    collate = build_batch_transform(
        [{"hflip": {}}, {"mixup": {"alpha": 0.4}}, {"cutmix": {}}], num_classes=4
    )
    batch = [(torch.rand(3, 8, 8), label) for label in (0, 1, 2, 3, 1, 2)]
    images, labels = collate(batch)
    assert images.shape == (6, 3, 8, 8) and labels.shape == (6, 4)
    assert torch.allclose(labels.sum(dim=1), torch.ones(6))
    assert labels.max(dim=1).values.min() >= 0.5 - 1e-6  # the image's own class keeps the most
    assert hard_labels(labels).shape == (6,)
    assert build_batch_transform([{"hflip": {}}], num_classes=4) is None
    hard = torch.tensor([2, 0])
    assert hard_labels(hard) is hard


def test_the_batch_mix_does_not_depend_on_the_workers(tmp_path):
    """Seeded from the batch's sample keys: the same mix collated in the main process or in
    either of two workers, and the main process's RNG untouched."""
    from finetune.data import Split, build_loader, build_train_sampler
    from finetune.sources import image_folder

    root = make_image_folder(tmp_path, ["a", "b", "c"], per_class=4)
    transform = build_transforms(data_config(augment=[], image_size=8), None, None, train=True)
    train = Split(image_folder(root, "data.train"), transform=transform)

    def epoch(num_workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = build_loader(
            train,
            batch_size=4,
            train=True,
            num_workers=num_workers,
            pin_memory=False,
            sampler=build_train_sampler("shuffle", train.targets, seed=0, batch_size=4),
            seed=0,
            collate_fn=build_batch_transform([{"mixup": {}}, "cutmix"], num_classes=3),
        )
        loader.sampler.set_epoch(1)
        return list(loader)

    before = torch.get_rng_state()
    plain = epoch(0)
    assert torch.equal(torch.get_rng_state(), before)
    assert all((labels.max(dim=1).values < 1).any() for _, labels in plain)  # mixed
    for (images, labels), (other_images, other_labels) in zip(plain, epoch(2), strict=True):
        assert torch.equal(images, other_images) and torch.equal(labels, other_labels)


def test_soft_labels_with_label_smoothing_give_a_finite_loss():
    _, labels = build_batch_transform([{"mixup": {}}], 3)(
        [(torch.rand(3, 4, 4), i % 3) for i in range(4)]
    )
    loss = torch.nn.functional.cross_entropy(
        torch.randn(4, 3), labels, label_smoothing=0.1, weight=torch.tensor([1.0, 2.0, 0.5])
    )
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "augment, message",
    [
        ([{"hflip": {"p": 2}}], "data.augment.0: hflip.p: Input should be less than or equal to 1"),
        ([{"rotate": [30, 10]}], "rotate.degrees: a range is [min, max] with min <= max"),
        ([{"rotate90": [0, 45]}], "rotate90.angles.1: Input should be 0, 90, 180 or 270"),
        (
            [{"gaussian_blur": {"kernel_size": 4}}],
            "gaussian_blur.kernel_size: the kernel size must",
        ),
        ([{"color_jitter": {"hue": 0.7}}], "color_jitter.hue: Input should be less than or equal"),
        ([{"random_erasing": {"area": 0.1}}], "random_erasing has no option ['area']"),
        (
            ["random_resized_crop", {"random_crop": 4}],
            "random_resized_crop already resizes and crops; drop random_crop",
        ),
        (["hflip", "hflip"], "listed more than once: hflip"),
        (["normalize"], "normalize is not an augmentation: data.normalize applies it once"),
    ],
)
def test_bad_augmentations_name_the_key(augment, message):
    lines = problems(augment=augment)
    assert len(lines) == 1 and message in lines[0], lines


def test_eval_transforms_must_be_deterministic_and_stats_on_the_unit_scale():
    assert "evaluation transforms must be deterministic" in problems(eval_transforms=["hflip"])[0]
    line = problems(normalize={"mean": [124, 116, 104], "std": [58, 57, 57]})[0]
    assert line.startswith("data.normalize: mean and std are on the 0-1 pixel scale")
    assert (
        "data.normalize: expected auto | imagenet | dataset | none"
        in problems(normalize="datset")[0]
    )


def test_already_normalised_input_is_refused():
    transform = build_transforms(data_config(augment=[]), MEAN, STD, train=False)
    normalised = v2.Normalize(MEAN, STD)(torch.rand(3, 32, 32))
    with pytest.raises(UserError, match="already normalised"):
        transform(normalised)
    assert transform(torch.rand(3, 32, 32)).shape == (3, 32, 32)  # floats in [0, 1] are pixels
    assert RejectNormalized()(image()).size == (40, 30)


# ------------------------------------------------------------------------- what each one does
def _pipeline(augment: list, **data) -> v2.Compose:
    """The training transform of a tiny recipe: no normalisation, a square image of
    ``image_size`` passes the size stage untouched (crop_pct 1)."""
    config = Recipe.from_dict(tiny_recipe(data={"augment": augment, "crop_pct": 1.0, **data})).data
    return build_transforms(config, None, None, train=True)


def _noise_image(size: int = 32, low: int = 1, high: int = 256, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(low, high, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _grey(size: int = 32, level: int = 128) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), level, dtype=np.uint8))


@pytest.mark.parametrize("name, dims", [("hflip", [-1]), ("vflip", [-2])])
def test_flips_with_p_1_mirror_the_image(name, dims):
    picture = _noise_image()
    plain = _pipeline([])(picture)
    flipped = _pipeline([{name: 1.0}])(picture)
    assert torch.equal(flipped, torch.flip(plain, dims=dims))
    assert not torch.equal(flipped, plain)
    assert torch.equal(_pipeline([{name: 0.0}])(picture), plain)  # p 0: never


def test_rotate_moves_pixels_and_fills_the_corners():
    picture = _noise_image()
    plain = _pipeline([])(picture)
    turned = _pipeline([{"rotate": {"degrees": [90, 90]}}])(picture)
    # A quarter turn only moves pixels: the same values, at other places.
    assert not torch.equal(turned, plain)
    assert torch.equal(turned.flatten().sort().values, plain.flatten().sort().values)
    # 45 degrees of a flat grey square: the corners the turned square leaves get `fill`, about
    # 1 - 2 (sqrt(2) - 1) = 17% of the area (a regular octagon stays covered).
    out = _pipeline([{"rotate": {"degrees": [45, 45], "fill": 255}}])(_grey())
    filled = (out == 1.0).all(dim=0).float().mean().item()
    assert filled == pytest.approx(1 - 2 * (2**0.5 - 1), abs=0.02)
    assert torch.all((out == 1.0) | ((out - 128 / 255).abs() < 1e-6))
    assert out[:, 16, 16].tolist() == pytest.approx([128 / 255] * 3)  # the centre stays


def test_random_erasing_erases_the_asked_share_of_the_area():
    picture = _noise_image()  # no zero pixel: every 0 below was erased
    exact = _pipeline([{"random_erasing": {"p": 1.0, "scale": [0.25, 0.25], "ratio": [1, 1]}}])
    erased = (exact(picture) == 0).all(dim=0)
    assert erased.float().mean().item() == 0.25
    rows, cols = erased.nonzero().unbind(1)  # one 16 x 16 square
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (16, 16)
    torch.manual_seed(0)
    free = _pipeline([{"random_erasing": {"p": 1.0, "scale": [0.25, 0.25]}}])
    shares = [(free(picture) == 0).all(dim=0).float().mean().item() for _ in range(10)]
    assert all(abs(share - 0.25) < 0.05 for share in shares), shares  # rounded to whole pixels
    assert torch.equal(_pipeline([{"random_erasing": 0.0}])(picture), _pipeline([])(picture))


def test_color_jitter_brightness_scales_the_mean_intensity():
    picture = _noise_image(low=20, high=100)  # dark: a brighter copy is not clipped
    before = _pipeline([])(picture).mean().item()
    torch.manual_seed(0)
    jitter = _pipeline([{"color_jitter": {"brightness": 0.5}}])
    ratios = [jitter(picture).mean().item() / before for _ in range(20)]
    assert all(0.5 - 0.02 <= ratio <= 1.5 + 0.02 for ratio in ratios), ratios
    assert max(ratios) - min(ratios) > 0.3  # a new factor each time, spread over [0.5, 1.5]
    assert torch.equal(_pipeline([{"color_jitter": 0.0}])(picture), _pipeline([])(picture))


@pytest.mark.parametrize("sigma", [0.05, 0.15])
def test_gaussian_noise_adds_noise_of_the_asked_std(sigma):
    torch.manual_seed(0)
    flat = _pipeline([])(_grey(64))
    assert flat.std().item() == 0
    noisy = _pipeline([{"gaussian_noise": sigma}], image_size=64)(_grey(64))
    assert noisy.std().item() == pytest.approx(sigma, rel=0.05)
    assert noisy.mean().item() == pytest.approx(128 / 255, abs=0.01)


def test_resize_and_center_crop_give_the_asked_sizes_and_the_centre():
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[10:30, 20:40] = 255  # a white 20 x 20 square in the middle of a black 40 x 60 image
    picture = Image.fromarray(pixels)
    centre = _pipeline([{"resize": [40, 60]}, {"center_crop": 20}])(picture)
    assert centre.shape == (3, 20, 20) and torch.all(centre == 1.0)
    squashed = _pipeline([{"resize": [24, 48]}, {"center_crop": 24}])(picture)
    assert squashed.shape == (3, 24, 24)
    # An int resizes the shorter side, keeping the aspect ratio: 40 x 60 -> 16 x 24; without a
    # center_crop the crop is to image_size (32), which pads the smaller image up.
    shorter = _pipeline([{"resize": 16}, {"center_crop": 16}])(picture)
    assert shorter.shape == (3, 16, 16) and torch.all(shorter[:, 5:11, 5:11] == 1.0)
    assert _pipeline([{"resize": 16}])(picture).shape == (3, 32, 32)
    evaluation = build_transforms(
        Recipe.from_dict(tiny_recipe(data={"image_size": 20})).data, None, None, train=False
    )
    assert evaluation(picture).shape == (3, 20, 20)  # resize to 20 / 0.875, centre crop 20
