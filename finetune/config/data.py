"""The ``data:`` section: sources, image size, transforms, normalisation and loading."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from finetune.config.augment import DETERMINISTIC, Augmentation, Augmentations, FlipArgs
from finetune.config.common import Fraction, PositiveFloat, PositiveInt, Section, validated
from finetune.config.sources import DataSource


class NormalizeStats(Section):
    """Per-channel (R, G, B) mean and std on the 0-1 pixel scale, as ``finetune stats`` prints."""

    mean: Annotated[list[float], Field(min_length=3, max_length=3)]
    std: Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]

    @model_validator(mode="after")
    def _unit_scale(self) -> NormalizeStats:
        if not all(0 <= m <= 1 for m in self.mean) or not all(s <= 1 for s in self.std):
            raise ValueError(
                "mean and std are on the 0-1 pixel scale (ImageNet's mean is "
                "[0.485, 0.456, 0.406]); divide 0-255 values by 255"
            )
        return self


NORMALIZE_CHOICES = ("auto", "imagenet", "dataset", "none")
CLASS_WEIGHT_CHOICES = ("none", "balanced")


class DataConfig(Section):
    """The ``data:`` section (``finetune.data``): sources, transforms and loading."""

    train: DataSource
    val: DataSource | None = None
    val_split: Fraction | None = None
    test: DataSource | None = None  # evaluated once, with the best weights, after training
    image_size: PositiveInt = 224
    crop_pct: Annotated[float, Field(gt=0, le=1)] = 0.875
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt | None = None
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    persistent_workers: bool = True  # keep loader processes alive from one epoch to the next
    prefetch_factor: PositiveInt | None = None  # batches each worker prepares ahead (torch: 2)
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    class_weights: Literal["none", "balanced"] | list[PositiveFloat] = "none"
    on_bad_image: Literal["error", "skip"] = "error"
    verify: Literal["header", "full", "none"] = "header"  # each image checked before the run
    augment: Augmentations = [Augmentation("hflip", FlipArgs())]
    eval_transforms: Augmentations = []  # resize / center_crop for evaluation
    normalize: Literal["auto", "imagenet", "dataset", "none"] | NormalizeStats = "auto"
    cache: Literal["none", "memory"] = "none"  # memory: decode and resize each image once
    cache_max_ram_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5  # refuse a larger cache

    @field_validator("eval_transforms")
    @classmethod
    def _deterministic(cls, value: list[Augmentation]) -> list[Augmentation]:
        random = [item.name for item in value if not item.spec.deterministic]
        if random:
            raise ValueError(
                f"evaluation transforms must be deterministic: only "
                f"{' and '.join(DETERMINISTIC)}, not {', '.join(random)}"
            )
        return value

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_choice(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return validated(NormalizeStats, value, "")
        if value not in NORMALIZE_CHOICES:
            raise ValueError(
                f"expected {' | '.join(NORMALIZE_CHOICES)} or {{mean: [r, g, b], std: [r, g, b]}}"
            )
        return value

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weight_choice(cls, value: Any, info: ValidationInfo) -> Any:
        valid_list = isinstance(value, list) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in value
        )
        if not valid_list and value not in CLASS_WEIGHT_CHOICES:
            raise ValueError(
                f"expected {' | '.join(CLASS_WEIGHT_CHOICES)} or a list of positive "
                "weights, one per class"
            )
        if value != "none" and info.data.get("sampler") == "balanced":
            raise ValueError(
                "data.sampler: balanced already corrects for class imbalance; use one of the two"
            )
        return value

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataConfig:
        if self.val is None and self.val_split is None:
            raise ValueError("give data.val (a source) or data.val_split (a fraction of train)")
        if self.val is not None and self.val_split is not None:
            raise ValueError("give data.val or data.val_split, not both")
        return self
