"""Everything finetune shows a person: the plan, the load report, LR previews and plots.

The building blocks return data (``LoadReport``, ``Built``, metrics rows); this module turns
them into rich tables and PNG files, so ``finetune plan``, ``finetune run`` and the run folder's
``plots/`` all print the same thing the same way.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.build import Built
from finetune.image_cache import describe_cache
from finetune.lr_preview import plot_lr_schedule, preview_lrs
from finetune.optim import UNFREEZE_PREFIX
from finetune.run_folder import RunFolder
from finetune.weights import LoadReport

SHOWN_NAMES = 6  # names per row of the load report table; the JSON form has them all


def _count(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _group_row(group: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": group["name"],
        "rule": group["rule"],
        "tensors": len(group["params"]),
        "params": _count(group["params"]),
        "lr": group["lr"],
        "weight_decay": group["weight_decay"],
    }


def plan_to_dict(built: Built) -> dict[str, Any]:
    """What was built, as plain JSON-able values (what ``finetune plan --json`` prints).

    ``load`` is ``null`` when no weights file was loaded (random init or ``pretrained: true``).
    """
    recipe, network = built.recipe, built.network
    model = network.model
    named = list(model.named_parameters())
    frozen = [p for _, p in named if not p.requires_grad]
    trainable = [p for _, p in named if p.requires_grad]
    report = built.freeze
    stage_groups = {
        stage.epoch: [
            g for g in built.groups if g["name"].startswith(f"{UNFREEZE_PREFIX}{stage.epoch}/")
        ]
        for stage in built.unfreeze
    }
    return {
        "model": {
            "backbone": recipe.model.backbone,
            "num_classes": built.num_classes,
            "head": {
                "type": recipe.model.head.type,
                "module": ", ".join(network.head_names),
                "in_features": network.in_features,
            },
            "params": _count([p for _, p in named]),
        },
        "load": network.load_report.to_dict() if network.load_report else None,
        "groups": [
            _group_row(group)
            for group in built.groups
            if not group["name"].startswith(UNFREEZE_PREFIX)
        ],
        "trainable_params": _count(trainable),
        "frozen_params": _count(frozen),
        "trainable_tensors": len(trainable),
        "frozen_tensors": len(frozen),
        "freeze": {
            "patterns": list(recipe.freeze.patterns),
            "until": report.until,
            "frozen": report.frozen,
        },
        "batchnorm": {"policy": report.batchnorm, "frozen_layers": report.frozen_batchnorms},
        "unfreeze": [
            {
                "epoch": stage.epoch,
                "patterns": stage.patterns,
                "lr": stage.lr,
                "tensors": len(stage.names),
                "params": sum(_count(g["params"]) for g in stage_groups[stage.epoch]),
                "groups": [_group_row(group) for group in stage_groups[stage.epoch]],
            }
            for stage in built.unfreeze
        ],
        "feature_cache": built.features.plan.to_dict(recipe.train.epochs)
        if built.features is not None
        else None,
        "lr_scale": built.lr_scale,
        "schedule": {
            "name": recipe.scheduler.name,
            "interval": recipe.scheduler.interval,
            "groups": schedule_preview(built),
        },
    }


def schedule_preview(built: Built) -> dict[str, list[dict[str, Any]]]:
    """Each group's LR at the start, the end of the warmup, the middle and the end of the run.

    Without data (``finetune plan``) an epoch counts ``built.steps_per_epoch`` optimizer steps
    (one by default): the points fall on the right epochs, but a ``warmup_steps`` warmup needs
    the real number.
    """
    recipe, steps_per_epoch = built.recipe, built.steps_per_epoch
    preview = preview_lrs(
        built.groups,
        lr=recipe.optimizer.lr,
        epochs=recipe.train.epochs,
        steps_per_epoch=steps_per_epoch,
        lr_scale=built.lr_scale,
        **dict(recipe.scheduler),
    )
    per_epoch = steps_per_epoch if recipe.scheduler.interval == "step" else 1
    return {
        name: [
            {"point": label, "epoch": round(step / per_epoch, 3), "lr": value}
            for label, step, value in points
        ]
        for name, points in preview.items()
    }


def write_schedule_plot(built: Built, path: Path) -> Path:
    """``lr_schedule.png``: every group's LR over the run."""
    recipe = built.recipe
    return plot_lr_schedule(
        path,
        built.groups,
        lr=recipe.optimizer.lr,
        epochs=recipe.train.epochs,
        steps_per_epoch=built.steps_per_epoch,
        lr_scale=built.lr_scale,
        **dict(recipe.scheduler),
    )


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    more = len(names) - SHOWN_NAMES
    return shown + (f", ... and {more} more" if more > 0 else "")


def print_load_report(report: LoadReport, console: Console) -> None:
    """The load report as a table, with a loud warning when the file barely fits the model."""
    table = Table(
        "", "tensors", "names", title=f"weights from {escape(report.source)}", title_justify="left"
    )
    mismatched = [
        f"{m['key']} (file {m['file_shape']} vs model {m['model_shape']})"
        for m in report.mismatched
    ]
    table.add_row("loaded", str(len(report.loaded)), escape(_by_module(report.loaded)))
    for label, names in (
        ("missing", report.missing),
        ("unexpected", report.unexpected),
        ("shape mismatch", mismatched),
        ("excluded", report.excluded),
    ):
        table.add_row(label, str(len(names)), escape(_names(names)))
    console.print(table)
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    if report.warning:
        console.print(f"[bold red]WARNING: {escape(report.warning)}[/]")
    elif report.suggestion:
        console.print(f"hint: {escape(report.suggestion)}")


