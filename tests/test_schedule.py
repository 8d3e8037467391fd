"""Our schedules against torch's schedulers driven directly, resume, per-group lambdas, preview."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
import yaml
from torch.optim import lr_scheduler

from finetune.config.schedule import SchedulerConfig
from finetune.errors import UserError
from finetune.lr_preview import preview_lrs
from finetune.recipe import Recipe
from finetune.run_folder import RunFolder
from finetune.schedule import (
    GroupLambdaLR,
    Schedule,
    build_scheduler,
    list_schedules,
)
from tests.conftest import invoke_cli, tiny_recipe, write_recipe

EPOCHS, STEPS_PER_EPOCH = 6, 4
BASE_LRS = [0.1, 0.01]  # "fc.*" ten times the default group's LR, which is optimizer.lr


# The functions the lambda schedule imports by path ("tests.test_schedule:halve_every_two").
def halve_every_two(step: int) -> float:
    return 0.5 ** (step // 2)


def linear_decay(step: int, total_steps: int) -> float:
    return 1.0 - step / total_steps


def two_groups() -> torch.optim.SGD:
    """Two groups with different base LRs, named like ``param_groups`` names them."""
    layer = torch.nn.Linear(3, 2)
    return torch.optim.SGD(
        [
            {"params": [layer.weight], "lr": BASE_LRS[0], "name": "fc.*", "rule": "fc.*"},
            {"params": [layer.bias], "lr": BASE_LRS[1], "name": "default", "rule": "default"},
        ],
        lr=BASE_LRS[1],
        momentum=0.9,
    )


def drive(
    optimizer: torch.optim.Optimizer,
    scheduler,
    steps: int,
    metrics: Callable[[int], float] | None = None,
    per_epoch: int = 1,
) -> list[list[float]]:
    """The LR of each group at each step, stepping as the loop does (optimizer, then scheduler)."""
    seen = []
    for step in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        advance(optimizer, scheduler, step, metrics, per_epoch)
    return seen


def advance(
    optimizer: torch.optim.Optimizer,
    schedule,
    step: int,
    metrics: Callable[[int], float] | None,
    per_epoch: int,
) -> None:
    """One scheduler step as the loop takes it; with ``interval: epoch`` every step ends an
    epoch, else every ``per_epoch`` steps do."""
    optimizer.step()
    schedule.step_update()
    if schedule.interval == "epoch" or (step + 1) % per_epoch == 0:
        epoch = (step + 1) // (1 if schedule.interval == "epoch" else per_epoch)
        schedule.step_epoch(None if metrics is None else {"val/loss": metrics(epoch)})


def assert_same_lrs(actual: list[list[float]], expected: list[list[float]]) -> None:
    np.testing.assert_allclose(np.array(actual), np.array(expected), rtol=1e-12, atol=1e-15)


# Each case: our scheduler keys, and the same schedule written with torch's classes directly.
# `per` is scheduler steps per epoch, `rest` the steps left after a warmup of `warm` steps.
CASES = {
    "constant": (
        {"name": "constant"},
        lambda o, per, rest, warm: lr_scheduler.ConstantLR(o, factor=1.0, total_iters=0),
    ),
    "step": (
        {"name": "step", "step_size": 2, "gamma": 0.5},
        lambda o, per, rest, warm: lr_scheduler.StepLR(o, step_size=2 * per, gamma=0.5),
    ),
    "multistep": (
        {"name": "multistep", "milestones": [2, 4], "gamma": 0.5},
        lambda o, per, rest, warm: lr_scheduler.MultiStepLR(
            o, milestones=[2 * per - warm, 4 * per - warm], gamma=0.5
        ),
    ),
    "exponential": (
        {"name": "exponential", "gamma": 0.5},
        lambda o, per, rest, warm: lr_scheduler.ExponentialLR(o, gamma=0.5 ** (1 / per)),
    ),
    "cosine": (
        {"name": "cosine", "min_lr": 1e-4},
        lambda o, per, rest, warm: lr_scheduler.CosineAnnealingLR(o, T_max=rest, eta_min=1e-4),
    ),
    "cosine-restarts": (
        {"name": "cosine", "min_lr": 1e-4, "cycle_epochs": 2, "cycle_mult": 2},
        lambda o, per, rest, warm: lr_scheduler.CosineAnnealingWarmRestarts(
            o, T_0=2 * per, T_mult=2, eta_min=1e-4
        ),
    ),
    "poly": (
        {"name": "poly", "power": 2.0},
        lambda o, per, rest, warm: lr_scheduler.PolynomialLR(o, total_iters=rest, power=2.0),
    ),
    "cyclic": (
        {"name": "cyclic", "max_lr": 0.05, "cycle_epochs": 2},
        lambda o, per, rest, warm: lr_scheduler.CyclicLR(
            o,
            base_lr=BASE_LRS,
            max_lr=[0.5, 0.05],
            step_size_up=per,
            step_size_down=per,
            cycle_momentum=False,
        ),
    ),
    "cyclic-exp-range": (
        {
            "name": "cyclic",
            "max_lr": 0.05,
            "cycle_epochs": 2,
            "cycle_mode": "exp_range",
            "gamma": 0.5,
        },
        lambda o, per, rest, warm: lr_scheduler.CyclicLR(
            o,
            base_lr=BASE_LRS,
            max_lr=[0.5, 0.05],
            step_size_up=per,
            step_size_down=per,
            mode="exp_range",
            gamma=0.5 ** (1 / per),
            cycle_momentum=False,
        ),
    ),
    "onecycle": (
        {"name": "onecycle", "max_lr": 0.05},
        lambda o, per, rest, warm: lr_scheduler.OneCycleLR(
            o, max_lr=[0.5, 0.05], total_steps=rest, cycle_momentum=False
        ),
    ),
    "lambda": (
        {
            "name": "lambda",
            "lambdas": {
                "fc.*": "tests.test_schedule:halve_every_two",
                "default": "tests.test_schedule:linear_decay",
            },
        },
        lambda o, per, rest, warm: lr_scheduler.LambdaLR(
            o, [halve_every_two, lambda step: linear_decay(step, rest)]
        ),
    ),
}
WARMUPS = {
    "no-warmup": {},
    "warmup-epochs": {"warmup_epochs": 1},
    "warmup-steps": {"warmup_steps": 3},
}


@pytest.mark.parametrize(
    "case, warmup, interval",
    [
        (case, warmup, interval)
        for case in CASES
        for warmup in WARMUPS
        for interval in ("step", "epoch")
        if not (warmup == "warmup-steps" and interval == "epoch")  # it counts optimizer steps
    ],
)
def test_schedule_matches_torch_step_by_step(case, warmup, interval):
    keys, reference = CASES[case]
    per = STEPS_PER_EPOCH if interval == "step" else 1
    warm = {"no-warmup": 0, "warmup-epochs": per, "warmup-steps": 3}[warmup]
    total = EPOCHS * per

    ours = two_groups()
    scheduler = build_scheduler(
        ours,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        interval=interval,
        **keys,
        **WARMUPS[warmup],
    )
    expected = two_groups()
    main = reference(expected, per, total - warm, warm)
    if warm:
        ramp = lr_scheduler.LinearLR(expected, start_factor=0.1, end_factor=1.0, total_iters=warm)
        main = lr_scheduler.SequentialLR(expected, [ramp, main], milestones=[warm])

    torch_schedule = Schedule(expected, interval="step", scheduler=main)  # stepped every time
    actual_lrs, expected_lrs = drive(ours, scheduler, total), drive(expected, torch_schedule, total)
    assert_same_lrs(actual_lrs, expected_lrs)
    first = [lr * (0.1 if warm else 1) for lr in BASE_LRS]
    if case not in ("cyclic", "cyclic-exp-range", "onecycle"):  # those start where they say
        assert actual_lrs[0] == pytest.approx(first)  # the first value is never skipped


@pytest.mark.parametrize("interval, warmup", [("step", 0), ("step", 1), ("epoch", 2)])
def test_plateau_matches_reduce_lr_on_plateau(interval, warmup):
    per = STEPS_PER_EPOCH if interval == "step" else 1
    warm, total = warmup * per, EPOCHS * per
    losses = {1: 1.0, 2: 0.9, 3: 0.95, 4: 0.97, 5: 0.99, 6: 0.5}

    ours = two_groups()
    scheduler = build_scheduler(
        ours,
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        interval=interval,
        name="plateau",
        factor=0.5,
        patience=1,
        warmup_epochs=warmup,
    )
    assert scheduler.plateau is not None and scheduler.monitor == "val/loss"
    actual = drive(ours, scheduler, total, losses.__getitem__, per)

    expected_opt = two_groups()
    plateau = lr_scheduler.ReduceLROnPlateau(expected_opt, mode="min", factor=0.5, patience=1)
    ramp = lr_scheduler.LinearLR(expected_opt, start_factor=0.1, total_iters=warm) if warm else None
    expected = []
    for step in range(total):
        expected.append([group["lr"] for group in expected_opt.param_groups])
        expected_opt.step()
        if step < warm:
            ramp.step()
        if (step + 1) % per == 0 and step + 1 >= warm:
            plateau.step(losses[(step + 1) // per])
    assert_same_lrs(actual, expected)
    assert actual[-1][0] < actual[warm][0]  # it did reduce


def test_plateau_mode_follows_the_metric():
    scheduler = build_scheduler(
        two_groups(), epochs=2, steps_per_epoch=1, name="plateau", monitor="val/top1"
    )
    assert scheduler.plateau.mode == "max"


RESUMABLE = [*CASES, "plateau"]


@pytest.mark.parametrize("case", RESUMABLE)
def test_resume_continues_the_schedule_exactly(case):
    """A state_dict round trip mid-way, as through a checkpoint's state files, changes nothing."""
    keys = CASES[case][0] if case in CASES else {"name": "plateau", "patience": 0, "factor": 0.5}
    keys = {**keys, "warmup_epochs": 1}
    total, middle = EPOCHS * STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH // 2 + 1
    metric = (lambda epoch: 1.0 + epoch) if case == "plateau" else None  # worse every epoch

    def build(optimizer):
        return build_scheduler(optimizer, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, **keys)

    whole_opt = two_groups()
    uninterrupted = drive(whole_opt, build(whole_opt), total, metric, STEPS_PER_EPOCH)

    first_opt = two_groups()
    first_scheduler = build(first_opt)
    before = drive(first_opt, first_scheduler, middle, metric, STEPS_PER_EPOCH)
    buffer = io.BytesIO()
    torch.save(
        {"optimizer": first_opt.state_dict(), "scheduler": first_scheduler.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second_opt = two_groups()
    second_scheduler = build(second_opt)
    second_opt.load_state_dict(saved["optimizer"])
    second_scheduler.load_state_dict(saved["scheduler"])
    # Continue mid-epoch, as drive() would have.
    after = []
    for step in range(middle, total):
        after.append([group["lr"] for group in second_opt.param_groups])
        advance(second_opt, second_scheduler, step, metric, STEPS_PER_EPOCH)
    assert_same_lrs(before + after, uninterrupted)


def test_lambda_functions_are_left_out_of_the_state_dict():
    optimizer = two_groups()
    scheduler = GroupLambdaLR(optimizer, "tests.test_schedule:linear_decay", total_steps=10)
    assert scheduler.state_dict()["lr_lambdas"] == [None, None]


# ------------------------------------------------------------------------------ lambdas per group
def test_lambdas_match_names_globs_rules_and_default():
    layer = torch.nn.Linear(3, 2)
    extra = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(
        [
            {"params": [layer.weight], "lr": 0.1, "name": "layer[12].*", "rule": "layer[12].*"},
            {
                "params": [layer.bias],
                "lr": 0.1,
                "name": "layer[12].*/no_decay",
                "rule": "layer[12].*",
            },
            {"params": [extra.weight], "lr": 0.1, "name": "head.fc"},
            {"params": [extra.bias], "lr": 0.1, "name": "default"},
        ],
        lr=0.1,
    )
    scheduler = GroupLambdaLR(
        optimizer,
        {
            "layer[12].*": "tests.test_schedule:halve_every_two",
            "head.*": "math:cos",
            "default": "tests.test_schedule:linear_decay",
        },
        total_steps=4,
    )
    # By name: pytest imports this file as a module of its own, apart from tests.test_schedule.
    functions = [getattr(f, "func", f).__name__ for f in scheduler.lr_lambdas]
    assert functions == ["halve_every_two", "halve_every_two", "cos", "linear_decay"]
    assert scheduler.lr_lambdas[3].keywords == {"total_steps": 4}


@pytest.mark.parametrize(
    "lambdas, message",
    [
        (
            {"fc.*": "tests.test_schedule:halve_every_two"},
            "no function for parameter group 'default'",
        ),
        ({"fc*x": "math:cos", "default": "math:cos"}, "'fc*x' matches no parameter group"),
        ("tests.test_schedule:missing", "has no function 'missing'"),
        ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
    ],
)
def test_lambda_errors_name_the_key(lambdas, message):
    with pytest.raises(UserError, match="scheduler.lambdas") as caught:
        build_scheduler(two_groups(), epochs=2, steps_per_epoch=2, name="lambda", lambdas=lambdas)
    assert message in str(caught.value)


# ----------------------------------------------------------------------------------- LR scaling
def test_absolute_lrs_of_a_schedule_follow_the_batch_size_scaling():
    optimizer = two_groups()
    for group in optimizer.param_groups:
        group["lr"] *= 2
    optimizer.defaults["lr"] *= 2  # as build_optimizer(lr_scale=2) leaves it
    build_scheduler(
        optimizer, epochs=1, steps_per_epoch=10, name="onecycle", max_lr=0.05, lr_scale=2.0
    )
    assert [group["max_lr"] for group in optimizer.param_groups] == pytest.approx([1.0, 0.1])
    cosine = build_scheduler(two_groups(), epochs=1, steps_per_epoch=10, min_lr=1e-3, lr_scale=2.0)
    assert cosine.scheduler.eta_min == pytest.approx(2e-3)


# ----------------------------------------------------------------------------- recipe validation
def problems(**scheduler) -> list[str]:
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(tiny_recipe(scheduler=scheduler))
    return caught.value.problems


def test_every_schedule_name_is_known_to_the_recipe():
    names = SchedulerConfig.model_fields["name"].annotation.__args__
    assert sorted(names) == sorted(list_schedules())


@pytest.mark.parametrize(
    "scheduler, key, words",
    [
        ({"name": "cosin"}, "scheduler.name", "'onecycle'"),
        ({"name": "plateau", "monitor": "val/acc"}, "scheduler.monitor", "never logged"),
        ({"name": "onecycle"}, "scheduler.max_lr", "needs the peak LR"),
        ({"name": "cyclic"}, "scheduler.max_lr", "needs the peak LR"),
        ({"name": "multistep", "milestones": [6, 3]}, "scheduler.milestones", "increasing order"),
        ({"name": "multistep"}, "scheduler.milestones", "needs the epochs"),
        (
            {"name": "multistep", "milestones": [1, 3], "warmup_epochs": 1},
            "scheduler.milestones",
            "after the warmup",
        ),
        ({"name": "exponential"}, "scheduler.gamma", "factor per epoch"),
        ({"name": "lambda"}, "scheduler.lambdas", "package.module:function"),
        ({"name": "lambda", "lambdas": {"fc.*": "mymodule.f"}}, "scheduler.lambdas", "import path"),
        ({"warmup_steps": 5, "interval": "epoch"}, "scheduler.warmup_steps", "interval: step"),
        ({"warmup_steps": 5, "warmup_epochs": 1}, "scheduler.warmup_steps", "not both"),
    ],
)
def test_bad_schedules_name_the_key(scheduler, key, words):
    lines = problems(**scheduler)
    assert len(lines) == 1 and lines[0].startswith(f"{key}:") and words in lines[0], lines


def test_validate_command_rejects_a_plateau_on_a_metric_never_logged(tmp_path):
    path = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(scheduler={"name": "plateau", "monitor": "val/accuracy"})
    )
    result = invoke_cli("validate", str(path))
    assert result.returncode == 2
    assert "scheduler.monitor: 'val/accuracy' is never logged" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------ in the real loop
def test_loop_steps_plateau_on_the_metric_and_state_pt_loads_weights_only(tmp_path):
    from finetune.training import run

    recipe = Recipe.from_dict(
        tiny_recipe(
            train={"epochs": 3, "device": "cpu"},
            scheduler={
                "name": "plateau",
                "monitor": "train/loss",
                "mode": "max",
                "patience": 0,
                "factor": 0.5,
            },
        )
    )
    result = run(recipe, run_dir=tmp_path / "run")
    state = RunFolder(result.run_dir).read_checkpoint_state(result.run_dir / "last")
    assert state["scheduler"]["plateau"]["last_epoch"] == 3  # one metric per epoch
    assert len(RunFolder(result.run_dir).read_metrics()) == 3


def test_loop_follows_a_per_group_lambda_schedule_with_warmup(tmp_path):
    """The LRs the loop logs for each epoch are the schedule's at the epoch's last step."""
    from finetune.training import run

    scheduler = {
        "name": "lambda",
        "warmup_epochs": 1,
        "lambdas": {
            "fc.*": "tests.test_schedule:halve_every_two",
            "default": "tests.test_schedule:linear_decay",
        },
    }
    data = tiny_recipe(train={"epochs": 3, "device": "cpu"}, scheduler=scheduler)
    data["optimizer"]["param_groups"] = [{"match": "fc.*", "lr_mult": 2}]
    result = run(Recipe.from_dict(data), run_dir=tmp_path / "run")
    rows = RunFolder(result.run_dir).read_metrics()
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert saved["scheduler"]["lambdas"] == scheduler["lambdas"]
    steps_per_epoch = 3  # 24 images, batch 8
    preview = preview_lrs(
        [{"name": "fc.*", "lr": 0.1}, {"name": "default", "lr": 0.05}],
        lr=0.05,
        epochs=3,
        steps_per_epoch=steps_per_epoch,
        points=[steps_per_epoch - 1, 2 * steps_per_epoch - 1],  # each epoch's last step
        **scheduler,
    )
    for group in ("fc.*", "default"):
        logged = [row[f"lr/{group}"] for row in rows[:2]]
        assert logged == pytest.approx([lr for _, _, lr in preview[group][-2:]], rel=1e-9)
    state = RunFolder(result.run_dir).read_checkpoint_state(result.run_dir / "last")
    assert state["scheduler"]["scheduler"]["_schedulers"][1]["lr_lambdas"] == [None, None]


@pytest.mark.parametrize(
    "scheduler",
    [
        {"name": "cosine", "warmup_epochs": 1},  # per step
        {"name": "step", "interval": "epoch", "step_size": 1, "gamma": 0.5},  # per epoch
        {"name": "plateau", "monitor": "train/loss", "mode": "max", "patience": 0},
        {"name": "onecycle", "max_lr": 0.1},
    ],
    ids=lambda scheduler: scheduler["name"],
)
def test_the_lr_column_is_the_lr_of_each_epochs_last_step(tmp_path, scheduler):
    """Whatever the schedule steps on, ``lr`` and ``lr/<group>`` in a metrics row are the
    learning rates the optimizer used for the epoch's last step."""
    from finetune.training import run

    used: list[dict[str, float]] = []
    original_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        used.append({group["name"]: group["lr"] for group in self.param_groups})
        return original_step(self, *args, **kwargs)

    data = tiny_recipe(train={"epochs": 3, "device": "cpu"}, scheduler=scheduler)
    data["optimizer"]["param_groups"] = [{"match": "fc.*", "lr_mult": 2}]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", recording_step)
        result = run(Recipe.from_dict(data), run_dir=tmp_path / "run")
    rows = RunFolder(result.run_dir).read_metrics()
    steps_per_epoch = 3  # 24 images, batch 8
    for epoch, row in enumerate(rows, start=1):
        last = used[epoch * steps_per_epoch - 1]
        assert {name: row[f"lr/{name}"] for name in last} == pytest.approx(last, rel=1e-12)
        assert row["lr"] == next(iter(last.values()))  # the first group's
    if scheduler["name"] != "plateau":  # whether a plateau reduces depends on the losses
        assert len({row["lr/default"] for row in rows}) > 1  # the schedule did move


def test_a_cosine_floor_above_a_groups_lr_is_refused():
    """torch's cosine runs every group to the one min_lr: a group below it would rise."""
    floor = (BASE_LRS[0] + BASE_LRS[1]) / 2
    with pytest.raises(UserError, match=r"scheduler.min_lr: .* group\(s\) default"):
        build_scheduler(two_groups(), name="cosine", epochs=2, steps_per_epoch=3, min_lr=floor)
