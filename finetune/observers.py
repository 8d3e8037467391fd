"""What watches a run from outside the loop: TensorBoard logging, a sweep's pruning.

``fit`` calls every observer at the start of an epoch, after every optimizer step and at the end
of an epoch (after its checkpoint is committed). An observer that wants the run to end raises
``StopRun`` from ``end_epoch``: the epoch's checkpoint is already safe, and the run ends with the
status it names (``summary.json``) instead of running its remaining epochs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StopRun(Exception):
    """Raised by ``Observer.end_epoch``: stop after this epoch, ending the run as ``status``."""

    def __init__(self, status: str, reason: str = "") -> None:
        super().__init__(reason or status)
        self.status = status
        self.reason = reason


class Observer:
    """Hooks of the training loop; each does nothing unless overridden.

    With several processes, ``fit`` calls the observers of each process; a stop asked by any
    of them stops all (the processes agree on it), so a rank-0-only observer may stop a run.
    """

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        """Epoch ``epoch`` of ``epochs`` starts (or, after a mid-epoch resume, continues); it
        has ``steps`` optimizer steps in all (a shorter last accumulation window is one)."""

    def after_step(self, step: int, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step ``step`` of the epoch was taken; ``loss`` is its last batch's loss (a
        device tensor: reading it waits for the device, so read it only when needed)."""

    def end_epoch(self, row: dict[str, Any], model: nn.Module) -> None:
        """The epoch's metrics row (as in ``metrics.jsonl``) and the unwrapped model."""
