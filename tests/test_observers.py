"""Observers see every epoch start, optimizer step and metrics row; one may end a run early."""

from __future__ import annotations

import json

import torch

from finetune import Recipe, run
from finetune.observers import Observer, StopRun
from tests.conftest import tiny_recipe, write_recipe


class Recorder(Observer):
    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple] = []
        self.stop_after = stop_after

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.events.append(("start", epoch, epochs, steps))

    def after_step(self, step, loss, optimizer) -> None:
        assert isinstance(loss, torch.Tensor) and optimizer.param_groups
        self.events.append(("step", step))

    def end_epoch(self, row, model) -> None:
        self.events.append(("end", row["epoch"], row["train/loss"]))
        if row["epoch"] == self.stop_after:
            raise StopRun("pruned", "the median pruner said so")


def _recipe(tmp_path, epochs: int) -> Recipe:
    recipe = tiny_recipe(train={"epochs": epochs, "device": "cpu"})  # 24 images, batch 8
    return Recipe.load(write_recipe(tmp_path / "r.yaml", recipe))


def test_observer_sees_each_epoch_step_and_row_in_order(tmp_path):
    recorder = Recorder()
    result = run(_recipe(tmp_path, 2), run_dir=tmp_path / "run", observers=[recorder])
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [("step", n) for n in (1, 2, 3)]
    assert recorder.events == [
        ("start", 1, 2, 3),
        *steps,
        ("end", 1, rows[0]["train/loss"]),
        ("start", 2, 2, 3),
        *steps,
        ("end", 2, rows[1]["train/loss"]),
    ]
    assert result.summary["status"] == "completed"


def test_stop_run_ends_after_the_epochs_checkpoint_with_its_status(tmp_path):
    recorder = Recorder(stop_after=1)
    result = run(_recipe(tmp_path, 3), run_dir=tmp_path / "run", observers=[recorder])
    assert [event for event in recorder.events if event[0] == "start"] == [("start", 1, 3, 3)]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == result.summary["status"] == "pruned"
    assert summary["epochs"] == 1
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()
