"""The LR range test ("LR finder"): a short run at exponentially rising learning rates.

The loss is recorded at every step, smoothed, and the run stops when it diverges; the suggested
LR is where the smoothed loss falls fastest (``steepest``) or a tenth of where it is lowest
(``min10``). The model, the optimizer and the random generators are put back as they were, so
training can start from the same weights.

The ramp multiplies every parameter group's LR by the same factor, so the groups keep their
ratios, and the LRs reported are values for ``optimizer.lr``. ``lr_range_test`` works on any
model, optimizer and loader; ``finetune.build.range_test`` runs it on what a recipe builds, as
``finetune lr-find`` and ``optimizer.lr: auto`` do.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import UserError
from finetune.runtime import Runtime, restore_rng_state, rng_state

START_LR, END_LR, STEPS = 1e-7, 10.0, 100  # the defaults, also of `optimizer.lr: auto`
RULES = {
    "steepest": "steepest descent of the smoothed loss",
    "min10": "a tenth of the LR with the lowest smoothed loss",
}


@dataclass
class LRFinderResult:
    """What the range test saw and what it suggests (``lrs`` are values of ``optimizer.lr``)."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str  # the rule that chose ``suggestion`` (a key of ``RULES``)
    start_lr: float
    end_lr: float
    steps: int
    diverged_at: int | None  # the step at which the loss diverged, if it did
    group_lrs: dict[str, float] = field(default_factory=dict)  # each group's LR at the suggestion

    def describe(self) -> str:
        """One line: the suggestion, its rule and how the test went."""
        end = (
            f"stopped at step {self.diverged_at} when the loss diverged"
            if self.diverged_at is not None
            else "did not diverge"
        )
        return (
            f"suggested optimizer.lr {self.suggestion:.3g} ({RULES[self.rule]}); "
            f"{len(self.lrs)} steps from {self.start_lr:g}, {end}"
        )

    def save(self, out_dir: str | Path) -> Path:
        """Write ``lr_find.json`` and ``lr_find.png`` into ``out_dir``; return the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lr_find.json").write_text(json.dumps(asdict(self), indent=2) + "\n")
        self.plot(out / "lr_find.png")
        return out

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axis = plt.subplots(figsize=(6.4, 3.8))
        axis.plot(self.lrs, self.losses, color="tab:blue", alpha=0.3, label="loss")
        axis.plot(self.lrs, self.smoothed, color="tab:blue", label="smoothed loss")
        axis.axvline(
            self.suggestion,
            color="tab:red",
            linestyle="--",
            label=f"suggested {self.suggestion:.2g}",
        )
        axis.set_xscale("log")
        if self.smoothed:  # the divergence would squash the interesting part
            low, high = min(self.smoothed), max(self.smoothed[0], min(self.smoothed) * 1.5)
            axis.set_ylim(low - 0.05 * (high - low), high + 0.25 * (high - low))
        axis.set_xlabel("optimizer.lr")
        axis.set_ylabel("training loss")
        axis.set_title(f"LR range test: {RULES[self.rule]}", fontsize=9)
        axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def suggest_lr(
    lrs: list[float], smoothed: list[float], rule: str = "steepest"
) -> tuple[float, str]:
    """The suggested LR and the rule that chose it.

    ``steepest``: where the smoothed loss falls fastest against log(LR), between the first
    tenth of the test and the loss's minimum; with too few points there, ``min10``: a tenth of
    the LR at the minimum.
    """
    if rule not in RULES:
        raise UserError(f"lr-find: unknown rule {rule!r}; choose {' or '.join(RULES)}")
    if not lrs:
        raise UserError("lr-find: the loss was not finite at the first step; lower --start-lr")
    lowest = int(np.argmin(smoothed))
    skip = max(1, len(lrs) // 10)  # at the smallest LRs the loss only moves by noise
    if rule == "steepest" and lowest - skip >= 3:
        log_lrs = np.log10(lrs[skip : lowest + 1])
        slopes = np.gradient(np.asarray(smoothed[skip : lowest + 1]), log_lrs)
        return float(lrs[skip + int(np.argmin(slopes))]), "steepest"
    return float(lrs[lowest]) / 10, "min10"


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime | None = None,
    *,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    steps: int = STEPS,
    rule: str = "steepest",
    reference_lr: float | None = None,
    smooth_steps: int | None = None,
    diverge_factor: float = 4.0,
    grad_accum_steps: int = 1,
    clip_grad_norm: float | None = None,
    label_smoothing: float = 0.0,
) -> LRFinderResult:
    """Train ``steps`` optimizer steps at LRs from ``start_lr`` to ``end_lr`` (geometric), then
    put the model, the optimizer and the random generators back.

    Args:
        loader: training batches of (images, labels); restarted (next epoch) when exhausted.
        runtime: device and precision (default: the model's device, fp32).
        reference_lr: the LR that maps to the optimizer's current ones: at a test LR ``x`` each
            group trains at ``its LR * x / reference_lr`` (default: ``optimizer.defaults["lr"]``).
        smooth_steps: the loss is averaged over this many steps on each side (default: a
            twentieth of ``steps``, at least 1), centred so that it does not lag behind the LR.
        diverge_factor: stop when the loss averaged over the last steps exceeds this many times
            its lowest value.

    Example:
        >>> result = lr_range_test(model, optimizer, train_loader, steps=100)
        >>> result.suggestion, result.rule
        (0.0316, 'steepest')
    """
    check_range(start_lr, end_lr, steps, rule)
    runtime = runtime or Runtime(device=next(model.parameters()).device)
    reference = reference_lr or optimizer.defaults["lr"]
    initial = [group["lr"] for group in optimizer.param_groups]
    saved = _snapshot(model, optimizer, runtime)
    lrs: list[float] = []
    losses: list[float] = []
    half = smooth_steps if smooth_steps is not None else max(1, steps // 20)
    lowest, diverged_at = math.inf, None
    batches = _forever(loader)
    try:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for step, lr in enumerate(np.geomspace(start_lr, end_lr, steps).tolist()):
            for group, base in zip(optimizer.param_groups, initial, strict=True):
                group["lr"] = base * lr / reference
            loss = _train_step(
                model,
                optimizer,
                batches,
                runtime,
                grad_accum_steps,
                clip_grad_norm,
                label_smoothing,
            )
            if not math.isfinite(loss):
                diverged_at = step
                break
            lrs.append(lr)
            losses.append(loss)
            running = float(np.mean(losses[-half - 1 :]))  # only the past is known yet
            lowest = min(lowest, running)
            if running > diverge_factor * lowest:
                diverged_at = step
                break
    finally:
        _restore(model, optimizer, runtime, saved)
    # Centred: a trailing average lags, and would move the suggestion to higher LRs.
    smoothed = [float(np.mean(losses[max(0, i - half) : i + half + 1])) for i in range(len(losses))]
    suggestion, used = suggest_lr(lrs, smoothed, rule)
    names = [str(group.get("name", i)) for i, group in enumerate(optimizer.param_groups)]
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        rule=used,
        start_lr=start_lr,
        end_lr=end_lr,
        steps=steps,
        diverged_at=diverged_at,
        group_lrs={
            name: base * suggestion / reference for name, base in zip(names, initial, strict=True)
        },
    )


def check_range(start_lr: float, end_lr: float, steps: int, rule: str) -> None:
    """The range test's settings, checked before anything is built."""
    if not 0 < start_lr < end_lr:
        raise UserError(f"lr-find: need 0 < start LR < end LR, got {start_lr:g} and {end_lr:g}")
    if steps < 2:
        raise UserError(f"lr-find: need at least 2 steps, got {steps}")
    if rule not in RULES:
        raise UserError(f"lr-find: unknown rule {rule!r}; choose {' or '.join(RULES)}")


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime,
    grad_accum_steps: int,
    clip_grad_norm: float | None,
    label_smoothing: float,
) -> float:
    """One optimizer step over ``grad_accum_steps`` batches, as the training loop takes it."""
    total = 0.0
    for _ in range(grad_accum_steps):
        images, labels = runtime.to_device(*next(batches))
        with runtime.autocast():
            loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
        runtime.backward(loss / grad_accum_steps)
        total += loss.item() / grad_accum_steps
    runtime.step(optimizer, model, clip_grad_norm)
    return total


def _forever(loader: Iterable[Any]) -> Iterator[Any]:
    epoch = 0
    while True:
        epoch += 1
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError(
                "lr-find: the training data gives no batch (fewer images than data.batch_size?)"
            )


def _snapshot(
    model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime
) -> dict[str, Any]:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scaler": runtime.scaler.state_dict(),
        "rng": rng_state(),
        "training": model.training,
    }


def _restore(
    model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, saved: dict[str, Any]
) -> None:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])  # also the groups' LRs
    runtime.scaler.load_state_dict(saved["scaler"])
    restore_rng_state(saved["rng"])
    model.train(saved["training"])
