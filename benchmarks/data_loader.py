"""How fast does the data loader alone deliver training batches? JPEG folder, 224 px, 0-2 workers.

Writes a folder of JPEG photos-like images (smooth colour fields plus noise, ``--source`` pixels
on the long side) to a temporary directory, builds the training split exactly as ``finetune run``
does (``random_resized_crop`` + ``hflip`` to ``--size``, float, ImageNet normalisation) and times
whole epochs of the loader, without a model, for each worker count. Compare the images/s with the
model's own training speed: when the loader is slower, data loading is the bottleneck and more
``data.num_workers`` (or cores) will help; when it is faster, they will not.

    python benchmarks/data_loader.py                     # 256 images of 400x300, workers 0 1 2
    python benchmarks/data_loader.py --images 512 --workers 0 2 4 --batch 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune.data import build_datasets, build_loader
from finetune.recipe import Recipe


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


def epoch_images_per_second(loader) -> float:
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--source", type=int, default=400, help="long side of the JPEGs, px")
    parser.add_argument("--size", type=int, default=224, help="data.image_size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per worker count")
    args = parser.parse_args()

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
                    "augment": ["random_resized_crop", "hflip"],
                    "normalize": "imagenet",
                },
            }
        )
        train = build_datasets(recipe.data, seed=0).train
        print(
            f"{len(train)} JPEGs of {args.source}x{args.source * 3 // 4} -> {args.size} px, "
            f"batch {args.batch}, {os.cpu_count()} CPU cores, torch threads "
            f"{torch.get_num_threads()} (workers use 1), load average {os.getloadavg()[0]:.1f}"
        )
        for workers in args.workers:
            loader = build_loader(
                train,
                batch_size=args.batch,
                train=True,
                num_workers=workers,
                pin_memory=False,
                seed=0,
                persistent_workers=True,
            )
            epoch_images_per_second(loader)  # warm-up: starts the worker processes
            rates = [epoch_images_per_second(loader) for _ in range(args.epochs)]
            print(
                f"num_workers {workers}: {statistics.median(rates):7.1f} img/s (median of "
                f"{args.epochs} epochs; {min(rates):.1f}-{max(rates):.1f})"
            )
            del loader  # stops its workers before the next count starts its own


if __name__ == "__main__":
    main()
