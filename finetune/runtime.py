"""The one place that knows the device, the precision and the process rank.

The training loop asks this object to move batches, to run the forward pass under autocast, to
scale the loss for fp16 and to step the optimizer; it never tests ``cuda`` itself. A distributed
run changes what this object holds, not the loop.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from finetune.errors import UserError

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device: {device} asked for, but CUDA is not available here")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"train.device: {device} asked for, but MPS is not available here")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it, else fp16 on CUDA; fp32 on CPU and MPS."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise UserError("train.precision: fp16 autocast is for GPUs; use bf16 or fp32 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@dataclass
class Runtime:
    """Device, precision and process placement of one training process."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    rank: int = 0
    world_size: int = 1
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @classmethod
    def create(cls, *, device: str = "auto", precision: str = "auto",
               channels_last: bool | str = "auto") -> Runtime:
        resolved = resolve_device(device)
        if channels_last == "auto":
            channels_last = resolved.type == "cuda"  # faster convolutions with tensor cores
        return cls(device=resolved, precision=resolve_precision(precision, resolved),
                   channels_last=bool(channels_last), rank=int(os.environ.get("RANK", 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def prepare(self, model: nn.Module) -> nn.Module:
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=memory_format)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        # non_blocking overlaps the copy with compute when the loader pinned the memory.
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISION_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module,
             clip_grad_norm: float | None) -> None:
        """Unscale (fp16), clip, step and zero the gradients."""
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (identity in a single process)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
        return values
