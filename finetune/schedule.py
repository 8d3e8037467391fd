"""Learning-rate schedules built from torch's own schedulers, with an optional linear warmup.

Every schedule multiplies each parameter group's own base LR, so the per-group learning rates of
``finetune.optim`` keep their ratios through warmup and decay. ``build_scheduler`` returns a
``Schedule``: the loop calls its ``step_update()`` after every optimizer step and its
``step_epoch(metrics)`` after every evaluation, and ``interval`` decides which one moves the LR;
``plateau`` also reads the monitored metric there.

Lengths given in epochs (``warmup_epochs``, ``step_size``, ``milestones``, ``cycle_epochs``) are
converted to scheduler steps, so a recipe reads the same with either interval. The warmup (a
``LinearLR`` from ``warmup_start_factor`` to 1) comes first; the schedule then runs over the
remaining steps inside torch's ``SequentialLR``.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import lr_scheduler

from finetune.errors import UserError


@dataclass(frozen=True)
class Span:
    """How many scheduler steps the run, an epoch and the warmup last."""

    per_epoch: int  # scheduler steps per epoch: optimizer steps, or 1 with interval "epoch"
    total: int
    warmup: int

    @property
    def after_warmup(self) -> int:
        """Steps left for the schedule proper once the warmup is over."""
        return max(self.total - self.warmup, 1)

    def steps(self, epochs: float) -> int:
        """``epochs`` in scheduler steps (at least one)."""
        return max(1, round(epochs * self.per_epoch))


def schedule_span(
    *,
    epochs: int,
    steps_per_epoch: int,
    interval: str = "step",
    warmup_epochs: float = 0.0,
    warmup_steps: int = 0,
) -> Span:
    """The lengths ``build_scheduler`` works with, in scheduler steps.

    ``steps_per_epoch`` counts optimizer steps (batches / accumulation steps). The warmup is
    ``warmup_steps`` or ``warmup_epochs`` rounded up, and always leaves at least one step.
    """
    per_epoch = steps_per_epoch if interval == "step" else 1
    total = epochs * per_epoch
    warmup = warmup_steps or (math.ceil(warmup_epochs * per_epoch) if warmup_epochs else 0)
    return Span(per_epoch=per_epoch, total=total, warmup=min(warmup, max(total - 1, 0)))


# --------------------------------------------------------------------------------- the schedules
# Each builder takes the options it uses by name (the others arrive in ``**_``) and returns the
# torch scheduler that runs after the warmup, over ``span.after_warmup`` steps.
def _constant(optimizer: torch.optim.Optimizer, span: Span, **_: Any) -> lr_scheduler.LRScheduler:
    return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _step(
    optimizer: torch.optim.Optimizer, span: Span, *, step_size: int, gamma: float | None, **_: Any
) -> lr_scheduler.LRScheduler:
    return lr_scheduler.StepLR(
        optimizer, step_size=span.steps(step_size), gamma=0.1 if gamma is None else gamma
    )


def _multistep(
    optimizer: torch.optim.Optimizer,
    span: Span,
    *,
    milestones: Sequence[int],
    gamma: float | None,
    **_: Any,
) -> lr_scheduler.LRScheduler:
    # Milestones count epochs from the start of training; the schedule starts after the warmup.
    steps = [span.steps(epoch) - span.warmup for epoch in milestones]
    if not milestones or any(step <= 0 for step in steps):
        raise UserError(
            f"scheduler.milestones: {list(milestones)} must be epochs after the "
            f"warmup ({span.warmup} steps)"
        )
    return lr_scheduler.MultiStepLR(
        optimizer, milestones=steps, gamma=0.1 if gamma is None else gamma
    )


def _exponential(
    optimizer: torch.optim.Optimizer, span: Span, *, gamma: float | None, **_: Any
) -> lr_scheduler.LRScheduler:
    if gamma is None:
        raise UserError("scheduler.gamma: exponential needs the LR factor per epoch, e.g. 0.95")
    return lr_scheduler.ExponentialLR(optimizer, gamma=gamma ** (1 / span.per_epoch))


def _cosine(
    optimizer: torch.optim.Optimizer,
    span: Span,
    *,
    min_lr: float,
    cycle_epochs: float | None,
    cycle_mult: int,
    lr_scale: float,
    **_: Any,
) -> lr_scheduler.LRScheduler:
    floor = min_lr * lr_scale
    below = [
        f"{group.get('name', i)} ({group['lr']:g})"
        for i, group in enumerate(optimizer.param_groups)
        if group["lr"] < floor
    ]
    if below:  # torch's cosine runs from each group's LR to the one floor: these would rise
        raise UserError(
            f"scheduler.min_lr: {floor:g} is above the learning rate of group(s) "
            f"{', '.join(below)}; cosine would raise them; lower min_lr"
        )
    if cycle_epochs is None:
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=span.after_warmup, eta_min=floor)
    return lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=span.steps(cycle_epochs), T_mult=cycle_mult, eta_min=floor
    )


def _poly(
    optimizer: torch.optim.Optimizer, span: Span, *, power: float, **_: Any
) -> lr_scheduler.LRScheduler:
    return lr_scheduler.PolynomialLR(optimizer, total_iters=span.after_warmup, power=power)


def _peak_lrs(
    optimizer: torch.optim.Optimizer, max_lr: float | None, lr_scale: float, name: str
) -> list[float]:
    """``max_lr`` is the peak of a group at the optimizer's own LR; others keep their ratio."""
    if max_lr is None:
        raise UserError(f"scheduler.max_lr: {name} needs the peak learning rate")
    reference = optimizer.defaults["lr"]
    return [max_lr * lr_scale * group["lr"] / reference for group in optimizer.param_groups]


