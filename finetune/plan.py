"""The model surgery a recipe asks for, built and described before any data or training.

``build_plan(recipe)`` creates the backbone and head, loads the weights file with the recipe's
rules, freezes, and splits the trainable parameters into optimizer groups: ``finetune run``
builds its model with this same function, and ``finetune plan`` prints what it returns
(``print_plan``, or ``plan_to_dict`` for ``--json``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.errors import UserError
from finetune.freeze import FreezeReport, ScheduledUnfreeze, UnfreezeStage, freeze
from finetune.model import BuiltModel, build_model
from finetune.optim import lr_scale_factor, param_groups
from finetune.recipe import DataConfig, DigitsSource, FakeSource, ImageFolderSource, Recipe
from finetune.schedule import plot_lr_schedule, preview_lrs
from finetune.weights import LoadReport

SHOWN_NAMES = 6  # names per row of the load report table; the JSON form has them all


@dataclass
class Plan:
    """The built model and everything decided about its parameters."""

    recipe: Recipe
    built: BuiltModel
    num_classes: int
    freeze: FreezeReport
    groups: list[dict[str, Any]]
    unfreeze: list[UnfreezeStage]


def build_plan(recipe: Recipe, *, num_classes: int | None = None) -> Plan:
    """Build the recipe's model with its weights, freezing and parameter groups; no data.

    Args:
        num_classes: by default ``model.num_classes``, else what ``data.train`` declares without
            reading an image (``classes_from_data``).

    Torch is seeded with ``recipe.seed`` first, so the new head starts from the same weights as
    in ``finetune run``.
    """
    opt = recipe.optimizer
    lr = opt.lr  # `finetune run` resolves `auto` (the LR range test) before it plans
    if not isinstance(lr, (int, float)):
        raise UserError(f"optimizer.lr: {lr!r} is found when training starts; to plan, give a "
                        "number, e.g. --set optimizer.lr=0.01")
    torch.manual_seed(recipe.seed)
    num_classes = num_classes or recipe.model.num_classes or classes_from_data(recipe.data)
    built = build_model(**{**dict(recipe.model), "num_classes": num_classes})
    report = freeze(built.model, **dict(recipe.freeze), head=built.head_name)
    options: dict[str, Any] = {"lr": lr, "weight_decay": opt.weight_decay,
                               "rules": opt.param_groups, "no_decay": opt.no_decay,
                               "layer_decay": opt.layer_decay}
    groups = param_groups(built.model, **options)
    reference_lr = groups[0]["lr"] if groups else None
    stages = [UnfreezeStage(step.epoch, _stage_groups(built.model, step, options), reference_lr)
              for step in report.unfreeze]
    return Plan(recipe, built, num_classes, report, groups, stages)


def _stage_groups(model: torch.nn.Module, step: ScheduledUnfreeze, options: dict[str, Any]
                  ) -> list[dict[str, Any]]:
    """The groups an unfreeze step adds: the usual rules, with the step's ``lr`` if it has one."""
    groups = param_groups(model, **options, names=set(step.names))
    for group in groups:
        group["name"] = f"unfreeze@{step.epoch}/{group['name']}"
        if step.lr is not None:
            group["lr"] = step.lr
    return groups


def classes_from_data(data: DataConfig) -> int:
    """The number of classes of ``data.train`` from the recipe alone (no image is read).

    ``fake``: its ``num_classes``; ``digits``: its ``classes``; ``imagefolder``: its sub-folders
    that are not hidden. Other sources need ``model.num_classes``.
    """
    source = data.train
    if isinstance(source, FakeSource):
        return source.num_classes
    if isinstance(source, DigitsSource):
        return len(source.classes)
    if not isinstance(source, ImageFolderSource):
        raise UserError(f"model.num_classes: needed to plan without reading the "
                        f"{source.type} data; set it in the recipe or with --set")
    try:
        classes = [entry.name for entry in os.scandir(source.root)
                   if entry.is_dir() and not entry.name.startswith(".")]
    except OSError as error:
        raise UserError(f"data.train.root: cannot list {source.root}: {error}") from None
    if len(classes) < 2:
        raise UserError(f"data.train.root: {source.root} has {len(classes)} class folders; "
                        "set model.num_classes or add one folder per class")
    return len(classes)


