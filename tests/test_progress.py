"""What a run shows while it trains: the progress bar on a terminal, one line per epoch in logs."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from rich.console import Console

from finetune.progress import EpochProgress, format_row


class _CountingSums:
    """Stands in for the loop's device tensor of sums and counts how often it is read."""

    def __init__(self) -> None:
        self.reads = 0

    def __truediv__(self, images: int) -> torch.Tensor:
        self.reads += 1
        return torch.tensor([0.5, 0.25])


def test_the_progress_bar_reads_the_running_sums_a_few_times_not_every_batch():
    """Reading device values waits for the GPU: the bar does it at most every 0.5 s, and once
    at the end of the epoch, however many batches there are."""
    progress = EpochProgress(console=Console(file=io.StringIO(), force_terminal=True))
    progress.interactive = True
    sums = _CountingSums()
    progress.start_epoch(1, 1, batches=1000)
    for batch in range(1, 1001):
        progress.update(batch, sums, images=8 * batch, seconds=1.0)
    progress.end_epoch({"epoch": 1, "epochs": 1})
    assert 2 <= sums.reads <= 10  # the first batch, the last, and about twice a second between


def _rows(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "epochs": epochs,
            "train/loss": 1.0 / e,
            "val/top1": 0.5 + e / 10,
            "lr": 0.01,
            "lr/backbone": 0.001,
            "seconds": 2.5,
        }
        for e in range(1, epochs + 1)
    ]


def test_not_on_a_terminal_one_line_per_epoch(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a log file, not a terminal
    out = io.StringIO()
    progress = EpochProgress(console=Console(file=out))
    assert not progress.interactive
    sums = _CountingSums()
    for row in _rows(3):
        progress.start_epoch(row["epoch"], 3, batches=50)
        for batch in range(1, 51):
            progress.update(batch, sums, images=8 * batch, seconds=1.0)
        progress.end_epoch(row)
    assert sums.reads == 0  # no bar, so nothing waits for the device
    lines = out.getvalue().splitlines()
    assert lines == [
        "epoch 1/3  train/loss 1  val/top1 60.0%  lr 0.01  seconds 2.5",
        "epoch 2/3  train/loss 0.5  val/top1 70.0%  lr 0.01  seconds 2.5",
        "epoch 3/3  train/loss 0.3333  val/top1 80.0%  lr 0.01  seconds 2.5",
    ]


def test_a_long_epoch_line_is_not_wrapped(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    out = io.StringIO()
    progress = EpochProgress(console=Console(file=out, width=40))
    row = {"epoch": 1, "epochs": 1, **{f"val/class_{i}_loss": 0.25 for i in range(10)}}
    progress.end_epoch(row)
    assert out.getvalue().count("\n") == 1 and "val/class_9_loss 0.25" in out.getvalue()


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    progress = EpochProgress(enabled=False, console=Console(file=out, force_terminal=True))
    assert not progress.interactive
    progress.start_epoch(1, 1, batches=2)
    progress.update(1, _CountingSums(), images=8, seconds=1.0)
    progress.end_epoch(_rows(1)[0])
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    "row, text",
    [
        ({"epoch": 2, "epochs": 5, "train/loss": 0.41234}, "epoch 2/5  train/loss 0.4123"),
        ({"epoch": 1, "epochs": 1, "val/top5": 0.9876}, "epoch 1/1  val/top5 98.8%"),
        ({"epoch": 1, "epochs": 1, "lr": 3.14159e-4, "lr/head": 0.1}, "epoch 1/1  lr 0.000314"),
        ({"epoch": 1, "epochs": 1, "train/skipped_images": 3}, "epoch 1/1  train/skipped_images 3"),
    ],
)
def test_format_row(row, text):
    assert format_row(row) == text
