"""The training loop: one file, read top to bottom.

Per batch: forward under autocast -> loss / accumulation steps -> backward -> on the accumulation
boundary: unscale, clip, optimizer step, zero_grad, ``schedule.step_update()``, the divergence
check, and a pause when a checkpoint is due or a signal asked to stop. Per epoch: evaluate ->
``schedule.step_epoch(metrics)`` -> checkpoint (``last``, and ``best`` when the monitored metric
improved), whose metrics rows ``metrics.jsonl`` mirrors.
Device, precision and process rank come from ``Runtime``; the loop never tests for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from finetune.augment import hard_labels
from finetune.config.train import CheckpointEvery
from finetune.data import skipped_images
from finetune.errors import Interrupted, TrainingDiverged
from finetune.feature_cache import EpochInputs, FeatureCache
from finetune.freezing import UnfreezeStage, unfreeze_due
from finetune.observers import Observer, StopRun
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
    # Checkpoints within an epoch (train.checkpoint_every); None: only at the end of each epoch.
    checkpoint_every: CheckpointEvery | None = None


@dataclass
class EpochPosition:
    """How far into an epoch training is: optimizer steps taken and the running train sums."""

    step: int = 0
    loss_sum: float = 0.0  # loss x images
    correct: float = 0.0
    images: int = 0
    seconds: float = 0.0


@dataclass
class LoopState:
    """What the loop carries across epochs and across a resume."""

    epoch: int = 0  # epochs completed
    position: EpochPosition = field(default_factory=EpochPosition)  # into epoch ``epoch + 1``
    best_epoch: int | None = None
    best_value: float | None = None
    best_checkpoint: str | None = None  # the checkpoint folder of the best epoch
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Where a resume with new epochs/LR restarted the schedule ([epochs, steps]; finetune.resume)
    schedule_start: list[int] | None = None
    stopped: str | None = None  # the status an observer ended the run with (StopRun)


class StopRequest:
    """Set by a signal handler (``finetune.training``): the loop finishes the optimizer step it
    is in, checkpoints, and raises ``Interrupted``."""

    def __init__(self) -> None:
        self.signum: int | None = None


class DivergenceGuard:
    """A non-finite loss (at every optimizer step) or gradient norm (at the steps a checkpoint
    follows, and at every step with ``clip_grad_norm``, which computes it anyway), noticed at
    the step where it happens.

    Each step updates two device tensors (no host sync): the run of bad steps, and the first
    step where that run reached ``patience``. The host reads them when it reads anyway (every
    step on the CPU, where it costs nothing; before a checkpoint and at the end of an epoch on a
    GPU), so no diverged weights are ever saved. Under fp16 the GradScaler skips a step with
    infinite gradients and lowers its scale: only ``patience`` bad steps in a row count.
    """

    def __init__(self, runtime: Runtime, start_step: int = 0) -> None:
        device = runtime.device
        self.patience = 10 if runtime.precision == "fp16" else 1
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)
        self.eager = device.type == "cpu"

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """After optimizer step ``step``: its loss and, when it was computed, gradient norm."""
        bad = ~torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            bad |= ~torch.isfinite(grad_norm.float())
        self.streak = (self.streak + 1) * bad
        hit = (self.streak >= self.patience) & (self.first < 0)
        self.first = torch.where(hit, step, self.first)
        self.loss = torch.where(hit, loss.detach().float(), self.loss)
        if self.eager:
            self.check()

    def check(self) -> None:
        """Raise ``TrainingDiverged`` if a step diverged since the guard was made."""
        step = int(self.first)
        if step >= 0:
            raise TrainingDiverged(step=step, loss=float(self.loss))


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
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    runtime: Runtime,
    progress: EpochProgress,
    options: FitOptions,
    *,
    position: EpochPosition | None = None,
    batches: int | None = None,
    pause: Callable[[int], bool] | None = None,
    observers: Sequence[Observer] = (),
) -> dict[str, float] | None:
    """Train over ``loader`` to the end of the epoch; returns train loss, accuracy, images
    per second and the learning rates the epoch's last optimizer step used (``lr``, and
    ``lr/<group>`` for each group), or ``None`` when ``pause(step)`` asked to stop after an
    optimizer step.

    Args:
        position: where in the epoch ``loader`` starts (after a pause or a resume); it is
            updated as training goes.
        batches: the epoch's number of batches (default ``len(loader)``): the last accumulation
            window may be shorter, and its loss is scaled by its own size.

    Labels may be class indices or, after mixup/cutmix, class probabilities (soft targets).
    The running sums stay on the device: reading them (a host sync) is left to the progress bar,
    which does so a few times a second at most.
    """
    position = position if position is not None else EpochPosition()
    batches = batches if batches is not None else len(loader)  # type: ignore[arg-type]
    accum = options.grad_accum_steps
    guard = DivergenceGuard(runtime)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    # loss x images, correct: on the device; carried over from a pause or a resume
    sums = torch.tensor(
        [position.loss_sum, position.correct], dtype=torch.float64, device=runtime.device
    )
    seen, start = position.images, time.perf_counter() - position.seconds
    lrs = group_lrs(optimizer)
    for index, (images, labels) in enumerate(loader, start=position.step * accum):
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
        correct = (logits.argmax(dim=1) == hard_labels(labels)).sum()
        sums += torch.stack([loss.detach() * len(labels), correct]).to(sums)
        seen += len(labels)
        progress.update(index + 1, sums, seen, time.perf_counter() - start)
        if boundary:
            last = index + 1 == batches
            # A checkpoint follows this step (a pause, or the end of the epoch): its gradient
            # norm must be finite too, or the checkpoint would hold the blown-up weights.
            pausing = pause is not None and pause(position.step + 1) and not last
            if last:  # the row's lr: what the epoch's last step used, whatever the schedule
                lrs = group_lrs(optimizer)
            grad_norm = runtime.step(optimizer, model, options.clip_grad_norm, norm=pausing or last)
            schedule.step_update()
            position.step += 1
            guard.record(position.step, loss, grad_norm)
            for observer in observers:
                observer.after_step(position.step, loss, optimizer)
            if pausing:
                guard.check()  # never pause (and checkpoint) on diverged weights
                _keep(position, sums, seen, time.perf_counter() - start)
                return None
    guard.check()
    _keep(position, sums, seen, time.perf_counter() - start)
    totals = torch.tensor(
        [position.loss_sum, position.correct, position.images],
        dtype=torch.float64,
        device=runtime.device,
    )
    loss_sum, correct, seen = runtime.all_reduce_sum(totals).tolist()  # over all processes
    return {
        "train/loss": loss_sum / seen,
        "train/top1": correct / seen,
        "img_per_s": seen / position.seconds,
        "seconds": position.seconds,
        "lr": next(iter(lrs.values())),
        **{f"lr/{name}": lr for name, lr in lrs.items()},
    }


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter group's learning rate, by group name."""
    return {
        group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)
    }


