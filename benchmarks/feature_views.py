"""What does ``train.cache_features: {views: K}`` cost a linear probe in accuracy, and save in
time, against random augmentation drawn fresh every epoch? Through ``finetune.run``.

Pretrains recipes/digits-pretrain.yaml once (digits 0-4), then for each seed trains a linear probe
on digits 5-9 (recipes/digits-finetune.yaml with everything but ``fc`` frozen, BatchNorm
included, ``--per-class`` labelled images per class, ``--epochs`` epochs) several ways:

- ``no augmentation, cached``: ``augment: []``, ``cache_features: true`` (features once);
- ``random_crop, uncached``: ``augment: [{random_crop: 4}]``, ``cache_features: false``, a new
  crop of every image every epoch, the backbone run every epoch;
- ``random_crop, views K``: the same augmentation, ``cache_features: {views: K}`` for each
  ``--views`` K.

Prints, per way, the mean final val/top1 over the seeds (all ~180 held-out images of 5-9) and the
mean wall and CPU time of a whole run (build, training, evaluation, checkpoints, plots), with the
CPU time relative to the uncached run. Everything runs in this process.

    python benchmarks/feature_views.py                       # seeds 0 1 2, views 1 4 8
    python benchmarks/feature_views.py --views 2 4 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import finetune

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
AUGMENT = [{"random_crop": 4}]


def ways(views: list[int]) -> dict[str, dict[str, Any]]:
    """Each way's ``--set`` overrides."""
    found: dict[str, dict[str, Any]] = {
        "no augmentation, cached": {"data.augment": [], "train.cache_features": True},
        "random_crop, uncached": {"data.augment": AUGMENT, "train.cache_features": False},
    }
    for k in views:
        found[f"random_crop, views {k}"] = {
            "data.augment": AUGMENT,
            "train.cache_features": {"views": k},
        }
    return found


def probe(
    args: argparse.Namespace, weights: Path, seed: int, way: dict[str, Any], run_dir: Path
) -> tuple[float, float, float]:
    """One linear probe: its final val/top1, wall and CPU seconds."""
    overrides = {
        "seed": seed,
        "model.pretrained": str(weights),
        "data.train.per_class": args.per_class,
        "freeze.until": "fc",
        "train.epochs": args.epochs,
        "train.device": "cpu",
        "optimizer.param_groups": [],
        "optimizer.lr": args.lr,
        "output.dir": str(run_dir.parent / "cache"),  # shared: the features' own folder
        **way,
    }
    recipe = finetune.Recipe.load(RECIPES / "digits-finetune.yaml", overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    result = finetune.run(recipe, run_dir=run_dir, console=Console(quiet=True))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result.summary["final"]["val/top1"], wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    print(
        f"linear probe of a digits-0-4 resnet10t on digits 5-9: {args.per_class} images per "
        f"class, {args.epochs} epochs, seeds {args.seeds}, cpu",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        pretrain = finetune.Recipe.load(RECIPES / "digits-pretrain.yaml", {"train.device": "cpu"})
        quiet = Console(quiet=True)
        weights = finetune.run(pretrain, run_dir=Path(tmp) / "pretrain", console=quiet).run_dir
        results: dict[str, list[tuple[float, float, float]]] = {}
        for label, way in ways(args.views).items():
            results[label] = [
                probe(args, weights, seed, way, Path(tmp) / f"{label}-{seed}")
                for seed in args.seeds
            ]
        uncached_cpu = statistics.mean(r[2] for r in results["random_crop, uncached"])
        print(
            f"{'':26s} {'val/top1':>9s} {'min-max':>13s} {'wall':>7s} {'CPU':>7s} {'less CPU':>9s}"
        )
        for label, rows in results.items():
            top1 = [r[0] for r in rows]
            wall, cpu = statistics.mean(r[1] for r in rows), statistics.mean(r[2] for r in rows)
            print(
                f"{label:26s} {statistics.mean(top1):9.1%} {min(top1):6.1%}-{max(top1):6.1%} "
                f"{wall:6.1f}s {cpu:6.1f}s {uncached_cpu / cpu:8.1f}x"
            )


if __name__ == "__main__":
    main()
