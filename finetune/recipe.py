"""The recipe: YAML in, typed and validated objects out, before any tensor exists.

A recipe file is read, its ``extends:`` chain merged, ``--set`` overrides applied, and the result
validated by the pydantic schema below. Every problem is reported at once, by dotted key, with the
closest valid key suggested for typos. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
        mlp_only = [key for key in ("hidden", "activation", "norm")
                    if getattr(self, key) != defaults[key]]
        if mlp_only and self.type != "mlp":
            raise ValueError(f"{', '.join(mlp_only)}: options of the mlp head, not of "
                             f"{self.type!r}")
        if self.type not in ("linear", "mlp") and self.dropout != defaults["dropout"]:
            raise ValueError(f"the {self.type!r} head takes its options under args, "
                             "e.g. args: {dropout: 0.2}")
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


# ------------------------------------------------------------------------------------------ data
class ImageFolderSource(Section):
    """A folder with one sub-folder of images per class (``root/<class>/**/<image>``).

    Class names are the sub-folder names, sorted. Files without an image extension and hidden
    files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are ignored.
    """

    type: Literal["imagefolder"]
    root: Path

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: Path, info: ValidationInfo) -> Path:
        return _existing_path(value, info)


class ManifestSource(Section):
    """A CSV file (with a header row) or a JSON-lines file that lists one image per row.

    ``path_key`` and ``label_key`` name the columns (CSV) or keys (JSONL). Image paths are
    relative to the manifest's folder. Labels are class names (classes sorted by name) or, when
    every label is an integer, class indices ``0..num_classes-1``.
    """

    type: Literal["csv", "jsonl"]
    path: Path
    path_key: str = "path"
    label_key: str = "label"

    @field_validator("path")
    @classmethod
    def _manifest_exists(cls, value: Path, info: ValidationInfo) -> Path:
        return _existing_path(value, info)


class TorchvisionSource(Section):
    """A classification dataset of ``torchvision.datasets`` by class name, from local files.

    ``root`` is the folder torchvision's own ``download=True`` fills; finetune never downloads.
    ``split`` is ``train`` or ``test`` for datasets with a ``train`` flag (CIFAR10, MNIST...),
    else the dataset's own split name (``Flowers102``: train | val | test).
    """

    type: Literal["torchvision"]
    name: Annotated[str, Field(min_length=1)]
    root: Path
    split: str = "train"

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
    ImageFolderSource | ManifestSource | TorchvisionSource | DigitsSource | FakeSource,
    Field(discriminator="type"),
]


# Arguments of each augmentation (``finetune.augment`` maps them onto torchvision's v2).
def _min_max(value: Any) -> Any:
    if isinstance(value, tuple) and value[0] > value[1]:
        raise ValueError("a range is [min, max] with min <= max")
    return value


Probability = Annotated[float, Field(ge=0, le=1)]
Share = Annotated[float, Field(gt=0, le=1)]
Range = Annotated[tuple[float, float], AfterValidator(_min_max)]
PositiveRange = Annotated[tuple[PositiveFloat, PositiveFloat], AfterValidator(_min_max)]
Interpolation = Literal["nearest", "bilinear", "bicubic"]


class FlipArgs(Section):
    p: Probability = 0.5


class RotateArgs(Section):
    degrees: NonNegativeFloat | Range = 15.0  # a random angle in [-degrees, degrees] or [min, max]
    fill: Annotated[int, Field(ge=0, le=255)] = 0  # grey level of the uncovered corners


class Rotate90Args(Section):
    angles: Annotated[list[Literal[0, 90, 180, 270]], Field(min_length=1)] = [0, 90, 180, 270]


class ResizeArgs(Section):
    size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None  # shorter side or [h, w]
    interpolation: Interpolation = "bilinear"


class CenterCropArgs(Section):
    size: PositiveInt | None = None  # default: data.image_size


class RandomCropArgs(Section):
    padding: Annotated[int, Field(ge=0)] = 0
    padding_mode: Literal["constant", "edge", "reflect", "symmetric"] = "constant"


class RandomResizedCropArgs(Section):
    scale: Annotated[tuple[Share, Share], AfterValidator(_min_max)] = (0.08, 1.0)  # of the area
    ratio: PositiveRange = (3 / 4, 4 / 3)
    interpolation: Interpolation = "bilinear"


class ColorJitterArgs(Section):
    brightness: NonNegativeFloat = 0.0
    contrast: NonNegativeFloat = 0.0
    saturation: NonNegativeFloat = 0.0
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0


class GaussianBlurArgs(Section):
    kernel_size: PositiveInt | None = None  # odd; default: the odd number nearest image_size / 10
    sigma: PositiveFloat | PositiveRange = (0.1, 2.0)
    p: Probability = 1.0

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError("the kernel size must be odd")
        return value


class GaussianNoiseArgs(Section):
    sigma: NonNegativeFloat = 0.1  # on the 0-1 pixel scale
    mean: float = 0.0
    clip: bool = True
    p: Probability = 1.0


class RandomErasingArgs(Section):
    p: Probability = 0.5
    scale: PositiveRange = (0.02, 0.33)
    ratio: PositiveRange = (0.3, 3.3)
    value: float | Literal["random"] = 0.0  # after normalisation: 0 is the mean colour


class AutoAugmentArgs(Section):
    policy: Literal["imagenet", "cifar10", "svhn"] = "imagenet"


class RandAugmentArgs(Section):
    num_ops: PositiveInt = 2
    magnitude: Annotated[int, Field(ge=0, le=30)] = 9


class TrivialAugmentArgs(Section):
    num_magnitude_bins: Annotated[int, Field(ge=2)] = 31


class MixArgs(Section):
    alpha: PositiveFloat = 1.0  # Beta(alpha, alpha) mixing weights


# Augmentation name -> (its arguments, those a scalar or list shorthand sets: `{rotate: 15}`).
AUGMENTATIONS: dict[str, tuple[type[Section], tuple[str, ...]]] = {
    "resize": (ResizeArgs, ("size",)),
    "center_crop": (CenterCropArgs, ("size",)),
    "random_crop": (RandomCropArgs, ("padding",)),
    "random_resized_crop": (RandomResizedCropArgs, ("scale",)),
    "hflip": (FlipArgs, ("p",)),
    "vflip": (FlipArgs, ("p",)),
    "rotate": (RotateArgs, ("degrees",)),
    "rotate90": (Rotate90Args, ("angles",)),
    "color_jitter": (ColorJitterArgs, ("brightness", "contrast", "saturation")),
    "autoaugment": (AutoAugmentArgs, ("policy",)),
    "randaugment": (RandAugmentArgs, ("magnitude",)),
    "trivialaugment": (TrivialAugmentArgs, ("num_magnitude_bins",)),
    "gaussian_blur": (GaussianBlurArgs, ("sigma",)),
    "gaussian_noise": (GaussianNoiseArgs, ("sigma",)),
    "random_erasing": (RandomErasingArgs, ("p",)),
    "mixup": (MixArgs, ("alpha",)),
    "cutmix": (MixArgs, ("alpha",)),
}
DETERMINISTIC = ("resize", "center_crop")  # the ones `data.eval_transforms` may use


def _normalize_augment(item: Any) -> dict[str, dict[str, Any]]:
    """``"hflip"``, ``{rotate: 15}`` or ``{rotate: {degrees: 15}}`` -> ``{name: kwargs}``.

    The arguments are validated, and stored as given (defaults stay in the argument classes).
    """
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"an augmentation is a name or a one-key mapping, got {item!r}")
    (name, args), = item.items()
    if name == "normalize":
        raise ValueError("normalize is not an augmentation: data.normalize applies it once, after "
                         "the augmentations (auto | imagenet | dataset | none | {mean, std})")
    if name not in AUGMENTATIONS:
        close = difflib.get_close_matches(str(name), AUGMENTATIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown augmentation {name!r}; {hint}known: {', '.join(AUGMENTATIONS)}")
    model, shorthand = AUGMENTATIONS[name]
    allowed = sorted(model.model_fields)
    if args is None:
        args = {}
    if not isinstance(args, dict):
        args = dict.fromkeys(shorthand, args)
    unknown = set(args) - set(allowed)
    if unknown:
        raise ValueError(f"{name} has no option {sorted(unknown)}; it takes {allowed}")
    return {name: _validated(model, args, name).model_dump(exclude_unset=True)}


def _validated(model: type[Section], value: dict[str, Any], prefix: str) -> Section:
    """``model(**value)``; its problems become one ValueError that names ``prefix.key`` for each."""
    try:
        return model(**value)
    except ValidationError as error:
        problems: dict[str, str] = {}
        for item in error.errors():  # a union reports every member: prefer constraint errors
            where = [str(p) for p in item["loc"] if isinstance(p, int) or str(p).isidentifier()]
            key = ".".join(filter(None, [prefix, *where]))
            message = item["msg"].removeprefix("Value error, ")
            if where:
                message += f" (got {item['input']!r})"
            if key not in problems or problems[key].startswith("wrong type"):
                is_type = item["type"].endswith(("_type", "_parsing"))
                problems[key] = f"wrong type (got {item['input']!r})" if is_type else message
        raise ValueError("; ".join(f"{key}: {message}" if key else message
                                   for key, message in problems.items())) from None


def _augment_list(value: Any) -> list[dict[str, dict[str, Any]]]:
    if not isinstance(value, list):
        raise ValueError("a list of augmentations, e.g. [hflip, {rotate: 15}]")
    items = [_normalize_augment(item) for item in value]
    names = [name for item in items for name in item]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"listed more than once: {', '.join(twice)}")
    clash = sorted(set(names) & {"resize", "center_crop", "random_crop"})
    if "random_resized_crop" in names and clash:
        raise ValueError(f"random_resized_crop already resizes and crops; drop {', '.join(clash)}")
    return items


class NormalizeStats(Section):
    """Per-channel (R, G, B) mean and std on the 0-1 pixel scale, as ``finetune stats`` prints."""

    mean: Annotated[list[float], Field(min_length=3, max_length=3)]
    std: Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]

    @model_validator(mode="after")
    def _unit_scale(self) -> NormalizeStats:
        if not all(0 <= m <= 1 for m in self.mean) or not all(s <= 1 for s in self.std):
            raise ValueError("mean and std are on the 0-1 pixel scale (ImageNet's mean is "
                             "[0.485, 0.456, 0.406]); divide 0-255 values by 255")
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
    augment: list[dict[str, dict[str, Any]]] = [{"hflip": {}}]
    eval_transforms: list[dict[str, dict[str, Any]]] = []  # resize / center_crop for evaluation
    normalize: Literal["auto", "imagenet", "dataset", "none"] | NormalizeStats = "auto"

    @field_validator("augment", "eval_transforms", mode="before")
    @classmethod
    def _augment_names(cls, value: Any) -> Any:
        return _augment_list(value)

    @field_validator("eval_transforms")
    @classmethod
    def _deterministic(cls, value: list[dict[str, dict[str, Any]]]
                       ) -> list[dict[str, dict[str, Any]]]:
        random = [name for item in value for name in item if name not in DETERMINISTIC]
        if random:
            raise ValueError(f"evaluation transforms must be deterministic: only "
                             f"{' and '.join(DETERMINISTIC)}, not {', '.join(random)}")
        return value

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_choice(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return _validated(NormalizeStats, value, "")
        if value not in NORMALIZE_CHOICES:
            raise ValueError(f"expected {' | '.join(NORMALIZE_CHOICES)} or {{mean: [r, g, b], "
                             "std: [r, g, b]}")
        return value

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_weight_choice(cls, value: Any, info: ValidationInfo) -> Any:
        valid_list = isinstance(value, list) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in value)
        if not valid_list and value not in CLASS_WEIGHT_CHOICES:
            raise ValueError(f"expected {' | '.join(CLASS_WEIGHT_CHOICES)} or a list of positive "
                             "weights, one per class")
        if value != "none" and info.data.get("sampler") == "balanced":
            raise ValueError("data.sampler: balanced already corrects for class imbalance; "
                             "use one of the two")
        return value

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


TORCH_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta")  # optim.OPTIMIZERS


def _known_optimizer(name: str) -> str:
    """torch's names pass at once; any other is looked up in timm's registry (importing timm)."""
    if name in TORCH_OPTIMIZERS:
        return name
    from finetune.optim import list_optimizers

    known = list_optimizers()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown optimizer{hint} torch's: {', '.join(TORCH_OPTIMIZERS)}; "
                         f"timm's: {', '.join(known[len(TORCH_OPTIMIZERS):])}")
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
        raise ValueError("a positive number, or auto (found by the LR range test, as "
                         "`finetune lr-find` runs it)")
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
    betas: Annotated[tuple[Fraction, ...], Field(min_length=2, max_length=3)] | None = None
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
    def _relative_with_auto_lr(cls, rules: list[ParamGroupRule], info: ValidationInfo
                               ) -> list[ParamGroupRule]:
        fixed = [rule.match for rule in rules if getattr(rule, "lr", None) is not None]
        if info.data.get("lr") == "auto" and fixed:
            raise ValueError(f"with optimizer.lr: auto, give lr_mult rather than lr "
                             f"({', '.join(fixed)}): a fixed LR cannot follow the one found")
        return rules


# ------------------------------------------------------------------------------------- scheduler
ScheduleName = Literal["constant", "none", "step", "multistep", "exponential", "cosine", "plateau",
                       "lambda", "cyclic", "onecycle", "poly"]  # finetune.schedule.list_schedules()
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
            raise ValueError("multistep needs the epochs at which to multiply the LR by gamma, "
                             "e.g. [30, 60]")
        if any(later <= earlier for earlier, later in zip(value, value[1:], strict=False)):
            raise ValueError("epochs must be in increasing order, e.g. [30, 60]")
        warmup = info.data.get("warmup_epochs") or 0
        if value and value[0] <= warmup:
            raise ValueError(f"epochs count from the start of training: each must come after "
                             f"the warmup (warmup_epochs {warmup:g})")
        return value

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, value: float | None, info: ValidationInfo) -> float | None:
        name = info.data.get("name")
        needed = name == "exponential" or (name == "cyclic" and
                                            info.data.get("cycle_mode") == "exp_range")
        if value is None and needed:
            raise ValueError(f"{name} needs the LR factor per epoch, e.g. 0.95")
        return value

    @field_validator("max_lr")
    @classmethod
    def _peak(cls, value: float | None, info: ValidationInfo) -> float | None:
        name = info.data.get("name")
        if value is None and name in ("onecycle", "cyclic"):
            raise ValueError(f"{name} needs the peak LR (of a group at optimizer.lr; other groups "
                             "peak in proportion), e.g. 0.1: `finetune lr-find` helps choose it")
        return value

    @field_validator("monitor")
    @classmethod
    def _logged(cls, value: str) -> str:
        if value not in LOGGED_METRICS:
            close = difflib.get_close_matches(value, LOGGED_METRICS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{value!r} is never logged; {hint}logged: "
                             f"{', '.join(LOGGED_METRICS)}")
        return value

    @field_validator("lambdas")
    @classmethod
    def _import_paths(cls, value: str | dict[str, str] | None, info: ValidationInfo
                      ) -> str | dict[str, str] | None:
        if value is None:
            if info.data.get("name") == "lambda":
                raise ValueError('the lambda schedule needs "package.module:function", or a '
                                 'mapping of parameter groups to such paths with a default')
            return value
        paths = [value] if isinstance(value, str) else list(value.values())
        bad = [path for path in paths if not re.match(IMPORT_PATH, path)]
        if bad:
            raise ValueError(f"not an import path 'package.module:function': {', '.join(bad)}")
        return value


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


ExportFormat = Literal["safetensors", "torchscript", "onnx", "pt2"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


class ExportConfig(Section):
    """Defaults of ``finetune export`` for this run; its command-line options override them."""

    fuse_bn: bool = True
    formats: Annotated[list[ExportFormat], Field(min_length=1)] = [
        "safetensors", "torchscript"]
    tolerance: NonNegativeFloat = 1e-4  # largest logit difference, relative to the largest |logit|


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
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _unfreeze_within_training(self) -> Recipe:
        late = sorted(step.epoch for step in self.freeze.unfreeze if step.epoch > self.train.epochs)
        if late:
            raise ValueError(f"freeze.unfreeze: epoch(s) {late} come after the last epoch "
                             f"(train.epochs {self.train.epochs}); they would never happen")
        return self

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
            got = item.get("input")
            if not isinstance(got, dict):  # a whole section's check names its keys itself
                message += f" (got {got!r})"
            lines.append(f"{key}: {message}" if loc else message)
    return lines


_UNION_TAGS = {"imagefolder", "csv", "jsonl", "torchvision", "digits", "fake", "function-after",
               "function-before"}


def _without_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Pydantic puts the union member into the path (``data.train.digits.seed``); drop it."""
    kept = tuple(
        part for part in loc
        if not (isinstance(part, str)
                and (part in _UNION_TAGS or part.startswith(("list[", "dict["))))
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
