"""From the recipe's ``data:`` section to batches: splits, checks, samplers and loaders.

``build_datasets`` opens the sources (``finetune.sources``), checks them against each other before
any training (class sets, label ranges, empty splits), resolves the normalisation
(``finetune.stats``) and wraps each split with its transform (``finetune.augment``).
``build_loader`` and ``build_train_sampler`` make the loaders: seeded, sharded over processes,
optionally class-balanced. A training image's random augmentations are seeded from its
``SampleKey`` (recipe seed, epoch, position in the epoch), so the images a run sees do not depend
on the number of loader workers, on persistent workers, or on a resume.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from finetune.augment import build_transforms
from finetune.config.data import DataConfig
from finetune.distributed import SampleKey, ShuffleShardSampler
from finetune.errors import UserError
from finetune.images import BadImageError, load_rgb
from finetune.sources import ImageSource, open_source
from finetune.stats import Normalization, normalization, resolve_normalization

# Also importable from here, where they lived before (finetune.export and older user code).
__all__ = [
    "Datasets",
    "Samples",
    "Split",
    "build_datasets",
    "build_loader",
    "build_train_sampler",
    "build_transforms",
    "class_weights",
    "load_rgb",
    "normalization",
    "resolve_num_workers",
    "skipped_images",
    "stratified_split",
]


class Split(Dataset):
    """Items ``indices`` of ``source`` (all by default) through ``transform``: (image, label).

    With ``on_bad_image="skip"``, an unreadable image is replaced by the next readable item of the
    split (as timm does), so batches keep their size; each one is counted (``take_skipped``) and
    warned about. With ``"error"`` it raises, naming the file.

    Indexed with a ``SampleKey`` (what the training samplers yield), the transform draws from a
    generator seeded by the key alone, inside ``torch.random.fork_rng``: the same image for the
    same key in any process, and the process's own RNG untouched. A replacement for a skipped
    image keeps the key's seed. (torchvision's v2 transforms draw from torch only, not from
    ``random`` or NumPy.)
    """

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int] | None = None,
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        self.source = source
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self._skipped = multiprocessing.Value("q", 0)  # shared with loader worker processes

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def targets(self) -> list[int]:
        return [self.source.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for step in range(len(self)):
            try:
                image, label = self.read((index + step) % len(self))
            except BadImageError as error:
                if self.on_bad_image == "error":
                    raise BadImageError(
                        f"{error}; fix or remove the file, or set data.on_bad_image: skip"
                    ) from None
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"skipped: {error}", stacklevel=2)
                continue
            return self._transformed(image, index), label
        origin = getattr(self.source, "origin", "the data")
        raise UserError(f"{origin}: none of the {len(self)} images of this split can be read")

    def read(self, position: int) -> tuple[Any, int]:
        """The untransformed image and label at ``position`` in the split (a subclass may read
        them elsewhere: ``finetune.image_cache.CachedSplit``)."""
        return self.source[self.indices[position]]

    def __getitems__(self, indices: list[int]) -> Samples:
        """A batch's samples (``DataLoader`` calls this); the first key's ``rng_seed(1)`` seeds
        the batch-level randomness (``finetune.augment.MixCollate``)."""
        samples = Samples(self[index] for index in indices)
        if indices and isinstance(indices[0], SampleKey):
            samples.rng_seed = indices[0].rng_seed(stream=1)
        return samples

    def _transformed(self, image: Any, index: int) -> Any:
        if self.transform is None:
            return image
        if not isinstance(index, SampleKey):  # evaluation, or a sampler of the user's
            return self.transform(image)
        # CPU generator only: torch.manual_seed would also reseed (and fork_rng not restore) CUDA.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(index.rng_seed())
            return self.transform(image)

    def take_skipped(self) -> int:
        """Images skipped since the last call (by this process and its loader workers)."""
        with self._skipped.get_lock():
            count, self._skipped.value = self._skipped.value, 0
        return count


class Samples(list):
    """The samples of one batch, as ``Split.__getitems__`` gives them to the ``collate_fn``;
    ``rng_seed`` seeds the batch's own randomness (``None``: the collating process's RNG)."""

    rng_seed: int | None = None


@dataclass
class Datasets:
    """The training and validation splits, the class names, the normalisation used and the
    loss weight of each class (``None``: unweighted)."""

    train: Split
    val: Split
    classes: list[str]
    normalization: Normalization
    class_weights: torch.Tensor | None = None
    test: Split | None = None


def build_datasets(
    data: DataConfig,
    *,
    seed: int,
    pretrained_cfg: dict[str, Any] | None = None,
    num_classes: int | None = None,
) -> Datasets:
    """Open, check and split the sources; resolve the normalisation; attach the transforms.

    Args:
        data: the recipe's ``data`` section.
        seed: the recipe's: for ``val_split``'s stratified choice, and the seed of a source
            that gives none of its own.
        pretrained_cfg: the backbone's pretrained config (``mean``, ``std``) for ``auto``.
        num_classes: ``model.num_classes`` when given: the data must have that many classes.

    Raises:
        UserError: naming the folder or file, for one class, different classes in train and val,
            an empty split, labels out of range, or a class count that differs from
            ``num_classes``.
    """
    size = data.image_size
    train_source = open_source(
        data.train, key="data.train", image_size=size, seed=seed, num_classes=num_classes
    )
    classes = list(train_source.classes)
    _check_classes(classes, num_classes, _where("data.train", train_source))
    if data.val is not None:
        val_source = open_source(
            data.val, key="data.val", image_size=size, seed=seed, num_classes=len(classes)
        )
        _check_same_classes(
            classes,
            list(val_source.classes),
            _where("data.train", train_source),
            _where("data.val", val_source),
        )
        train_idx, val_idx = None, None
    else:
        val_source = train_source
        train_idx, val_idx = stratified_split(train_source.targets, data.val_split, seed)
        if not val_idx:
            raise UserError(
                f"data.val_split: {_where('data.train', train_source)} has too few "
                "images per class to hold any out for validation"
            )
    norm = resolve_normalization(
        data,
        pretrained_cfg or {},
        train=train_source,
        indices=train_idx,
        num_workers=resolve_num_workers(data.num_workers),
    )
    train = Split(
        train_source,
        train_idx,
        build_transforms(data, norm.mean, norm.std, True),
        data.on_bad_image,
    )
    val = Split(
        val_source, val_idx, build_transforms(data, norm.mean, norm.std, False), data.on_bad_image
    )
    test = None
    if data.test is not None:
        test_source = open_source(
            data.test, key="data.test", image_size=size, seed=seed, num_classes=len(classes)
        )
        _check_same_classes(
            classes,
            list(test_source.classes),
            _where("data.train", train_source),
            _where("data.test", test_source),
        )
        test = Split(
            test_source, None, build_transforms(data, norm.mean, norm.std, False), data.on_bad_image
        )
    for key, split in (("data.train", train), ("data.val", val), ("data.test", test)):
        if split is not None and len(split) == 0:
            raise UserError(f"{_where(key, split.source)}: the dataset is empty")
    weights = class_weights(data.class_weights, train.targets, len(classes))
    return Datasets(train, val, classes, norm, weights, test)


def _where(key: str, source: ImageSource) -> str:
    origin = getattr(source, "origin", None)
    return f"{key} ({origin})" if origin is not None else key


def _check_classes(classes: list[str], num_classes: int | None, where: str) -> None:
    if len(classes) < 2:
        raise UserError(
            f"{where}: found {len(classes)} class ({', '.join(classes)}); training "
            "needs at least two"
        )
    if num_classes is not None and num_classes != len(classes):
        raise UserError(
            f"model.num_classes is {num_classes} but {where} has {len(classes)} classes: {classes}"
        )


def _check_same_classes(train: list[str], val: list[str], train_where: str, val_where: str) -> None:
    if val == train:
        return
    missing, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    detail = (
        f"missing {missing}, extra {extra}"
        if missing or extra
        else f"in another order: {val} vs {train}"
    )
    raise UserError(f"{val_where}: its classes differ from {train_where}'s: {detail}")


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``fraction`` of each class to val, chosen with ``seed``; at least
    one image of a class goes to val, and at least one stays in train."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = rng.permutation([i for i, y in enumerate(labels) if y == label]).tolist()
        count = min(max(1, round(len(members) * fraction)), len(members) - 1)
        val += members[:count]
        train += members[count:]
    return sorted(train), sorted(val)


# --------------------------------------------------------------------------------- loading
def resolve_num_workers(num_workers: int | str) -> int:
    """``auto``: one worker per spare core, at most 8 (0 on a single core)."""
    if num_workers != "auto":
        return int(num_workers)
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    num_workers: int,
    pin_memory: bool,
    sampler: Sampler | None = None,
    seed: int | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A loader. For training, no batch of one image reaches a BatchNorm in training mode: when
    this process's share of an epoch is larger than a batch, the last incomplete batch is dropped
    (every optimizer step also sees the same batch size); a share of one batch or less is one
    batch; a share of a single image is an error. Only ``batch_size: 1`` itself gives batches of
    one. Without a ``sampler`` it shuffles for training.

    Args:
        seed: seeds the loader's generator, from which each worker's ``random``, NumPy and torch
            generators are seeded (``torch.utils.data`` does this per worker). Training samplers'
            ``SampleKey``s seed ``Split``'s augmentations themselves; this covers other datasets.
            Every loader has its own generator (seed 0 by default): torch would otherwise draw
            each iterator's base seed from the process's generator, and an evaluation loader
            whose persistent workers start at another moment after a resume would shift the
            random numbers dropout draws from.
        collate_fn: e.g. ``finetune.augment.MixCollate`` for mixup/cutmix.
        persistent_workers, prefetch_factor: only used with ``num_workers > 0``.

    Raises:
        UserError: for training, when this process's share of the split is a single image.
    """
    workers = num_workers > 0
    items = len(sampler) if sampler is not None else len(dataset)  # this process's share
    if train and items == 1:
        raise UserError(
            f"data.batch_size: this process's share of the training split ({len(dataset)} "
            "images) is a single image, and a batch of one breaks BatchNorm in training; "
            "use more training images (or fewer processes)"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and items > batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=workers and persistent_workers,
        prefetch_factor=prefetch_factor if workers else None,
        generator=torch.Generator().manual_seed(0 if seed is None else seed),
        collate_fn=collate_fn,
    )


