"""Normalisation statistics: which mean/std a run uses, and measuring them on a dataset.

``data.normalize`` is ``auto`` (the mean/std the backbone was pretrained with), ``imagenet``,
``{mean, std}``, ``dataset`` (measured on the training split before training: every pixel of every
image at its own size, on the 0-1 scale) or ``none``. A run records what it used in
``normalization.json``; with ``dataset`` the measured values also replace ``dataset`` in the run's
``recipe.yaml``, so resume, eval, predict and export reuse them without measuring again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from finetune.config.data import DataConfig, NormalizeStats
from finetune.errors import UserError
from finetune.images import BadImageError
from finetune.recipe import Recipe
from finetune.sources import ImageSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageStats:
    """What ``finetune stats`` reports about a set of images."""

    images: int  # images measured (readable ones)
    mean: list[float]  # per channel (R, G, B), 0-1 scale, over every pixel
    std: list[float]
    per_class: dict[str, int]  # readable images per class name
    width: list[int]  # [smallest, largest]
    height: list[int]
    unreadable: list[str] = field(default_factory=list)  # messages naming each bad file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _PixelSums(Dataset):
    """Per image: sum and sum of squares of each channel, pixel count and size (or the error)."""

    def __init__(self, source: ImageSource, indices: Sequence[int]) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image, label = self.source[self.indices[index]]
        except BadImageError as error:
            return {"error": str(error)}
        pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
        return {
            "sum": pixels.sum(axis=0),
            "sum_sq": np.square(pixels).sum(axis=0),
            "count": len(pixels),
            "size": image.size,
            "label": label,
        }


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def image_statistics(
    source: ImageSource, indices: Sequence[int] | None = None, *, num_workers: int = 0
) -> ImageStats:
    """Mean and std per channel over every pixel of ``source`` (or its ``indices``), images per
    class, and the range of image sizes. Unreadable images are listed, not measured.

    Sums are accumulated in float64, so the result matches NumPy on all pixels at once.
    """
    indices = list(range(len(source))) if indices is None else list(indices)
    loader = DataLoader(
        _PixelSums(source, indices), batch_size=16, num_workers=num_workers, collate_fn=_as_list
    )
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    sizes, labels, unreadable = [], Counter(), []
    for batch in loader:
        for item in batch:
            if "error" in item:
                unreadable.append(item["error"])
                continue
            total, total_sq = total + item["sum"], total_sq + item["sum_sq"]
            count += item["count"]
            sizes.append(item["size"])
            labels[item["label"]] += 1
    if not sizes:
        raise UserError("no readable image to measure")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    widths, heights = zip(*sizes, strict=True)
    return ImageStats(
        images=len(sizes),
        mean=(mean / 255).tolist(),
        std=(std / 255).tolist(),
        per_class={name: labels.get(i, 0) for i, name in enumerate(source.classes)},
        width=[min(widths), max(widths)],
        height=[min(heights), max(heights)],
        unreadable=unreadable,
    )


@dataclass
class Normalization:
    """The mean/std a run normalises with (``None``: no normalisation) and where they came from."""

    normalize: str  # auto | imagenet | dataset | none | explicit
    mean: list[float] | None
    std: list[float] | None
    images: int | None = None  # with ``dataset``: how many training images were measured

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def normalization(
    data: DataConfig, pretrained_cfg: dict[str, Any]
) -> tuple[tuple[float, ...], tuple[float, ...]] | tuple[None, None]:
    """(mean, std) for ``data.normalize``; ``auto`` reads the backbone's pretrained config.

    ``dataset`` needs the training images: use ``resolve_normalization``.
    """
    choice = data.normalize
    if choice == "none":
        return None, None
    if choice == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if choice == "auto":
        return (
            tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)),
            tuple(pretrained_cfg.get("std", IMAGENET_STD)),
        )
    if choice == "dataset":
        raise UserError(
            "data.normalize: dataset is measured on the training images when a run "
            "starts; this recipe was not resolved by a run"
        )
    return tuple(choice.mean), tuple(choice.std)


def resolve_normalization(
    data: DataConfig,
    pretrained_cfg: dict[str, Any],
    *,
    train: ImageSource,
    indices: Sequence[int] | None = None,
    num_workers: int = 0,
) -> Normalization:
    """What ``data.normalize`` means for this run; ``dataset`` measures ``train[indices]``."""
    if data.normalize != "dataset":
        mean, std = normalization(data, pretrained_cfg)
        kind = data.normalize if isinstance(data.normalize, str) else "explicit"
        return Normalization(kind, mean and list(mean), std and list(std))
    stats = image_statistics(train, indices, num_workers=num_workers)
    if stats.unreadable and data.on_bad_image == "error":
        raise BadImageError(
            f"{stats.unreadable[0]}; set data.on_bad_image: skip to skip unreadable files"
        )
    if min(stats.std) <= 0:
        raise UserError(
            "data.normalize: dataset: a channel of the training images is constant "
            f"(std {stats.std}); use imagenet or give {{mean, std}}"
        )
    return Normalization("dataset", stats.mean, stats.std, images=stats.images)


def with_measured_normalization(recipe: Recipe, measured: Normalization) -> Recipe:
    """``recipe`` with ``data.normalize: dataset`` replaced by the values measured for it."""
    if recipe.data.normalize != "dataset":
        return recipe
    values = NormalizeStats(mean=measured.mean, std=measured.std)
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"normalize": values})})
