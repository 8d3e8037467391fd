"""``data.cache: memory``: decode and resize every image once, then keep it in RAM as uint8.

A split's transform (``finetune.augment.build_transforms``) opens with steps that give the same
result every epoch: the conversion to a uint8 tensor, then ``resize`` and ``center_crop``.
``split_transform`` cuts the transform after them. That head runs once per image, while the
cache fills (in ``data.num_workers`` loader processes, behind a progress bar); the tail (random
crops, flips, colour, float, normalisation) runs every epoch on the cached tensor, inside the
same ``Split`` and so seeded by the same ``SampleKey`` as without the cache. The cached split
gives the very same tensors as the uncached one, with one exception:

``random_resized_crop`` crops before it resizes, so no part of it can run ahead. Its input is
cached at the *pre-crop size* instead: the shorter side shrunk to ``round(image_size /
crop_pct)`` (256 px for 224, the size evaluation resizes to), the aspect ratio kept; images that
are smaller already are cached as decoded, and for them nothing changes. For larger ones the
crop takes the same share of the image but resamples the cached pixels, not the file's, so its
crops come out a little softer (most where they are small) and the random draws can land
elsewhere. ``finetune plan`` and the run's first lines say so when it applies.

The images are packed into a few large buffers (``SLAB_BYTES``) with an index, not kept as
thousands of tensors: loader workers share them by fork (copy-on-write) or, under the spawn and
forkserver start methods, as a few shared-memory segments.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from finetune.augment import RejectNormalized, build_transforms
from finetune.config.data import DataConfig
from finetune.data import Datasets, Split, resolve_num_workers
from finetune.errors import UserError
from finetune.images import BadImageError

SLAB_BYTES = 256 * 2**20  # cached images are packed into buffers of this size
# The steps a cache may run ahead: the same output every epoch, and no random draw. Compared by
# exact type: a subclass could add randomness.
EXACT_STEPS = (v2.ToImage, RejectNormalized, v2.Resize, v2.CenterCrop)
# Where Linux says how much memory the container (cgroup v2) may use; "max" when unlimited.
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


class ShrinkShorterSide:
    """Resize so that the shorter side is at most ``side`` pixels (aspect ratio kept,
    antialiased); smaller images pass unchanged. The pre-crop step of ``random_resized_crop``."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if min(image.shape[-2:]) <= self.side:
            return image
        return v2.functional.resize(image, [self.side], antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(side={self.side})"


def split_transform(transform: v2.Compose, pre_crop_side: int) -> tuple[v2.Compose, v2.Compose]:
    """``(head, tail)``: ``transform`` is ``tail(head(image))``, where ``head`` draws nothing at
    random (its output can be cached) and ``tail`` holds the rest. A tail that opens with
    ``random_resized_crop`` gets ``ShrinkShorterSide(pre_crop_side)`` at the end of the head:
    the one step that changes what the transform sees (see the module's docstring)."""
    steps = list(transform.transforms)
    cut = next((i for i, step in enumerate(steps) if type(step) not in EXACT_STEPS), len(steps))
    head, tail = steps[:cut], steps[cut:]
    if tail and isinstance(tail[0], v2.RandomResizedCrop):
        head.append(ShrinkShorterSide(pre_crop_side))
    return v2.Compose(head), v2.Compose(tail)


def pre_crop_side(data: DataConfig) -> int:
    """The shorter side ``random_resized_crop``'s input is cached at: evaluation's resize."""
    return round(data.image_size / data.crop_pct)


# ----------------------------------------------------------------------------------- storage
class PackedImages:
    """uint8 images of any shape packed one after another into large buffers, with an index.
    An entry can instead hold why its image could not be read (``BadImageError``'s message)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.index = torch.empty(0, 5, dtype=torch.int64)  # buffer, offset, channels, h, w
        self.errors: dict[int, str] = {}
        self.nbytes = 0
        self._rows: list[tuple[int, ...]] = []
        self._free = 0  # bytes left in the last buffer

    def add(self, image: torch.Tensor | None, error: str | None = None) -> None:
        """Append ``image`` (copied), or ``error`` for an image that cannot be read."""
        if image is None:
            self.errors[len(self._rows)] = str(error)
            self._rows.append((0, 0, 0, 0, 0))
            return
        size = image.numel()
        if size > self._free:
            # Memory is committed as it is written: a new buffer's unused tail costs nothing.
            self.buffers.append(torch.empty(max(size, SLAB_BYTES), dtype=torch.uint8))
            self._free = len(self.buffers[-1])
        offset = len(self.buffers[-1]) - self._free
        self.buffers[-1][offset : offset + size].view(image.shape).copy_(image)
        self._rows.append((len(self.buffers) - 1, offset, *image.shape))
        self._free -= size
        self.nbytes += size

    def finish(self) -> PackedImages:
        """Trim the last buffer to what it holds and freeze the index; returns ``self``."""
        if self.buffers and self._free:
            self.buffers[-1] = self.buffers[-1][: len(self.buffers[-1]) - self._free].clone()
            self._free = 0
        self.index = torch.tensor(self._rows, dtype=torch.int64).reshape(-1, 5)
        self._rows = []
        return self

    def __getitem__(self, position: int) -> tv_tensors.Image:
        """A view of the ``position``-th image (read only: every tail copies before it writes).

        Raises:
            BadImageError: the image could not be read when the cache was filled.
        """
        if position in self.errors:
            raise BadImageError(self.errors[position])
        buffer, offset, *shape = self.index[position].tolist()
        size = shape[0] * shape[1] * shape[2]
        return tv_tensors.Image(self.buffers[buffer][offset : offset + size].view(shape))


class AfterCache:
    """A split's transform whose head ran when the cache filled: calling it runs the tail; its
    repr names both, so it still identifies the whole transform (``train.cache_features``
    keys its stored features with it)."""

    def __init__(self, head: v2.Compose, tail: v2.Compose) -> None:
        self.head, self.tail = head, tail

    def __call__(self, image: Any) -> Any:
        return self.tail(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(head={self.head!r}, tail={self.tail!r})"


class CachedSplit(Split):
    """A ``Split`` whose images come from ``images`` (the head of its transform applied once)
    rather than from its source; its transform runs the tail (``AfterCache``). Source, indices,
    labels, bad-image handling and per-sample seeding are the ``Split``'s own."""

    def __init__(
        self, split: Split, head: v2.Compose, tail: v2.Compose, images: PackedImages
    ) -> None:
        super().__init__(split.source, split.indices, AfterCache(head, tail), split.on_bad_image)
        self.images = images

    def read(self, position: int) -> tuple[Any, int]:
        return self.images[position], self.source.targets[self.indices[position]]


class _HeadOutputs(Dataset):
    """A split's images through ``head``: ``(uint8 tensor, None)``, or ``(None, why not)``."""

    def __init__(self, split: Split, head: v2.Compose) -> None:
        self.split, self.head = split, head

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, position: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            image, _ = self.split.read(position)
        except BadImageError as error:
            return None, str(error)
        return self.head(image).as_subclass(torch.Tensor), None

    def first(self) -> torch.Tensor | None:
        """The first image that can be read (``None``: none can)."""
        outputs = (self[position][0] for position in range(len(self)))
        return next((image for image in outputs if image is not None), None)


# -------------------------------------------------------------------------------------- memory
def total_ram() -> int | None:
    """Bytes of memory this machine has, or its container's limit when lower (cgroup v2);
    ``None`` where the system does not say (Windows)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = CGROUP_MEMORY_MAX.read_text().strip()
    except OSError:
        return ram
    return min(ram, int(limit)) if limit.isdigit() else ram


@dataclass(frozen=True)
class RamBudget:
    """What the cache may hold: ``fraction`` of ``ram`` over all ``processes`` on this machine
    (each process of a multi-process run caches every image). ``ram=None``: no limit."""

    fraction: float
    ram: int | None
    processes: int = 1

    def check(self, needed: int, what: str) -> None:
        """Refuse ``needed`` bytes per process for ``what`` when they exceed the budget.

        Raises:
            UserError: naming ``data.cache_max_ram_fraction`` and the numbers.
        """
        if self.ram is None or needed * self.processes <= self.fraction * self.ram:
            return
        each = f" in each of {self.processes} processes" if self.processes > 1 else ""
        raise UserError(
            f"data.cache_max_ram_fraction: data.cache: memory would hold {what} in about "
            f"{_size(needed)}{each}, more than {self.fraction:g} of this machine's "
            f"{_size(self.ram)} of RAM ({_size(self.fraction * self.ram)}); set data.cache: "
            "none, lower data.image_size, or raise data.cache_max_ram_fraction"
        )


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} bytes"


def _local_processes() -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else one."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


# -------------------------------------------------------------------------------------- filling
def cache_images(datasets: Datasets, data: DataConfig, *, progress: bool = True) -> Datasets:
    """``data.cache: memory``: the training and validation splits as ``CachedSplit``s, each
    image decoded and resized once; ``none``: ``datasets`` unchanged. The test split, evaluated
    once, is left as it is.

    The size is estimated first (every image as large as the first one) and checked against
    ``data.cache_max_ram_fraction`` of the RAM; while the cache fills, the bytes actually held
    are checked again (images of other sizes).

    Args:
        datasets: as ``finetune.data.build_datasets`` made them.
        data: the ``data`` section: ``data.cache``, ``data.cache_max_ram_fraction``,
            ``data.num_workers`` (processes that decode), ``image_size`` and ``crop_pct``.
        progress: a progress bar on a terminal while the cache fills.

    Raises:
        UserError: naming ``data.cache_max_ram_fraction``, when the images would not fit.
    """
    if data.cache == "none":
        return datasets
    budget = RamBudget(data.cache_max_ram_fraction, total_ram(), _local_processes())
    splits = {"train": datasets.train, "val": datasets.val}
    parts = {
        key: split_transform(split.transform, pre_crop_side(data)) for key, split in splits.items()
    }
    outputs = {key: _HeadOutputs(split, parts[key][0]) for key, split in splits.items()}
    budget.check(*_estimate(outputs))
    cached: dict[str, CachedSplit] = {}
    for key, split in splits.items():
        held = sum(c.images.nbytes for c in cached.values())
        images = _fill(
            outputs[key], key, budget, held, resolve_num_workers(data.num_workers), progress
        )
        cached[key] = CachedSplit(split, *parts[key], images)
    return replace(datasets, train=cached["train"], val=cached["val"])


def _estimate(outputs: dict[str, _HeadOutputs]) -> tuple[int, str]:
    """The bytes of every split's images, each as large as the split's first, and what they
    are (``12 train images of 18x18 + 4 val images of 16x16``)."""
    needed, parts = 0, []
    for key, items in outputs.items():
        first = items.first()
        needed += len(items) * (first.numel() if first is not None else 0)
        shape = f" of {first.shape[-2]}x{first.shape[-1]}" if first is not None else ""
        parts.append(f"{len(items):,} {key} images{shape}")
    return needed, " + ".join(parts)


def _fill(
    outputs: _HeadOutputs, key: str, budget: RamBudget, held: int, workers: int, progress: bool
) -> PackedImages:
    """Pack ``outputs`` (decoded by ``workers`` loader processes), checking ``budget`` with the
    ``held`` bytes of the splits already cached."""
    loader = DataLoader(
        outputs,
        batch_size=None,
        num_workers=workers,
        generator=torch.Generator(),  # draws nothing from the process's generator
    )
    show = progress and sys.stderr.isatty()
    console = Console(stderr=True)
    packed = PackedImages()
    bar = track(
        loader,
        f"caching {key} images",
        len(outputs),
        transient=True,
        console=console,
        disable=not show,
    )
    for count, (image, error) in enumerate(bar, start=1):
        if image is not None:
            budget.check(
                held + packed.nbytes + image.numel(),
                f"the {key} images ({count:,} of {len(outputs):,} read so far)",
            )
        packed.add(image, error)
    return packed.finish()


# ---------------------------------------------------------------------------------- describing
def describe_cache(data: DataConfig, datasets: Datasets | None = None) -> str:
    """One line on ``data.cache``: whether images are cached, at which size and (with the
    filled ``datasets``) how much memory they take; what it changes for ``random_resized_crop``."""
    if data.cache == "none":
        return "data.cache: none (every image decoded from its source each epoch)"
    side = pre_crop_side(data)
    heads = {
        key: split_transform(build_transforms(data, None, None, train), side)[0]
        for key, train in (("train", True), ("val", False))
    }
    sizes = ", ".join(f"{key} {_cached_size(head)}" for key, head in heads.items())
    line = f"data.cache: memory: images decoded once and kept as uint8 ({sizes})"
    if datasets is not None and isinstance(datasets.train, CachedSplit):
        held = datasets.train.images.nbytes + datasets.val.images.nbytes
        line += f", {len(datasets.train):,} + {len(datasets.val):,} images in {_size(held)}"
    else:
        line += f", at most {data.cache_max_ram_fraction:.0%} of RAM"
    if isinstance(heads["train"].transforms[-1], ShrinkShorterSide):
        line += (
            f"; random_resized_crop crops the cached images (shorter side at most {side} px), "
            "not the files: larger images give slightly softer crops"
        )
    return line


def _cached_size(head: v2.Compose) -> str:
    last = head.transforms[-1]
    if isinstance(last, v2.CenterCrop):
        return "x".join(map(str, last.size))
    if isinstance(last, v2.Resize):
        return (
            "x".join(map(str, last.size))
            if len(last.size) == 2
            else f"{last.size[0]} px on the shorter side"
        )
    if isinstance(last, ShrinkShorterSide):
        return f"at most {last.side} px on the shorter side"
    return "as decoded"
