"""Transforms: the recipe's ``data.augment`` mapped onto torchvision's transforms v2.

A training image goes through a fixed order of stages, each augmentation in its stage in the
order the recipe lists it::

    size      resize + center_crop | random_crop, or random_resized_crop  -> image_size
    geometry  hflip, vflip, rotate, rotate90
    colour    color_jitter, autoaugment, randaugment, trivialaugment, gaussian_blur   (uint8)
    float     to float in [0, 1], then gaussian_noise
    normalise data.normalize: once, here, and nowhere else
    erase     random_erasing (after normalisation, as timm does: 0 is the mean colour)
    batch     mixup, cutmix: on the whole batch, in the loader's collate_fn (soft labels)

Evaluation uses resize to ``image_size / crop_pct`` and a centre crop, or ``data.eval_transforms``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode, v2

from finetune.errors import UserError
from finetune.recipe import AUGMENTATIONS, DataConfig, Section

BATCH = ("mixup", "cutmix")
# The stage of each augmentation that does not run on uint8 images between size and float.
STAGES = {"resize": "size", "center_crop": "size", "random_crop": "size",
          "random_resized_crop": "size", "gaussian_noise": "float", "random_erasing": "erase",
          "mixup": "batch", "cutmix": "batch"}


def _args(name: str, given: dict[str, Any]) -> Any:
    """The validated argument object of augmentation ``name``, defaults filled in."""
    model: type[Section] = AUGMENTATIONS[name][0]
    return model(**given)


def _maybe(transform: v2.Transform, p: float) -> v2.Transform:
    return transform if p >= 1 else v2.RandomApply([transform], p=p)


# One builder per augmentation: (arguments, image_size) -> a v2 transform. Size transforms are
# assembled by `_size_steps`, batch transforms by `build_batch_transform`.
BUILDERS: dict[str, Callable[[Any, int], v2.Transform]] = {
    "hflip": lambda a, size: v2.RandomHorizontalFlip(p=a.p),
    "vflip": lambda a, size: v2.RandomVerticalFlip(p=a.p),
    "rotate": lambda a, size: v2.RandomRotation(a.degrees, fill=a.fill),
    # Exact quarter turns: torchvision transposes for 90/180/270 instead of resampling.
    "rotate90": lambda a, size: v2.RandomChoice(
        [v2.RandomRotation((angle, angle), expand=True) for angle in a.angles]),
    "color_jitter": lambda a, size: v2.ColorJitter(
        brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue),
    "autoaugment": lambda a, size: v2.AutoAugment(v2.AutoAugmentPolicy(a.policy)),
    "randaugment": lambda a, size: v2.RandAugment(num_ops=a.num_ops, magnitude=a.magnitude),
    "trivialaugment": lambda a, size: v2.TrivialAugmentWide(
        num_magnitude_bins=a.num_magnitude_bins),
    "gaussian_blur": lambda a, size: _maybe(
        v2.GaussianBlur(a.kernel_size or (size // 10) // 2 * 2 + 1, sigma=a.sigma), a.p),
    "gaussian_noise": lambda a, size: _maybe(
        v2.GaussianNoise(mean=a.mean, sigma=a.sigma, clip=a.clip), a.p),
    "random_erasing": lambda a, size: v2.RandomErasing(p=a.p, scale=a.scale, ratio=a.ratio,
                                                       value=a.value),
}


class RejectNormalized:
    """Refuse float tensors outside [0, 1]: input normalised already would be normalised twice.

    PIL images and uint8 tensors pass; so do float tensors in [0, 1] (treated as pixel values).
    """

    def __call__(self, image: Any) -> Any:
        if isinstance(image, torch.Tensor) and image.is_floating_point() and image.numel():
            low, high = image.min().item(), image.max().item()
            if low < 0 or high > 1:
                raise UserError(f"an image reached the transforms with values in [{low:.2f}, "
                                f"{high:.2f}]: already normalised? finetune normalises once "
                                "(data.normalize); give it images, or float pixels in [0, 1]")
        return image


def build_transforms(data: DataConfig, mean: Sequence[float] | None,
                     std: Sequence[float] | None, train: bool) -> v2.Compose:
    """The per-image transform of training (``train``) or evaluation: image in, normalised
    float tensor of ``image_size`` out.

    Args:
        data: the recipe's ``data`` section (``image_size``, ``crop_pct``, ``augment``,
            ``eval_transforms``).
        mean, std: per-channel normalisation on the 0-1 scale; ``None`` for none.
        train: random augmentations for training; deterministic resize and crop otherwise.
    """
    chosen = data.augment if train else data.eval_transforms
    given = [(name, _args(name, args)) for item in chosen for name, args in item.items()]

    def stage(kind: str) -> list[v2.Transform]:
        return [BUILDERS[name](args, data.image_size) for name, args in given
                if STAGES.get(name, "uint8") == kind]

    steps: list[Callable[[Any], Any]] = [
        v2.ToImage(), RejectNormalized(), *_size_steps(dict(given), data.image_size,
                                                       data.crop_pct),
        *stage("uint8"), v2.ToDtype(torch.float32, scale=True), *stage("float")]
    if mean is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps + stage("erase"))


def _size_steps(given: dict[str, Any], image_size: int, crop_pct: float) -> list[v2.Transform]:
    """To ``image_size``: a random resized crop, or a resize then a centre (or random) crop."""
    if "random_resized_crop" in given:
        a = given["random_resized_crop"]
        return [v2.RandomResizedCrop(image_size, scale=a.scale, ratio=a.ratio,
                                     interpolation=InterpolationMode(a.interpolation),
                                     antialias=True)]
    resize = given.get("resize") or _args("resize", {})
    steps: list[v2.Transform] = [v2.Resize(
        resize.size or round(image_size / crop_pct), interpolation=InterpolationMode(
            resize.interpolation), antialias=True)]
    crop = given.get("center_crop") or _args("center_crop", {})
    if "random_crop" in given:
        a = given["random_crop"]
        steps.append(v2.RandomCrop(crop.size or image_size, padding=a.padding or None,
                                   pad_if_needed=True, padding_mode=a.padding_mode))
    else:
        steps.append(v2.CenterCrop(crop.size or image_size))
    return steps


# ------------------------------------------------------------------------------------ batches
class MixCollate:
    """``collate_fn`` that stacks a batch, then mixes it with MixUp or CutMix (one chosen at
    random per batch when both are given). Labels become class probabilities (soft targets)."""

    def __init__(self, mix: v2.Transform) -> None:
        self.mix = mix

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = default_collate(batch)
        return self.mix(images, labels)


def build_batch_transform(augment: list[dict[str, dict[str, Any]]], num_classes: int
                          ) -> MixCollate | None:
    """The training loader's ``collate_fn`` for ``mixup``/``cutmix``; ``None`` without them."""
    makers = {"mixup": v2.MixUp, "cutmix": v2.CutMix}
    mixes = [makers[name](alpha=_args(name, args).alpha, num_classes=num_classes)
             for item in augment for name, args in item.items() if name in BATCH]
    if not mixes:
        return None
    return MixCollate(mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes))


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices from labels that may be soft (mixed probabilities): the largest share."""
    return labels.argmax(dim=1) if labels.ndim == 2 else labels
