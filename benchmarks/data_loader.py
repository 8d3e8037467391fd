"""How fast does the data loader alone deliver training batches? Four ways, side by side.

Writes a folder of photo-like JPEGs (smooth colour fields plus noise, ``--source`` pixels on the
long side) to a temporary directory and times whole epochs of a training loader, without a
model, for each worker count:

- ``bare PyTorch``: torchvision's ``ImageFolder`` with the same v2 transforms and a shuffling
  ``DataLoader``: the reference, without finetune's per-image seeding;
- ``finetune, PIL``: the training split exactly as ``finetune run`` builds it (Pillow decodes,
  the transforms run on tensors, each image seeded by its ``SampleKey``);
- ``finetune, decode_image``: the same split, its files decoded by ``torchvision.io``;
- ``finetune, data.cache: memory``: the split with every image decoded and resized once
  (``finetune.image_cache``); the time to fill the cache is printed apart.

It also checks whether ``decode_image`` gives Pillow's pixels for every file. Compare the
images/s with the model's own training speed: when the loader is slower, data loading is the
bottleneck and more ``data.num_workers`` (or the cache) will help; when it is faster, they will
not.

    python benchmarks/data_loader.py                   # 256 JPEGs of 400x300, workers 0 1 2
    python benchmarks/data_loader.py --images 512 --workers 0 2 4 --batch 64 --threads 0
    python benchmarks/data_loader.py --augment hflip   # resize + centre crop: an exact cache
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image

from finetune.data import Split, build_datasets, build_loader, build_train_sampler
from finetune.image_cache import cache_images
from finetune.images import load_rgb
from finetune.recipe import Recipe
from finetune.sources import ImageFiles


def write_jpeg_folder(root: Path, *, images: int, classes: int, long_side: int) -> None:
    """``root/class_k/img_i.jpg``: upscaled random colour fields with noise, quality 90."""
    rng = np.random.default_rng(0)
    height = long_side * 3 // 4
    for i in range(images):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(field.resize((long_side, height), Image.Resampling.BICUBIC), float)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.jpg", quality=90)


class DecodedByTorchvision(Dataset):
    """An image source whose files ``torchvision.io.decode_image`` decodes (RGB uint8)."""

    def __init__(self, files: ImageFiles) -> None:
        self.files, self.classes, self.targets = files, files.classes, files.targets

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, int]:
        path, label = self.files.samples[index]
        return tv_tensors.Image(decode_image(str(path), mode=ImageReadMode.RGB)), label


def largest_difference(files: ImageFiles) -> int:
    """The largest pixel difference between Pillow's and ``decode_image``'s decoding."""
    torchvision_decoded = DecodedByTorchvision(files)
    worst = 0
    for index, (path, _) in enumerate(files.samples):
        pil = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1).int()
        worst = max(worst, int((pil - torchvision_decoded[index][0].int()).abs().max()))
    return worst


def epoch_images_per_second(loader: DataLoader, epoch: int) -> float:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - start)


def finetune_loader(split: Dataset, args: argparse.Namespace, workers: int) -> DataLoader:
    """The training loader ``finetune run`` makes: seeded sampler, ``SampleKey`` per image."""
    sampler = build_train_sampler("shuffle", split.targets, seed=0, batch_size=args.batch)
    return build_loader(
        split,
        batch_size=args.batch,
        train=True,
        sampler=sampler,
        num_workers=workers,
        pin_memory=False,
        seed=0,
    )


def bare_loader(dataset: Dataset, args: argparse.Namespace, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def time_ways(
    ways: dict[str, Callable[[int], DataLoader]], workers: int, epochs: int
) -> dict[str, list[float]]:
    """Images/s of each way's epochs with ``workers`` workers, the ways taking turns epoch by
    epoch, so that a change in the machine's load falls on all of them alike."""
    loaders = {name: make(workers) for name, make in ways.items()}
    for loader in loaders.values():
        epoch_images_per_second(loader, 0)  # warm-up: starts the worker processes
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for epoch in range(1, epochs + 1):
        for name, loader in loaders.items():
            rates[name].append(epoch_images_per_second(loader, epoch))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--source", type=int, default=400, help="long side of the JPEGs, px")
    parser.add_argument("--size", type=int, default=224, help="data.image_size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per worker count")
    parser.add_argument("--augment", nargs="+", default=["random_resized_crop", "hflip"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the main process (0: default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        write_jpeg_folder(Path(tmp), images=args.images, classes=4, long_side=args.source)
        recipe = Recipe.from_dict(
            {
                "name": "loader-benchmark",
                "model": {"backbone": "resnet50"},
                "data": {
                    "train": {"type": "imagefolder", "root": tmp},
                    "val_split": 0.01,
                    "image_size": args.size,
                    "batch_size": args.batch,
                    "augment": args.augment,
                    "normalize": "imagenet",
                    "cache": "memory",
                    "num_workers": 0,
                },
            }
        )
        datasets = build_datasets(recipe.data, seed=0)
        train = datasets.train
        print(
            f"{len(train)} JPEGs of {args.source}x{args.source * 3 // 4} -> {args.size} px "
            f"({', '.join(args.augment)}), batch {args.batch}, {os.cpu_count()} CPU cores, "
            f"torch threads {torch.get_num_threads()} (workers use 1), load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        difference = largest_difference(train.source)
        print(
            "decode_image vs Pillow: "
            + (
                "the same pixels in every file"
                if difference == 0
                else f"pixels differ by up to {difference}"
            )
        )
        started = time.perf_counter()
        cached = cache_images(datasets, recipe.data, progress=False).train
        fill = time.perf_counter() - started
        by_torchvision = Split(DecodedByTorchvision(train.source), train.indices, train.transform)
        bare = ImageFolder(tmp, transform=train.transform)
        ways = {
            "bare PyTorch (ImageFolder)": lambda w: bare_loader(bare, args, w),
            "finetune, PIL (default)": lambda w: finetune_loader(train, args, w),
            "finetune, decode_image": lambda w: finetune_loader(by_torchvision, args, w),
            "finetune, data.cache: memory": lambda w: finetune_loader(cached, args, w),
        }
        rates = {workers: time_ways(ways, workers, args.epochs) for workers in args.workers}
        print(f"img/s, median (min-max) of {args.epochs} epochs".ljust(34), end="")
        print("".join(f"{f'{w} workers':>20}" for w in args.workers))
        for name in ways:
            cells = "".join(
                f"{f'{statistics.median(r):.1f} ({min(r):.0f}-{max(r):.0f})':>20}"
                for r in (rates[w][name] for w in args.workers)
            )
            print(f"{name:<34}{cells}")
        held = cached.images.nbytes / 2**20
        print(f"filling the cache: {fill:.1f} s ({len(cached)} images, {held:.1f} MiB, 0 workers)")


if __name__ == "__main__":
    main()