def print_plan(built: Built, console: Console) -> None:
    """Load report, parameter groups, frozen/trainable totals, BatchNorm policy, unfreezing,
    and the LR schedule of each group."""
    info = plan_to_dict(built)
    head = info["model"]["head"]
    console.print(
        f"{escape(info['model']['backbone'])}: {info['model']['params']:,} parameters;"
        f" head {escape(head['type'])} at {escape(head['module'])} "
        f"({head['in_features']} features -> {built.num_classes} classes)"
    )
    if built.network.load_report is not None:
        print_load_report(built.network.load_report, console)
    else:
        pretrained = built.recipe.model.pretrained
        console.print(
            "weights: "
            + (
                "the backbone's published pretrained weights"
                if pretrained is True
                else "random initialisation"
            )
        )
    console.print(_groups_table("parameter groups (first matching rule wins)", info["groups"]))
    total = info["trainable_params"] + info["frozen_params"]
    console.print(
        f"trainable {info['trainable_params']:,} parameters "
        f"({info['trainable_tensors']} tensors), frozen {info['frozen_params']:,} "
        f"({info['frozen_tensors']} tensors), {info['frozen_params'] / total:.1%} "
        f"frozen"
    )
    if built.freeze.frozen:
        console.print(f"frozen: {escape(_by_module(built.freeze.frozen))}")
    batchnorm = info["batchnorm"]
    console.print(
        f"BatchNorm: {batchnorm['policy']}"
        + (
            f" (running statistics fixed in {len(batchnorm['frozen_layers'])} layers, across "
            "model.train())"
            if batchnorm["policy"] == "frozen"
            else " (statistics update)"
        )
    )
    for stage in info["unfreeze"]:
        console.print(
            _groups_table(
                f"unfreeze at the start of epoch {stage['epoch']}: {', '.join(stage['patterns'])} "
                f"({stage['params']:,} parameters)",
                stage["groups"],
            )
        )
    console.print(escape(describe_cache(built.recipe.data)), highlight=False)
    if built.features is not None:
        features = built.features.plan.describe(built.recipe.train.epochs)
        console.print(escape(features), highlight=False)
    console.print(_schedule_table(info))


def _schedule_table(info: dict[str, Any]) -> Table:
    schedule = info["schedule"]
    points = next(iter(schedule["groups"].values()), [])
    scaled = f", x{info['lr_scale']:g} by lr_scaling" if info["lr_scale"] != 1 else ""
    table = Table(
        "group",
        *(f"{p['point']} (epoch {p['epoch']:g})" for p in points),
        title=f"learning rate: {escape(schedule['name'])}, stepped per "
        f"{schedule['interval']}{scaled}",
        title_justify="left",
    )
    for name, values in schedule["groups"].items():
        table.add_row(escape(name), *(f"{p['lr']:.3g}" for p in values))
    return table


def _groups_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(
        "group",
        "tensors",
        "params",
        "lr",
        "weight decay",
        title=escape(title),
        title_justify="left",
    )
    for row in rows:
        table.add_row(
            escape(row["name"]),
            str(row["tensors"]),
            f"{row['params']:,}",
            f"{row['lr']:.4g}",
            f"{row['weight_decay']:.4g}",
        )
    return table


def _by_module(names: list[str]) -> str:
    """``conv1 (1), bn1 (2), layer1 (12)``: how many of ``names`` each top-level module has."""
    counts = Counter(name.split(".", 1)[0] for name in names)
    return ", ".join(f"{module} ({count})" for module, count in counts.items())


def describe_run(built: Built, folder: RunFolder, console: Console) -> None:
    """The load report and one line on what is about to train, where and how."""
    if built.network.load_report is not None:
        print_load_report(built.network.load_report, console)
    datasets, runtime = built.datasets, built.runtime
    assert datasets is not None
    ddp = f" with DDP over {runtime.backend}" if runtime.distributed else ""
    console.print(
        f"run folder: {folder.path}  ({len(datasets.train)} train / "
        f"{len(datasets.val)} val images, {len(datasets.classes)} classes, "
        f"device {runtime.device}, {runtime.precision}, {runtime.world_size} "
        f"process(es){ddp}, "
        f"effective batch {built.effective_batch_size})",
        highlight=False,
    )
    if built.recipe.data.cache != "none":
        console.print(escape(describe_cache(built.recipe.data, datasets)), highlight=False)


def plot_curves(folder: RunFolder) -> None:
    """``plots/curves.png``: loss, accuracy and learning rate per epoch."""
    rows = folder.read_metrics()
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("train/loss", "val/loss"):
        axes[0].plot(epochs, [row[key] for row in rows], marker="o", label=key)
    for key in ("train/top1", "val/top1", "val/top5"):
        if key in rows[0]:
            axes[1].plot(epochs, [row[key] for row in rows], marker="o", label=key)
    for key in (k for k in rows[0] if k.startswith("lr/")):
        axes[2].plot(epochs, [row[key] for row in rows], marker="o", label=key)
    for axis, title in zip(
        axes, ("loss", "accuracy", "learning rate (each epoch's last step)"), strict=True
    ):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    fig.tight_layout()
    folder.plots.mkdir(exist_ok=True)
    fig.savefig(folder.plots / "curves.png", dpi=90)
    plt.close(fig)
