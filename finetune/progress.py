"""What a run shows while training: a rich progress bar on a terminal, a line per epoch in logs."""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    import torch

STATS_INTERVAL_S = 0.5


def format_row(row: dict[str, Any]) -> str:
    """``epoch 2/5  train/loss 0.412  val/top1 91.3% ...`` from a metrics row."""
    parts = [f"epoch {row['epoch']}/{row['epochs']}"]
    for key, value in row.items():
        if key in {"epoch", "epochs"} or key.startswith("lr/"):
            continue
        if "top" in key:
            parts.append(f"{key} {value:.1%}")
        elif key == "lr":
            parts.append(f"lr {value:.3g}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


class EpochProgress:
    """Per-batch progress inside an epoch; silent except for epoch lines when not a terminal."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console()
        self.interactive = enabled and sys.stdout.isatty()
        self._progress: Progress | None = None
        self._task = None
        self._batches, self._stats, self._stats_time = 0, "", -math.inf

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        if not self.interactive:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=batches, stats="")
        self._batches, self._stats, self._stats_time = batches, "", -math.inf

    def update(self, batches_done: int, sums: torch.Tensor, images: int, seconds: float) -> None:
        """Advance the bar. ``sums`` (loss x images, correct) may live on the GPU: reading it
        waits for the GPU to catch up, so it is read at most every ``STATS_INTERVAL_S``."""
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._stats_time >= STATS_INTERVAL_S or batches_done == self._batches:
            loss, top1 = (sums / images).tolist()
            self._stats = f"loss {loss:.4f}  acc {top1:.1%}  {images / seconds:.0f} img/s"
            self._stats_time = now
        self._progress.update(self._task, completed=batches_done, stats=self._stats)

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.enabled:
            self.console.print(format_row(row), highlight=False, soft_wrap=True)
