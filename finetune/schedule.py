"""Learning-rate schedules built from torch's own schedulers, with an optional linear warmup.

Every schedule multiplies each parameter group's own base LR, so per-group learning rates from
``finetune.optim`` keep their ratios through warmup and decay. The loop calls ``scheduler.step()``
after ``optimizer.step()``: once per optimizer step (``interval: step``) or once per epoch.
"""

from __future__ import annotations

import math

import torch
from torch.optim import lr_scheduler


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    epochs: int,
    steps_per_epoch: int,
    interval: str = "step",
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.1,
    min_lr: float = 0.0,
    step_size: int = 10,
    gamma: float = 0.1,
) -> lr_scheduler.LRScheduler:
    """The scheduler for ``name`` (``none``, ``cosine``, ``step``), preceded by a warmup.

    Lengths are counted in the unit of ``interval``: with ``step``, ``epochs * steps_per_epoch``
    scheduler steps; ``step_size`` is always in epochs.
    """
    per_epoch = steps_per_epoch if interval == "step" else 1
    total = epochs * per_epoch
    warmup = min(math.ceil(warmup_epochs * per_epoch), total - 1) if warmup_epochs else 0
    remaining = total - warmup
    if name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(remaining, 1), eta_min=min_lr)
    elif name == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=step_size * per_epoch, gamma=gamma)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0,
                                 total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
