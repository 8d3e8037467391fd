"""Freezing parameters (by pattern or by stage), the BatchNorm policy, and gradual unfreezing.

A frozen parameter has ``requires_grad=False``: it never gets a gradient and never changes in an
optimizer step. A "frozen" BatchNorm layer also stays in eval mode, so its running statistics do
not drift, however often the training loop calls ``model.train()``. Gradual unfreezing makes
frozen parameters trainable at the start of a given epoch (``unfreeze_due``) by flipping
``requires_grad``: their optimizer groups exist from the start and follow the LR schedule like
any other, and torch's and timm's optimizers skip a parameter that has no gradient.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.config import UnfreezeStep
from finetune.errors import UserError
from finetune.patterns import matches_any, unmatched_patterns
from finetune.recipe import as_section


@dataclass
class UnfreezeStage:
    """The frozen parameters (``names``) that start training at the start of ``epoch``.

    ``lr``: the LR of their optimizer groups, if the step sets one (else the group rules').
    """

    epoch: int
    patterns: list[str]
    lr: float | None
    names: list[str]


@dataclass
class FreezeReport:
    """What ``freeze`` did: every parameter is in ``frozen`` or ``trainable``."""

    frozen: list[str]
    trainable: list[str]
    frozen_batchnorms: list[str]
    batchnorm: str = "train"
    until: str | None = None
    unfreeze: list[UnfreezeStage] = field(default_factory=list)


def freeze(
    model: nn.Module,
    *,
    patterns: Iterable[str] = (),
    until: str | None = None,
    batchnorm: str = "train",
    unfreeze: Sequence[UnfreezeStep | Mapping[str, Any]] = (),
    head: str | Sequence[str] = (),
) -> FreezeReport:
    """Freeze the parameters matching ``patterns`` and those before the stage ``until``.

    Args:
        patterns: globs over ``named_parameters()`` names, e.g. ``["conv1.*", "layer1.*"]``. A
            pattern that matches no parameter is an error, so a typo never freezes nothing.
        until: a stage name (``stage_names(model)``: timm's ``feature_info`` modules such as
            ``layer3``, ``blocks.4`` or ``stages.2``, and the top-level children): every
            parameter registered before that module is frozen.
        batchnorm: ``"frozen"`` keeps every BatchNorm layer in eval mode (running statistics
            fixed) across ``model.train()`` calls; ``"train"`` leaves them alone. Whether their
            affine weights train is up to ``patterns`` and ``until``.
        unfreeze: steps that make frozen parameters trainable at a later epoch
            (``UnfreezeStep``s or mappings: ``{"epoch": 3, "patterns": ["layer3.*"]}``); each
            pattern must match a parameter frozen here (checked now, applied by
            ``unfreeze_due``).
        head: the module name(s) of the new head, whose BatchNorm layers (an mlp head's) have
            no statistics worth keeping and always train.

    Example:
        >>> report = freeze(model, until="layer3", batchnorm="frozen")
        >>> report.frozen[:2]
        ['conv1.weight', 'bn1.weight']
    """
    if batchnorm not in {"train", "frozen"}:
        raise UserError(f"freeze.batchnorm: expected train or frozen, got {batchnorm!r}")
    patterns = list(patterns)
    unfreeze = [
        as_section(UnfreezeStep, step, f"freeze.unfreeze.{index}")
        for index, step in enumerate(unfreeze)
    ]
    names = [name for name, _ in model.named_parameters()]
    _check_patterns("freeze.patterns", patterns, names)
    to_freeze = {name for name in names if matches_any(name, patterns)}
    if until is not None:
        to_freeze |= set(parameters_before(model, until))
    frozen = [
        name
        for name, param in model.named_parameters()
        if name in to_freeze or not param.requires_grad
    ]
    scheduled = schedule_unfreeze(frozen, unfreeze)  # checked before the model is changed
    for name, param in model.named_parameters():
        if name in to_freeze:
            param.requires_grad_(False)
    frozen_bns = freeze_batchnorm_statistics(model, skip=head) if batchnorm == "frozen" else []
    return FreezeReport(
        frozen=frozen,
        trainable=[name for name, param in model.named_parameters() if param.requires_grad],
        frozen_batchnorms=frozen_bns,
        batchnorm=batchnorm,
        until=until,
        unfreeze=scheduled,
    )


def _check_patterns(key: str, patterns: list[str], names: list[str]) -> None:
    unmatched = unmatched_patterns(patterns, names)
    if unmatched:
        example = f" (names look like {names[0]!r}, {names[-1]!r})" if names else ""
        raise UserError(f"{key}: these patterns match no parameter{example}", unmatched)


# ------------------------------------------------------------------------------------- stages
def stage_names(model: nn.Module) -> list[str]:
    """The names ``freeze.until`` accepts, in the model's order.

    timm models list their stages in ``feature_info`` (``layer1``..``layer4`` for ResNets,
    ``blocks.N`` for EfficientNets and ViTs, ``stages.N`` for ConvNeXts); every model also
    accepts its top-level children (torchvision's ``conv1``, ``layer1``, ..., ``fc``).
    """
    position = {name: index for index, (name, _) in enumerate(model.named_modules())}
    stages = [
        info.get("module")
        for info in getattr(model, "feature_info", None) or []
        if isinstance(info, dict)
    ]
    stages += [name for name, _ in model.named_children()]
    return sorted({name for name in stages if name in position}, key=position.__getitem__)


def parameters_before(model: nn.Module, until: str) -> list[str]:
    """Names of the parameters registered before the module ``until`` (which must be a stage)."""
    valid = stage_names(model)
    if until not in valid:
        raise UserError(
            f"freeze.until: {until!r} is not a stage of this model; stages: {', '.join(valid)}"
        )
    before = []
    for module_name, module in model.named_modules():
        if module_name == until:
            break
        prefix = f"{module_name}." if module_name else ""
        before += [prefix + name for name, _ in module.named_parameters(recurse=False)]
    return before


# ---------------------------------------------------------------------------------- batchnorm
def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_batchnorm_statistics(model: nn.Module, skip: str | Sequence[str] = ()) -> list[str]:
    """Put every BatchNorm in eval mode and keep it there when ``model.train()`` is called.

    Layers inside the module(s) named ``skip`` (a new head) are left to train.
    """
    skipped = (skip,) if isinstance(skip, str) else tuple(skip)
    names = []
    for name, module in model.named_modules():
        inside_skip = any(name == s or name.startswith(f"{s}.") for s in skipped)
        if isinstance(module, _BatchNorm) and not inside_skip:
            module.train = types.MethodType(_stay_in_eval, module)  # per instance, not per class
            module.eval()
            names.append(name)
    return names


# -------------------------------------------------------------------------- gradual unfreezing
def schedule_unfreeze(frozen: list[str], steps: Sequence[UnfreezeStep]) -> list[UnfreezeStage]:
    """Resolve each step (in epoch order) to the frozen parameters it will make trainable.

    A parameter belongs to the earliest step that matches it. A pattern that matches no frozen
    parameter, or a step left with nothing to unfreeze, is an error.
    """
    claimed: set[str] = set()
    stages = []
    for step in sorted(steps, key=lambda s: s.epoch):
        unmatched = unmatched_patterns(step.patterns, frozen)
        if unmatched:
            raise UserError(
                f"freeze.unfreeze (epoch {step.epoch}): these patterns match no frozen parameter",
                unmatched,
            )
        names = [n for n in frozen if n not in claimed and matches_any(n, step.patterns)]
        if not names:
            raise UserError(
                f"freeze.unfreeze (epoch {step.epoch}): an earlier step already "
                "unfreezes every parameter these patterns match",
                step.patterns,
            )
        claimed.update(names)
        stages.append(UnfreezeStage(step.epoch, list(step.patterns), step.lr, names))
    return stages


def unfreeze_due(
    model: nn.Module, stages: Sequence[UnfreezeStage], epoch: int
) -> list[UnfreezeStage]:
    """Make the parameters of every stage due by ``epoch`` trainable; return the stages that
    changed anything.

    The loop calls it at the start of each epoch, and a resumed run gets the same calls, so it
    is idempotent. Nothing else changes: the parameters' optimizer groups were built with the
    others and have followed the LR schedule all along, without a gradient to step with.
    """
    parameters = dict(model.named_parameters())
    unfrozen = []
    for stage in stages:
        params = [parameters[name] for name in stage.names]
        if stage.epoch <= epoch and not all(p.requires_grad for p in params):
            for param in params:
                param.requires_grad_(True)
            unfrozen.append(stage)
    return unfrozen
