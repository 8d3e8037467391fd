"""The LR each parameter group will get over a run, before any training: for ``finetune plan``
(a table at a few points, and ``--lr-plot``) and for tests.

The curves come from the real ``build_scheduler`` on a throwaway optimizer, so a preview can
never disagree with what a run does (a ``plateau`` schedule's reductions depend on the run and
are not shown).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from finetune.schedule import Span, build_scheduler, schedule_span


def lr_curve(
    groups: Sequence[Mapping[str, Any]],
    *,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    lr_scale: float = 1.0,
    **scheduler: Any,
) -> tuple[Span, dict[str, list[float]]]:
    """Each group's LR at every scheduler step, from the real scheduler on a throwaway optimizer.

    Args:
        groups: parameter groups with ``name`` and ``lr`` (``finetune.optim.param_groups``).
        lr: the optimizer's own LR (``optimizer.lr``), which ``max_lr`` is relative to.
        scheduler: the ``scheduler:`` keys, as for ``build_scheduler``.

    Returns:
        The span and, by group name, the LR used by each of the ``span.total`` steps. A
        ``plateau`` schedule gets no metric here: its reductions depend on the run.
    """
    dummies = [
        {
            "params": [torch.zeros(1, requires_grad=True)],
            "lr": group["lr"] * lr_scale,
            "name": str(group.get("name", index)),
            "rule": group.get("rule"),
        }
        for index, group in enumerate(groups)
    ]
    optimizer = torch.optim.SGD(dummies, lr=lr * lr_scale, momentum=0.9)
    schedule = build_scheduler(
        optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch, lr_scale=lr_scale, **scheduler
    )
    span = schedule_span(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        interval=scheduler.get("interval", "step"),
        warmup_epochs=scheduler.get("warmup_epochs", 0.0),
        warmup_steps=scheduler.get("warmup_steps", 0),
    )
    curves: dict[str, list[float]] = {group["name"]: [] for group in dummies}
    for _ in range(span.total):
        for group in optimizer.param_groups:
            curves[group["name"]].append(float(group["lr"]))
        optimizer.step()  # no gradients: changes nothing, but keeps torch's step order
        schedule.step_update() if schedule.interval == "step" else schedule.step_epoch()
    return span, curves


def preview_lrs(
    groups: Sequence[Mapping[str, Any]],
    *,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    lr_scale: float = 1.0,
    points: Sequence[int] = (),
    **scheduler: Any,
) -> dict[str, list[tuple[str, int, float]]]:
    """Each group's LR at the start, the end of the warmup, the middle and the end of the run.

    Same arguments as ``lr_curve``; ``points`` adds steps of your choice. Steps count scheduler
    steps: optimizer steps, or epochs with ``interval: epoch``.

    Returns:
        ``{group name: [(label, step, lr), ...]}``, e.g. ``("warmup end", 50, 0.01)``.

    Example:
        >>> preview_lrs(groups, lr=0.01, epochs=10, steps_per_epoch=50, name="cosine",
        ...             warmup_epochs=1)["default"][0]
        ('start', 0, 0.001)
    """
    span, curves = lr_curve(
        groups,
        lr=lr,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr_scale=lr_scale,
        **scheduler,
    )
    marks = [("start", 0)]
    if span.warmup:
        marks.append(("warmup end", span.warmup))
    marks += [("middle", span.total // 2), ("end", span.total - 1)]
    marks += [(f"step {step}", step) for step in points if 0 <= step < span.total]
    return {
        name: [(label, step, values[step]) for label, step in marks]
        for name, values in curves.items()
    }


def plot_lr_schedule(
    path: str | Path,
    groups: Sequence[Mapping[str, Any]],
    *,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    lr_scale: float = 1.0,
    **scheduler: Any,
) -> Path:
    """Write ``lr_schedule.png`` (or ``path`` if it names a ``.png``): each group's LR by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span, curves = lr_curve(
        groups,
        lr=lr,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr_scale=lr_scale,
        **scheduler,
    )
    path = Path(path)
    path = path if path.suffix == ".png" else path / "lr_schedule.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axis = plt.subplots(figsize=(6.4, 3.6))
    for name, values in curves.items():
        axis.plot([step / span.per_epoch for step in range(span.total)], values, label=name)
    if span.warmup:
        axis.axvline(span.warmup / span.per_epoch, color="grey", linestyle=":", linewidth=1)
    title = scheduler.get("name", "cosine")
    axis.set_title(
        f"{title}: LR per group" + (" (no reductions shown)" if title == "plateau" else "")
    )
    axis.set_xlabel("epoch")
    axis.set_ylabel("learning rate")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
