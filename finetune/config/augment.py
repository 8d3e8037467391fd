"""``data.augment``: the registry of augmentations and the classes of their arguments.

``AUGMENTATIONS`` holds one entry per augmentation name. The schema validates a recipe's list
with it, and ``finetune.augment`` builds each transform from it (its own builders are keyed by
the same names, and a test checks that the two agree). A validated list holds ``Augmentation``
objects (name + typed arguments), never raw mappings; it is written back to YAML as
``{name: {the arguments given}}``, which reads back unchanged.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    TypeAdapter,
    field_validator,
)

from finetune.config.common import (
    AsTuple,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    PositiveRange,
    Probability,
    Range,
    Section,
    ShareRange,
    validated,
)

Interpolation = Literal["nearest", "bilinear", "bicubic"]


class FlipArgs(Section):
    p: Probability = 0.5


class RotateArgs(Section):
    degrees: NonNegativeFloat | Range = 15.0  # a random angle in [-degrees, degrees] or [min, max]
    fill: Annotated[int, Field(ge=0, le=255)] = 0  # grey level of the uncovered corners


class Rotate90Args(Section):
    angles: Annotated[list[Literal[0, 90, 180, 270]], Field(min_length=1)] = [0, 90, 180, 270]


class ResizeArgs(Section):
    # the shorter side, or [h, w]
    size: PositiveInt | Annotated[tuple[PositiveInt, PositiveInt], AsTuple] | None = None
    interpolation: Interpolation = "bilinear"


class CenterCropArgs(Section):
    size: PositiveInt | None = None  # default: data.image_size


class RandomCropArgs(Section):
    padding: Annotated[int, Field(ge=0)] = 0
    padding_mode: Literal["constant", "edge", "reflect", "symmetric"] = "constant"


class RandomResizedCropArgs(Section):
    scale: ShareRange = (0.08, 1.0)  # of the area
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


# Where a transform runs in the pipeline (finetune.augment): size -> uint8 (geometry and colour,
# in the recipe's order) -> float -> normalise -> erase; batch runs in the loader's collate_fn.
Stage = Literal["size", "uint8", "float", "erase", "batch"]


@dataclass(frozen=True)
class AugmentSpec:
    """What the schema and the transform builder know about one augmentation.

    Attributes:
        args: the class of its arguments.
        shorthand: the arguments a scalar or list value sets (``{rotate: 15}``).
        stage: where it runs in the pipeline.
        deterministic: whether ``data.eval_transforms`` may use it.
    """

    args: type[Section]
    shorthand: tuple[str, ...]
    stage: Stage = "uint8"
    deterministic: bool = False


AUGMENTATIONS: dict[str, AugmentSpec] = {
    "resize": AugmentSpec(ResizeArgs, ("size",), "size", deterministic=True),
    "center_crop": AugmentSpec(CenterCropArgs, ("size",), "size", deterministic=True),
    "random_crop": AugmentSpec(RandomCropArgs, ("padding",), "size"),
    "random_resized_crop": AugmentSpec(RandomResizedCropArgs, ("scale",), "size"),
    "hflip": AugmentSpec(FlipArgs, ("p",)),
    "vflip": AugmentSpec(FlipArgs, ("p",)),
    "rotate": AugmentSpec(RotateArgs, ("degrees",)),
    "rotate90": AugmentSpec(Rotate90Args, ("angles",)),
    "color_jitter": AugmentSpec(ColorJitterArgs, ("brightness", "contrast", "saturation")),
    "autoaugment": AugmentSpec(AutoAugmentArgs, ("policy",)),
    "randaugment": AugmentSpec(RandAugmentArgs, ("magnitude",)),
    "trivialaugment": AugmentSpec(TrivialAugmentArgs, ("num_magnitude_bins",)),
    "gaussian_blur": AugmentSpec(GaussianBlurArgs, ("sigma",)),
    "gaussian_noise": AugmentSpec(GaussianNoiseArgs, ("sigma",), "float"),
    "random_erasing": AugmentSpec(RandomErasingArgs, ("p",), "erase"),
    "mixup": AugmentSpec(MixArgs, ("alpha",), "batch"),
    "cutmix": AugmentSpec(MixArgs, ("alpha",), "batch"),
}
DETERMINISTIC = tuple(name for name, spec in AUGMENTATIONS.items() if spec.deterministic)


@dataclass(frozen=True)
class Augmentation:
    """One validated entry of ``data.augment``: the registered name and its argument object.

    Example: ``{rotate: 15}`` becomes ``Augmentation("rotate", RotateArgs(degrees=15.0))``.
    """

    name: str
    args: Section

    @property
    def spec(self) -> AugmentSpec:
        return AUGMENTATIONS[self.name]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{name: {the arguments given}}``: the recipe form, without shorthand or defaults."""
        return {self.name: self.args.model_dump(mode="json", exclude_unset=True)}