def _cyclic(
    optimizer: torch.optim.Optimizer,
    span: Span,
    *,
    max_lr: float | None,
    lr_scale: float,
    cycle_epochs: float | None,
    cycle_mode: str,
    gamma: float | None,
    cycle_momentum: bool,
    **_: Any,
) -> lr_scheduler.LRScheduler:
    cycle = span.after_warmup if cycle_epochs is None else span.steps(cycle_epochs)
    up = max(cycle // 2, 1)
    return lr_scheduler.CyclicLR(
        optimizer,
        base_lr=[group["lr"] for group in optimizer.param_groups],
        max_lr=_peak_lrs(optimizer, max_lr, lr_scale, "cyclic"),
        step_size_up=up,
        step_size_down=max(cycle - up, 1),
        mode=cycle_mode,
        gamma=1.0 if gamma is None else gamma ** (1 / span.per_epoch),  # exp_range, per epoch
        cycle_momentum=cycle_momentum,
    )


def _onecycle(
    optimizer: torch.optim.Optimizer,
    span: Span,
    *,
    max_lr: float | None,
    lr_scale: float,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    cycle_momentum: bool,
    **_: Any,
) -> lr_scheduler.LRScheduler:
    return lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=_peak_lrs(optimizer, max_lr, lr_scale, "onecycle"),
        total_steps=span.after_warmup,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=cycle_momentum,
    )


def _lambda(
    optimizer: torch.optim.Optimizer,
    span: Span,
    *,
    lambdas: str | Mapping[str, str] | None,
    **_: Any,
) -> lr_scheduler.LRScheduler:
    if lambdas is None:
        raise UserError(
            "scheduler.lambdas: the lambda schedule needs 'package.module:function' "
            "(or one per parameter group)"
        )
    return GroupLambdaLR(optimizer, lambdas, total_steps=span.after_warmup)


SCHEDULES: dict[str, Callable[..., lr_scheduler.LRScheduler]] = {
    "constant": _constant,
    "none": _constant,  # the same: the LR stays where the warmup left it
    "step": _step,
    "multistep": _multistep,
    "exponential": _exponential,
    "cosine": _cosine,
    "poly": _poly,
    "cyclic": _cyclic,
    "onecycle": _onecycle,
    "lambda": _lambda,
}


