"""A whole run: build -> open or resume the run folder -> fit -> test split -> summary.

``run(recipe)`` is what ``finetune run`` calls. Every object is built, and every input checked
(``finetune.build``), before the run folder is created, so a bad recipe or a bad dataset leaves
nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from finetune.build import Built, build, eval_loader
from finetune.describe import describe_run, plot_curves
from finetune.errors import UserError
from finetune.loop import FitOptions, LoopState, evaluate, fit
from finetune.progress import EpochProgress
from finetune.recipe import Recipe
from finetune.run_folder import RunFolder, is_resumable, latest_run, new_run_dir
from finetune.runtime import restore_rng_state


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def run(
    recipe: Recipe,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    console: Console | None = None,
) -> RunResult:
    """Train ``recipe`` with the shared loop and return the run folder and its summary.

    Args:
        run_dir: where to write the run; by default ``<output.dir>/<name>/<timestamp>``.
        resume: a run folder to continue from its ``last/`` checkpoint (``run_dir`` is ignored).
    """
    console = console or Console()
    built = build(recipe)
    recipe, runtime = built.recipe, built.runtime
    # Every process must write to (and resume from) the folder rank 0 names.
    folder = RunFolder(
        runtime.broadcast(
            Path(resume)
            if resume
            else Path(run_dir)
            if run_dir
            else new_run_dir(recipe.output.dir, recipe.name)
        )
    )
    state = LoopState()
    if resume:
        runtime.barrier()
        state = _restore(folder, built)
    if runtime.is_main:
        _start_folder(folder, built, link=not resume and run_dir is None)
        describe_run(built, folder, console)
    test_metrics = None
    try:
        fit(
            built.model,
            built.train_loader,
            built.val_loader,
            built.optimizer,
            built.schedule,
            runtime,
            fit_options(built),
            state=state,
            run=folder if runtime.is_main else None,
            progress=EpochProgress(enabled=runtime.is_main, console=console),
            unfreeze=built.unfreeze,
        )
        test_metrics = evaluate_test_split(built, folder)
    finally:
        summary = _summary(folder, state, built, completed=state.epoch == recipe.train.epochs)
        if test_metrics is not None:
            summary["test"] = test_metrics
            if runtime.is_main:
                scores = "  ".join(f"{key} {value:.4f}" for key, value in test_metrics.items())
                console.print(
                    f"data.test with the best/ weights (epoch {state.best_epoch}): {scores}",
                    highlight=False,
                )
        if runtime.is_main and folder.path.exists():
            folder.write_summary(summary)
            plot_curves(folder)
    runtime.barrier()
    runtime.shutdown()  # leave the process group torchrun's job set up
    return RunResult(folder.path, summary)


def fit_options(built: Built) -> FitOptions:
    """The ``train:`` and ``output:`` keys the loop reads, with the run's class count."""
    train = built.recipe.train
    return FitOptions(
        epochs=train.epochs,
        num_classes=built.num_classes,
        grad_accum_steps=train.grad_accum_steps,
        clip_grad_norm=train.clip_grad_norm,
        label_smoothing=train.label_smoothing,
        save_best=built.recipe.output.save_best,
        class_weights=built.class_weights(),
    )


def evaluate_test_split(built: Built, folder: RunFolder) -> dict[str, Any] | None:
    """``data.test`` scored once with the ``best/`` weights (``test/loss``, ``test/top1``, ...)."""
    datasets, runtime = built.datasets, built.runtime
    if datasets is None or datasets.test is None:
        return None
    runtime.barrier()  # rank 0 has written best/
    tensors, _ = folder.load_checkpoint("best")
    runtime.unwrap(built.model).load_state_dict(tensors)
    loader = eval_loader(built.recipe.data, runtime, datasets.test, once=True)
    metrics = evaluate(built.model, loader, runtime, built.num_classes)
    return {key.replace("val/", "test/"): value for key, value in metrics.items()}


def resolve_resume(
    resume: str, recipe: Recipe, run_dir: Path | None, overrides: list[str]
) -> tuple[Path, Recipe]:
    """The run folder to resume and its saved recipe with this command's ``--set`` applied.

    ``resume`` is a run folder, or ``latest``: ``--run-dir`` if given, else the recipe's latest run.
    """
    if resume == "latest":
        folder = run_dir or latest_run(recipe.output.dir, recipe.name)
    else:
        folder = Path(resume)
    folder = RunFolder(folder.resolve())
    if not folder.recipe_file.is_file():
        raise UserError(f"--resume: {folder.path} is not a run folder (no recipe.yaml)")
    if not is_resumable(folder.path):
        raise UserError(f"--resume: {folder.path} has no last/ checkpoint to resume from")
    return folder.path, Recipe.load(folder.recipe_file, overrides)


def _start_folder(folder: RunFolder, built: Built, link: bool) -> None:
    assert built.datasets is not None
    folder.create()
    report = built.network.load_report
    folder.write_start(
        recipe_yaml=built.recipe.to_yaml(),
        classes=built.datasets.classes,
        normalization=built.datasets.normalization.to_dict(),
        load_report=report.to_dict() if report is not None else None,
    )
    if built.lr_found is not None:
        built.lr_found.save(folder.lr_find)  # how optimizer.lr: auto was resolved
    if link:
        folder.link_latest()


def _restore(folder: RunFolder, built: Built) -> LoopState:
    """Weights, optimizer, schedule, loss scale and random generators of ``last/``."""
    tensors, saved = folder.load_checkpoint("last")
    built.runtime.unwrap(built.model).load_state_dict(tensors)
    built.optimizer.load_state_dict(saved["optimizer"])
    built.schedule.load_state_dict(saved["scheduler"])
    built.runtime.load_scaler_state(saved["scaler"])
    restore_rng_state(saved["rng"])
    history = [row for row in folder.read_metrics() if row["epoch"] <= saved["epoch"]]
    return LoopState(
        epoch=saved["epoch"],
        best_epoch=saved["best_epoch"],
        best_value=saved["best_value"],
        train_seconds=saved["train_seconds"],
        history=history,
    )


def _summary(folder: RunFolder, state: LoopState, built: Built, completed: bool) -> dict[str, Any]:
    metric = built.recipe.output.save_best
    return {
        "status": "completed" if completed else "interrupted",
        "processes": built.runtime.world_size,
        "effective_batch_size": built.effective_batch_size,
        "best": {"epoch": state.best_epoch, metric: state.best_value},
        "final": state.history[-1] if state.history else {},
        "epochs": state.epoch,
        "train_seconds": round(state.train_seconds, 3),
        "run_dir": str(folder.path),
    }