def parse_augmentation(item: Any) -> Augmentation:
    """``"hflip"``, ``{rotate: 15}`` or ``{rotate: {degrees: 15}}`` -> an ``Augmentation``.

    Raises:
        ValueError: for an unknown name or option, or an invalid argument (naming ``name.key``).
    """
    if isinstance(item, Augmentation):  # built in Python: its arguments must be of its kind
        expected = AUGMENTATIONS[item.name].args if item.name in AUGMENTATIONS else None
        if expected is None or type(item.args) is not expected:
            raise ValueError(
                f"{item.name}: arguments of type {type(item.args).__name__}, "
                f"expected {expected.__name__ if expected else 'a known name'}"
            )
        return item
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"an augmentation is a name or a one-key mapping, got {item!r}")
    ((name, args),) = item.items()
    if name == "normalize":
        raise ValueError(
            "normalize is not an augmentation: data.normalize applies it once, after "
            "the augmentations (auto | imagenet | dataset | none | {mean, std})"
        )
    if name not in AUGMENTATIONS:
        close = difflib.get_close_matches(str(name), AUGMENTATIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown augmentation {name!r}; {hint}known: {', '.join(AUGMENTATIONS)}")
    spec = AUGMENTATIONS[name]
    allowed = sorted(spec.args.model_fields)
    if args is None:
        args = {}
    if not isinstance(args, dict):
        args = dict.fromkeys(spec.shorthand, args)
    unknown = set(args) - set(allowed)
    if unknown:
        raise ValueError(f"{name} has no option {sorted(unknown)}; it takes {allowed}")
    return Augmentation(name, validated(spec.args, args, name))


def _a_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("a list of augmentations, e.g. [hflip, {rotate: 15}]")
    return value


def check_together(items: list[Augmentation]) -> list[Augmentation]:
    """The checks of the list as a whole, once every item has parsed: no name twice, no crop
    that ``random_resized_crop`` already does."""
    names = [item.name for item in items]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"listed more than once: {', '.join(twice)}")
    clash = sorted(set(names) & {"resize", "center_crop", "random_crop"})
    if "random_resized_crop" in names and clash:
        raise ValueError(f"random_resized_crop already resizes and crops; drop {', '.join(clash)}")
    return items


def _dump(item: Augmentation, info: SerializationInfo) -> dict[str, dict[str, Any]]:
    return {item.name: item.args.model_dump(mode=info.mode, exclude_unset=True)}


# The type of ``data.augment``: each item parsed on its own (every bad item is reported, under
# its index), then the list checked as a whole; written back in the recipe's own form.
Augmentations = Annotated[
    list[
        Annotated[
            Augmentation,
            PlainValidator(parse_augmentation),
            PlainSerializer(_dump, return_type=Any),
        ]
    ],
    BeforeValidator(_a_list),
    AfterValidator(check_together),
]


def parse_augmentations(value: Any) -> list[Augmentation]:
    """A list in the recipe's form as ``data.augment`` validates it.

    Raises:
        pydantic.ValidationError: one error per bad item (under its index) or for the list.
    """
    return TypeAdapter(Augmentations).validate_python(value)
