"""From a validated recipe to a finished run: build everything, train with the shared loop, report.

``run(recipe)`` is what ``finetune run`` calls. Every object is built, and every input checked,
before the run folder is created, so a bad recipe or a bad dataset leaves nothing behind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from finetune.augment import build_batch_transform
from finetune.checkpoint import RunFolder, link_latest, new_run_dir, restore_rng_state, write_json
from finetune.data import (
    Datasets,
    build_datasets,
    build_loader,
    build_train_sampler,
    resolve_num_workers,
)
from finetune.distributed import ShardSampler
from finetune.errors import UserError
from finetune.freeze import FreezeReport, UnfreezeStage, apply_unfreeze
from finetune.loop import LoopState, evaluate, fit
from finetune.lr_find import resolve_auto_lr
from finetune.model import TORCHVISION_PREFIX, BuiltModel, check_backbone_name
from finetune.optim import build_optimizer, lr_scale_factor, optimizer_arguments
from finetune.plan import build_plan, print_load_report
from finetune.progress import EpochProgress
from finetune.recipe import Recipe
from finetune.runtime import Runtime
from finetune.schedule import build_scheduler
from finetune.stats import with_measured_normalization


@dataclass
class Prepared:
    """Everything a run needs, built from a recipe, before any training or file writing."""

    recipe: Recipe
    runtime: Runtime
    datasets: Datasets
    built: BuiltModel
    freeze_report: FreezeReport
    groups: list[dict[str, Any]]
    unfreeze: list[UnfreezeStage]


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrained_config(backbone: str) -> dict[str, Any]:
    """The mean/std the backbone was pretrained with (timm's config; ImageNet for torchvision)."""
    if backbone.startswith(TORCHVISION_PREFIX):
        return {}
    import timm

    cfg = timm.get_pretrained_cfg(backbone)
    return cfg.to_dict() if cfg is not None else {}


def prepare(recipe: Recipe) -> Prepared:
    """Check the backbone name, build the datasets, the model, freezing and parameter groups."""
    check_backbone_name(recipe.model.backbone)
    seed_everything(recipe.seed)
    runtime = Runtime.create(device=recipe.train.device, precision=recipe.train.precision,
                             channels_last=recipe.train.channels_last)
    datasets = build_datasets(recipe.data, seed=recipe.seed, num_classes=recipe.model.num_classes,
                              pretrained_cfg=pretrained_config(recipe.model.backbone))
    # `normalize: dataset` is measured once: the run's recipe.yaml keeps the values it measured.
    recipe = with_measured_normalization(recipe, datasets.normalization)
    num_classes = recipe.model.num_classes or len(datasets.classes)
    if num_classes != len(datasets.classes):
        raise UserError(f"model.num_classes is {num_classes} but the training data has "
                        f"{len(datasets.classes)} classes: {datasets.classes}")
    if recipe.freeze.unfreeze and runtime.distributed:
        raise UserError("freeze.unfreeze: gradual unfreezing needs a single process; DDP fixes "
                        "the set of trainable parameters when it wraps the model")
    plan = build_plan(recipe, num_classes=num_classes)
    return Prepared(recipe, runtime, datasets, plan.built, plan.freeze, plan.groups,
                    plan.unfreeze)


def run(recipe: Recipe, *, run_dir: str | Path | None = None, resume: str | Path | None = None,
        console: Console | None = None) -> RunResult:
    """Train ``recipe`` with the shared loop and return the run folder and its summary.

    Args:
        run_dir: where to write the run; by default ``<output.dir>/<name>/<timestamp>``.
        resume: a run folder to continue from its ``last/`` checkpoint (``run_dir`` is ignored).
    """
    console = console or Console()
    recipe, lr_found = resolve_auto_lr(recipe, console)  # optimizer.lr: auto -> a number
    prepared = prepare(recipe)
    runtime, datasets, model = prepared.runtime, prepared.datasets, prepared.built.model
    # Frozen BatchNorm layers never compute batch statistics: there is nothing to synchronise.
    sync_bn = recipe.train.sync_batchnorm and recipe.freeze.batchnorm != "frozen"
    model = runtime.prepare(model, sync_batchnorm=sync_bn)
    train_loader, val_loader = build_loaders(prepared)
    opt = recipe.optimizer
    lr_scale = lr_scale_factor(lr_scaling=opt.lr_scaling, base_batch_size=opt.base_batch_size,
                               batch_size=recipe.data.batch_size,
                               grad_accum_steps=recipe.train.grad_accum_steps,
                               world_size=runtime.world_size)
    optimizer = build_optimizer(prepared.groups, lr_scale=lr_scale, **optimizer_arguments(opt))
    steps_per_epoch = -(-len(train_loader) // recipe.train.grad_accum_steps)
    if recipe.scheduler.monitor == "val/top5" and len(datasets.classes) < 5:
        raise UserError("scheduler.monitor: val/top5 is only logged with 5 or more classes")
    scheduler = build_scheduler(optimizer, epochs=recipe.train.epochs,
                                steps_per_epoch=steps_per_epoch, lr_scale=lr_scale,
                                **dict(recipe.scheduler))

    # Every process must write to (and resume from) the folder rank 0 names.
    folder = RunFolder(runtime.broadcast(Path(resume) if resume else Path(run_dir) if run_dir
                                         else new_run_dir(recipe.output.dir, recipe.name)))
    state = LoopState()
    if resume:
        runtime.barrier()
        state = _restore(folder, runtime.unwrap(model), optimizer, scheduler, runtime,
                         prepared.unfreeze)
    if runtime.is_main:
        _start_folder(folder, prepared, link=not resume and run_dir is None)
        if lr_found is not None:
            lr_found.save(folder.path / "lr_find")  # how optimizer.lr: auto was resolved
        if prepared.built.load_report is not None:
            print_load_report(prepared.built.load_report, console)
        console.print(f"run folder: {folder.path}  ({len(datasets.train)} train / "
                      f"{len(datasets.val)} val images, {len(datasets.classes)} classes, "
                      f"device {runtime.device}, {runtime.precision}, {runtime.world_size} "
                      f"process(es), effective batch {effective_batch_size(recipe, runtime)})",
                      highlight=False)
    progress = EpochProgress(enabled=runtime.is_main, console=console)
    test_metrics = None
    try:
        fit(model, train_loader, val_loader, optimizer, scheduler, runtime,
            epochs=recipe.train.epochs, num_classes=len(datasets.classes), state=state,
            run=folder if runtime.is_main else None, progress=progress,
            grad_accum_steps=recipe.train.grad_accum_steps,
            clip_grad_norm=recipe.train.clip_grad_norm,
            label_smoothing=recipe.train.label_smoothing,
            scheduler_interval=recipe.scheduler.interval, save_best=recipe.output.save_best,
            unfreeze=prepared.unfreeze,
            class_weights=_class_weights(prepared))
        test_metrics = evaluate_test_split(prepared, model, folder)
    finally:
        summary = _summary(folder, state, recipe, runtime,
                           completed=state.epoch == recipe.train.epochs)
        if test_metrics is not None:
            summary["test"] = test_metrics
            if runtime.is_main:
                scores = "  ".join(f"{key} {value:.4f}" for key, value in test_metrics.items())
                console.print(f"data.test with the best/ weights (epoch {state.best_epoch}): "
                              f"{scores}", highlight=False)
        if runtime.is_main and folder.path.exists():
            folder.write_summary(summary)
            _plot_curves(folder)
    runtime.barrier()
    runtime.shutdown()  # leave the process group torchrun's job set up
    return RunResult(folder.path, summary)


def effective_batch_size(recipe: Recipe, runtime: Runtime) -> int:
    """Images per optimizer step: per-process batch x processes x accumulation steps."""
    return recipe.data.batch_size * runtime.world_size * recipe.train.grad_accum_steps


def build_loaders(prepared: Prepared) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled per epoch, sharded over processes) and evaluation loader."""
    recipe, runtime, datasets = prepared.recipe, prepared.runtime, prepared.datasets
    data = recipe.data
    train_sampler = build_train_sampler(data.sampler, datasets.train.targets, seed=recipe.seed,
                                        batch_size=data.batch_size, rank=runtime.rank,
                                        world_size=runtime.world_size)
    train_loader = build_loader(
        datasets.train, batch_size=data.batch_size, train=True, sampler=train_sampler,
        seed=recipe.seed + runtime.rank, num_workers=resolve_num_workers(data.num_workers),
        pin_memory=runtime.pin_memory, persistent_workers=data.persistent_workers,
        prefetch_factor=data.prefetch_factor,
        collate_fn=build_batch_transform(data.augment, len(datasets.classes)))
    return train_loader, eval_loader(prepared, datasets.val, once=False)


def eval_loader(prepared: Prepared, dataset: Dataset, *, once: bool) -> DataLoader:
    """An evaluation loader sharded over processes; ``once``: no workers kept between passes."""
    data, runtime = prepared.recipe.data, prepared.runtime
    return build_loader(dataset, batch_size=data.eval_batch_size or 2 * data.batch_size,
                        train=False, num_workers=resolve_num_workers(data.num_workers),
                        pin_memory=runtime.pin_memory,
                        persistent_workers=data.persistent_workers and not once,
                        prefetch_factor=data.prefetch_factor,
                        sampler=ShardSampler(len(dataset), rank=runtime.rank,
                                             world_size=runtime.world_size))


def evaluate_test_split(prepared: Prepared, model: torch.nn.Module, folder: RunFolder
                        ) -> dict[str, Any] | None:
    """``data.test`` scored once with the ``best/`` weights (``test/loss``, ``test/top1``, ...)."""
    datasets, runtime = prepared.datasets, prepared.runtime
    if datasets.test is None:
        return None
    runtime.barrier()  # rank 0 has written best/
    tensors, _ = folder.load_checkpoint("best")
    runtime.unwrap(model).load_state_dict(tensors)
    loader = eval_loader(prepared, datasets.test, once=True)
    metrics = evaluate(model, loader, runtime, len(datasets.classes))
    return {key.replace("val/", "test/"): value for key, value in metrics.items()}


def _class_weights(prepared: Prepared) -> torch.Tensor | None:
    """``data.class_weights`` as a tensor on the device (``None``: unweighted loss)."""
    weights = prepared.datasets.class_weights
    return None if weights is None else weights.to(prepared.runtime.device)


def resolve_resume(resume: str, recipe: Recipe, run_dir: Path | None, overrides: list[str]
                   ) -> tuple[Path, Recipe]:
    """The run folder to resume and its saved recipe with this command's ``--set`` applied.

    ``resume`` is a run folder, or ``latest``: ``--run-dir`` if given, else the recipe's latest run.
    """
    if resume == "latest":
        folder = run_dir or recipe.output.dir / recipe.name / "latest"
    else:
        folder = Path(resume)
    folder = folder.resolve()
    if not (folder / "recipe.yaml").is_file():
        raise UserError(f"--resume: {folder} is not a run folder (no recipe.yaml)")
    if not (folder / "last").is_dir():
        raise UserError(f"--resume: {folder} has no last/ checkpoint to resume from")
    return folder, Recipe.load(folder / "recipe.yaml", overrides)


def _start_folder(folder: RunFolder, prepared: Prepared, link: bool) -> None:
    folder.create()
    folder.write_recipe(prepared.recipe.to_yaml())
    folder.write_classes(prepared.datasets.classes)
    write_json(folder.path / "normalization.json", prepared.datasets.normalization.to_dict())
    if prepared.built.load_report is not None:
        write_json(folder.path / "load_report.json", prepared.built.load_report.to_dict())
    if link:
        link_latest(folder.path)


def _restore(folder: RunFolder, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, runtime: Runtime, unfreeze: list[UnfreezeStage]) -> LoopState:
    tensors, saved = folder.load_checkpoint("last")
    model.load_state_dict(tensors)
    # The saved optimizer has the groups of the stages unfrozen so far: add them first.
    apply_unfreeze(optimizer, scheduler, unfreeze, saved["epoch"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    runtime.load_scaler_state(saved["scaler"])
    restore_rng_state(saved["rng"])
    history = [row for row in folder.read_metrics() if row["epoch"] <= saved["epoch"]]
    return LoopState(epoch=saved["epoch"], best_epoch=saved["best_epoch"],
                     best_value=saved["best_value"], train_seconds=saved["train_seconds"],
                     history=history)


def _summary(folder: RunFolder, state: LoopState, recipe: Recipe, runtime: Runtime,
             completed: bool) -> dict[str, Any]:
    metric = recipe.output.save_best
    return {
        "status": "completed" if completed else "interrupted",
        "processes": runtime.world_size,
        "effective_batch_size": effective_batch_size(recipe, runtime),
        "best": {"epoch": state.best_epoch, metric: state.best_value},
        "final": state.history[-1] if state.history else {},
        "epochs": state.epoch,
        "train_seconds": round(state.train_seconds, 3),
        "run_dir": str(folder.path),
    }


def _plot_curves(folder: RunFolder) -> None:
    """``plots/curves.png``: loss, accuracy and learning rate per epoch."""
    rows = folder.read_metrics()
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("train/loss", "val/loss"):
        axes[0].plot(epochs, [row[key] for row in rows], marker="o", label=key)
    for key in ("train/top1", "val/top1", "val/top5"):
        if key in rows[0]:
            axes[1].plot(epochs, [row[key] for row in rows], marker="o", label=key)
    for key in (k for k in rows[0] if k.startswith("lr/")):
        axes[2].plot(epochs, [row[key] for row in rows], marker="o", label=key)
    for axis, title in zip(axes, ("loss", "accuracy", "learning rate (end of epoch)"), strict=True):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    fig.tight_layout()
    (folder.path / "plots").mkdir(exist_ok=True)
    fig.savefig(folder.path / "plots" / "curves.png", dpi=90)
    plt.close(fig)
