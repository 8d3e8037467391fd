"""Live curves in TensorBoard (``output.tensorboard: true``): event files in ``<run>/tensorboard``.

Everything is logged against one x-axis, the run's optimizer step (``(epoch - 1) x
steps_per_epoch + step``), so per-step and per-epoch curves line up and a resume can cut back
all of them at once:

- every optimizer step: ``step/loss`` (the loss of the step's last batch, on the main process)
  and ``step/lr/<group>`` (the LR each parameter group took that step with);
- every epoch, at its last step: each number of the epoch's ``metrics.jsonl`` row under its own
  name (``train/loss``, ``val/top1``, ``lr/<group>``, ``img_per_s``, ...) and a histogram of
  every trainable parameter (``weights/<name>``);
- once, at step 0: ``train/first_batch``, a grid of the first training batch as the model sees
  it (augmented, mixed), de-normalised.

The step losses are device tensors: reading one waits for the device. They are kept on the
device and read all at once every ``READ_SECONDS`` and at each epoch end, so a GPU run gets no
host sync per step. A resumed run tells TensorBoard to drop what the interrupted one logged after
its checkpoint (``purge_step``): no step appears twice. The ``tensorboard`` package is an
optional extra (``pip install 'finetune[tensorboard]'``), imported only when a run asks for it.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from torchvision.utils import make_grid

from finetune.build import Built
from finetune.errors import UserError
from finetune.loop import LoopState, group_lrs
from finetune.observers import Observer
from finetune.run_folder import RunFolder
from finetune.stats import Normalization

READ_SECONDS = 10.0  # step losses wait on the device at most this long before being written
FLUSH_SECONDS = 10  # how often the writer's thread puts what it was given into the event file
NOT_SCALARS = {"epoch", "epochs", "lr"}  # row keys that are the x-axis, or a copy of lr/<group>


def require_tensorboard() -> None:
    """Raise ``UserError`` unless ``torch.utils.tensorboard`` can be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError(
            "output.tensorboard: true needs the tensorboard package; install it with "
            "pip install 'finetune[tensorboard]' (or set output.tensorboard: false)"
        ) from None


class TensorBoardLog(Observer):
    """Writes a run's curves, weight histograms and first batch to TensorBoard event files.

    Args:
        log_dir: the folder of the event files (one TensorBoard run).
        optimizer: the optimizer the loop steps; its groups' LRs are read at every epoch start
            and after every step (the LRs of the next step).
        steps_per_epoch: optimizer steps in an epoch.
        start: optimizer steps already taken (a resume): what was logged after them is dropped.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        optimizer: torch.optim.Optimizer,
        steps_per_epoch: int,
        start: int = 0,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Drop what an interrupted run logged after step `start`; all of it when starting over
        # (the first batch is logged again).
        purge = start + 1 if start else 0
        self.writer = SummaryWriter(str(log_dir), purge_step=purge, flush_secs=FLUSH_SECONDS)
        self.optimizer, self.steps_per_epoch = optimizer, steps_per_epoch
        self.epoch = 1  # set by start_epoch
        self.lrs = group_lrs(optimizer)  # what the next step takes
        self.pending: list[tuple[int, torch.Tensor, dict[str, float]]] = []
        self.last_read = time.monotonic()

    def add_first_batch(self, images: torch.Tensor, normalization: Normalization) -> None:
        """``images`` (normalised, as the model takes them) as one grid at step 0."""
        grid = make_grid(denormalize(images, normalization))  # 8 images a row
        self.writer.add_image("train/first_batch", grid, 0)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        # After the last epoch's schedule step and this epoch's unfreezing: its first step's LRs.
        self.epoch, self.lrs = epoch, group_lrs(self.optimizer)

    def after_step(self, step: int, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        at = (self.epoch - 1) * self.steps_per_epoch + step
        self.pending.append((at, loss.detach().float(), self.lrs))
        self.lrs = group_lrs(optimizer)
        if time.monotonic() - self.last_read >= READ_SECONDS:
            self._write_steps()

    def end_epoch(self, row: dict[str, Any], model: nn.Module) -> None:
        self._write_steps()
        step = row["epoch"] * self.steps_per_epoch  # the epoch's last step
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in NOT_SCALARS:
                    self.writer.add_scalar(key, value, step)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:  # frozen weights draw the same histogram every epoch
                self.writer.add_histogram(f"weights/{name}", parameter.detach().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        """Write the steps not yet written, and close the event file."""
        self._write_steps()
        self.writer.close()

    def _write_steps(self) -> None:
        if self.pending:
            losses = torch.stack([loss for _, loss, _ in self.pending]).tolist()  # one host sync
            for (step, _, lrs), loss in zip(self.pending, losses, strict=True):
                self.writer.add_scalar("step/loss", loss, step)
                for name, lr in lrs.items():
                    self.writer.add_scalar(f"step/lr/{name}", lr, step)
            self.pending.clear()
        self.last_read = time.monotonic()


def tensorboard_log(
    built: Built, run: RunFolder, state: LoopState, *, enabled: bool
) -> TensorBoardLog | None:
    """The run's ``TensorBoardLog`` in ``<run>/tensorboard`` when ``enabled``
    (``output.tensorboard``), on the main process only, continuing from ``state``; ``None``
    otherwise."""
    if not (enabled and built.runtime.is_main):
        return None
    assert built.datasets is not None and built.train_loader is not None
    start = state.epoch * built.steps_per_epoch + state.position.step
    log = TensorBoardLog(
        run.tensorboard,
        optimizer=built.optimizer,
        steps_per_epoch=built.steps_per_epoch,
        start=start,
    )
    if start == 0:
        log.add_first_batch(first_batch(built.train_loader), built.datasets.normalization)
    return log


def first_batch(loader: DataLoader, epoch: int = 1) -> torch.Tensor:
    """The images of the first batch ``loader`` gives in ``epoch``, made without iterating it.

    The sampler's order and every augmentation (per image, and mixup/cutmix per batch) are
    seeded by (seed, epoch, position): indexing the dataset with the keys a copy of the sampler
    yields gives the very batch training will take, and draws nothing from the loader.
    """
    sampler = copy.copy(loader.sampler)  # set_epoch on the loader's own would move its start
    sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    indices = next(iter(BatchSampler(sampler, loader.batch_size or 1, loader.drop_last)))
    dataset = loader.dataset
    getitems = getattr(dataset, "__getitems__", None)  # as the DataLoader fetches a batch
    samples = getitems(indices) if getitems else [dataset[i] for i in indices]
    images, _ = loader.collate_fn(samples)
    return images


def denormalize(images: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """Images in [0, 1] from images normalised with ``normalization``'s mean and std."""
    if normalization.mean is not None and normalization.std is not None:
        mean = torch.tensor(normalization.mean).view(1, -1, 1, 1)
        std = torch.tensor(normalization.std).view(1, -1, 1, 1)
        images = images * std + mean
    return images.clamp(0, 1)
