"""The ``train:``, ``output:`` and ``export:`` sections: the loop's settings, where the run is
written, and the defaults of ``finetune export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator

from finetune.config.common import (
    NonNegativeFloat,
    PathValue,
    PositiveFloat,
    PositiveInt,
    Section,
)


class CheckpointEvery(Section):
    """Checkpoints within an epoch (one is always written at the end of every epoch): after
    every ``steps`` optimizer steps of an epoch, and/or ``minutes`` after the last one."""

    steps: PositiveInt | None = None
    minutes: PositiveFloat | None = 10.0  # a kill loses at most about this much training


class CachedViews(Section):
    """``train.cache_features: {views: K}``: with random augmentations, cache the features of K
    augmented views of every training image; epoch e trains on view (e - 1) mod K."""

    views: PositiveInt


class TrainConfig(Section):
    """The training loop's settings (``finetune.loop.fit`` and ``finetune.runtime``)."""

    epochs: PositiveInt = 10
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_accum_steps: PositiveInt = 1
    clip_grad_norm: PositiveFloat | None = None
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool | Literal["auto"] = "auto"  # torch.compile; auto: on for CUDA
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    sync_batchnorm: bool = False
    checkpoint_every: CheckpointEvery = CheckpointEvery()
    # Frozen backbone, deterministic inputs: compute features once (finetune.feature_cache);
    # {views: K} caches K augmented views of each training image for random augmentations.
    cache_features: bool | Literal["auto"] | CachedViews = "auto"
    cache_features_memory_gb: PositiveFloat = 4.0  # larger caches are memory-mapped

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind = value.split(":")[0]
        if kind not in {"auto", "cpu", "cuda", "mps"}:
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return value


class OutputConfig(Section):
    """Where the run folder goes, which metric picks the best weights, and TensorBoard logs."""

    dir: PathValue = Path("checkpoints")
    save_best: Literal["val/top1", "val/loss"] = "val/top1"
    tensorboard: bool = False  # event files in <run>/tensorboard (finetune.tensorboard_log)


ExportFormat = Literal["safetensors", "torchscript", "onnx", "pt2"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


class ExportConfig(Section):
    """Defaults of ``finetune export`` for this run; its command-line options override them."""

    fuse_bn: bool = True
    formats: Annotated[list[ExportFormat], Field(min_length=1)] = ["safetensors", "torchscript"]
    tolerance: NonNegativeFloat = 1e-4  # largest logit difference, relative to the largest |logit|
