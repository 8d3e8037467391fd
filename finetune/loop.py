"""The training loop: one file, read top to bottom.

Per batch: forward under autocast -> loss / accumulation steps -> backward -> on the accumulation
boundary: unscale, clip, optimizer step, zero_grad, ``schedule.step_update()``. Per epoch:
evaluate -> ``schedule.step_epoch(metrics)`` -> checkpoint ``last/`` (and ``best/`` when the
monitored metric improved) -> log a metrics row.
Device, precision and process rank come from ``Runtime``; the loop never tests for them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from finetune.augment import hard_labels
from finetune.data import skipped_images
from finetune.freezing import UnfreezeStage, unfreeze_due
from finetune.progress import EpochProgress
from finetune.run_folder import RunFolder
from finetune.runtime import Runtime, rng_state
from finetune.schedule import Schedule


@dataclass(frozen=True)
class FitOptions:
    """How ``fit`` trains: the ``train:`` keys the loop reads, and what it monitors."""

    epochs: int
    num_classes: int
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    label_smoothing: float = 0.0
    save_best: str = "val/top1"  # the metric that decides which epoch best/ holds
    class_weights: torch.Tensor | None = None  # per-class loss weights, on the device


@dataclass
class LoopState:
    """What the loop carries across epochs and across a resume."""

    epoch: int = 0  # epochs completed
    best_epoch: int | None = None
    best_value: float | None = None
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    num_classes: int,
    per_class: bool = False,
) -> dict[str, Any]:
    """Loss, top-1 and (with 5 or more classes) top-5 accuracy over ``loader``.

    Sums are reduced over processes, so a sharded evaluation gives the single-process numbers.
    With ``per_class``, also ``per_class_images`` and ``per_class_correct`` (lists by class).
    """
    model.eval()
    device = runtime.device
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    class_counts = torch.zeros(2, num_classes, device=device, dtype=torch.float64)
    with torch.inference_mode(), runtime.autocast():
        for images, labels in loader:
            images, labels = runtime.to_device(images, labels)
            logits = model(images).float()
            top = logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]
            totals += torch.stack(
                [
                    F.cross_entropy(logits, labels, reduction="sum"),
                    top[:, 0].sum(),
                    top.any(dim=1).sum(),
                    torch.tensor(len(labels), device=device),
                ]
            ).to(totals)
            class_counts[0].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
            class_counts[1].index_add_(0, labels, top[:, 0].to(torch.float64))
    loss, top1, top5, count = runtime.all_reduce_sum(totals).tolist()
    metrics: dict[str, Any] = {"val/loss": loss / count, "val/top1": top1 / count}
    if num_classes >= 5:
        metrics["val/top5"] = top5 / count
    if per_class:
        images_per_class, correct_per_class = runtime.all_reduce_sum(class_counts).tolist()
        metrics["per_class_images"] = [int(n) for n in images_per_class]
        metrics["per_class_correct"] = [int(n) for n in correct_per_class]
    return metrics


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    runtime: Runtime,
    progress: EpochProgress,
    options: FitOptions,
) -> dict[str, float]:
    """One pass over ``loader``; returns train loss, accuracy and images per second.

    Labels may be class indices or, after mixup/cutmix, class probabilities (soft targets).
    The running sums stay on the device: reading them (a host sync) is left to the progress bar,
    which does so a few times a second at most.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss x images, correct
    seen, batches, accum = 0, len(loader), options.grad_accum_steps
    start = time.perf_counter()
    for index, (images, labels) in enumerate(loader):
        images, labels = runtime.to_device(images, labels)
        window_start = index - index % accum
        window = min(accum, batches - window_start)  # the last one may be shorter
        boundary = index + 1 == window_start + window
        with runtime.no_sync(model, accumulating=not boundary):
            with runtime.autocast():
                logits = model(images)
                loss = F.cross_entropy(
                    logits,
                    labels,
                    weight=options.class_weights,
                    label_smoothing=options.label_smoothing,
                )
            runtime.backward(loss / window)
        if boundary:
            runtime.step(optimizer, model, options.clip_grad_norm)
            schedule.step_update()
        correct = (logits.argmax(dim=1) == hard_labels(labels)).sum()
        sums += torch.stack([loss.detach() * len(labels), correct]).to(sums)
        seen += len(labels)
        progress.update(index + 1, sums, seen, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    totals = torch.cat([sums, sums.new_tensor([seen])])
    loss_sum, correct, seen = runtime.all_reduce_sum(totals).tolist()  # over all processes
    return {
        "train/loss": loss_sum / seen,
        "train/top1": correct / seen,
        "img_per_s": seen / seconds,
        "seconds": seconds,
    }


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    runtime: Runtime,
    options: FitOptions,
    *,
    state: LoopState | None = None,
    run: RunFolder | None = None,
    progress: EpochProgress | None = None,
    unfreeze: Sequence[UnfreezeStage] = (),
) -> LoopState:
    """Train from epoch ``state.epoch + 1`` to ``options.epochs``, evaluating after every epoch
    and, given a run folder, checkpointing and logging a metrics row.

    ``unfreeze``: stages whose parameters start training at a given epoch; their optimizer
    groups must be in ``optimizer`` already (``finetune.build`` puts them there).
    """
    state = state or LoopState()
    progress = progress or EpochProgress(enabled=False)
    epochs, save_best = options.epochs, options.save_best
    for epoch in range(state.epoch + 1, epochs + 1):
        unfreeze_due(runtime.unwrap(model), unfreeze, epoch)
        # Our samplers draw a permutation seeded per epoch: the same order whether or not the
        # run was resumed. A plain DataLoader's sampler (Python API users) has no set_epoch.
        set_epoch = getattr(train_loader.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        progress.start_epoch(epoch, epochs, len(train_loader))
        train_metrics = train_one_epoch(
            model, train_loader, optimizer, schedule, runtime, progress, options
        )
        lrs = {
            group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)
        }
        val_metrics = evaluate(model, val_loader, runtime, options.num_classes)
        schedule.step_epoch({**train_metrics, **val_metrics})
        state.epoch, state.train_seconds = epoch, state.train_seconds + train_metrics["seconds"]
        improved = is_better(val_metrics[save_best], state.best_value, save_best)
        if improved:
            state.best_epoch, state.best_value = epoch, val_metrics[save_best]
        row = {
            "epoch": epoch,
            "epochs": epochs,
            **train_metrics,
            **val_metrics,
            **skipped_images(train=train_loader, val=val_loader),
            "lr": next(iter(lrs.values())),
            **{f"lr/{k}": v for k, v in lrs.items()},
        }
        state.history.append(row)
        diverged = not math.isfinite(row["train/loss"])
        if run is not None:
            if not diverged:  # diverged weights must not replace the last good checkpoint
                checkpoint = checkpoint_state(optimizer, schedule, runtime, state)
                run.save_checkpoint("last", runtime.unwrap(model), checkpoint)
                if improved:
                    run.save_checkpoint("best", runtime.unwrap(model), checkpoint)
            run.append_metrics(row)
        progress.end_epoch(row)
        if diverged:
            raise FloatingPointError(
                f"training loss became {row['train/loss']} at epoch "
                f"{epoch}; lower optimizer.lr or set train.clip_grad_norm "
                f"(last/ holds epoch {epoch - 1})"
            )
    return state


def checkpoint_state(
    optimizer: torch.optim.Optimizer, schedule: Schedule, runtime: Runtime, state: LoopState
) -> dict[str, Any]:
    """Everything besides the weights that an exact resume needs (loads with weights_only)."""
    return {
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_value": state.best_value,
        "train_seconds": state.train_seconds,
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": runtime.scaler.state_dict(),
        "rng": rng_state(),
    }
