"""The ``model:`` section: the backbone, its new head and the rules for loading a weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from finetune.config.common import PathValue, PositiveInt, Section, existing_path


class HeadConfig(Section):
    """The new classifier that replaces the backbone's (``finetune.heads``).

    ``type`` is a built-in head (``linear``, ``mlp``), a name registered with
    ``@finetune.register_head``, or ``"package.module:Class"`` (importable code of your own). The
    head gets ``in_features`` and ``num_classes``; built-in heads take the options below, any
    other head takes its keyword arguments from ``args`` (which built-in heads also receive).
    """

    type: str = "linear"
    pool: Literal["avg", "max", "avgmax", "catavgmax", "token"] | None = None  # None: backbone's
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    hidden: list[PositiveInt] = [512]  # mlp: sizes of the hidden layers
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"  # mlp
    norm: Literal["none", "batchnorm", "layernorm"] = "none"  # mlp: after each hidden layer
    init: Literal["kaiming_normal", "kaiming_uniform", "xavier", "trunc_normal", "zeros"] = (
        "kaiming_normal"
    )
    args: dict[str, Any] = {}

    @model_validator(mode="after")
    def _options_belong_to_the_type(self) -> HeadConfig:
        # Compared with the defaults, not with the keys given, so a dumped recipe reads back.
        defaults = {name: field.default for name, field in type(self).model_fields.items()}
        mlp_only = [
            key for key in ("hidden", "activation", "norm") if getattr(self, key) != defaults[key]
        ]
        if mlp_only and self.type != "mlp":
            raise ValueError(
                f"{', '.join(mlp_only)}: options of the mlp head, not of {self.type!r}"
            )
        if self.type not in ("linear", "mlp") and self.dropout != defaults["dropout"]:
            raise ValueError(
                f"the {self.type!r} head takes its options under args, e.g. args: {{dropout: 0.2}}"
            )
        return self


class LoadConfig(Section):
    """Rules for partially loading ``model.pretrained`` when it is a file (``load_partial``)."""

    key: str | None = None  # entry of a nested checkpoint; default: state_dict, model, module...
    strip_prefix: list[str] = []
    add_prefix: str = ""
    rename: dict[str, str] = {}
    include: list[str] = []
    exclude: list[str] = []
    on_shape_mismatch: Literal["skip", "error"] = "skip"
    strict: bool = False


class ModelConfig(Section):
    """The ``model:`` section (``finetune.model.build_model``).

    ``pretrained`` is ``true`` (timm's weights for the backbone), ``false`` (random init) or a
    weights file, loaded with the ``load`` rules.
    """

    backbone: str
    pretrained: bool | PathValue = False
    num_classes: Annotated[int, Field(ge=2)] | None = None
    head: HeadConfig = HeadConfig()
    load: LoadConfig = LoadConfig()

    @field_validator("pretrained")
    @classmethod
    def _weights_file_exists(cls, value: bool | Path, info: ValidationInfo) -> bool | Path:
        if isinstance(value, Path):
            existing_path(value, info)
        return value
