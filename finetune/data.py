"""Datasets, transforms and loaders: from the recipe's ``data:`` section to batches.

Each source yields PIL RGB images and integer labels; transforms (torchvision v2) resize, augment,
convert to float and normalise exactly once. Class names travel with the datasets so that the run
folder's ``classes.json`` maps every output index to a name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from finetune.errors import UserError
from finetune.recipe import DataConfig, DigitsSource, FakeSource, ImageFolderSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: list[str]


# ---------------------------------------------------------------------------------------- sources
class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits as RGB PIL images, labels relabelled 0..k-1."""

    def __init__(self, source: DigitsSource, transform: v2.Transform | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        indices = _digits_split(digits.target, source.split)
        keep = [i for i in indices if digits.target[i] in source.classes]
        if source.per_class is not None:
            keep = _first_per_class(keep, digits.target, source.per_class, source.seed)
        relabel = {digit: index for index, digit in enumerate(source.classes)}
        pixels = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [Image.fromarray(img, mode="L").convert("RGB") for img in pixels]
        self.targets = [relabel[int(digits.target[i])] for i in keep]
        self.classes = [str(digit) for digit in source.classes]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def _digits_split(targets: np.ndarray, split: str) -> list[int]:
    """A fixed stratified 80/20 split: every fifth image of each digit is validation."""
    if split == "all":
        return list(range(len(targets)))
    position = np.zeros(len(targets), dtype=int)
    for digit in np.unique(targets):
        where = np.flatnonzero(targets == digit)
        position[where] = np.arange(len(where))
    is_val = position % 5 == 4
    return [i for i in range(len(targets)) if is_val[i] == (split == "val")]


def _first_per_class(indices: list[int], targets: np.ndarray, per_class: int, seed: int
                     ) -> list[int]:
    order = np.random.default_rng(seed).permutation(indices)
    kept: dict[int, list[int]] = {}
    for index in order:
        bucket = kept.setdefault(int(targets[index]), [])
        if len(bucket) < per_class:
            bucket.append(int(index))
    return sorted(i for bucket in kept.values() for i in bucket)


def _imagefolder(root: Path, transform: v2.Transform) -> Dataset:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as error:
        raise UserError(f"data: {root}: {error}") from None


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise UserError(f"data: cannot read image {path}: {error}") from None


def _fake(source: FakeSource, image_size: int, transform: v2.Transform) -> Dataset:
    from torchvision.datasets import FakeData

    dataset = FakeData(size=source.num_samples, image_size=(3, image_size, image_size),
                       num_classes=source.num_classes, transform=transform,
                       random_offset=source.seed * 1_000_003)
    dataset.classes = [f"class_{i}" for i in range(source.num_classes)]
    return dataset


def _open_source(source, image_size: int, transform: v2.Transform) -> Dataset:
    if isinstance(source, ImageFolderSource):
        return _imagefolder(source.root, transform)
    if isinstance(source, DigitsSource):
        return DigitsDataset(source, transform)
    return _fake(source, image_size, transform)


def _labels(dataset: Dataset) -> list[int]:
    return list(dataset.targets) if hasattr(dataset, "targets") else [
        int(dataset[i][1]) for i in range(len(dataset))]


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``fraction`` of each class to val, at least one, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = rng.permutation([i for i, y in enumerate(labels) if y == label]).tolist()
        count = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        val += members[:count]
        train += members[count:]
    return sorted(train), sorted(val)


# ------------------------------------------------------------------------------------- transforms
def build_transforms(data: DataConfig, mean: tuple[float, ...], std: tuple[float, ...],
                     train: bool) -> v2.Transform:
    """Resize and crop to ``image_size`` (random crops and flips only for training), normalise."""
    size = data.image_size
    steps: list[v2.Transform] = [v2.ToImage()]
    augments = {name: args for item in data.augment for name, args in item.items()} if train else {}
    if "random_resized_crop" in augments:
        steps.append(v2.RandomResizedCrop(size, antialias=True, **augments.pop("random_resized_crop")))
    else:
        steps += [v2.Resize(round(size / data.crop_pct), antialias=True), v2.CenterCrop(size)]
    steps += [_augmentation(name, args, size) for name, args in augments.items()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)


def _augmentation(name: str, args: dict, size: int) -> v2.Transform:
    if name == "hflip":
        return v2.RandomHorizontalFlip(**args)
    if name == "vflip":
        return v2.RandomVerticalFlip(**args)
    if name == "rotate":
        return v2.RandomRotation(**{"degrees": 15, **args})
    if name == "random_crop":
        return v2.RandomCrop(size, **{"padding": size // 8, **args})
    return v2.ColorJitter(**args)


def normalization(data: DataConfig, pretrained_cfg: dict) -> tuple[tuple, tuple] | tuple[None, None]:
    """(mean, std) for ``data.normalize``: ``auto`` reads the backbone's pretrained config."""
    choice = data.normalize
    if choice == "none":
        return None, None
    if choice == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if choice == "auto":
        return (tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)),
                tuple(pretrained_cfg.get("std", IMAGENET_STD)))
    return tuple(choice.mean), tuple(choice.std)


# ------------------------------------------------------------------------------------ assembling
def build_datasets(data: DataConfig, *, mean: tuple | None, std: tuple | None, seed: int
                   ) -> Datasets:
    """Train and validation datasets with their transforms, and the class names."""
    train_tf = build_transforms(data, mean, std, train=True)
    eval_tf = build_transforms(data, mean, std, train=False)
    train = _open_source(data.train, data.image_size, train_tf)
    classes = list(train.classes)
    if data.val is not None:
        val = _open_source(data.val, data.image_size, eval_tf)
        if list(val.classes) != classes:
            raise UserError(f"data.val: classes {list(val.classes)} differ from data.train's "
                            f"{classes}")
    else:
        train_idx, val_idx = stratified_split(_labels(train), data.val_split, seed)
        val = Subset(_open_source(data.train, data.image_size, eval_tf), val_idx)
        train = Subset(train, train_idx)
    for split, dataset in (("train", train), ("val", val)):
        if len(dataset) == 0:
            raise UserError(f"data.{split}: the dataset is empty")
    if len(classes) < 2:
        raise UserError(f"data.train: found {len(classes)} class; training needs at least two")
    return Datasets(train, val, classes)


def resolve_num_workers(num_workers: int | str) -> int:
    """``auto``: one worker per spare core, at most 8 (0 on a single core)."""
    if num_workers != "auto":
        return int(num_workers)
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def build_loader(dataset: Dataset, *, batch_size: int, train: bool, num_workers: int,
                 pin_memory: bool, generator: torch.Generator | None = None,
                 sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
    """A loader. For training without a ``sampler`` it shuffles with ``generator``; it drops the
    last incomplete batch so every optimizer step sees the same batch size."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=generator,
    )
