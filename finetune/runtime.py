"""The one place that knows the device, the precision and the process rank.

The training loop asks this object to move batches, to run the forward pass under autocast, to
scale the loss for fp16 and to step the optimizer; it never tests ``cuda`` itself. A distributed
run changes what this object holds, not the loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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


def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """``auto``: compile on CUDA, where the toolchain is there (on a CPU, inductor's C++ build
    takes minutes for what it saves). ``true`` where ``torch.compile`` cannot work is an error
    now, rather than at the first step of a run whose folder already exists."""
    if compile == "auto":
        return device.type == "cuda" and compile_unavailable(device) is None
    reason = compile_unavailable(device) if compile else None
    if reason is not None:
        raise UserError(f"train.compile: torch.compile cannot work here: {reason}; set it to false")
    return bool(compile)


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` with its default backend (inductor) cannot run on ``device``, or
    ``None``: TorchDynamo must support this Python, and inductor needs Triton for a GPU and a C++
    compiler (``$CXX``, else g++; clang++ on macOS) for the CPU."""
    import torch._dynamo  # a second or two to import: only when compiling

    if not torch._dynamo.is_dynamo_supported():
        return f"TorchDynamo does not support Python {sys.version.split()[0]} on {sys.platform}"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "inductor needs Triton on CUDA (pip install triton)"
        if torch.cuda.get_device_capability(device) < (7, 0):
            return f"Triton needs a GPU of compute capability 7.0 or newer ({device})"
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(compiler) is None:
            return f"inductor needs a C++ compiler on the CPU, and {compiler} was not found ($CXX)"
    return None


@dataclass
class Runtime:
    """Device, precision and process placement of one training process."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    rank: int = 0
    world_size: int = 1
    distributed: bool = False  # in a process group, the model wrapped in DDP (even alone)
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @classmethod
    def create(
        cls, *, device: str = "auto", precision: str = "auto", channels_last: bool | str = "auto"
    ) -> Runtime:
        """Resolve ``auto`` choices; under torchrun (``--nproc N``, one process included), join
        the process group and take the GPU of this process's ``LOCAL_RANK``."""
        from finetune.launch import is_torchrun_child

        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        resolved = resolve_device(device)
        distributed = world_size > 1 or is_torchrun_child()
        if distributed:
            from finetune.distributed import init_process_group

            if resolved.type == "cuda":
                resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(resolved)
            init_process_group(resolved)
        if channels_last == "auto":
            channels_last = resolved.type == "cuda"  # faster convolutions with tensor cores
        return cls(
            device=resolved,
            precision=resolve_precision(precision, resolved),
            channels_last=bool(channels_last),
            rank=rank,
            world_size=world_size,
            distributed=distributed,
        )

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    @property
    def backend(self) -> str | None:
        """The process group's backend (``nccl``, ``gloo``), or ``None`` in a single process."""
        return torch.distributed.get_backend() if self.distributed else None

    def prepare(
        self, model: nn.Module, sync_batchnorm: bool = False, compile: bool = False
    ) -> nn.Module:
        """Move the model to the device; with several processes, wrap it in DDP; with
        ``compile`` (``resolve_compile``), compile it for training.

        ``model.compile()`` compiles in place: the module returned is still the user's (or the
        DDP wrapper around it), so ``state_dict`` keys never carry ``_orig_mod.``. Under DDP the
        wrapper is compiled, as PyTorch recommends: TorchDynamo then splits the graph at DDP's
        gradient buckets so that their all-reduce overlaps the backward pass.
        """
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        model = model.to(self.device, memory_format=memory_format)
        if self.distributed:
            if sync_batchnorm:
                if self.device.type != "cuda":
                    raise UserError("train.sync_batchnorm: SyncBatchNorm needs CUDA devices")
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if compile:
            model.compile()  # inductor builds the graphs at the first training (and eval) step
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The user's model inside DDP, and inside the wrapper ``torch.compile(model)`` returns
        (a Python API user's): its state_dict keys carry no ``module.`` or ``_orig_mod.``."""
        model = getattr(model, "_orig_mod", model)
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def no_sync(self, model: nn.Module, accumulating: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on accumulation steps that do not step the optimizer."""
        if accumulating and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every process (e.g. the run folder, named from a timestamp)."""
        if not self.distributed:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def shutdown(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def to_device(
        self, images: torch.Tensor, labels: torch.Tensor
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

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        """Restore the fp16 loss scale. A run saved without loss scaling (fp32 or bf16, an empty
        state) and resumed in fp16, say on a GPU without bf16, starts from a fresh scale."""
        if state:
            self.scaler.load_state_dict(state)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        clip_grad_norm: float | None,
        norm: bool = False,
    ) -> torch.Tensor | None:
        """Unscale (fp16), clip, step and zero the gradients. Returns the gradients' total norm
        (a device tensor: reading it is left to the caller) when clipping computed it or
        ``norm`` asked for it, else ``None``."""
        if clip_grad_norm is None and not norm:
            total = None
        else:
            self.scaler.unscale_(optimizer)  # the true gradients (a no-op unless fp16)
            total = (
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                if clip_grad_norm is not None
                else gradient_norm(model.parameters(), self.device)
            )
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return total

    def agree(self, flag: bool) -> bool:
        """``flag`` on any process makes it true on every process (one tiny all-reduce per call
        with several processes; free with one)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes (identity in a single process)."""
        if self.distributed:
            torch.distributed.all_reduce(values)
        return values


def gradient_norm(parameters: Any, device: torch.device) -> torch.Tensor:
    """The 2-norm of all gradients together, computed on the device (no host sync)."""
    norms = [
        torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
        for p in parameters
        if p.grad is not None
    ]
    if not norms:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(norms))


# ---------------------------------------------------------------------------- random generators
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CUDA's too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The random generators that training draws from (python, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``rng_state`` returned (also after a round trip through ``torch.save``)."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
