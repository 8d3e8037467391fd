"""The ``optimizer:`` section: the optimizer, its LR scaling and the parameter-group rules."""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finetune.config.common import (
    AsTuple,
    Fraction,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Section,
)


class ParamGroupRule(Section):
    """Parameters whose name matches ``match`` (a glob) get these values; first match wins."""

    match: str
    lr: PositiveFloat | None = None
    lr_mult: PositiveFloat | None = None
    weight_decay: NonNegativeFloat | None = None

    @model_validator(mode="after")
    def _lr_or_mult(self) -> ParamGroupRule:
        if self.lr is not None and self.lr_mult is not None:
            raise ValueError("give lr or lr_mult, not both")
        return self


# torch's own optimizers (finetune.optim.OPTIMIZERS has their classes); any other name is looked
# up in timm's registry.
TORCH_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta")


def list_optimizers() -> list[str]:
    """Every ``optimizer.name``: torch's, then the rest of timm's registry (imports timm)."""
    from timm.optim import list_optimizers as timm_optimizers

    return [
        *TORCH_OPTIMIZERS,
        *(name for name in timm_optimizers() if name not in TORCH_OPTIMIZERS),
    ]


def _known_optimizer(name: str) -> str:
    """torch's names pass at once; any other is looked up in timm's registry (importing timm)."""
    if name in TORCH_OPTIMIZERS:
        return name
    known = list_optimizers()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown optimizer{hint} torch's: {', '.join(TORCH_OPTIMIZERS)}; "
            f"timm's: {', '.join(known[len(TORCH_OPTIMIZERS) :])}"
        )
    return name


def _lr_or_auto(value: Any) -> float | str:
    """A positive number, or ``auto``: ``finetune run`` finds it with the LR range test first."""
    if value == "auto":
        return value
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise ValueError(
            "a positive number, or auto (found by the LR range test, as `finetune lr-find` runs it)"
        )
    return number


def _options_without_own_keys(options: dict[str, Any]) -> dict[str, Any]:
    own = sorted(set(options) & (set(OptimizerConfig.model_fields) | {"params"}))
    if own:
        raise ValueError(f"{', '.join(own)} has its own key: optimizer.{own[0]}")
    return options


class OptimizerConfig(Section):
    """The optimizer (``finetune.optim.build_optimizer``); unset options keep its own defaults.

    ``name`` is one of torch's (sgd, adam, adamw, rmsprop, adagrad, adadelta) or any name in
    timm's optimizer registry (lamb, lion, adan, ...). Options the chosen optimizer does not
    take are reported when it is built; ``options`` passes any other keyword argument through.
    """

    name: Annotated[str, AfterValidator(_known_optimizer)] = "sgd"
    lr: Annotated[float | Literal["auto"], PlainValidator(_lr_or_auto)] = 0.01
    weight_decay: NonNegativeFloat = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] | None = None
    dampening: Annotated[float, Field(ge=0, le=1)] | None = None  # sgd
    nesterov: bool | None = None  # sgd
    betas: Annotated[tuple[Fraction, ...], AsTuple, Field(min_length=2, max_length=3)] | None = None
    eps: PositiveFloat | None = None
    alpha: Fraction | None = None  # rmsprop: smoothing of the squared gradients
    centered: bool | None = None  # rmsprop
    options: Annotated[dict[str, Any], AfterValidator(_options_without_own_keys)] = {}
    lr_scaling: Literal["none", "linear"] = "none"  # linear: x images per step / base_batch_size
    base_batch_size: PositiveInt = 256  # the batch size the LRs were chosen for
    param_groups: list[ParamGroupRule] = []
    # true: biases, norm weights (and other 1-d gains) and the model's no_weight_decay() tensors
    no_decay: bool | list[Literal["bias", "norm", "embed"]] = False
    layer_decay: Annotated[float, Field(gt=0, le=1)] | None = None  # LR x decay^(layers above)

    @field_validator("param_groups")
    @classmethod
    def _relative_with_auto_lr(
        cls, rules: list[ParamGroupRule], info: ValidationInfo
    ) -> list[ParamGroupRule]:
        fixed = [rule.match for rule in rules if getattr(rule, "lr", None) is not None]
        if info.data.get("lr") == "auto" and fixed:
            raise ValueError(
                f"with optimizer.lr: auto, give lr_mult rather than lr "
                f"({', '.join(fixed)}): a fixed LR cannot follow the one found"
            )
        return rules
