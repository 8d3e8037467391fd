"""Classifier heads: the registry, the built-in heads and the initialisation of new layers.

A head is any ``nn.Module`` built as ``Head(in_features, num_classes, **kwargs)`` whose
``forward(features)`` maps pooled backbone features ``(batch, in_features)`` to logits. Register
your own with ``@register_head("name")`` and name it in a recipe (``model.head.type: name``), or
point at importable code with ``type: "package.module:Class"``. The toolkit pools the backbone's
features, initialises the head's linear and conv layers, swaps it in, and names its parameters
after the classifier it replaces (``fc.*``, ``head.*``), so freeze and group rules can match them.

An import path is followed only when the user names it: a recipe read back from a run folder and
an export's model card are refused when they name one (``finetune.recipe.check_imports``), unless
``--trust-code``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from finetune.config.model import HeadConfig
from finetune.errors import UserError

HeadFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=HeadFactory)

HEADS: dict[str, HeadFactory] = {}


def register_head(name: str) -> Callable[[F], F]:
    """Class (or function) decorator that makes a head available as ``model.head.type: name``.

    Example:
        >>> @register_head("cosine")
        ... class CosineHead(nn.Module):
        ...     def __init__(self, in_features, num_classes, scale=16.0): ...
    """
    if not name or ":" in name:
        raise ValueError(f"a head name is a plain non-empty word, got {name!r}")

    def decorate(factory: F) -> F:
        HEADS[name] = factory
        return factory

    return decorate


def list_heads() -> list[str]:
    """The registered head names, sorted."""
    return sorted(HEADS)


# ------------------------------------------------------------------------------- built-in heads
@register_head("linear")
def linear_head(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """One linear layer, after dropout when asked.

    Without dropout it is a bare ``nn.Linear``, so the weights keep timm's and torchvision's key
    names (``fc.weight``) and load into those libraries' models unchanged.
    """
    linear = nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batchnorm": nn.BatchNorm1d,
    "layernorm": nn.LayerNorm,
}


@register_head("mlp")
def mlp_head(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (512,),
    activation: str = "relu",
    dropout: float = 0.0,
    norm: str = "none",
) -> nn.Module:
    """Hidden layers of ``linear -> norm -> activation -> dropout``, then a linear classifier.

    Example:
        >>> mlp_head(2048, 10, hidden=[512], activation="gelu", norm="layernorm")
    """
    if activation not in ACTIVATIONS or norm not in {"none", *NORMS}:
        raise UserError(
            f"model.head: mlp activation must be one of {sorted(ACTIVATIONS)} and "
            f"norm none or one of {sorted(NORMS)}, got {activation!r}, {norm!r}"
        )
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if norm != "none":
            layers.append(NORMS[norm](size))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------ initialisation
INITIALIZERS: dict[str, Callable[[nn.Parameter], object]] = {
    # fan_in keeps the forward signal's scale. fan_out (torchvision's choice for convolutions)
    # would give a classifier with few classes weights of std ~ sqrt(2 / classes): huge logits.
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu"),
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "xavier": nn.init.xavier_uniform_,
    # Cut at two standard deviations: torch's default bounds (+-2) are absolute, not in stds.
    "trunc_normal": lambda w: nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04),
    "zeros": nn.init.zeros_,
}


def initialize(module: nn.Module, init: str) -> None:
    """Initialise the weights of every linear and conv layer in a new module; biases to zero.

    Other parameters (a custom head's own ``nn.Parameter``) keep the head's initialisation.
    """
    if init not in INITIALIZERS:
        raise UserError(f"model.head.init: unknown {init!r}; known: {', '.join(INITIALIZERS)}")
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            INITIALIZERS[init](layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# ----------------------------------------------------------------------------------- building
def resolve_head(type: str) -> HeadFactory:
    """The head class or function for ``type``: a registered name or ``package.module:Name``."""
    if ":" in type:
        return _import_head(type)
    if type not in HEADS:
        close = difflib.get_close_matches(type, HEADS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"model.head.type: unknown head {type!r}; {hint}registered heads: "
            f'{", ".join(list_heads())} (or give "package.module:Class")'
        )
    return HEADS[type]


def _import_head(spec: str) -> HeadFactory:
    """``package.module:Class`` from importable code (installed, or on ``PYTHONPATH``)."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"model.head.type: cannot import {module_name!r} ({error}); the module "
            "must be installed or on PYTHONPATH"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UserError(f"model.head.type: {module_name!r} has no head named {attribute!r}")
    return factory


def head_options(head: HeadConfig) -> dict[str, Any]:
    """The keyword arguments a head gets from the recipe: its built-in options, then ``args``."""
    builtin = {"linear": ("dropout",), "mlp": ("dropout", "hidden", "activation", "norm")}
    options = {key: getattr(head, key) for key in builtin.get(head.type, ())}
    return {**options, **head.args}


def build_head(
    type: str, *, in_features: int, num_classes: int, init: str = "kaiming_normal", **kwargs: Any
) -> nn.Module:
    """Make the head ``type`` for ``in_features`` pooled features and initialise its layers.

    Example:
        >>> build_head("mlp", in_features=512, num_classes=10, hidden=[256], dropout=0.1)
    """
    factory = resolve_head(type)
    try:
        head = factory(in_features, num_classes, **kwargs)
    except TypeError as error:
        raise UserError(
            f"model.head: the {type} head rejected its arguments {sorted(kwargs)}: {error}"
        ) from None
    if not isinstance(head, nn.Module):
        raise UserError(
            f"model.head: the {type} head returned {head.__class__.__name__}, not a torch.nn.Module"
        )
    initialize(head, init)
    return head
