"""Freezing parameters (by pattern or by stage), the BatchNorm policy, and gradual unfreezing.

A frozen parameter has ``requires_grad=False``: it never gets a gradient and never reaches the
optimizer. A "frozen" BatchNorm layer also stays in eval mode, so its running statistics do not
drift, however often the training loop calls ``model.train()``. Gradual unfreezing makes frozen
parameters trainable at the start of a given epoch and adds them to the optimizer as new groups
(``apply_unfreeze``), joining the LR schedule where it stands.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import UserError
from finetune.patterns import matches_any, unmatched_patterns


class UnfreezeRule(Protocol):
    """One step of ``freeze.unfreeze`` (``finetune.recipe.UnfreezeStep`` is one)."""

    epoch: int
    patterns: list[str]
    lr: float | None


@dataclass
class ScheduledUnfreeze:
    """The parameters one unfreeze step will make trainable, resolved against the model."""

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
    unfreeze: list[ScheduledUnfreeze] = field(default_factory=list)


def freeze(
    model: nn.Module,
    *,
    patterns: Iterable[str] = (),
    until: str | None = None,
    batchnorm: str = "train",
    unfreeze: Sequence[UnfreezeRule] = (),
    head: str | None = None,
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
        unfreeze: steps that make frozen parameters trainable at a later epoch; each pattern
            must match a parameter frozen here (checked now, applied by ``apply_unfreeze``).
        head: the module name of the new head, whose BatchNorm layers (an mlp head's) have no
            statistics worth keeping and always train.

    Example:
        >>> report = freeze(model, until="layer3", batchnorm="frozen")
        >>> report.frozen[:2]
        ['conv1.weight', 'bn1.weight']
    """
    if batchnorm not in {"train", "frozen"}:
        raise UserError(f"freeze.batchnorm: expected train or frozen, got {batchnorm!r}")
    patterns = list(patterns)
    names = [name for name, _ in model.named_parameters()]
    _check_patterns("freeze.patterns", patterns, names)
    to_freeze = {name for name in names if matches_any(name, patterns)}
    if until is not None:
        to_freeze |= set(parameters_before(model, until))
    frozen = [name for name, param in model.named_parameters()
              if name in to_freeze or not param.requires_grad]
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
    stages = [info.get("module") for info in getattr(model, "feature_info", None) or []
              if isinstance(info, dict)]
    stages += [name for name, _ in model.named_children()]
    return sorted({name for name in stages if name in position}, key=position.__getitem__)


def parameters_before(model: nn.Module, until: str) -> list[str]:
    """Names of the parameters registered before the module ``until`` (which must be a stage)."""
    valid = stage_names(model)
    if until not in valid:
        raise UserError(f"freeze.until: {until!r} is not a stage of this model; stages: "
                        f"{', '.join(valid)}")
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


def freeze_batchnorm_statistics(model: nn.Module, skip: str | None = None) -> list[str]:
    """Put every BatchNorm in eval mode and keep it there when ``model.train()`` is called.

    Layers inside the module named ``skip`` (a new head) are left to train.
    """
    names = []
    for name, module in model.named_modules():
        inside_skip = skip is not None and (name == skip or name.startswith(f"{skip}."))
        if isinstance(module, _BatchNorm) and not inside_skip:
            module.train = types.MethodType(_stay_in_eval, module)  # per instance, not per class
            module.eval()
            names.append(name)
    return names


# -------------------------------------------------------------------------- gradual unfreezing
def schedule_unfreeze(frozen: list[str], steps: Sequence[UnfreezeRule]) -> list[ScheduledUnfreeze]:
    """Resolve each step (in epoch order) to the frozen parameters it will make trainable.

    A parameter belongs to the earliest step that matches it. A pattern that matches no frozen
    parameter, or a step left with nothing to unfreeze, is an error.
    """
    claimed: set[str] = set()
    scheduled = []
    for step in sorted(steps, key=lambda s: s.epoch):
        unmatched = unmatched_patterns(step.patterns, frozen)
        if unmatched:
            raise UserError(f"freeze.unfreeze (epoch {step.epoch}): these patterns match no "
                            "frozen parameter", unmatched)
        names = [n for n in frozen if n not in claimed and matches_any(n, step.patterns)]
        if not names:
            raise UserError(f"freeze.unfreeze (epoch {step.epoch}): an earlier step already "
                            "unfreezes every parameter these patterns match", step.patterns)
        claimed.update(names)
        scheduled.append(ScheduledUnfreeze(step.epoch, list(step.patterns), step.lr, names))
    return scheduled