def _keep(position: EpochPosition, sums: torch.Tensor, images: int, seconds: float) -> None:
    position.loss_sum, position.correct = sums.tolist()
    position.images, position.seconds = images, seconds


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
    stop: StopRequest | None = None,
    observers: Sequence[Observer] = (),
    features: FeatureCache | None = None,
) -> LoopState:
    """Train from where ``state`` stands to ``options.epochs``, evaluating after every epoch
    and, given a run folder, checkpointing at every epoch end and as ``checkpoint_every`` says.

    Args:
        unfreeze: stages whose parameters start training at a given epoch; their optimizer
            groups must be in ``optimizer`` already (``finetune.build`` puts them there).
        stop: set by a signal handler: checkpoint after the current step, then raise
            ``Interrupted``.
        observers: called at every epoch start, optimizer step and epoch end
            (``finetune.observers``); one raising ``StopRun`` ends the fit after that epoch,
            with ``state.stopped`` set to its status.
        features: the feature cache (``finetune.feature_cache``): on the epochs it serves, the
            head trains and is evaluated on features computed once, in place inside ``model``.

    Raises:
        TrainingDiverged: a non-finite loss or gradient norm; nothing after the last good
            checkpoint is saved.
    """
    state = state or LoopState()
    progress = progress or EpochProgress(enabled=False)
    stop = stop or StopRequest()
    pause = _pause_rule(options, runtime, stop, saving=run is not None)
    epochs = options.epochs
    for epoch in range(state.epoch + 1, epochs + 1):
        unfreeze_due(runtime.unwrap(model), unfreeze, epoch)
        cached = features.inputs(epoch) if features is not None else None
        inputs = cached or EpochInputs(model, train_loader, val_loader)
        batches = _start_epoch(inputs.train_loader, epoch, state.position, options.grad_accum_steps)
        progress.start_epoch(epoch, epochs, batches)
        for observer in observers:
            observer.start_epoch(epoch, epochs, -(-batches // options.grad_accum_steps))
        loader = iter(inputs.train_loader)
        try:
            while (
                train_metrics := train_one_epoch(
                    inputs.model,
                    loader,
                    optimizer,
                    schedule,
                    runtime,
                    progress,
                    options,
                    position=state.position,
                    batches=batches,
                    pause=pause,
                    observers=observers,
                )
            ) is None:
                _save(run, model, optimizer, schedule, runtime, state, best=False)
                if stop.signum is not None:
                    raise Interrupted(stop.signum, _where(state))
        except TrainingDiverged as error:
            error.epoch = epoch
            raise
        _end_epoch(
            model,
            train_loader,
            val_loader,
            optimizer,
            schedule,
            runtime,
            options,
            state,
            run,
            train_metrics,
            inputs,
        )
        progress.end_epoch(state.history[-1])
        if stop.signum is not None:  # the signal came during the evaluation or the save
            raise Interrupted(stop.signum, _where(state))
        state.stopped = _observe_end(observers, state.history[-1], runtime.unwrap(model), runtime)
        if state.stopped is not None:
            break
    return state


def _observe_end(
    observers: Sequence[Observer], row: dict[str, Any], model: nn.Module, runtime: Runtime
) -> str | None:
    """Show the observers the epoch's row; the status to stop with if one asked (and, with
    several processes, ``"stopped"`` on those whose own observers did not)."""
    status = None
    for observer in observers:
        try:
            observer.end_epoch(row, model)
        except StopRun as request:
            status = status or request.status
    if runtime.agree(status is not None):
        return status or "stopped"
    return None


def _start_epoch(loader: DataLoader, epoch: int, position: EpochPosition, accum: int) -> int:
    """Set the sampler's epoch (and, after a mid-epoch resume, where it starts); the epoch's
    number of batches."""
    # Our samplers draw a permutation seeded per epoch: the same order whether or not the run
    # was resumed. A plain DataLoader's sampler (Python API users) has no set_epoch.
    set_epoch = getattr(loader.sampler, "set_epoch", None)
    skip = position.step * accum * (loader.batch_size or 1)  # items of this process's share
    if set_epoch is not None:
        set_epoch(epoch, start=skip)
    elif skip:
        raise ValueError("resuming within an epoch needs a sampler with set_epoch(epoch, start)")
    return position.step * accum + len(loader)


def _end_epoch(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    runtime: Runtime,
    options: FitOptions,
    state: LoopState,
    run: RunFolder | None,
    train_metrics: dict[str, float],
    inputs: EpochInputs,
) -> None:
    """Evaluate (``inputs``: the model, or the head on cached features), step the schedule,
    record the metrics row and commit the epoch's checkpoint (of the whole ``model``)."""
    val_metrics = evaluate(inputs.model, inputs.val_loader, runtime, options.num_classes)
    schedule.step_epoch({**train_metrics, **val_metrics})
    epoch = state.epoch + 1
    state.epoch, state.position = epoch, EpochPosition()
    state.train_seconds += train_metrics["seconds"]
    save_best = options.save_best
    improved = is_better(val_metrics[save_best], state.best_value, save_best)
    if improved:
        state.best_epoch, state.best_value = epoch, val_metrics[save_best]
    state.history.append(
        {
            "epoch": epoch,
            "epochs": options.epochs,
            **train_metrics,
            **val_metrics,
            **skipped_images(train=train_loader, val=val_loader),
        }
    )
    _save(run, model, optimizer, schedule, runtime, state, best=improved)


def _pause_rule(
    options: FitOptions, runtime: Runtime, stop: StopRequest, saving: bool
) -> Callable[[int], bool]:
    """When to stop after an optimizer step: a signal, or a checkpoint due (by steps or by
    minutes since the last one). Every process takes the same decision at the same step."""
    every = options.checkpoint_every or CheckpointEvery(minutes=None)
    every_steps, every_minutes = every.steps, every.minutes
    last = [time.monotonic()]

    def pause(step: int) -> bool:
        due = stop.signum is not None or (
            saving
            and (
                (every_steps is not None and step % every_steps == 0)
                or (every_minutes is not None and time.monotonic() - last[0] >= 60 * every_minutes)
            )
        )
        due = runtime.agree(due)
        if due:
            last[0] = time.monotonic()
        return due

    return pause


def _save(
    run: RunFolder | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    runtime: Runtime,
    state: LoopState,
    best: bool,
) -> None:
    if run is None:  # only rank 0 has a run folder: the others' state is the same
        return
    name = run.commit_checkpoint(
        runtime.unwrap(model), checkpoint_state(optimizer, schedule, runtime, state), best=best
    )
    if best:
        state.best_checkpoint = name


def _where(state: LoopState) -> str:
    return (
        f"epoch {state.epoch + 1}, step {state.position.step}"
        if state.position.step
        else f"the end of epoch {state.epoch}"
    )


def checkpoint_state(
    optimizer: torch.optim.Optimizer, schedule: Schedule, runtime: Runtime, state: LoopState
) -> dict[str, Any]:
    """Everything besides the weights that an exact resume needs: plain data and tensors."""
    return {
        "epoch": state.epoch,
        "step": state.position.step,
        "position": asdict(state.position),
        "best_epoch": state.best_epoch,
        "best_value": state.best_value,
        "best_checkpoint": state.best_checkpoint,
        "train_seconds": state.train_seconds,
        "history": state.history,
        "schedule_start": state.schedule_start,
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": runtime.scaler.state_dict(),
        "rng": rng_state(),
    }


def loop_state(saved: dict[str, Any]) -> LoopState:
    """The ``LoopState`` a checkpoint's state holds."""
    return LoopState(
        epoch=saved["epoch"],
        position=EpochPosition(**saved["position"]),
        best_epoch=saved["best_epoch"],
        best_value=saved["best_value"],
        best_checkpoint=saved["best_checkpoint"],
        train_seconds=saved["train_seconds"],
        history=list(saved["history"]),
        schedule_start=saved.get("schedule_start"),
    )
