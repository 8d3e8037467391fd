"""What a sweep varies: ``--grid`` and ``--search`` parsed, and checked against the recipe.

``--grid KEY=[V1,V2]`` lists values (YAML-typed, like ``--set``); several grids mean every
combination. ``--search KEY=DIST`` names a distribution Optuna samples from. Every value a trial
can take is validated with the recipe before anything runs, so a bad key or value exits 2
naming it, with the recipe's own messages. Nothing here imports torch or Optuna.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from finetune.errors import UserError
from finetune.recipe import Recipe, apply_overrides

RANGES = ("uniform", "loguniform", "int", "logint")
SEARCH_FORMS = (
    "uniform(low,high), loguniform(low,high), int(low,high), logint(low,high), choice(v1,v2,...)"
)
_CALL = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", flags=re.S)


@dataclass(frozen=True)
class Axis:
    """One swept recipe key: ``values`` are the choices (``grid``, ``choice``) or
    ``(low, high)`` of a range (``uniform``, ``loguniform``, ``int``, ``logint``)."""

    key: str
    kind: str  # grid, choice, or one of RANGES
    values: tuple[Any, ...]

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "logint")

    def suggest(self, trial: Any) -> Any:
        """The value of this key for an Optuna trial (fixed when the trial was queued)."""
        if self.kind in ("uniform", "loguniform"):
            return trial.suggest_float(self.key, *self.values, log=self.log)
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.key, *self.values, log=self.log)
        choices = [encode(value) for value in self.values]
        return self.decode(trial.suggest_categorical(self.key, choices))

    def decode(self, stored: Any) -> Any:
        """The recipe value of a value as the study stores it (``encode``)."""
        if self.kind in RANGES:
            return stored
        return self.values[[encode(value) for value in self.values].index(stored)]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Axis:
        return cls(data["key"], data["kind"], tuple(data["values"]))


def encode(value: Any) -> Any:
    """A choice as Optuna stores it: scalars as they are, lists and mappings as JSON text."""
    scalar = value is None or isinstance(value, (bool, int, float, str))
    return value if scalar else json.dumps(value)


@dataclass(frozen=True)
class SweepSpec:
    """The swept keys, how many trials, and the metric that ranks them."""

    axes: tuple[Axis, ...]
    trials: int  # every combination of a grid; --trials of a search
    search: bool  # Optuna samples (TPE) rather than running every grid combination
    metric: str  # output.save_best: what the trial's value is and what pruning watches

    @property
    def maximize(self) -> bool:
        return not self.metric.endswith("loss")  # the rule of finetune.loop.is_better

    def combinations(self) -> Iterator[dict[str, Any]]:
        """Every combination of the axes' values (a grid's trials), by key."""
        keys = [axis.key for axis in self.axes]
        for values in itertools.product(*(axis.values for axis in self.axes)):
            yield dict(zip(keys, values, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "axes": [axis.to_dict() for axis in self.axes],
            "trials": self.trials,
            "search": self.search,
            "metric": self.metric,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        axes = tuple(Axis.from_dict(axis) for axis in data["axes"])
        return cls(axes, data["trials"], data["search"], data["metric"])


def build_spec(
    base: dict[str, Any], grid: list[str], search: list[str], trials: int | None, source: str
) -> SweepSpec:
    """Parse ``--grid`` and ``--search``, and validate the recipe ``base`` with every value.

    Raises:
        UserError: naming the option and key at fault (an unknown key, an empty grid, a range
            with low >= high, a value the recipe refuses, ``--trials`` missing or misplaced).
    """
    recipe = Recipe.from_dict(base, source=source)
    axes = [parse_grid(item) for item in grid] + [parse_search(item) for item in search]
    if not axes:
        raise UserError("finetune sweep: give at least one --grid KEY=[V1,V2] or --search KEY=DIST")
    keys = [axis.key for axis in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise UserError(f"finetune sweep: {', '.join(repeated)} swept more than once")
    if search and trials is None:
        raise UserError("--search needs --trials N: how many trials to sample")
    if not search and trials is not None:
        raise UserError("--trials goes with --search; a grid runs every combination")
    spec = SweepSpec(
        tuple(axes),
        trials if trials is not None else math.prod(len(axis.values) for axis in axes),
        search=bool(search),
        metric=recipe.output.save_best,
    )
    check_values(base, spec, source)
    return spec


def check_values(base: dict[str, Any], spec: SweepSpec, source: str) -> None:
    """Validate the recipe with every grid combination (a search: each choice and both ends of
    each range, the other keys as in the recipe)."""
    if spec.search:
        overrides = [{axis.key: value} for axis in spec.axes for value in axis.values]
    else:
        overrides = list(spec.combinations())
    for override in overrides:
        try:
            Recipe.from_dict(apply_overrides(base, override), source=source)
        except UserError as error:
            where = ", ".join(f"{key}={value!r}" for key, value in override.items())
            raise UserError(
                f"{_option(spec)} {where}: the recipe is invalid", error.problems
            ) from None


def _option(spec: SweepSpec) -> str:
    return "--search" if spec.search else "--grid"


# --------------------------------------------------------------------------------- parsing
def parse_grid(item: str) -> Axis:
    """``KEY=[V1,V2,...]`` -> an axis of kind ``grid``."""
    key, raw = _split(item, "--grid", "KEY=[V1,V2,...]")
    return Axis(key, "grid", _choices(_yaml(raw, f"--grid {key}"), f"--grid {key}", raw))


def parse_search(item: str) -> Axis:
    """``KEY=loguniform(1e-4,1e-1)`` (or uniform, int, logint, choice) -> an axis."""
    key, raw = _split(item, "--search", "KEY=DIST")
    call = _CALL.match(raw)
    if call is None or call[1] not in (*RANGES, "choice"):
        raise UserError(f"--search {key}: expects one of {SEARCH_FORMS}; got {raw!r}")
    kind, args = call[1], _yaml(f"[{call[2]}]", f"--search {key}")
    if kind == "choice":
        return Axis(key, kind, _choices(args, f"--search {key}", raw))
    integers = kind in ("int", "logint")
    wanted = int if integers else (int, float)
    if len(args) != 2 or not all(isinstance(v, wanted) and not isinstance(v, bool) for v in args):
        number = "integers" if integers else "numbers"
        raise UserError(f"--search {key}: {kind}(low,high) takes two {number}; got {raw!r}")
    low, high = args
    if low >= high:
        raise UserError(f"--search {key}: low ({low}) must be below high ({high}) in {raw!r}")
    if kind.startswith("log") and low <= 0:
        raise UserError(f"--search {key}: a log scale needs low > 0; got {raw!r}")
    return Axis(key, kind, (low, high) if integers else (float(low), float(high)))


def _split(item: str, option: str, form: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise UserError(f"{option} expects {form}, got {item!r}")
    return key.strip(), raw


def _choices(values: Any, where: str, raw: str) -> tuple[Any, ...]:
    if not isinstance(values, list):
        raise UserError(f"{where}: expects a YAML list of values such as [1e-2,1e-3]; got {raw!r}")
    if not values:
        raise UserError(f"{where}: the list is empty; give at least one value")
    stored = [encode(value) for value in values]
    if len(set(map(json.dumps, stored))) < len(stored):
        raise UserError(f"{where}: a value appears twice in {raw!r}")
    return tuple(values)


def _yaml(raw: str, where: str) -> Any:
    """YAML as ``--set`` reads it: scientific notation such as ``1e-3`` is a number (YAML 1.1
    reads it as a string), here also inside a list."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise UserError(f"{where}: not valid YAML: {raw!r} ({error})") from None
    if isinstance(value, list):
        return [_number(item) for item in value]
    return _number(value)


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value