# ---------------------------------------------------------------------------------- describing
def _count(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _group_row(group: dict[str, Any]) -> dict[str, Any]:
    return {"name": group["name"], "rule": group["rule"], "tensors": len(group["params"]),
            "params": _count(group["params"]), "lr": group["lr"],
            "weight_decay": group["weight_decay"]}


def plan_to_dict(plan: Plan, steps_per_epoch: int = 1) -> dict[str, Any]:
    """The plan as plain JSON-able values (what ``finetune plan --json`` prints).

    ``load`` is ``null`` when no weights file was loaded (random init or ``pretrained: true``).
    """
    model = plan.built.model
    named = list(model.named_parameters())
    frozen = [p for _, p in named if not p.requires_grad]
    trainable = [p for _, p in named if p.requires_grad]
    report = plan.freeze
    return {
        "model": {"backbone": plan.recipe.model.backbone, "num_classes": plan.num_classes,
                  "head": {"type": plan.recipe.model.head.type, "module": plan.built.head_name,
                           "in_features": plan.built.in_features},
                  "params": _count([p for _, p in named])},
        "load": plan.built.load_report.to_dict() if plan.built.load_report else None,
        "groups": [_group_row(group) for group in plan.groups],
        "trainable_params": _count(trainable),
        "frozen_params": _count(frozen),
        "trainable_tensors": len(trainable),
        "frozen_tensors": len(frozen),
        "freeze": {"patterns": list(plan.recipe.freeze.patterns), "until": report.until,
                   "frozen": report.frozen},
        "batchnorm": {"policy": report.batchnorm, "frozen_layers": report.frozen_batchnorms},
        "unfreeze": [{"epoch": stage.epoch, "patterns": step.patterns, "lr": step.lr,
                      "tensors": sum(len(g["params"]) for g in stage.groups),
                      "params": sum(_count(g["params"]) for g in stage.groups),
                      "groups": [_group_row(group) for group in stage.groups]}
                     for stage, step in zip(plan.unfreeze, report.unfreeze, strict=True)],
        "lr_scale": lr_scale(plan.recipe),
        "schedule": {"name": plan.recipe.scheduler.name, "interval": plan.recipe.scheduler.interval,
                     "groups": schedule_preview(plan, steps_per_epoch)},
    }


def lr_scale(recipe: Recipe) -> float:
    """The factor ``optimizer.lr_scaling`` applies to every LR (1 without scaling)."""
    opt = recipe.optimizer
    return lr_scale_factor(lr_scaling=opt.lr_scaling, batch_size=recipe.data.batch_size,
                           base_batch_size=opt.base_batch_size,
                           grad_accum_steps=recipe.train.grad_accum_steps)


def schedule_preview(plan: Plan, steps_per_epoch: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Each group's LR at the start, the end of the warmup, the middle and the end of the run.

    The plan reads no data, so by default an epoch counts as one optimizer step: the points fall
    on the right epochs, but a ``warmup_steps`` warmup needs the real ``steps_per_epoch``.
    """
    recipe = plan.recipe
    preview = preview_lrs(plan.groups, lr=recipe.optimizer.lr, epochs=recipe.train.epochs,
                          steps_per_epoch=steps_per_epoch, lr_scale=lr_scale(recipe),
                          **dict(recipe.scheduler))
    per_epoch = steps_per_epoch if recipe.scheduler.interval == "step" else 1
    return {name: [{"point": label, "epoch": round(step / per_epoch, 3), "lr": value}
                   for label, step, value in points] for name, points in preview.items()}


def write_schedule_plot(plan: Plan, path: Path, steps_per_epoch: int = 1) -> Path:
    """``lr_schedule.png``: every group's LR over the run."""
    recipe = plan.recipe
    return plot_lr_schedule(path, plan.groups, lr=recipe.optimizer.lr,
                            epochs=recipe.train.epochs, steps_per_epoch=steps_per_epoch,
                            lr_scale=lr_scale(recipe), **dict(recipe.scheduler))


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    more = len(names) - SHOWN_NAMES
    return shown + (f", ... and {more} more" if more > 0 else "")


def print_load_report(report: LoadReport, console: Console) -> None:
    """The load report as a table, with a loud warning when the file barely fits the model."""
    table = Table("", "tensors", "names", title=f"weights from {escape(report.source)}",
                  title_justify="left")
    mismatched = [f"{m['key']} (file {m['file_shape']} vs model {m['model_shape']})"
                  for m in report.mismatched]
    table.add_row("loaded", str(len(report.loaded)), escape(_by_module(report.loaded)))
    for label, names in (("missing", report.missing), ("unexpected", report.unexpected),
                         ("shape mismatch", mismatched), ("excluded", report.excluded)):
        table.add_row(label, str(len(names)), escape(_names(names)))
    console.print(table)
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    if report.warning:
        console.print(f"[bold red]WARNING: {escape(report.warning)}[/]")


def print_plan(plan: Plan, console: Console, steps_per_epoch: int = 1) -> None:
    """Load report, parameter groups, frozen/trainable totals, BatchNorm policy, unfreezing,
    and the LR schedule of each group."""
    info = plan_to_dict(plan, steps_per_epoch)
    head = info["model"]["head"]
    console.print(f"{escape(info['model']['backbone'])}: {info['model']['params']:,} parameters;"
                  f" head {escape(head['type'])} at {escape(head['module'])} "
                  f"({head['in_features']} features -> {plan.num_classes} classes)")
    if plan.built.load_report is not None:
        print_load_report(plan.built.load_report, console)
    else:
        pretrained = plan.recipe.model.pretrained
        console.print("weights: " + ("the backbone's published pretrained weights"
                                     if pretrained is True else "random initialisation"))
    console.print(_groups_table("parameter groups (first matching rule wins)", info["groups"]))
    total = info["trainable_params"] + info["frozen_params"]
    console.print(f"trainable {info['trainable_params']:,} parameters "
                  f"({info['trainable_tensors']} tensors), frozen {info['frozen_params']:,} "
                  f"({info['frozen_tensors']} tensors), {info['frozen_params'] / total:.1%} "
                  f"frozen")
    if plan.freeze.frozen:
        console.print(f"frozen: {escape(_by_module(plan.freeze.frozen))}")
    batchnorm = info["batchnorm"]
    console.print(f"BatchNorm: {batchnorm['policy']}" + (
        f" (running statistics fixed in {len(batchnorm['frozen_layers'])} layers, across "
        "model.train())" if batchnorm["policy"] == "frozen" else " (statistics update)"))
    for stage in info["unfreeze"]:
        console.print(_groups_table(
            f"unfreeze at the start of epoch {stage['epoch']}: {', '.join(stage['patterns'])} "
            f"({stage['params']:,} parameters)", stage["groups"]))
    console.print(_schedule_table(info))


def _schedule_table(info: dict[str, Any]) -> Table:
    schedule = info["schedule"]
    points = next(iter(schedule["groups"].values()), [])
    scaled = f", x{info['lr_scale']:g} by lr_scaling" if info["lr_scale"] != 1 else ""
    table = Table("group", *(f"{p['point']} (epoch {p['epoch']:g})" for p in points),
                  title=f"learning rate: {escape(schedule['name'])}, stepped per "
                        f"{schedule['interval']}{scaled}", title_justify="left")
    for name, values in schedule["groups"].items():
        table.add_row(escape(name), *(f"{p['lr']:.3g}" for p in values))
    return table


def _groups_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table("group", "tensors", "params", "lr", "weight decay", title=escape(title),
                  title_justify="left")
    for row in rows:
        table.add_row(escape(row["name"]), str(row["tensors"]), f"{row['params']:,}",
                      f"{row['lr']:.4g}", f"{row['weight_decay']:.4g}")
    return table


def _by_module(names: list[str]) -> str:
    """``conv1 (1), bn1 (2), layer1 (12)``: how many of ``names`` each top-level module has."""
    counts = Counter(name.split(".", 1)[0] for name in names)
    return ", ".join(f"{module} ({count})" for module, count in counts.items())
