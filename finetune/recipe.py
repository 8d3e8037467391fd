"""The recipe: YAML in, typed and validated objects out, before any tensor exists.

A recipe file is read, its ``extends:`` chain merged, ``--set`` overrides applied, and the result
validated by the pydantic schema below. Every problem is reported at once, by dotted key, with the
closest valid key suggested for typos. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from finetune.errors import UserError

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _existing_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Paths must exist, unless the recipe is read back only to rebuild a trained model."""
    check = (info.context or {}).get("check_paths", True)
    if check and value is not None and not Path(value).exists():
        raise ValueError(f"path does not exist: {value}")
    return value


# ----------------------------------------------------------------------------------------- model
class HeadConfig(Section):
    """The new classifier that replaces the backbone's (``finetune.heads``)."""

    type: str = "linear"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    init: Literal["kaiming_normal", "kaiming_uniform", "xavier", "trunc_normal", "zeros"] = (
        "kaiming_normal"
    )


class LoadConfig(Section):
    """Rules for partially loading ``model.pretrained`` when it is a file (``load_partial``)."""

    strip_prefix: list[str] = []
    add_prefix: str = ""
    rename: dict[str, str] = {}
    include: list[str] = []
    exclude: list[str] = []
    on_shape_mismatch: Literal["skip", "error"] = "skip"
    strict: bool = False


class ModelConfig(Section):
    backbone: str
    pretrained: bool | Path = False
    num_classes: Annotated[int, Field(ge=2)] | None = None
    head: HeadConfig = HeadConfig()
    load: LoadConfig = LoadConfig()

    @field_validator("pretrained")
    @classmethod
    def _weights_file_exists(cls, value: bool | Path, info: ValidationInfo) -> bool | Path:
        if isinstance(value, Path):
            _existing_path(value, info)
        return value


# ---------------------------------------------------------------------------------------- freeze
class FreezeConfig(Section):
    """Which parameters stay fixed (``finetune.freeze``)."""

    patterns: list[str] = []
    batchnorm: Literal["train", "frozen"] = "train"


# ------------------------------------------------------------------------------------------ data
class ImageFolderSource(Section):
    """A folder with one sub-folder of images per class (torchvision's ``ImageFolder``)."""

    type: Literal["imagefolder"]
    root: Path

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: Path, info: ValidationInfo) -> Path:
        return _existing_path(value, info)


class DigitsSource(Section):
    """scikit-learn's bundled 8x8 handwritten digits, upscaled to RGB; no download.

    ``split`` picks a fixed stratified 80/20 division of the 1,797 images, so that a train and a
    val source never share an image. ``classes`` selects digits (relabelled 0..k-1 in the given
    order); ``per_class`` keeps that many images of each class, chosen with ``seed``.
    """

    type: Literal["digits"]
    split: Literal["train", "val", "all"] = "all"
    classes: list[Annotated[int, Field(ge=0, le=9)]] = list(range(10))
    per_class: PositiveInt | None = None
    seed: int = 0

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or len(value) < 2:
            raise ValueError("needs at least two distinct digits")
        return value


class FakeSource(Section):
    """Random images (torchvision's ``FakeData``), for tests and benchmarks."""

    type: Literal["fake"]
    num_samples: PositiveInt = 64
    num_classes: Annotated[int, Field(ge=2)] = 4
    seed: int = 0


DataSource = Annotated[
    Union[ImageFolderSource, DigitsSource, FakeSource], Field(discriminator="type")
]

# Augmentation name -> (its keyword arguments, those a scalar shorthand sets: `{rotate: 15}`).
AUGMENTATIONS: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "hflip": ({"p"}, ("p",)),
    "vflip": ({"p"}, ("p",)),
    "rotate": ({"degrees"}, ("degrees",)),
    "random_crop": ({"padding", "padding_mode"}, ("padding",)),
    "random_resized_crop": ({"scale", "ratio"}, ()),
    "color_jitter": ({"brightness", "contrast", "saturation", "hue"},
                     ("brightness", "contrast", "saturation")),
}


def _normalize_augment(item: Any) -> dict[str, dict[str, Any]]:
    """``"hflip"``, ``{rotate: 15}`` or ``{rotate: {degrees: 15}}`` -> ``{name: kwargs}``."""
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"an augmentation is a name or a one-key mapping, got {item!r}")
    (name, args), = item.items()
    if name not in AUGMENTATIONS:
        close = difflib.get_close_matches(str(name), AUGMENTATIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown augmentation {name!r}; {hint}known: {', '.join(AUGMENTATIONS)}")
    allowed, shorthand = AUGMENTATIONS[name]
    if args is None:
        args = {}
    if not isinstance(args, dict):
        if not shorthand:
            raise ValueError(f"{name} takes a mapping of {sorted(allowed)}, got {args!r}")
        args = dict.fromkeys(shorthand, args)
    unknown = set(args) - allowed
    if unknown:
        raise ValueError(f"{name} has no option {sorted(unknown)}; it takes {sorted(allowed)}")
    return {name: args}


class NormalizeStats(Section):
    mean: Annotated[list[float], Field(min_length=3, max_length=3)]
    std: Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]


