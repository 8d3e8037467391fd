"""What a run shows while training: a rich progress bar on a terminal, a line per epoch in logs."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


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

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        if not self.interactive:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=batches, stats="")

    def update(self, loss: float, top1: float, images_per_second: float) -> None:
        if self._progress is not None:
            stats = f"loss {loss:.4f}  acc {top1:.1%}  {images_per_second:.0f} img/s"
            self._progress.update(self._task, advance=1, stats=stats)

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.enabled:
            self.console.print(format_row(row), highlight=False, soft_wrap=True)
