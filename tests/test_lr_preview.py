"""The LR preview (``finetune plan`` and ``--lr-plot``): the data behind the table and the plot,
against torch's schedulers driven by hand and against the textbook formulas."""

from __future__ import annotations

import numpy as np
import pytest
from torch.optim import lr_scheduler

from finetune.lr_preview import lr_curve, plot_lr_schedule, preview_lrs
from tests.test_schedule import EPOCHS, STEPS_PER_EPOCH, assert_same_lrs, two_groups


# -------------------------------------------------------------------------------------- preview
def test_preview_drives_the_real_scheduler():
    groups = [{"name": "fc.*", "lr": 0.1}, {"name": "default", "lr": 0.01}]
    preview = preview_lrs(
        groups,
        lr=0.01,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        name="cosine",
        warmup_epochs=1,
        min_lr=0.0,
        points=[10],
    )
    labels = [label for label, _, _ in preview["default"]]
    assert labels == ["start", "warmup end", "middle", "end", "step 10"]
    start, warmup_end, middle, end, _ = preview["fc.*"]
    assert start == ("start", 0, pytest.approx(0.01))
    assert warmup_end == ("warmup end", STEPS_PER_EPOCH, pytest.approx(0.1))
    assert middle[1] == 12 and 0 < middle[2] < 0.1 and end[2] < middle[2]
    for fc, default in zip(preview["fc.*"], preview["default"], strict=True):
        assert fc[2] == pytest.approx(10 * default[2])  # each group keeps its own base LR


def test_plot_lr_schedule_writes_a_png(tmp_path):
    path = plot_lr_schedule(
        tmp_path,
        [{"name": "default", "lr": 0.01}],
        lr=0.01,
        epochs=3,
        steps_per_epoch=5,
        name="onecycle",
        max_lr=0.1,
    )
    assert path == tmp_path / "lr_schedule.png" and path.stat().st_size > 1000


# -------------------------------------------------------------------- the data behind the plot
def test_lr_curve_is_cosine_with_warmup_as_written_by_hand():
    """The values `plan --lr-plot` draws: each group's LR at every step, against the textbook
    formula and against torch's schedulers driven by hand."""
    groups = [{"name": "fc.*", "lr": 0.1}, {"name": "default", "lr": 0.01}]
    span, curves = lr_curve(
        groups,
        lr=0.01,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        name="cosine",
        warmup_epochs=1,
        min_lr=1e-4,
    )
    total, warm = EPOCHS * STEPS_PER_EPOCH, STEPS_PER_EPOCH
    assert (span.total, span.warmup, span.per_epoch) == (total, warm, STEPS_PER_EPOCH)
    assert list(curves) == ["fc.*", "default"]

    def formula(base: float, step: int) -> float:
        if step < warm:  # linear from 0.1 x base to base
            return base * (0.1 + 0.9 * step / warm)
        progress = (step - warm) / (total - warm)
        return 1e-4 + (base - 1e-4) * (1 + np.cos(np.pi * progress)) / 2

    for group in groups:
        expected = [formula(group["lr"], step) for step in range(total)]
        np.testing.assert_allclose(curves[group["name"]], expected, rtol=1e-9)

    optimizer = two_groups()
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.1, end_factor=1.0, total_iters=warm)
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warm, eta_min=1e-4)
    torch_schedule = lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warm])
    by_hand = []
    for _ in range(total):
        by_hand.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        torch_schedule.step()
    assert_same_lrs([[curves["fc.*"][s], curves["default"][s]] for s in range(total)], by_hand)
    assert max(curves["fc.*"]) == pytest.approx(0.1) and curves["fc.*"][warm] == pytest.approx(0.1)


def test_lr_curve_applies_the_lr_scale_and_the_epoch_interval():
    groups = [{"name": "default", "lr": 0.01}]
    _, plain = lr_curve(
        groups,
        lr=0.01,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        name="step",
        step_size=2,
        gamma=0.5,
    )
    span, scaled = lr_curve(
        groups,
        lr=0.01,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        lr_scale=4.0,
        name="step",
        step_size=2,
        gamma=0.5,
    )
    np.testing.assert_allclose(scaled["default"], [4 * v for v in plain["default"]], rtol=1e-12)
    expected = [0.01 * 0.5 ** (step // (2 * STEPS_PER_EPOCH)) for step in range(span.total)]
    np.testing.assert_allclose(plain["default"], expected, rtol=1e-12)
    span, epochs = lr_curve(
        groups,
        lr=0.01,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        interval="epoch",
        name="step",
        step_size=2,
        gamma=0.5,
    )
    assert span.total == EPOCHS
    np.testing.assert_allclose(epochs["default"], [0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025])
