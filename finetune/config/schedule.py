"""The ``scheduler:`` section: the LR schedule after an optional linear warmup."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from finetune.config.common import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Section

ScheduleName = Literal[
    "constant",
    "none",
    "step",
    "multistep",
    "exponential",
    "cosine",
    "plateau",
    "lambda",
    "cyclic",
    "onecycle",
    "poly",
]  # finetune.schedule.list_schedules()
LOGGED_METRICS = ("val/loss", "val/top1", "val/top5", "train/loss", "train/top1")
IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class SchedulerConfig(Section):
    """The LR schedule (``finetune.schedule.build_scheduler``), after an optional linear warmup.

    Lengths are in epochs (converted to optimizer steps with ``interval: step``); each key
    below says which schedules read it. Every schedule multiplies each group's own base LR.
    """

    name: ScheduleName = "cosine"  # none is constant
    interval: Literal["step", "epoch"] = "step"
    warmup_epochs: NonNegativeFloat = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 0  # instead of warmup_epochs, interval: step
    warmup_start_factor: Annotated[float, Field(gt=0, le=1)] = 0.1
    min_lr: NonNegativeFloat = 0.0  # cosine, plateau
    step_size: PositiveInt = 10  # step: epochs between decays
    milestones: Annotated[list[PositiveInt], Field(validate_default=True)] = []  # multistep
    cycle_epochs: PositiveFloat | None = None  # cosine: restart period; cyclic: cycle length
    cycle_mult: PositiveInt = 1  # cosine with restarts: each cycle this many times longer
    cycle_mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"  # cyclic
    cycle_momentum: bool = False  # cyclic, onecycle: also cycle momentum (or beta1), inversely
    # step, multistep: the factor at each decay (default 0.1); exponential, cyclic exp_range:
    # the factor per epoch (required)
    gamma: Annotated[PositiveFloat | None, Field(validate_default=True)] = None
    max_lr: Annotated[PositiveFloat | None, Field(validate_default=True)] = None  # cyclic, onecycle
    pct_start: Fraction = 0.3  # onecycle: share of the run spent rising
    div_factor: PositiveFloat = 25.0  # onecycle: starts at max_lr / div_factor
    final_div_factor: PositiveFloat = 1e4  # onecycle: ends at the start LR / final_div_factor
    power: PositiveFloat = 1.0  # poly
    monitor: str = "val/loss"  # plateau
    mode: Literal["auto", "min", "max"] = "auto"  # plateau; auto: max for accuracies
    factor: Fraction = 0.1  # plateau: LR factor on a plateau
    patience: Annotated[int, Field(ge=0)] = 10  # plateau: epochs without improvement first
    lambdas: Annotated[str | dict[str, str] | None, Field(validate_default=True)] = None  # lambda

    @field_validator("warmup_steps")
    @classmethod
    def _one_warmup(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("warmup_epochs"):
            raise ValueError("give warmup_epochs or warmup_steps, not both")
        if value and info.data.get("interval") == "epoch":
            raise ValueError("counts optimizer steps: use interval: step, or warmup_epochs")
        return value

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if info.data.get("name") == "multistep" and not value:
            raise ValueError(
                "multistep needs the epochs at which to multiply the LR by gamma, e.g. [30, 60]"
            )
        if any(later <= earlier for earlier, later in zip(value, value[1:], strict=False)):
            raise ValueError("epochs must be in increasing order, e.g. [30, 60]")
        warmup = info.data.get("warmup_epochs") or 0
        if value and value[0] <= warmup:
            raise ValueError(
                f"epochs count from the start of training: each must come after "
                f"the warmup (warmup_epochs {warmup:g})"
            )
        return value

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, value: float | None, info: ValidationInfo) -> float | None:
        name = info.data.get("name")
        needed = name == "exponential" or (
            name == "cyclic" and info.data.get("cycle_mode") == "exp_range"
        )
        if value is None and needed:
            raise ValueError(f"{name} needs the LR factor per epoch, e.g. 0.95")
        return value

    @field_validator("max_lr")
    @classmethod
    def _peak(cls, value: float | None, info: ValidationInfo) -> float | None:
        name = info.data.get("name")
        if value is None and name in ("onecycle", "cyclic"):
            raise ValueError(
                f"{name} needs the peak LR (of a group at optimizer.lr; other groups "
                "peak in proportion), e.g. 0.1: `finetune lr-find` helps choose it"
            )
        return value

    @field_validator("monitor")
    @classmethod
    def _logged(cls, value: str) -> str:
        if value not in LOGGED_METRICS:
            close = difflib.get_close_matches(value, LOGGED_METRICS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{value!r} is never logged; {hint}logged: {', '.join(LOGGED_METRICS)}"
            )
        return value

    @field_validator("lambdas")
    @classmethod
    def _import_paths(
        cls, value: str | dict[str, str] | None, info: ValidationInfo
    ) -> str | dict[str, str] | None:
        if value is None:
            if info.data.get("name") == "lambda":
                raise ValueError(
                    'the lambda schedule needs "package.module:function", or a '
                    "mapping of parameter groups to such paths with a default"
                )
            return value
        paths = [value] if isinstance(value, str) else list(value.values())
        bad = [path for path in paths if not re.match(IMPORT_PATH, path)]
        if bad:
            raise ValueError(f"not an import path 'package.module:function': {', '.join(bad)}")
        return value
