"""A whole run: build -> open or resume the run folder -> fit -> test split -> summary.

``run(recipe)`` is what ``finetune run`` calls. Every object is built, and every input checked
(``finetune.build``), before the run folder is created, so a bad recipe or a bad dataset leaves
nothing behind. While it trains, SIGINT and SIGTERM ask the loop to checkpoint after the current
optimizer step and stop (``Interrupted``); a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from finetune.build import Built, build, eval_loader
from finetune.describe import describe_run, plot_curves
from finetune.errors import TrainingDiverged, UserError
from finetune.loop import FitOptions, LoopState, StopRequest, evaluate, fit
from finetune.observers import Observer
from finetune.progress import EpochProgress
from finetune.recipe import Recipe, check_imports
from finetune.resume import changes_on_resume, restore
from finetune.run_folder import RunFolder, claim_run_dir, latest_run
from finetune.tensorboard_log import require_tensorboard, tensorboard_log
from finetune.weights import load_weights

REPEAT_SECONDS = 2.0  # a second signal sooner than this repeats the first request


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
    observers: Sequence[Observer] = (),
) -> RunResult:
    """Train ``recipe`` with the shared loop and return the run folder and its summary.

    Args:
        run_dir: where to write the run; by default ``<output.dir>/<name>/<timestamp>``.
        resume: a run folder to continue from its ``last/`` checkpoint (``run_dir`` is ignored).
        observers: watch the loop (``finetune.observers``); one may end the run early with
            ``StopRun``, whose status ``summary.json`` then records.
    """
    console = console or Console()
    if recipe.output.tensorboard:
        require_tensorboard()  # before anything is built or written
    changed: set[str] = set()
    if resume:  # refuse what cannot change before anything is built
        saved = Recipe.load(RunFolder(Path(resume)).recipe_file, check_paths=False)
        changed = changes_on_resume(saved, recipe)
    built = build(recipe)
    recipe, runtime = built.recipe, built.runtime
    # Every process must write to (and resume from) the folder rank 0 names (and claims).
    folder = RunFolder(runtime.broadcast(_run_folder(recipe, run_dir, resume, runtime.is_main)))
    state = LoopState()
    if resume:
        state = _recover(folder, built, changed, console)
    if runtime.is_main:
        _start_folder(folder, built, link=not resume and run_dir is None)
        describe_run(built, folder, console)
    board = tensorboard_log(built, folder, state, enabled=recipe.output.tensorboard)  # rank 0
    stop, status, test_metrics = StopRequest(), "interrupted", None
    try:
        with _stop_on_signals(stop):
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
                stop=stop,
                observers=[board, *observers] if board is not None else observers,
                features=built.features,
            )
            test_metrics = evaluate_test_split(built, folder)
        status = state.stopped or "completed"
    except TrainingDiverged:
        status = "diverged"
        raise
    finally:
        summary = _summary(folder, state, built, status)
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
        if board is not None:
            board.close()
    runtime.barrier()
    runtime.shutdown()  # leave the process group torchrun's job set up
    return RunResult(folder.path, summary)


def _run_folder(
    recipe: Recipe, run_dir: str | Path | None, resume: str | Path | None, main: bool
) -> Path | None:
    """The folder of this run: the one resumed, ``--run-dir``, or a new one claimed under
    ``output.dir`` (on the main process; the others get it by broadcast)."""
    if resume:
        return Path(resume)
    if run_dir:
        return Path(run_dir)
    return claim_run_dir(recipe.output.dir, recipe.name) if main else None


@contextlib.contextmanager
def _stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop``; another one more than ``REPEAT_SECONDS`` later raises
    ``KeyboardInterrupt`` at once. Closer repeats are the same request: schedulers (systemd,
    Slurm) send SIGTERM to every process of a job, and the launcher of ``--nproc`` forwards it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    first = [0.0]

    def handler(signum: int, frame: object) -> None:
        if stop.signum is None:
            stop.signum, first[0] = signum, time.monotonic()
        elif time.monotonic() - first[0] > REPEAT_SECONDS:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
        checkpoint_every=train.checkpoint_every,
    )


def evaluate_test_split(built: Built, folder: RunFolder) -> dict[str, Any] | None:
    """``data.test`` scored once with the ``best/`` weights (``test/loss``, ``test/top1``, ...)."""
    datasets, runtime = built.datasets, built.runtime
    if datasets is None or datasets.test is None:
        return None
    runtime.barrier()  # rank 0 has written best/
    tensors, _ = folder.load_checkpoint("best")
    load_weights(runtime.unwrap(built.model), tensors, source=folder.path / "best")
    loader = eval_loader(built.recipe.data, runtime, datasets.test, once=True)
    metrics = evaluate(built.model, loader, runtime, built.num_classes)
    return {key.replace("val/", "test/"): value for key, value in metrics.items()}


def resolve_resume(
    resume: str, recipe: Recipe, run_dir: Path | None, overrides: list[str]
) -> tuple[Path, Recipe]:
    """The run folder to resume and its saved recipe with this command's ``--set`` applied.

    ``resume`` is a run folder, or ``latest``: ``--run-dir`` if given, else the recipe's latest run.
    A run folder without a checkpoint yet (killed before its first one) starts from the
    beginning, with its saved recipe. The saved recipe is a file we read back: code it names by
    import path (a head, an LR lambda) is refused unless ``recipe``, the user's own, names it too.
    """
    if resume == "latest":
        folder = run_dir or latest_run(recipe.output.dir, recipe.name)
    else:
        folder = Path(resume)
    folder = RunFolder(folder.resolve())
    if not folder.recipe_file.is_file():
        raise UserError(f"--resume: {folder.path} is not a run folder (no recipe.yaml)")
    saved = Recipe.load(folder.recipe_file, overrides)
    check_imports(
        saved,
        source=folder.recipe_file,
        allowed=recipe,
        hint="if you trust it, name the same path in the recipe you pass on the command line",
    )
    return folder.path, saved


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


def _recover(folder: RunFolder, built: Built, changed: set[str], console: Console) -> LoopState:
    """The newest complete checkpoint restored into ``built`` (rank 0 first repairs what a kill
    during a save left); a fresh start when there is none."""
    if built.runtime.is_main and folder.recover() is None:
        console.print(
            f"{folder.path}: no checkpoint yet; starting from the beginning", highlight=False
        )
    built.runtime.barrier()
    return restore(folder, built, changed)


def _summary(folder: RunFolder, state: LoopState, built: Built, status: str) -> dict[str, Any]:
    metric = built.recipe.output.save_best
    return _finite(
        {
            "status": status,
            "processes": built.runtime.world_size,
            "backend": built.runtime.backend,
            "effective_batch_size": built.effective_batch_size,
            "best": {"epoch": state.best_epoch, metric: state.best_value},
            "final": state.history[-1] if state.history else {},
            "epochs": state.epoch,
            "steps_into_next_epoch": state.position.step,
            "train_seconds": round(state.train_seconds + state.position.seconds, 3),
            "run_dir": str(folder.path),
        }
    )


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None``: summary.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
