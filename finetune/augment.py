"""Transforms: the recipe's ``data.augment`` mapped onto torchvision's transforms v2.

A training image goes through a fixed order of stages, each augmentation in its stage in the
order the recipe lists it::

    size      resize + center_crop | random_crop, or random_resized_crop  -> image_size
    uint8     geometry (hflip, vflip, rotate, rotate90) and colour (color_jitter, autoaugment,
              randaugment, trivialaugment, gaussian_blur), together in the recipe's order
    float     to float in [0, 1], then gaussian_noise
    normalise data.normalize: once, here, and nowhere else
    erase     random_erasing (after normalisation, as timm does: 0 is the mean colour)
    batch     mixup, cutmix: on the whole batch, in the loader's collate_fn (soft labels)

Evaluation uses resize to ``image_size / crop_pct`` and a centre crop, or ``data.eval_transforms``.
Each augmentation's stage and arguments are in its registry entry
(``finetune.config.augment.AUGMENTATIONS``); ``BUILDERS`` below makes its transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import ValidationError
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode, v2

from finetune.config.augment import AUGMENTATIONS, Augmentation, parse_augmentations
from finetune.config.data import DataConfig
from finetune.errors import UserError
from finetune.recipe import describe_errors

BATCH = tuple(name for name, spec in AUGMENTATIONS.items() if spec.stage == "batch")


def _maybe(transform: v2.Transform, p: float) -> v2.Transform:
    return transform if p >= 1 else v2.RandomApply([transform], p=p)


# One builder per augmentation of the registry (``finetune.config.augment.AUGMENTATIONS``, the
# same names: a test checks it): (its arguments, n) -> a transform, where n is the side the
# transform produces (``_size_steps`` passes it for the size stage, ``image_size`` otherwise) or,
# for the batch stage, the number of classes.
BUILDERS: dict[str, Callable[[Any, int], Callable[..., Any]]] = {
    "resize": lambda a, size: v2.Resize(
        a.size or size, interpolation=InterpolationMode(a.interpolation), antialias=True
    ),
    "center_crop": lambda a, size: v2.CenterCrop(a.size or size),
    "random_crop": lambda a, size: v2.RandomCrop(
        size, padding=a.padding or None, pad_if_needed=True, padding_mode=a.padding_mode
    ),
    "random_resized_crop": lambda a, size: v2.RandomResizedCrop(
        size,
        scale=a.scale,
        ratio=a.ratio,
        interpolation=InterpolationMode(a.interpolation),
        antialias=True,
    ),
    "hflip": lambda a, size: v2.RandomHorizontalFlip(p=a.p),
    "vflip": lambda a, size: v2.RandomVerticalFlip(p=a.p),
    "rotate": lambda a, size: v2.RandomRotation(a.degrees, fill=a.fill),
    # Exact quarter turns: torchvision transposes for 90/180/270 instead of resampling.
    "rotate90": lambda a, size: v2.RandomChoice(
        [v2.RandomRotation((angle, angle), expand=True) for angle in a.angles]
    ),
    "color_jitter": lambda a, size: v2.ColorJitter(
        brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue
    ),
    "autoaugment": lambda a, size: v2.AutoAugment(v2.AutoAugmentPolicy(a.policy)),
    "randaugment": lambda a, size: v2.RandAugment(num_ops=a.num_ops, magnitude=a.magnitude),
    "trivialaugment": lambda a, size: v2.TrivialAugmentWide(
        num_magnitude_bins=a.num_magnitude_bins
    ),
    "gaussian_blur": lambda a, size: _maybe(
        v2.GaussianBlur(a.kernel_size or (size // 10) // 2 * 2 + 1, sigma=a.sigma), a.p
    ),
    "gaussian_noise": lambda a, size: _maybe(
        v2.GaussianNoise(mean=a.mean, sigma=a.sigma, clip=a.clip), a.p
    ),
    "random_erasing": lambda a, size: v2.RandomErasing(
        p=a.p, scale=a.scale, ratio=a.ratio, value=a.value
    ),
    "mixup": lambda a, num_classes: v2.MixUp(alpha=a.alpha, num_classes=num_classes),
    "cutmix": lambda a, num_classes: v2.CutMix(alpha=a.alpha, num_classes=num_classes),
}


class RejectNormalized:
    """Refuse float tensors outside [0, 1]: input normalised already would be normalised twice.

    PIL images and uint8 tensors pass; so do float tensors in [0, 1] (treated as pixel values).
    """

    def __call__(self, image: Any) -> Any:
        if isinstance(image, torch.Tensor) and image.is_floating_point() and image.numel():
            low, high = image.min().item(), image.max().item()
            if low < 0 or high > 1:
                raise UserError(
                    f"an image reached the transforms with values in [{low:.2f}, "
                    f"{high:.2f}]: already normalised? finetune normalises once "
                    "(data.normalize); give it images, or float pixels in [0, 1]"
                )
        return image


def build_transforms(
    data: DataConfig, mean: Sequence[float] | None, std: Sequence[float] | None, train: bool
) -> v2.Compose:
    """The per-image transform of training (``train``) or evaluation: image in, normalised
    float tensor of ``image_size`` out.

    Args:
        data: the recipe's ``data`` section (``image_size``, ``crop_pct``, ``augment``,
            ``eval_transforms``).
        mean, std: per-channel normalisation on the 0-1 scale; ``None`` for none.
        train: random augmentations for training; deterministic resize and crop otherwise.
    """
    chosen = data.augment if train else data.eval_transforms

    def stage(kind: str) -> list[Callable[[Any], Any]]:
        return [
            BUILDERS[item.name](item.args, data.image_size)
            for item in chosen
            if item.spec.stage == kind
        ]

    steps: list[Callable[[Any], Any]] = [
        v2.ToImage(),
        RejectNormalized(),
        *_size_steps(chosen, data.image_size, data.crop_pct),
        *stage("uint8"),
        v2.ToDtype(torch.float32, scale=True),
        *stage("float"),
    ]
    if mean is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps + stage("erase"))


def _size_steps(
    chosen: Sequence[Augmentation], image_size: int, crop_pct: float
) -> list[Callable[[Any], Any]]:
    """To ``image_size``: a random resized crop, or a resize then a centre (or random) crop."""
    given = {item.name: item.args for item in chosen}

    def args(name: str) -> Any:  # as given, or the defaults
        return given.get(name) or AUGMENTATIONS[name].args()

    if "random_resized_crop" in given:
        return [BUILDERS["random_resized_crop"](given["random_resized_crop"], image_size)]
    resize = BUILDERS["resize"](args("resize"), round(image_size / crop_pct))
    crop_size = args("center_crop").size or image_size
    if "random_crop" in given:
        return [resize, BUILDERS["random_crop"](given["random_crop"], crop_size)]
    return [resize, BUILDERS["center_crop"](args("center_crop"), image_size)]


# ------------------------------------------------------------------------------------ batches
class MixCollate:
    """``collate_fn`` that stacks a batch, then mixes it with MixUp or CutMix (one chosen at
    random per batch when both are given). Labels become class probabilities (soft targets).

    A batch with an ``rng_seed`` (``finetune.data.Samples``, from a training sampler's keys) is
    mixed with a generator seeded from it alone, so the mix is the same in any loader worker and
    after a resume; other batches draw from the collating process's torch RNG.
    """

    def __init__(self, mix: v2.Transform) -> None:
        self.mix = mix

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(batch)
        seed = getattr(batch, "rng_seed", None)
        if seed is None:
            return self.mix(images, labels)
        with torch.random.fork_rng(devices=[]):  # CPU only: MixUp and CutMix draw on the CPU
            torch.default_generator.manual_seed(seed)
            return self.mix(images, labels)


def build_batch_transform(
    augment: Sequence[Augmentation | str | dict[str, Any]], num_classes: int
) -> MixCollate | None:
    """The training loader's ``collate_fn`` for ``mixup``/``cutmix``; ``None`` without them.

    Args:
        augment: ``data.augment``, or a list in the recipe's form (``[{mixup: 0.2}, cutmix]``).
        num_classes: the length of the soft labels.
    """
    try:
        items = parse_augmentations(list(augment))
    except ValidationError as error:
        raise UserError(
            "data.augment: invalid", describe_errors(error, ("data", "augment"))
        ) from None
    mixes = [
        BUILDERS[item.name](item.args, num_classes) for item in items if item.spec.stage == "batch"
    ]
    if not mixes:
        return None
    return MixCollate(mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes))


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices from labels that may be soft (mixed probabilities): the largest share."""
    return labels.argmax(dim=1) if labels.ndim == 2 else labels
