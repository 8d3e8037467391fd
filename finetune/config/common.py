"""What every recipe section shares: the frozen, closed base class, the common numeric types,
the existing-path check, and the translation of one argument class's errors into one message."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
)

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Share = Annotated[float, Field(gt=0, le=1)]


def _min_max(value: Any) -> Any:
    if isinstance(value, tuple) and value[0] > value[1]:
        raise ValueError("a range is [min, max] with min <= max")
    return value


def _list_as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# YAML has lists, not tuples: a fixed-length list is read as a tuple, its items stay strict.
AsTuple = BeforeValidator(_list_as_tuple)
# A path is written as a string in YAML.
PathValue = Annotated[Path, Strict(False)]

Range = Annotated[tuple[float, float], AsTuple, AfterValidator(_min_max)]
PositiveRange = Annotated[tuple[PositiveFloat, PositiveFloat], AsTuple, AfterValidator(_min_max)]
ShareRange = Annotated[tuple[Share, Share], AsTuple, AfterValidator(_min_max)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are immutable, and types
    are strict: a recipe is typed YAML, so ``"2"`` is not a number and ``"yes"`` not a bool
    (an int is a float, though)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def existing_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Paths must exist, unless the recipe is read back only to rebuild a trained model."""
    check = (info.context or {}).get("check_paths", True)
    if check and value is not None and not Path(value).exists():
        raise ValueError(f"path does not exist: {value}")
    return value


def validated(model: type[Section], value: dict[str, Any], prefix: str) -> Section:
    """``model(**value)``; its problems become one ValueError that names ``prefix.key`` for each.

    For values validated inside another field's validator (an augmentation's arguments, the
    normalisation statistics), whose errors pydantic would otherwise report under that field.
    """
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
        raise ValueError(
            "; ".join(f"{key}: {message}" if key else message for key, message in problems.items())
        ) from None
