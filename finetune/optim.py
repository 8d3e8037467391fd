"""Parameter groups (per-layer learning rates and weight decay) and the optimizer.

Rules are tried in order and the first whose glob matches a parameter's name decides its group;
parameters no rule matches form the ``default`` group with the optimizer's own ``lr`` and
``weight_decay``. Frozen parameters are left out entirely.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from finetune.config.optim import ParamGroupRule, list_optimizers
from finetune.errors import UserError
from finetune.freezing import UnfreezeStage
from finetune.patterns import matches_any, unmatched_patterns
from finetune.recipe import as_section

# torch's own optimizers, under torch's names and with torch's defaults. Every other name is
# looked up in timm's registry (lamb, lion, adan, nadamw, ...) and keeps timm's defaults.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
}

# What ``no_decay`` can exempt from weight decay; ``no_decay: true`` means all of them, which is
# timm's rule (``param_groups_weight_decay``): 1-d tensors, biases and ``model.no_weight_decay()``.
NO_DECAY_KINDS = ("bias", "norm", "embed")
UNFREEZE_PREFIX = "unfreeze@"  # groups of parameters a freeze.unfreeze step trains later


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    rules: Sequence[ParamGroupRule | Mapping[str, Any]] = (),
    no_decay: bool | Sequence[str] = False,
    layer_decay: float | None = None,
    names: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Each parameter goes to exactly one group. A group is a dict for ``torch.optim`` with
    ``params``, ``lr``, ``weight_decay``, plus ``name`` and ``rule`` (the rule's ``match``, or
    ``default``) and ``param_names`` for reports; empty groups never appear.

    Args:
        lr, weight_decay: the values of parameters that no rule matches.
        rules: ``ParamGroupRule``s or plain mappings (``{"match": "fc.*", "lr": 0.1}``, the
            ``optimizer.param_groups`` entries of a recipe), first match wins: ``lr``
            (absolute), or ``lr_mult`` (times ``lr``), and/or ``weight_decay``. A rule that
            matches no parameter is an error.
        no_decay: ``True``, or some of ``"bias"`` (``*.bias``), ``"norm"`` (other 1-d tensors:
            normalisation weights, layer-scale gains) and ``"embed"`` (the model's
            ``no_weight_decay()`` names, e.g. ViT's ``pos_embed`` and ``cls_token``): these
            move to a ``<name>/no_decay`` twin group with weight decay 0.
        layer_decay: layer-wise LR decay (BEiT-style, as timm's ``param_groups_layer_decay``):
            the LR of layer ``i`` of ``n`` (timm's ``group_matcher``; for other models the
            top-level children in order; the head is last) is multiplied by
            ``layer_decay ** (n - 1 - i)``, in groups ``<name>/depth<i>``. Rules with an absolute
            ``lr`` are not decayed.
        names: group these parameters, frozen or not, instead of the trainable ones (used for
            parameters that an unfreeze step will add later).

    Example:
        >>> groups = param_groups(model, lr=0.01, weight_decay=1e-4, no_decay=True,
        ...                       rules=[ParamGroupRule(match="fc.*", lr=0.1)])
        >>> [(g["name"], g["lr"]) for g in groups]
        [('default', 0.01), ('default/no_decay', 0.01), ('fc.*', 0.1), ('fc.*/no_decay', 0.1)]
    """
    named = list(model.named_parameters())
    rules = [
        as_section(ParamGroupRule, rule, f"optimizer.param_groups.{index}")
        for index, rule in enumerate(rules)
    ]
    _check_rules(rules, named)
    kinds = _no_decay_kinds(no_decay)
    embed = _no_weight_decay_names(model) if "embed" in kinds else set()
    layers, num_layers = layer_ids(model) if layer_decay is not None else ({}, 1)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in named:
        if (not param.requires_grad) if names is None else (name not in names):
            continue
        rule = next((r for r in rules if matches_any(name, [r.match])), None)
        group_name, group_lr, group_wd = _group_values(rule, lr, weight_decay)
        rule_name = group_name
        if layer_decay is not None and (rule is None or rule.lr is None):
            layer = layers.get(name, num_layers - 1)
            group_lr *= layer_decay ** (num_layers - 1 - layer)
            group_name = f"{group_name}/depth{layer}"
        if group_wd > 0 and _exempt_from_decay(name, param, kinds, embed):
            group_name, group_wd = f"{group_name}/no_decay", 0.0
        group = groups.setdefault(
            group_name,
            {
                "name": group_name,
                "rule": rule_name,
                "lr": group_lr,
                "weight_decay": group_wd,
                "params": [],
                "param_names": [],
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def _check_rules(rules: Sequence[ParamGroupRule], named: list[tuple[str, nn.Parameter]]) -> None:
    for index, rule in enumerate(rules):
        if unmatched_patterns([rule.match], (name for name, _ in named)):
            raise UserError(
                f"optimizer.param_groups.{index}.match: {rule.match!r} matches no "
                f"parameter (names look like {named[0][0]!r}, {named[-1][0]!r})"
            )


def _group_values(
    rule: ParamGroupRule | None, lr: float, weight_decay: float
) -> tuple[str, float, float]:
    if rule is None:
        return "default", lr, weight_decay
    group_lr = rule.lr if rule.lr is not None else lr * (rule.lr_mult or 1.0)
    group_wd = rule.weight_decay if rule.weight_decay is not None else weight_decay
    return rule.match, group_lr, group_wd


def _no_decay_kinds(no_decay: bool | Sequence[str]) -> set[str]:
    if isinstance(no_decay, bool):
        return set(NO_DECAY_KINDS) if no_decay else set()
    unknown = set(no_decay) - set(NO_DECAY_KINDS)
    if unknown:
        raise UserError(
            f"optimizer.no_decay: unknown {sorted(unknown)}; choose from "
            f"{', '.join(NO_DECAY_KINDS)} or true"
        )
    return set(no_decay)


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Globs a timm model names in ``no_weight_decay()`` (position embeddings, class tokens)."""
    method = getattr(model, "no_weight_decay", None)
    return set(method()) if callable(method) else set()


def _exempt_from_decay(name: str, param: nn.Parameter, kinds: set[str], embed: set[str]) -> bool:
    if "bias" in kinds and name.endswith("bias"):
        return True
    if "norm" in kinds and param.ndim <= 1 and not name.endswith("bias"):
        return True
    return "embed" in kinds and matches_any(name, embed)


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """The layer index of every parameter (0 at the input, the head last) and the layer count.

    timm models describe their layers with ``group_matcher`` (stem, each block, head), which
    timm's own layer decay uses; other models count their top-level children in order.
    """
    if callable(getattr(model, "group_matcher", None)):
        from timm.models import group_parameters

        raw = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    else:
        children = {name: index for index, (name, _) in enumerate(model.named_children())}
        raw = {name: children.get(name.split(".", 1)[0], 0) for name, _ in model.named_parameters()}
    compact = {value: index for index, value in enumerate(sorted(set(raw.values())))}
    return {name: compact[value] for name, value in raw.items()}, len(compact)


# The options with a key of their own in the recipe; any other goes in ``optimizer.options``.
_COMMON_OPTIONS = ("momentum", "dampening", "nesterov", "betas", "eps", "alpha", "centered")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class behind ``name``; an unknown name is an error that lists the known ones."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    from timm.optim import get_optimizer_class

    try:
        return get_optimizer_class(name, bind_defaults=False)
    except ValueError:
        known = list_optimizers()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"optimizer.name: unknown optimizer {name!r}; {hint}known: {', '.join(known)}"
        ) from None


def build_optimizer(
    groups: list[dict[str, Any]],
    *,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    dampening: float | None = None,
    nesterov: bool | None = None,
    betas: Sequence[float] | None = None,
    eps: float | None = None,
    alpha: float | None = None,
    centered: bool | None = None,
    options: dict[str, Any] | None = None,
    lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups``: torch's class for ``OPTIMIZERS``, else built by
    timm's ``create_optimizer_v2``.

    Each group keeps its own ``lr``, ``weight_decay`` and ``name`` (``param_names`` is left out).
    Options left as ``None`` keep the optimizer's defaults: torch's for ``OPTIMIZERS`` (timm's
    factory would make ``sgd`` Nesterov with momentum 0.9), timm's for its own names. An option the
    optimizer's constructor does not take is an error that names it.

    Args:
        lr, weight_decay: the defaults of groups that do not set their own.
        momentum, dampening, nesterov, betas, eps, alpha, centered: the common options.
        options: any other keyword argument of the optimizer (``{rho: 0.9}`` for adadelta,
            ``{trust_clip: true}`` for lamb).
        lr_scale: multiplies every LR (``lr_scale_factor``: the linear scaling rule).

    Example:
        >>> build_optimizer(param_groups(model, lr=0.1), name="sgd", lr=0.1, momentum=0.9)
    """
    if not groups:
        raise UserError("optimizer: no trainable parameters (is everything frozen?)")
    common = dict(
        zip(
            _COMMON_OPTIONS,
            (momentum, dampening, nesterov, betas, eps, alpha, centered),
            strict=True,
        )
    )
    given = {key: value for key, value in common.items() if value is not None}
    extra = dict(options or {})
    cls = optimizer_class(name)
    _check_options(name, cls, given, extra)
    kwargs = {"lr": lr * lr_scale, "weight_decay": weight_decay, **given, **extra}
    torch_groups = [
        {**{k: v for k, v in g.items() if k != "param_names"}, "lr": g["lr"] * lr_scale}
        for g in groups
    ]
    try:
        if name in OPTIMIZERS:  # torch's own class, torch's defaults: no timm import needed
            return cls(torch_groups, **kwargs)
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(torch_groups, opt=name, **kwargs)
    except (TypeError, ValueError) as error:  # e.g. a value out of the optimizer's range
        raise UserError(f"optimizer: {name}: {error}") from None


def _check_options(name: str, cls: type, given: dict[str, Any], extra: dict[str, Any]) -> None:
    """Every option must be a keyword argument of the optimizer's constructor."""
    for key in extra:
        if key in ("params", "lr", "weight_decay", *_COMMON_OPTIONS):
            raise UserError(f"optimizer.options.{key}: {key} has its own key: set optimizer.{key}")
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # takes anything: the constructor itself will complain
    valid = sorted(set(parameters) - {"self", "params", "lr", "weight_decay"})
    for prefix, keys in (("optimizer", given), ("optimizer.options", extra)):
        for key in keys:
            if key not in parameters:
                raise UserError(
                    f"{prefix}.{key}: {name} ({cls.__name__}) has no option {key!r}; "
                    f"it takes: {', '.join(valid)}"
                )


def lr_scale_factor(
    *,
    lr_scaling: str = "none",
    batch_size: int,
    base_batch_size: int = 256,
    grad_accum_steps: int = 1,
    world_size: int | None = None,
) -> float:
    """The factor ``optimizer.lr_scaling`` applies to every learning rate.

    ``linear`` is the linear scaling rule: images per optimizer step (``batch_size`` x
    ``grad_accum_steps`` x processes) / ``base_batch_size``, the batch the LRs were chosen for;
    ``none`` is 1. ``world_size`` defaults to the ``WORLD_SIZE`` environment variable (torchrun
    sets it), else 1.

    Example:
        >>> lr_scale_factor(lr_scaling="linear", batch_size=64, grad_accum_steps=2,
        ...                 base_batch_size=256, world_size=4)
        2.0
    """
    if lr_scaling == "none":
        return 1.0
    if lr_scaling != "linear":
        raise UserError(f"optimizer.lr_scaling: expected none or linear, got {lr_scaling!r}")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return batch_size * grad_accum_steps * world_size / base_batch_size


def optimizer_arguments(config: Any) -> dict[str, Any]:
    """The keys of an ``optimizer:`` section (``OptimizerConfig``) that ``build_optimizer`` takes.

    The others belong to ``param_groups`` (the group rules) and ``lr_scale_factor``.
    """
    accepted = inspect.signature(build_optimizer).parameters
    return {key: value for key, value in config if key in accepted}


def training_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    rules: Sequence[ParamGroupRule | Mapping[str, Any]] = (),
    no_decay: bool | Sequence[str] = False,
    layer_decay: float | None = None,
    unfreeze: Sequence[UnfreezeStage] = (),
) -> list[dict[str, Any]]:
    """Every group the run will ever train: ``param_groups`` of the trainable parameters, then,
    for each unfreeze stage, the groups of its (still frozen) parameters under the same rules,
    named ``unfreeze@<epoch>/<group>`` and at the stage's ``lr`` if it sets one.

    The stages' groups are in the optimizer from the start: frozen parameters get no gradient,
    so the optimizer skips them until ``finetune.freezing.unfreeze_due`` flips ``requires_grad``.
    """
    options: dict[str, Any] = {
        "lr": lr,
        "weight_decay": weight_decay,
        "rules": rules,
        "no_decay": no_decay,
        "layer_decay": layer_decay,
    }
    groups = param_groups(model, **options)
    for stage in unfreeze:
        for group in param_groups(model, **options, names=set(stage.names)):
            group["name"] = f"{UNFREEZE_PREFIX}{stage.epoch}/{group['name']}"
            if stage.lr is not None:
                group["lr"] = stage.lr
            groups.append(group)
    return groups


def create_optimizer(
    model: nn.Module,
    *,
    name: str = "sgd",
    lr: float = 0.01,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    dampening: float | None = None,
    nesterov: bool | None = None,
    betas: Sequence[float] | None = None,
    eps: float | None = None,
    alpha: float | None = None,
    centered: bool | None = None,
    options: dict[str, Any] | None = None,
    lr_scaling: str = "none",
    base_batch_size: int = 256,
    param_groups: Sequence[ParamGroupRule | Mapping[str, Any]] = (),
    no_decay: bool | Sequence[str] = False,
    layer_decay: float | None = None,
    batch_size: int = 32,  # data.batch_size, as the schema defaults it
    grad_accum_steps: int = 1,
    world_size: int | None = None,
    unfreeze: Sequence[UnfreezeStage] = (),
) -> torch.optim.Optimizer:
    """The optimizer of ``model``: its keywords are the ``optimizer:`` keys of a recipe, plus
    what linear LR scaling needs to know (``batch_size``, ``grad_accum_steps``, ``world_size``)
    and the ``unfreeze`` stages whose groups it should hold from the start.

    Example:
        >>> create_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05, no_decay=True,
        ...                  param_groups=[{"match": "head.*", "lr_mult": 10}])
    """
    groups = training_groups(
        model,
        lr=lr,
        weight_decay=weight_decay,
        rules=param_groups,
        no_decay=no_decay,
        layer_decay=layer_decay,
        unfreeze=unfreeze,
    )
    scale = lr_scale_factor(
        lr_scaling=lr_scaling,
        batch_size=batch_size,
        base_batch_size=base_batch_size,
        grad_accum_steps=grad_accum_steps,
        world_size=world_size,
    )
    return build_optimizer(
        groups,
        name=name,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        betas=betas,
        eps=eps,
        alpha=alpha,
        centered=centered,
        options=options,
        lr_scale=scale,
    )
