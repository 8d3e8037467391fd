"""How much time does ``train.cache_features`` save a linear probe? Through ``finetune.run``,
side by side with a bare PyTorch loop.

Writes ``--train`` + ``--val`` photo-like JPEGs to a temporary folder and trains a head on a
frozen ``--model`` (random weights: nothing is downloaded; the time does not depend on them) for
``--epochs`` epochs, four ways:

- ``bare PyTorch, frozen backbone``: the textbook loop over images decoded and transformed once
  (in memory), the backbone run over every image in every epoch, training and validation;
- ``bare PyTorch, features once``: the same images through the backbone once, then the head
  trained and evaluated on those features every epoch;
- ``finetune run, cache_features: false`` and ``true``: the whole ``finetune.run`` (build, JPEG
  decoding, training, evaluation, a checkpoint every epoch, plots), timed from call to return;
- ``finetune run, features reused``: a second cached run over the same data and weights (the
  next trial of a sweep of head learning rates), which finds the features already computed.

Everything runs in this process (``data.num_workers: 0``), so that besides the wall time the
script can print the CPU time, which other work on a shared machine disturbs less.

    python benchmarks/feature_cache.py                      # resnet18 @ 128 px, 320 + 96 images
    python benchmarks/feature_cache.py --train 1000 --val 250 --epochs 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from data_loader import write_jpeg_folder  # benchmarks/data_loader.py
from rich.console import Console

import finetune
from finetune.build import build

Batches = list[tuple[torch.Tensor, torch.Tensor]]
# Which row each row is compared with: the bare loops with each other, the cached runs with the
# uncached one.
SAVES_AGAINST = {1: 0, 3: 2, 4: 2}


def recipe(args: argparse.Namespace, root: Path, cache_features: bool) -> finetune.Recipe:
    return finetune.Recipe.from_dict(
        {
            "name": "feature-cache-benchmark",
            "seed": 0,
            "model": {"backbone": args.model, "pretrained": False},
            "freeze": {"until": args.head, "batchnorm": "frozen"},
            "data": {
                "train": {"type": "imagefolder", "root": str(root / "train")},
                "val": {"type": "imagefolder", "root": str(root / "val")},
                "image_size": args.size,
                "batch_size": args.batch,
                "augment": [],
                "num_workers": 0,
            },
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "train": {"epochs": args.epochs, "device": "cpu", "cache_features": cache_features},
            "output": {"dir": str(root / "runs")},
        }
    )


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(args: argparse.Namespace, root: Path, cache_features: bool) -> None:
    finetune.run(recipe(args, root, cache_features), console=Console(quiet=True))


def in_memory(args: argparse.Namespace, root: Path) -> tuple[Batches, Batches]:
    """Training and validation batches, decoded and transformed once, as finetune makes them."""
    built = build(recipe(args, root, cache_features=False))
    assert built.datasets is not None
    return tuple(  # type: ignore[return-value]
        [
            (torch.stack([split[i][0] for i in chunk]), torch.tensor([split[i][1] for i in chunk]))
            for chunk in torch.arange(len(split)).split(args.batch)
        ]
        for split in (built.datasets.train, built.datasets.val)
    )


def bare_frozen(model: torch.nn.Module, train: Batches, val: Batches, epochs: int) -> None:
    """The backbone over every image in every epoch; only the head steps."""
    head = model.get_classifier()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    for _ in range(epochs):
        model.train()
        model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
        for images, labels in train:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        evaluate(model, val)


def bare_features_once(model: torch.nn.Module, train: Batches, val: Batches, epochs: int) -> None:
    """The backbone over every image once; then the head alone, every epoch."""
    head = model.get_classifier()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    model.eval()
    with torch.no_grad():
        pooled = [
            [(model.forward_head(model.forward_features(x), pre_logits=True), y) for x, y in split]
            for split in (train, val)
        ]
    for _ in range(epochs):
        head.train()
        for features, labels in pooled[0]:
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        evaluate(head, pooled[1])


def evaluate(model: Callable[[torch.Tensor], torch.Tensor], batches: Batches) -> float:
    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.inference_mode():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--head", default="fc", help="freeze.until: the head's module name")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--val", type=int, default=96)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    epochs = args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for split in ("train", "val"):
            write_jpeg_folder(
                root / split,
                images=getattr(args, split),
                classes=args.classes,
                long_side=args.size * 5 // 4,
            )
        train, val = in_memory(args, root)
        model = timm.create_model(args.model, num_classes=args.classes)
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
        print(
            f"{args.model} @ {args.size} px, {args.train} train + {args.val} val images, batch "
            f"{args.batch}, {args.epochs} epochs, cpu, {torch.get_num_threads()} threads"
        )
        work: dict[str, Callable[[], None]] = {
            "bare PyTorch, frozen backbone": lambda: bare_frozen(model, train, val, epochs),
            "bare PyTorch, features once": lambda: bare_features_once(model, train, val, epochs),
            "finetune run, cache_features: false": lambda: run(args, root, False),
            "finetune run, cache_features: true": lambda: run(args, root, True),
            "finetune run, features reused": lambda: run(args, root, True),
        }
        print(f"{'':38s} {'wall':>8s} {'less':>6s} {'CPU':>8s} {'less':>6s}")
        times: list[tuple[float, float]] = []
        for index, (label, job) in enumerate(work.items()):
            times.append(timed(job))
            wall, cpu = times[index]
            less = ("", "")
            if index in SAVES_AGAINST:
                reference = times[SAVES_AGAINST[index]]
                less = (f"{reference[0] / wall:5.1f}x", f"{reference[1] / cpu:5.1f}x")
            print(f"{label:38s} {wall:7.1f}s {less[0]:>6s} {cpu:7.1f}s {less[1]:>6s}", flush=True)


if __name__ == "__main__":
    main()