@dataclass
class UnfreezeStage:
    """Optimizer groups (``finetune.optim.param_groups`` format) to add at the start of ``epoch``.

    ``reference_lr`` is the LR the optimizer's first group was configured with: the new groups
    then get any scaling applied to every LR (the linear scaling rule; OneCycleLR's start at
    ``max_lr / div_factor``) as the first group did. Without it, the first group's
    ``initial_lr`` stands in, which is right only when nothing rescaled it.
    """

    epoch: int
    groups: list[dict[str, Any]]
    reference_lr: float | None = None

    @property
    def applied(self) -> bool:
        return all(p.requires_grad for group in self.groups for p in group["params"])


def apply_unfreeze(optimizer: torch.optim.Optimizer, scheduler: Any,
                   stages: Sequence[UnfreezeStage], epoch: int) -> list[UnfreezeStage]:
    """Unfreeze every stage due by ``epoch`` that is not applied yet; return those applied now.

    The training loop calls this at the start of each epoch; a resumed run calls it with the
    last completed epoch before loading the optimizer state, so the groups match. Each new group
    joins the LR schedule where it stands: its LR is its own base LR times the factor the
    schedule has reached (read from the optimizer's first group), and the scheduler learns its
    base LR, so warmup, decay and ``scheduler.state_dict()`` cover it like any other group.
    """
    applied = []
    for stage in stages:
        if stage.epoch > epoch or stage.applied:
            continue
        for group in stage.groups:
            for param in group["params"]:
                param.requires_grad_(True)
            _add_group(optimizer, scheduler, group, stage.reference_lr)
        applied.append(stage)
    return applied


def _add_group(optimizer: torch.optim.Optimizer, scheduler: Any, group: dict[str, Any],
               reference_lr: float | None) -> None:
    """Add ``group`` with every per-group LR value scaled from the first group's by LR ratio."""
    reference = optimizer.param_groups[0]
    initial = reference.get("initial_lr", reference["lr"])  # set by torch's schedulers
    ratio = group["lr"] / (reference_lr or initial)
    # torch requires all groups or none to carry param_names: follow the existing ones.
    new = {key: value for key, value in group.items()
           if key != "param_names" or "param_names" in reference}
    new["initial_lr"] = initial * ratio
    new["lr"] = reference["lr"] * ratio
    for key in ("max_lr", "min_lr"):  # OneCycleLR keeps these in each group
        if key in reference:
            new[key] = reference[key] * ratio
    for key in ("base_momentum", "max_momentum", "momentum", "betas"):  # cycled momentum
        if key in reference:
            new[key] = reference[key]
    optimizer.add_param_group(new)
    for schedule in _schedulers(scheduler):
        # Per-group lists that torch's schedulers zip (strictly) with optimizer.param_groups.
        for attribute in ("base_lrs", "max_lrs"):
            values = getattr(schedule, attribute, None)
            if isinstance(values, list) and values:
                values.append(values[0] * ratio)
        for attribute in ("base_momentums", "max_momentums"):  # CyclicLR's, not LR-scaled
            values = getattr(schedule, attribute, None)
            if isinstance(values, list) and values:
                values.append(values[0])
        if isinstance(getattr(schedule, "min_lrs", None), list):  # ReduceLROnPlateau's floor
            schedule.min_lrs.append(schedule.min_lrs[0])
        if isinstance(getattr(schedule, "_last_lr", None), list):
            schedule._last_lr.append(new["lr"])


def _schedulers(scheduler: Any) -> list[Any]:
    """The scheduler and, for SequentialLR or ChainedScheduler, the ones inside it."""
    if scheduler is None:
        return []
    inner = getattr(scheduler, "_schedulers", [])
    return [scheduler, *(s for child in inner for s in _schedulers(child))]
