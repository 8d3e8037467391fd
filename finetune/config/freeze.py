"""The ``freeze:`` section: which parameters stay fixed, and when frozen ones start training."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from finetune.config.common import PositiveFloat, PositiveInt, Section


class UnfreezeStep(Section):
    """At the start of ``epoch`` (1-based), frozen parameters matching ``patterns`` start training.

    Without ``lr`` they get the values the optimizer's parameter-group rules give them.
    """

    epoch: PositiveInt
    patterns: Annotated[list[str], Field(min_length=1)]
    lr: PositiveFloat | None = None


class FreezeConfig(Section):
    """Which parameters stay fixed (``finetune.freeze``)."""

    patterns: list[str] = []
    until: str | None = None  # a stage name (timm's feature_info), e.g. layer3: freeze all before
    batchnorm: Literal["train", "frozen"] = "train"
    unfreeze: list[UnfreezeStep] = []
