"""Several processes with PyTorch's own engine: torchrun, a process group, samplers that shard.

``finetune run RECIPE --nproc N`` re-launches itself under ``torchrun``; every process then runs
the same shared loop, with ``Runtime`` holding its rank. The samplers here give each process its
share of every epoch's one seeded permutation, so N processes with batch B see, step by step, the
same images as one process with batch N x B. They yield ``SampleKey``s: indices that also name the
draw, from which ``finetune.data.Split`` seeds each image's augmentations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import torch
from torch.utils.data import Sampler

# A rank that dies makes the others fail at their next collective within this time, not hang.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=int(os.environ.get("FINETUNE_DIST_TIMEOUT_MIN", "10")))


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


class SampleKey(int):
    """A dataset index drawn by a training sampler, naming its draw: the sampler's ``seed``, the
    ``epoch`` and its ``position`` in the epoch's order (over all processes).

    It indexes any dataset as the plain int it is; ``finetune.data.Split`` also seeds the image's
    random augmentations from ``rng_seed()``, so they depend on (seed, epoch, position) only: not
    on the number of loader workers, on persistent workers, or on a resume.
    """

    seed: int
    epoch: int
    position: int

    def __new__(cls, index: int, seed: int, epoch: int, position: int) -> SampleKey:
        key = super().__new__(cls, index)
        key.seed, key.epoch, key.position = seed, epoch, position
        return key

    def __reduce__(self) -> tuple[type, tuple[int, int, int, int]]:  # to loader workers
        return SampleKey, (int(self), self.seed, self.epoch, self.position)

    def __repr__(self) -> str:
        return f"SampleKey({int(self)}, seed={self.seed}, epoch={self.epoch}, pos={self.position})"

    def rng_seed(self, stream: int = 0) -> int:
        """A 64-bit seed from (seed, epoch, position, stream): stream 0 for the image's
        transforms, 1 for the randomness of the batch it opens (mixup, cutmix)."""
        entropy = [self.seed & 0xFFFF_FFFF_FFFF_FFFF, self.epoch, self.position, stream]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class ShuffleShardSampler(Sampler[int]):
    """Each epoch: a permutation seeded by ``seed + epoch``, cut to whole global batches' worth,
    and dealt round-robin to the ``world_size`` processes (rank r takes every r-th index).

    The tail that would not fill a batch on every process is dropped, so every process takes the
    same number of steps; a split no larger than one global batch is used whole. Call
    ``set_epoch`` before iterating; its ``start`` skips the first items of this process's share
    (a run resumed within an epoch continues with the very next batch). The indices are
    ``SampleKey``s carrying (seed, epoch, position in the epoch's order).
    """

    def __init__(
        self, length: int, *, seed: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        global_batch = batch_size * world_size
        usable = length - length % global_batch if length > global_batch else length
        self.per_rank = usable // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_order(self, generator: torch.Generator) -> list[int]:
        """All indices of this epoch, in the order they are dealt."""
        return torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        order = self.epoch_order(torch.Generator().manual_seed(self.seed + self.epoch))
        mine = range(self.rank, len(order), self.world_size)[self.start : self.per_rank]
        return (SampleKey(order[p], self.seed, self.epoch, p) for p in mine)

    def __len__(self) -> int:
        return self.per_rank - self.start


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes indices r, r + world_size, ... with no padding or duplicates,
    so summed metrics reduced over processes equal a single-process evaluation."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
