"""`output.tensorboard: true`: curves, histograms and the first batch, read back from the event
files; a resume that repeats no step; a clear error when the package is missing."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.utils import make_grid
from typer.testing import CliRunner

from finetune import Recipe, run
from finetune.build import build
from finetune.cli import app
from finetune.observers import Observer
from tests.conftest import tiny_recipe, write_recipe

STEPS = 3  # optimizer steps per epoch: 24 images, batch 8


def _recipe(tmp_path, **sections) -> Recipe:
    recipe = tiny_recipe(output={"dir": str(tmp_path / "ckpt"), "tensorboard": True}, **sections)
    return Recipe.load(write_recipe(tmp_path / "r.yaml", recipe))


def _events(path) -> EventAccumulator:
    """Everything TensorBoard shows for ``path`` (a folder, or one event file)."""
    keep_all = {"scalars": 0, "images": 0, "histograms": 0}
    return EventAccumulator(str(path), size_guidance=keep_all).Reload()


def _steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def _lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


class LRsAfterEachStep(Observer):
    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []

    def after_step(self, step, loss, optimizer) -> None:
        self.lrs.append(_lrs(optimizer))


def test_a_run_logs_steps_epochs_weights_and_the_first_batch_as_the_model_sees_it(tmp_path):
    recipe = _recipe(
        tmp_path,
        data={**tiny_recipe()["data"], "augment": ["hflip", "random_resized_crop", "mixup"]},
        optimizer={"name": "sgd", "lr": 0.05, "param_groups": [{"match": "fc.*", "lr_mult": 10}]},
        scheduler={"name": "cosine", "warmup_epochs": 1},  # an LR that moves every step
    )
    built = build(recipe)  # the same seed: the same batches as the run's
    first_lrs = _lrs(built.optimizer)
    built.train_loader.sampler.set_epoch(1)
    batch, _ = next(iter(built.train_loader))  # what the model is given at its first step
    after = LRsAfterEachStep()
    result = run(recipe, run_dir=tmp_path / "run", observers=[after])
    events = _events(tmp_path / "run" / "tensorboard")
    rows = result.run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in rows.read_text().splitlines()]

    # Per step: the loss, and the LR each group took that step with (after step s, the
    # optimizer holds the LRs of step s + 1).
    assert _steps(events, "step/loss") == [1, 2, 3, 4, 5, 6]
    for epoch, row in enumerate(rows):
        losses = [event.value for event in events.Scalars("step/loss")][epoch * STEPS :][:STEPS]
        assert np.mean(losses) == pytest.approx(row["train/loss"], rel=1e-5)  # equal batches
    for group in ("default", "fc.*"):
        logged = [event.value for event in events.Scalars(f"step/lr/{group}")]
        expected = [lrs[group] for lrs in [first_lrs, *after.lrs[:-1]]]
        assert logged == pytest.approx(expected, rel=1e-6)
        assert len(set(logged)) == len(logged)

    # Per epoch, at its last step: every number of the metrics row.
    numbers = {k for k, v in rows[0].items() if isinstance(v, (int, float))}
    assert numbers - {"epoch", "epochs", "lr"} <= set(events.Tags()["scalars"])
    for key in numbers - {"epoch", "epochs", "lr"}:
        assert _steps(events, key) == [STEPS, 2 * STEPS]
        logged = [event.value for event in events.Scalars(key)]
        assert logged == pytest.approx([row[key] for row in rows], rel=1e-6), key

    # Weight histograms: the last one is of the final weights.
    final = load_file(result.run_dir / "last" / "model.safetensors")
    trained = [name for name, _ in built.network.model.named_parameters()]  # all: none frozen
    assert set(events.Tags()["histograms"]) == {f"weights/{name}" for name in trained}
    for name in trained:
        histograms = events.Histograms(f"weights/{name}")
        assert [event.step for event in histograms] == [STEPS, 2 * STEPS]
        last = histograms[-1].histogram_value
        weights = final[name]
        assert last.num == weights.numel()
        assert (last.min, last.max) == pytest.approx((weights.min().item(), weights.max().item()))

    # The first batch, augmented and mixed, de-normalised with the run's mean and std.
    (image,) = events.Images("train/first_batch")
    assert image.step == 0
    logged = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    norm = json.loads((result.run_dir / "normalization.json").read_text())
    mean, std = (torch.tensor(norm[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    grid = make_grid((batch * std + mean).clamp(0, 1)).permute(1, 2, 0).numpy()
    assert logged.shape == grid.shape
    assert np.abs(logged / 255 - grid).max() <= 1 / 255 + 1e-6

    # Making the grid drew nothing from the loader: without logs, the run trains the same.
    plain = Recipe.load(tmp_path / "r.yaml", overrides={"output.tensorboard": False})
    run(plain, run_dir=tmp_path / "plain")
    assert not (tmp_path / "plain" / "tensorboard").exists()
    for name, tensor in load_file(tmp_path / "plain" / "last" / "model.safetensors").items():
        assert torch.equal(tensor, final[name]), name


class KillAt(Observer):
    """Stops the process at a given step of an epoch, before that step's checkpoint."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at, self.epoch = (epoch, step), 0

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch = epoch

    def after_step(self, step, loss, optimizer) -> None:
        if (self.epoch, step) == self.at:
            raise KeyboardInterrupt


def test_a_resumed_run_drops_the_steps_logged_after_its_checkpoint(tmp_path):
    """Killed at epoch 2, step 2 (run step 5) after a checkpoint at step 4: step 5 was logged
    twice, once by each process; TensorBoard shows every step once."""
    recipe = _recipe(tmp_path, train={"device": "cpu", "checkpoint_every": {"steps": 1}})
    with pytest.raises(KeyboardInterrupt):
        run(recipe, run_dir=tmp_path / "run", observers=[KillAt(epoch=2, step=2)])
    log = tmp_path / "run" / "tensorboard"
    (killed,) = log.iterdir()
    assert _steps(_events(killed), "step/loss") == [1, 2, 3, 4, 5]

    run(recipe, resume=tmp_path / "run")
    assert len(list(log.iterdir())) == 2
    events = _events(log)
    assert _steps(events, "step/loss") == [1, 2, 3, 4, 5, 6]
    assert _steps(events, "step/lr/default") == [1, 2, 3, 4, 5, 6]
    assert _steps(events, "val/top1") == [STEPS, 2 * STEPS]
    assert [event.step for event in events.Images("train/first_batch")] == [0]
    assert [event.step for event in events.Histograms("weights/fc.weight")] == [3, 6]


def test_without_the_package_the_run_exits_2_naming_the_key_and_leaves_no_folder(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    recipe = tiny_recipe(output={"dir": str(tmp_path / "ckpt"), "tensorboard": True})
    result = CliRunner().invoke(app, ["run", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 2, result.output
    assert "output.tensorboard" in result.output and "finetune[tensorboard]" in result.output
    assert not (tmp_path / "ckpt").exists()