def list_schedules() -> list[str]:
    """Every ``scheduler.name``: the builders above and ``plateau`` (``ReduceLROnPlateau``)."""
    return [*SCHEDULES, "plateau"]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    lr_scale: float = 1.0,
    name: str = "cosine",
    interval: str = "step",
    warmup_epochs: float = 0.0,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.1,
    min_lr: float = 0.0,
    step_size: int = 10,
    milestones: Sequence[int] = (),
    gamma: float | None = None,
    cycle_epochs: float | None = None,
    cycle_mult: int = 1,
    cycle_mode: str = "triangular",
    cycle_momentum: bool = False,
    max_lr: float | None = None,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    power: float = 1.0,
    monitor: str = "val/loss",
    mode: str = "auto",
    factor: float = 0.1,
    patience: int = 10,
    lambdas: str | Mapping[str, str] | None = None,
) -> Schedule:
    """The schedule ``name`` over ``optimizer``, preceded by a linear warmup when one is asked.

    The loop calls ``step_update()`` after every optimizer step and ``step_epoch(metrics)``
    after every evaluation; ``interval`` decides which of them moves the LR. The keyword
    arguments are the recipe's ``scheduler:`` keys.

    Args:
        epochs: length of the run.
        steps_per_epoch: optimizer steps per epoch (batches / gradient accumulation steps).
        lr_scale: the batch-size factor already applied to the optimizer's LRs
            (``finetune.optim.lr_scale_factor``); absolute LRs here (``min_lr``, ``max_lr``)
            get it too.
        name: constant (or none), step, multistep, exponential, cosine, plateau, lambda, cyclic,
            onecycle or poly.
        step_size: step: multiply by ``gamma`` every ``step_size`` epochs after the warmup.
        milestones: multistep: epochs (from the start of training) at which to multiply by
            ``gamma``.
        gamma: step and multistep (default 0.1); exponential (required) and cyclic
            ``exp_range``: the factor per epoch.
        min_lr: cosine and plateau: the lowest LR.
        cycle_epochs: cosine: restart every ``cycle_epochs`` (``CosineAnnealingWarmRestarts``),
            each cycle ``cycle_mult`` times longer than the last; cyclic: the length of a cycle
            (up then down). Default: one cycle over the run.
        max_lr: cyclic and onecycle (required): the peak LR of a group whose base LR is the
            optimizer's ``lr``; every other group peaks in proportion to its own base LR.
        cycle_mode, cycle_momentum: cyclic (``CyclicLR``'s ``mode``); both: also cycle the
            momentum (or beta1) inversely, as torch does by default (off here).
        pct_start, div_factor, final_div_factor: onecycle, as ``OneCycleLR`` takes them.
        power: poly: the exponent of the decay to zero.
        monitor, mode, factor, patience: plateau: multiply by ``factor`` when ``monitor`` has
            not improved for ``patience`` epochs (``mode`` auto: max for accuracies, else min).
        lambdas: lambda: ``"package.module:function"`` for every group, or a mapping of group
            names or globs (and ``default``) to such paths; see ``GroupLambdaLR``.

    Example:
        >>> scheduler = build_scheduler(optimizer, epochs=10, steps_per_epoch=50, name="cosine",
        ...                             warmup_epochs=1, min_lr=1e-5)
    """
    span = schedule_span(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        interval=interval,
        warmup_epochs=warmup_epochs,
        warmup_steps=warmup_steps,
    )

    def ramp() -> lr_scheduler.LRScheduler | None:  # built after the main one, as torch wants
        return (
            lr_scheduler.LinearLR(
                optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=span.warmup
            )
            if span.warmup
            else None
        )

    if name == "plateau":
        if mode == "auto":
            mode = "min" if monitor.endswith("loss") else "max"
        plateau = lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=factor, patience=patience, min_lr=min_lr * lr_scale
        )
        return Schedule(
            optimizer,
            interval=interval,
            scheduler=ramp(),
            plateau=plateau,
            monitor=monitor,
            warmup_steps=span.warmup,
        )
    if name not in SCHEDULES:
        raise UserError(
            f"scheduler.name: unknown schedule {name!r}; known: {', '.join(list_schedules())}"
        )
    options = dict(
        lr_scale=lr_scale,
        min_lr=min_lr,
        step_size=step_size,
        milestones=milestones,
        gamma=gamma,
        cycle_epochs=cycle_epochs,
        cycle_mult=cycle_mult,
        cycle_mode=cycle_mode,
        cycle_momentum=cycle_momentum,
        max_lr=max_lr,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        power=power,
        lambdas=lambdas,
    )
    try:
        main = SCHEDULES[name](optimizer, span, **options)
    except ValueError as error:  # torch's own checks, e.g. momentum cycling without momentum
        raise UserError(f"scheduler: {name}: {error}") from None
    warmup = ramp()
    if warmup is not None:
        main = lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[span.warmup])
    return Schedule(optimizer, interval=interval, scheduler=main)


