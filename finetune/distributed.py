"""Several processes with PyTorch's own engine: torchrun, a process group, samplers that shard.

``finetune run RECIPE --nproc N`` re-launches itself under ``torchrun``; every process then runs
the same shared loop, with ``Runtime`` holding its rank. The samplers here give each process its
share of every epoch's one seeded permutation, so N processes with batch B see, step by step, the
same images as one process with batch N x B.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta

import torch
from torch.utils.data import Sampler

# A rank that dies makes the others fail at their next collective within this time, not hang.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=int(os.environ.get("FINETUNE_DIST_TIMEOUT_MIN", "10")))


def is_torchrun_child() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m finetune ARGV`` in ``nproc`` processes under torchrun; its exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "finetune",
        *argv,
    ]
    return subprocess.call(command)


def init_process_group(device: torch.device) -> None:
    """Join the job torchrun started: NCCL between GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        timeout=PROCESS_GROUP_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )


class ShuffleShardSampler(Sampler[int]):
    """Each epoch: a permutation seeded by ``seed + epoch``, cut to whole global batches' worth,
    and dealt round-robin to the ``world_size`` processes (rank r takes every r-th index).

    The tail that would not fill a batch on every process is dropped, so every process takes the
    same number of steps; a split no larger than one global batch is used whole. Call
    ``set_epoch`` before iterating.
    """

    def __init__(
        self, length: int, *, seed: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        global_batch = batch_size * world_size
        usable = length - length % global_batch if length > global_batch else length
        self.per_rank = usable // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self, generator: torch.Generator) -> list[int]:
        """All indices of this epoch, in the order they are dealt."""
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order[self.rank :: self.world_size][: self.per_rank])

    def __len__(self) -> int:
        return self.per_rank


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes indices r, r + world_size, ... with no padding or duplicates,
    so summed metrics reduced over processes equal a single-process evaluation."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
