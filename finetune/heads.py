"""Classifier heads: the registry, the built-in heads and the initialisation of new layers.

A head is any ``nn.Module`` built as ``Head(in_features, num_classes, **kwargs)`` whose
``forward(features)`` maps pooled backbone features to logits. Register your own with
``@register_head("name")`` and name it in a recipe (``model.head.type: name``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from finetune.errors import UserError

HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that makes a head available to recipes as ``head.type: name``."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        HEADS[name] = cls
        return cls

    return decorate


def list_heads() -> list[str]:
    return sorted(HEADS)


def linear_head(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """One linear layer, after dropout when asked.

    Without dropout it is a bare ``nn.Linear``, so the weights keep timm's and torchvision's key
    names (``fc.weight``) and load into those libraries' models unchanged.
    """
    linear = nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Dropout(dropout), linear) if dropout > 0 else linear


HEADS["linear"] = linear_head


INITIALIZERS: dict[str, Callable[[nn.Parameter], object]] = {
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "xavier": nn.init.xavier_uniform_,
    "trunc_normal": lambda w: nn.init.trunc_normal_(w, std=0.02),
    "zeros": nn.init.zeros_,
}


def initialize(module: nn.Module, init: str) -> None:
    """Initialise the weights of every linear and conv layer in a new module; biases to zero."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            INITIALIZERS[init](layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def build_head(type: str, *, in_features: int, num_classes: int, init: str = "kaiming_normal",
               **kwargs: object) -> nn.Module:
    """Make the head registered as ``type`` and initialise its layers."""
    if type not in HEADS:
        close = difflib.get_close_matches(type, HEADS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"model.head.type: unknown head {type!r}; {hint}"
                        f"registered heads: {', '.join(list_heads())}")
    try:
        head = HEADS[type](in_features, num_classes, **kwargs)
    except TypeError as error:
        raise UserError(f"model.head: {type} head rejected its arguments: {error}") from None
    initialize(head, init)
    return head
