"""Continuing a run: what ``--resume --set`` may change, and how the run picks up again.

A resumed run restores the newest complete checkpoint: weights, optimizer, schedule, loss scale,
random generators and its position in the epoch, so it ends bit-identical to an uninterrupted
run. ``--set`` on a resume may change how the rest of the run trains (``train.epochs``,
``optimizer.lr``, ``optimizer.weight_decay``) and how it is run (device, loader workers,
checkpoint interval, output, export), never what it is (model, data, batch size, freezing...):
those would make the checkpoint describe another run.

When the epochs, the LR or the weight decay change, the restored optimizer groups take the new
values and the schedule continues from where it stands: each group's LR is its current LR times
the ratio of new to old base LR, and the schedule's shape (cosine, step, ...) runs from there
over the remaining steps, without warmup, so the LR never jumps back up. A schedule that has
finished (cosine at its floor) stays there: to train longer at a useful LR, also set
``optimizer.lr``.
"""

from __future__ import annotations

from typing import Any

from finetune.build import Built
from finetune.config.train import CachedViews
from finetune.errors import UserError
from finetune.loop import LoopState, loop_state
from finetune.recipe import Recipe
from finetune.run_folder import RunFolder
from finetune.runtime import restore_rng_state
from finetune.schedule import Schedule, build_scheduler
from finetune.weights import load_weights

# What --set may change on a resume (a key, or a section given by its name).
CHANGEABLE = (
    "train.epochs",
    "train.device",
    "train.checkpoint_every",
    "train.clip_grad_norm",
    "train.cache_features",  # the same rows with or without it (not to or from views)
    "train.compile",  # the same module, compiled or not
    "optimizer.lr",
    "optimizer.weight_decay",
    "data.num_workers",
    "data.persistent_workers",
    "data.prefetch_factor",
    "data.eval_batch_size",
    "data.verify",
    "data.cache_max_ram_fraction",
    "output.dir",
    "output.tensorboard",
    "export",
)
SCHEDULE_KEYS = {"train.epochs", "optimizer.lr", "optimizer.weight_decay"}
FIXED_SCHEDULES = ("onecycle", "cyclic")  # one cycle over the whole run: nothing to extend


def changes_on_resume(saved: Recipe, recipe: Recipe) -> set[str]:
    """The dotted keys where ``recipe`` differs from the run's ``saved`` one; a key that
    cannot change on a resume is an error naming it."""
    changed = _differences(saved.model_dump(mode="json"), recipe.model_dump(mode="json"))
    fixed = sorted(
        key
        for key in changed
        if not any(key == allowed or key.startswith(f"{allowed}.") for allowed in CHANGEABLE)
    )
    if fixed:
        raise UserError(
            "--resume: these keys cannot change when a run continues (its checkpoint belongs to "
            f"the saved values); start a new run instead. Changeable: {', '.join(CHANGEABLE)}",
            fixed,
        )
    if _changes_views(saved, recipe):
        raise UserError(
            "--resume: train.cache_features: {views: K} trains on other images than the "
            "uncached run and than another K; it cannot change on a resume (true, false and auto "
            "can: they give the same rows)"
        )
    if changed & SCHEDULE_KEYS and recipe.scheduler.name in FIXED_SCHEDULES:
        raise UserError(
            f"--resume: scheduler.name: {recipe.scheduler.name} runs one cycle over the whole "
            f"run; {', '.join(sorted(changed & SCHEDULE_KEYS))} cannot change on a resume"
        )
    return changed


def _changes_views(saved: Recipe, recipe: Recipe) -> bool:
    """Whether ``train.cache_features`` changes to, from or between views."""
    old, new = saved.train.cache_features, recipe.train.cache_features
    return old != new and (isinstance(old, CachedViews) or isinstance(new, CachedViews))


def _differences(old: Any, new: Any, prefix: str = "") -> set[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return {
            found
            for key in keys
            for found in _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        }
    return set() if old == new else {prefix.rstrip(".")}


def restore(folder: RunFolder, built: Built, changed: set[str]) -> LoopState:
    """Load the checkpoint ``last`` points at into ``built``; a fresh state without one.

    ``changed``: the keys this resume changes (``changes_on_resume``); epochs, LR or weight
    decay make the schedule continue from where it stands.
    """
    if not (folder.path / "last").exists():
        return LoopState()
    # The groups as this recipe builds them: their base LRs and weight decays.
    new_values = [(_base_lr(g), g["weight_decay"]) for g in built.optimizer.param_groups]
    tensors, saved = folder.load_checkpoint("last")
    load_weights(built.runtime.unwrap(built.model), tensors, source=folder.path / "last")
    built.optimizer.load_state_dict(saved["optimizer"])
    state = loop_state(saved)
    if state.schedule_start is not None:  # an earlier resume changed the schedule: rebuild it
        built.schedule = _continuation(built, state.schedule_start)
        built.optimizer.load_state_dict(saved["optimizer"])  # building touched the LRs
    built.schedule.load_state_dict(saved["scheduler"])
    built.runtime.load_scaler_state(saved["scaler"])
    restore_rng_state(saved["rng"])
    if changed & SCHEDULE_KEYS:
        restored = built.optimizer.param_groups  # loading the state replaced the group dicts
        for group, (new_base, weight_decay) in zip(restored, new_values, strict=True):
            group["lr"] *= new_base / _base_lr(group)
            group["initial_lr"] = group["lr"]  # the continuation's own base
            group["weight_decay"] = weight_decay
        state.schedule_start = [state.epoch, state.position.step]
        built.schedule = _continuation(built, state.schedule_start)
    return state


def _continuation(built: Built, start: list[int]) -> Schedule:
    """The recipe's schedule, without warmup, over the steps left after ``start`` ([epochs
    done, steps into the next]), from the optimizer groups' ``initial_lr``."""
    epochs_done, steps = start
    recipe = built.recipe
    remaining = recipe.train.epochs - epochs_done
    if remaining < 1:
        raise UserError(
            f"--resume: train.epochs {recipe.train.epochs} leaves nothing to train after the "
            f"{epochs_done} epochs done"
        )
    keys = {**dict(recipe.scheduler), "warmup_epochs": 0.0, "warmup_steps": 0}
    schedule = build_scheduler(
        built.optimizer,
        epochs=remaining,
        steps_per_epoch=built.steps_per_epoch,
        lr_scale=built.lr_scale,
        **keys,
    )
    for _ in range(steps):  # already taken in the current epoch
        schedule.step_update()
    return schedule


def _base_lr(group: dict[str, Any]) -> float:
    return group.get("initial_lr", group["lr"])