# ------------------------------------------------------------------------------------ schedule
class Schedule:
    """The LR schedule as the loop drives it: ``step_update()`` after every optimizer step,
    ``step_epoch(metrics)`` after every evaluation, whatever the schedule.

    ``interval`` decides which of the two advances ``scheduler`` (torch's, warmup included).
    ``plateau`` (``ReduceLROnPlateau``) decides on ``metrics[monitor]`` once ``warmup_steps``
    are over; the warmup is then the only thing ``scheduler`` does.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        interval: str = "step",
        scheduler: lr_scheduler.LRScheduler | None = None,
        plateau: lr_scheduler.ReduceLROnPlateau | None = None,
        monitor: str = "val/loss",
        warmup_steps: int = 0,
    ) -> None:
        self.optimizer, self.interval = optimizer, interval
        self.scheduler, self.plateau = scheduler, plateau
        self.monitor, self.warmup_steps = monitor, warmup_steps
        self.ticks = 0  # intervals done

    def step_update(self) -> None:
        """After an optimizer step: advances the schedule with ``interval: step``."""
        if self.interval == "step":
            self._tick()

    def step_epoch(self, metrics: Mapping[str, float] | None = None) -> None:
        """After an epoch's evaluation: advances the schedule with ``interval: epoch``; a
        plateau schedule also reads ``metrics[monitor]`` (without metrics: no decision)."""
        if self.interval == "epoch":
            self._tick()
        if self.plateau is not None and metrics is not None and self.ticks >= self.warmup_steps:
            self.plateau.step(metrics[self.monitor])

    def _tick(self) -> None:
        warming_up = self.ticks < self.warmup_steps
        if self.scheduler is not None and (self.plateau is None or warming_up):
            self.scheduler.step()
        self.ticks += 1

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ticks = state["ticks"]
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])


# -------------------------------------------------------------------------------------- lambda
class GroupLambdaLR(lr_scheduler.LambdaLR):
    """``LambdaLR`` with a function per parameter group, named by import path.

    ``lambdas`` is one ``"package.module:function"`` for every group, or a mapping whose keys
    are group names or globs over them, plus an optional ``default`` for the rest; the first key
    that matches wins. A group matches its ``name`` and its ``rule`` (the ``match`` of the
    ``optimizer.param_groups`` rule that made it), so ``fc.*`` also covers ``fc.*/no_decay``.
    A function takes the step (counted from the end of the warmup) and returns the factor for
    the group's base LR; one that also takes ``total_steps`` gets the length of the schedule.

    ``state_dict()`` leaves the functions out: they are named by the recipe, not saved, which
    keeps a checkpoint loadable with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, lambdas: str | Mapping[str, str], total_steps: int
    ) -> None:
        self.lambdas, self.total_steps = lambdas, total_steps
        groups = optimizer.param_groups
        if not isinstance(lambdas, str):
            unused = [
                key
                for key in lambdas
                if key != "default"
                and not any(_group_matches(group, index, key) for index, group in enumerate(groups))
            ]
            if unused:
                names = ", ".join(_group_name(group, i) for i, group in enumerate(groups))
                raise UserError(
                    f"scheduler.lambdas: {', '.join(map(repr, unused))} matches no "
                    f"parameter group; groups: {names}"
                )
        super().__init__(optimizer, [self._function(group, i) for i, group in enumerate(groups)])

    def _function(self, group: Mapping[str, Any], index: int) -> Callable[[int], float]:
        if isinstance(self.lambdas, str):
            path = self.lambdas
        else:
            path = next(
                (
                    path
                    for key, path in self.lambdas.items()
                    if key != "default" and _group_matches(group, index, key)
                ),
                self.lambdas.get("default"),
            )
        if path is None:
            raise UserError(
                f"scheduler.lambdas: no function for parameter group "
                f"{_group_name(group, index)!r}; add a `default` entry"
            )
        function = load_callable(path, key="scheduler.lambdas")
        try:
            takes_total = "total_steps" in inspect.signature(function).parameters
        except (TypeError, ValueError):  # builtins without a signature
            takes_total = False
        if takes_total:
            return functools.partial(function, total_steps=self.total_steps)
        return function

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        return state


def _group_name(group: Mapping[str, Any], index: int) -> str:
    return str(group.get("name", index))


def _group_matches(group: Mapping[str, Any], index: int, key: str) -> bool:
    name = _group_name(group, index)
    return key in (name, group.get("rule")) or fnmatch.fnmatchcase(name, key)


def load_callable(path: str, *, key: str) -> Callable[..., Any]:
    """The object ``"package.module:name"`` points at; ``key`` names the recipe key in errors."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(f"{key}: {path!r} is not an import path 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{key}: cannot import {module_name!r} ({error})") from None
    target = getattr(module, attribute, None)
    if not callable(target):
        raise UserError(f"{key}: {module_name} has no function {attribute!r}")
    return target
