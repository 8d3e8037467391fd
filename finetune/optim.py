"""Parameter groups (per-layer learning rates and weight decay) and the optimizer.

Rules are tried in order and the first whose glob matches a parameter's name decides its group;
parameters no rule matches form the ``default`` group with the optimizer's own ``lr`` and
``weight_decay``. Frozen parameters are left out entirely.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from finetune.errors import UserError
from finetune.recipe import ParamGroupRule

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation weights (1-d tensors) are conventionally not decayed."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    rules: Sequence[ParamGroupRule] = (),
    no_decay: bool = False,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Each group is a dict for ``torch.optim`` with ``params``, ``lr``, ``weight_decay`` plus
    ``name`` (the rule's pattern or ``default``) and ``param_names`` for reports. With
    ``no_decay``, each group's biases and norm weights move to a ``<name>/no_decay`` twin with
    weight decay 0. Empty groups are dropped.
    """
    named = list(model.named_parameters())
    for rule in rules:
        if not any(fnmatch.fnmatchcase(name, rule.match) for name, _ in named):
            raise UserError(f"optimizer.param_groups: {rule.match!r} matches no parameter "
                            f"(names look like {named[0][0]!r})")
    groups: dict[str, dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.match)), None)
        group_name, group_lr, group_wd = _group_values(rule, lr, weight_decay)
        if no_decay and _is_no_decay(name, param):
            group_name, group_wd = f"{group_name}/no_decay", 0.0
        group = groups.setdefault(group_name, {"name": group_name, "lr": group_lr,
                                               "weight_decay": group_wd, "params": [],
                                               "param_names": []})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def _group_values(rule: ParamGroupRule | None, lr: float, weight_decay: float
                  ) -> tuple[str, float, float]:
    if rule is None:
        return "default", lr, weight_decay
    group_lr = rule.lr if rule.lr is not None else lr * (rule.lr_mult or 1.0)
    group_wd = rule.weight_decay if rule.weight_decay is not None else weight_decay
    return rule.match, group_lr, group_wd


def build_optimizer(groups: list[dict[str, Any]], *, name: str, lr: float,
                    **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups``; ``options`` left as ``None`` keep torch's defaults."""
    if not groups:
        raise UserError("optimizer: no trainable parameters (is everything frozen?)")
    options = {key: value for key, value in options.items() if value is not None}
    torch_groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    try:
        return OPTIMIZERS[name](torch_groups, lr=lr, **options)
    except TypeError as error:
        raise UserError(f"optimizer: {name} does not take these options: {error}") from None