class DataConfig(Section):
    train: DataSource
    val: DataSource | None = None
    val_split: Fraction | None = None
    image_size: PositiveInt = 224
    crop_pct: Annotated[float, Field(gt=0, le=1)] = 0.875
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt | None = None
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    augment: list[dict[str, dict[str, Any]]] = [{"hflip": {}}]
    normalize: Literal["auto", "imagenet", "none"] | NormalizeStats = "auto"

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_names(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError("a list of augmentations, e.g. [hflip, {rotate: 15}]")
        return [_normalize_augment(item) for item in value]

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataConfig:
        if self.val is None and self.val_split is None:
            raise ValueError("give data.val (a source) or data.val_split (a fraction of train)")
        if self.val is not None and self.val_split is not None:
            raise ValueError("give data.val or data.val_split, not both")
        return self


# ------------------------------------------------------------------------------------- optimizer
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


class OptimizerConfig(Section):
    """The optimizer (``finetune.optim.build_optimizer``); unset options keep torch's defaults."""

    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    lr: PositiveFloat = 0.01
    weight_decay: NonNegativeFloat = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] | None = None
    nesterov: bool | None = None
    betas: tuple[Fraction, Fraction] | None = None
    eps: PositiveFloat | None = None
    alpha: Fraction | None = None
    param_groups: list[ParamGroupRule] = []
    no_decay: bool = False


# ------------------------------------------------------------------------------------- scheduler
class SchedulerConfig(Section):
    """The LR schedule (``finetune.schedule.build_scheduler``), after an optional linear warmup."""

    name: Literal["none", "cosine", "step"] = "cosine"
    interval: Literal["step", "epoch"] = "step"
    warmup_epochs: NonNegativeFloat = 0.0
    warmup_start_factor: Annotated[float, Field(gt=0, le=1)] = 0.1
    min_lr: NonNegativeFloat = 0.0
    step_size: PositiveInt = 10
    gamma: PositiveFloat = 0.1


# ----------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    epochs: PositiveInt = 10
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_accum_steps: PositiveInt = 1
    clip_grad_norm: PositiveFloat | None = None
    channels_last: bool | Literal["auto"] = "auto"
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    sync_batchnorm: bool = False

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind = value.split(":")[0]
        if kind not in {"auto", "cpu", "cuda", "mps"}:
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return value


class OutputConfig(Section):
    dir: Path = Path("checkpoints")
    save_best: Literal["val/top1", "val/loss"] = "val/top1"


class Recipe(Section):
    """A whole recipe; ``Recipe.load`` reads one from YAML."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[\w.-]+$")]
    seed: int = 0
    model: ModelConfig
    freeze: FreezeConfig = FreezeConfig()
    data: DataConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | list[str] | None = None,
             check_paths: bool = True) -> Recipe:
        """Read ``path`` (following ``extends:``), apply overrides, and validate.

        Args:
            path: the YAML recipe.
            overrides: ``{"optimizer.lr": 0.1}`` or CLI-style ``["optimizer.lr=0.1"]``.
            check_paths: whether data roots and weight files must exist (not needed to rebuild
                a trained model from its run folder).

        Raises:
            UserError: listing every invalid key of the recipe.
        """
        data = read_recipe_dict(Path(path))
        return cls.from_dict(apply_overrides(data, overrides or {}), source=str(path),
                             check_paths=check_paths)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe", check_paths: bool = True
                  ) -> Recipe:
        try:
            return cls.model_validate(data, context={"check_paths": check_paths})
        except ValidationError as error:
            raise UserError(f"{source}: invalid recipe", describe_errors(error)) from None

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, readable back by ``Recipe.load``."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------ reading and merge
def read_recipe_dict(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe file and merge the recipe it ``extends`` (relative to the file) under it."""
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    if path.resolve() in _seen:
        raise UserError(f"{path}: `extends` forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = read_recipe_dict(path.parent / parent, (*_seen, path.resolve()))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``; nested mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Set dotted keys; CLI strings ``a.b=value`` are parsed as YAML (``1e-3`` is a float)."""
    if isinstance(overrides, list):
        overrides = dict(_parse_assignment(item) for item in overrides)
    result = dict(data)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return result


def _parse_assignment(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects KEY=VALUE, got {item!r}")
    # YAML 1.1 reads "1e-3" as a string; accept the scientific notation users type.
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


# -------------------------------------------------------------------------------- error messages
def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem: the dotted key, what is wrong, and a suggestion for unknown keys."""
    lines = []
    for item in error.errors():
        loc = _without_union_tags(item["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key{_suggestion(loc)}")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message} (got {item.get('input')!r})")
    return lines


_UNION_TAGS = {"imagefolder", "digits", "fake", "function-after", "function-before"}


def _without_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Pydantic puts the union member into the path (``data.train.digits.seed``); drop it."""
    kept = tuple(
        part for part in loc
        if not (isinstance(part, str) and (part in _UNION_TAGS or part.startswith(("list[", "dict["))))
        and part not in {"bool", "str", "int", "float", "path", "literal['auto']"}
    )
    return kept


def _suggestion(loc: tuple[Any, ...]) -> str:
    names = _field_names_at(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys: {', '.join(sorted(names))}" if names else ""


def _field_names_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of every schema class reachable at ``loc`` (all members of a union)."""
    classes: list[type[BaseModel]] = [Recipe]
    for part in loc:
        if isinstance(part, int):
            continue
        found: list[type[BaseModel]] = []
        for cls in classes:
            field = cls.model_fields.get(str(part))
            if field is not None:
                found.extend(_model_classes(field.annotation))
        classes = found
    return sorted({name for cls in classes for name in cls.model_fields})


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list, typing.Annotated):
        return [cls for arg in typing.get_args(annotation) for cls in _model_classes(arg)]
    return []


def recipe_keys() -> list[str]:
    """Every dotted key of the schema (for documentation and tests)."""

    def walk(cls: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for name, field in cls.model_fields.items():
            keys.append(prefix + name)
            for sub in _model_classes(field.annotation):
                keys.extend(walk(sub, f"{prefix}{name}."))
        return keys

    return sorted(set(walk(Recipe, "")))