class BalancedSampler(ShuffleShardSampler):
    """Each epoch draws as many items as the split has, with replacement, every class equally
    likely (``WeightedRandomSampler`` seeded with ``seed + epoch``), and deals them out to the
    processes as ``ShuffleShardSampler`` does. Call ``set_epoch`` before iterating."""

    def __init__(
        self,
        labels: Sequence[int],
        *,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            len(labels), seed=seed, batch_size=batch_size, rank=rank, world_size=world_size
        )
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[list(labels)], dtype=torch.float64)

    def epoch_order(self, generator: torch.Generator) -> list[int]:
        return list(WeightedRandomSampler(self.weights, self.length, generator=generator))


def build_train_sampler(
    kind: str,
    labels: Sequence[int],
    *,
    seed: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Sampler[int]:
    """``shuffle``: a fresh seeded permutation each epoch; ``balanced``: classes drawn equally."""
    shards = {"seed": seed, "batch_size": batch_size, "rank": rank, "world_size": world_size}
    if kind == "balanced":
        return BalancedSampler(labels, **shards)
    return ShuffleShardSampler(len(labels), **shards)


def class_weights(
    choice: str | list[float], labels: Sequence[int], num_classes: int
) -> torch.Tensor | None:
    """Loss weight per class: ``balanced`` is ``n / (classes x n_class)`` (scikit-learn's rule),
    a list is taken as given, ``none`` is ``None``."""
    if choice == "none":
        return None
    if isinstance(choice, list):
        if len(choice) != num_classes:
            raise UserError(f"data.class_weights: {len(choice)} weights for {num_classes} classes")
        return torch.tensor(choice, dtype=torch.float32)
    counts = torch.bincount(torch.as_tensor(list(labels)), minlength=num_classes).float()
    return torch.where(counts > 0, len(labels) / (num_classes * counts), torch.zeros(()))


def skipped_images(**loaders: DataLoader) -> dict[str, int]:
    """``{"<name>/skipped_images": n}``: unreadable images each loader skipped since the last
    call; empty unless ``data.on_bad_image`` is ``skip``. Counts are per process."""
    return {
        f"{name}/skipped_images": loader.dataset.take_skipped()
        for name, loader in loaders.items()
        if isinstance(loader.dataset, Split) and loader.dataset.on_bad_image == "skip"
    }
