"""The recipe: YAML in, typed and validated objects out, before any tensor exists.

A recipe file is read, its ``extends:`` chain merged, ``--set`` overrides applied, and the result
validated by the schema (one module per section in ``finetune.config``). Every problem is
reported at once, by dotted key, with the closest valid key suggested for typos. Nothing here
imports torch.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from finetune.config.common import Section
from finetune.config.data import DataConfig
from finetune.config.freeze import FreezeConfig
from finetune.config.model import ModelConfig
from finetune.config.optim import OptimizerConfig
from finetune.config.schedule import SchedulerConfig
from finetune.config.sources import SOURCE_TYPES
from finetune.config.train import ExportConfig, OutputConfig, TrainConfig
from finetune.errors import UserError


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
            raise ValueError(
                f"freeze.unfreeze: epoch(s) {late} come after the last epoch "
                f"(train.epochs {self.train.epochs}); they would never happen"
            )
        return self

    @classmethod
    def load(
        cls,
        path: str | Path,
        overrides: dict[str, Any] | list[str] | None = None,
        check_paths: bool = True,
    ) -> Recipe:
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
        return cls.from_dict(
            apply_overrides(data, overrides or {}), source=str(path), check_paths=check_paths
        )

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], source: str = "recipe", check_paths: bool = True
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


# --------------------------------------------------------------------- code named by a file
TRUST_HINT = "if you trust it, pass --trust-code"


def import_paths(recipe: Recipe) -> dict[str, str]:
    """The code a recipe names by import path (``"package.module:Name"``), by dotted key.

    Example:
        >>> import_paths(recipe)
        {'model.head.type': 'my_heads:CosineHead', 'scheduler.lambdas.default': 'lr:warm'}
    """
    found = {}
    if ":" in recipe.model.head.type:
        found["model.head.type"] = recipe.model.head.type
    lambdas = recipe.scheduler.lambdas
    if isinstance(lambdas, str):
        found["scheduler.lambdas"] = lambdas
    elif lambdas:
        found.update({f"scheduler.lambdas.{key}": path for key, path in lambdas.items()})
    return found


def check_import_paths(
    paths: Mapping[str, str],
    *,
    source: str | Path,
    allowed: Recipe | None = None,
    trust_code: bool = False,
    hint: str = TRUST_HINT,
) -> None:
    """Refuse import paths read from a file finetune wrote (a run's ``recipe.yaml``, an
    export's model card): importing them would run whatever code the file names.

    Args:
        paths: dotted key -> import path, as ``import_paths`` gives them.
        source: the file the paths were read from, named in the error.
        allowed: the user's own recipe (from the command line): the paths it names are allowed.
        trust_code: allow every path (``--trust-code``).
        hint: what the user can do about it, at the end of the message.

    Raises:
        UserError: naming ``source`` and each refused key with its path.
    """
    if trust_code:
        return
    permitted = set(import_paths(allowed).values()) if allowed is not None else set()
    refused = {key: path for key, path in paths.items() if path not in permitted}
    if refused:
        raise UserError(
            f"{source}: refused: it names code to import and run, and finetune imports code "
            f"only when you name it yourself; {hint}",
            [f"{key}: {path!r}" for key, path in refused.items()],
        )


def check_imports(
    recipe: Recipe,
    *,
    source: str | Path,
    allowed: Recipe | None = None,
    trust_code: bool = False,
    hint: str = TRUST_HINT,
) -> None:
    """Refuse a recipe read back from a run folder or an export when it names code by import
    path (``import_paths``) that ``allowed`` (the user's own recipe) does not name too.

    Heads and schedules named by registered name pass. Call it before building anything.

    Example:
        >>> saved = Recipe.load(run / "recipe.yaml", check_paths=False)
        >>> check_imports(saved, source=run / "recipe.yaml", allowed=user_recipe)
    """
    check_import_paths(
        import_paths(recipe), source=source, allowed=allowed, trust_code=trust_code, hint=hint
    )


# ------------------------------------------------------------------------- sections from Python
SectionT = typing.TypeVar("SectionT", bound=Section)


def as_section(
    cls: type[SectionT], value: SectionT | typing.Mapping[str, Any] | None, key: str
) -> SectionT:
    """``value`` as the section ``cls``: a plain mapping (from Python) is validated exactly as
    the recipe key ``key`` would be, with the same messages; ``None`` gives the defaults.

    Example:
        >>> as_section(HeadConfig, {"type": "mlp", "hidden": [256]}, "model.head").hidden
        [256]
    """
    if isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value or {}, context={"check_paths": True})
    except ValidationError as error:
        where = tuple(int(part) if part.isdigit() else part for part in key.split("."))
        raise UserError(f"{key}: invalid", describe_errors(error, where)) from None


# -------------------------------------------------------------------------------- error messages
def describe_errors(error: ValidationError, where: tuple[str | int, ...] = ()) -> list[str]:
    """One line per problem: the dotted key, what is wrong, and a suggestion for unknown keys.

    ``where``: the recipe path of the section that was validated, when it is not ``Recipe``.
    """
    lines = []
    for item in _chosen_members(error.errors()):
        loc = (*where, *_without_union_tags(item["loc"], item["type"] == "extra_forbidden"))
        key = ".".join(str(part) for part in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key{_suggestion(loc)}")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            if not isinstance(got, dict):  # a whole section's check names its keys itself
                message += f" (got {got!r}){_closest_choice(item)}{_unquote_hint(item)}"
            lines.append(f"{key}: {message}" if loc else message)
    return lines


# A mapping given to a scalar, a scalar given to a section: what the other members of a union of
# scalars and a section (``train.cache_features``) say beside the member the value was meant for.
_SCALAR_TYPE_ERRORS = frozenset(
    {"bool_type", "literal_error", "int_type", "float_type", "string_type", "path_type"}
)


def _chosen_members(items: list[Any]) -> list[Any]:
    """``items`` less the other members' errors: a mapping reports the section's problems, a
    scalar the scalar members' (``cache_features: {views: 0}`` is not "not a valid boolean")."""

    def misfit(item: Any) -> bool:
        if isinstance(item.get("input"), dict):
            return item["type"] in _SCALAR_TYPE_ERRORS
        return item["type"] == "model_type"

    def key(item: Any) -> tuple[Any, ...]:
        return _without_union_tags(item["loc"], item["type"] == "extra_forbidden")

    fitting = [key(item) for item in items if not misfit(item)]
    return [
        item
        for item in items
        if not (misfit(item) and any(k[: len(key(item))] == key(item) for k in fitting))
    ]


def _closest_choice(item: Any) -> str:
    """``; did you mean 'cosine'?`` for a value that is not one of a key's choices."""
    if item["type"] != "literal_error" or not isinstance(item.get("input"), str):
        return ""
    choices = re.findall(r"'([^']*)'", item["ctx"]["expected"])
    close = difflib.get_close_matches(item["input"], choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unquote_hint(item: Any) -> str:
    """A number or a bool written as a string: a recipe is typed YAML, say how to write it."""
    wanted = {"int_type": "a number", "float_type": "a number", "bool_type": "true or false"}
    if item["type"] in wanted and isinstance(item.get("input"), str):
        return f"; write {wanted[item['type']]} without quotes"
    return ""


# Pydantic names the member of a union in the error path: a source by its ``type``, other members
# by their schema (``function-after[...]``, ``list[...]``, ``str``...).
_UNION_TAGS = frozenset(SOURCE_TYPES)
_TAG_PREFIXES = (
    "function-after[",
    "function-before[",
    "function-plain[",
    "function-wrap[",
    "list[",
    "dict[",
)
_TYPE_TAGS = frozenset({"bool", "str", "int", "float", "path", "literal['auto']"})


def _without_union_tags(loc: tuple[Any, ...], unknown_key: bool = False) -> tuple[Any, ...]:
    """Pydantic puts the union member into the path (``data.train.digits.seed``, a section by
    its class: ``train.cache_features.CachedViews.views``); drop it. ``unknown_key``: the last
    part is a key the user wrote, kept whatever it is."""
    last = len(loc) - 1 if unknown_key else len(loc)
    return tuple(
        part
        for position, part in enumerate(loc)
        if not (
            isinstance(part, str)
            and (
                part in _UNION_TAGS
                or part in _TYPE_TAGS
                or part.startswith(_TAG_PREFIXES)
                or (part in _section_names() and position < last)
            )
        )
    )


@functools.cache
def _section_names() -> frozenset[str]:
    """The class names of every section reachable from ``Recipe``."""
    found: dict[str, type[BaseModel]] = {}
    pending: list[type[BaseModel]] = [Recipe]
    while pending:
        cls = pending.pop()
        if cls.__name__ not in found:
            found[cls.__name__] = cls
            for field in cls.model_fields.values():
                pending.extend(_model_classes(field.annotation))
    return frozenset(found)


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
