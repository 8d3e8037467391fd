"""``finetune sweep``: one run folder per trial, the trials kept in an Optuna study.

A sweep folder::

    <output.dir>/<name>-sweep/<timestamp>/      (or --sweep-dir)
      sweep.json     the recipe the trials start from, the swept keys, storage and study
      study.db       the Optuna study (SQLite), unless --storage names another database
      trials/0000/   one run folder per trial (recipe.yaml, metrics.jsonl, summary.json, ...)
      results.csv  results.md  sweep.png

A worker (one ``finetune sweep`` process) repeats: claim a trial of the study
(``finetune.sweep_study``), train it with ``finetune.training.run`` in its run folder, record
the outcome in the study, rewrite the results (``finetune.sweep_results``). A search's median
pruner stops hopeless trials after an epoch (``Pruning``). A trial that stopped unfinished is
queued again, and its next attempt continues from its run folder's ``last/`` checkpoint when
that folder is on the worker's machine. A worker with nothing to claim waits while other
trials run (to take over one whose worker dies) and ends when none does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from finetune.errors import Interrupted, TrainingDiverged, UserError
from finetune.observers import Observer, StopRun
from finetune.recipe import Recipe, apply_overrides, check_imports
from finetune.run_folder import (
    LATEST,
    SUMMARY_FILE,
    RunFolder,
    claim_run_dir,
    replace_with_link,
    write_json,
)
from finetune.sweep_results import write_results
from finetune.sweep_space import SweepSpec
from finetune.sweep_study import (
    ClaimLock,
    claim_label,
    claim_lock,
    claimable,
    grace_seconds,
    heartbeat_seconds,
    import_optuna,
    open_study,
    queue_stale_trials,
    record_outcome,
    requeue,
    result_rows,
    running,
)
from finetune.training import resolve_resume, run

SWEEP_FILE = "sweep.json"
STUDY_FILE = "study.db"
TRIALS = "trials"


@dataclass(frozen=True)
class Sweep:
    """A sweep folder's ``sweep.json``: what every worker of the study must agree on."""

    folder: Path
    spec: SweepSpec
    recipe: dict[str, Any]  # the recipe each trial starts from (extends and --set applied)
    storage: str
    study: str

    def definition(self) -> dict[str, Any]:
        """What identifies the sweep (the folder may differ from one machine to another)."""
        return json.loads(json.dumps({"spec": self.spec.to_dict(), "recipe": self.recipe}))

    def run_folder(self, label: int) -> Path:
        """The run folder of trial ``label`` (its attempts share it)."""
        return self.folder / TRIALS / f"{label:04d}"


def create_sweep(
    recipe: dict[str, Any],
    spec: SweepSpec,
    *,
    sweep_dir: Path | None = None,
    storage: str | None = None,
    study: str | None = None,
) -> Sweep:
    """The sweep folder for ``recipe`` and ``spec`` (from ``build_spec``): a new one under
    ``<output.dir>/<name>-sweep/``, or ``sweep_dir``, which may hold the same sweep already
    (another worker joins it).

    Raises:
        UserError: ``sweep_dir`` holds a different sweep.
    """
    resolved = Recipe.from_dict(recipe)
    folder = sweep_dir or claim_run_dir(resolved.output.dir, f"{resolved.name}-sweep")
    folder = folder.resolve()
    sweep = Sweep(
        folder,
        spec,
        recipe,
        storage or f"sqlite:///{folder / STUDY_FILE}",
        study or resolved.name,
    )
    if (folder / SWEEP_FILE).is_file():
        existing = read_sweep(folder, allowed=resolved)
        if (existing.definition(), existing.storage, existing.study) != (
            sweep.definition(),
            sweep.storage,
            sweep.study,
        ):
            raise UserError(
                f"--sweep-dir {folder}: holds another sweep (its recipe, swept keys, storage or "
                f"study differ); continue it with --resume {folder}, or choose another folder"
            )
        return existing
    try:
        (folder / TRIALS).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{folder}: cannot create the sweep folder: {error.strerror}") from None
    write_json(folder / SWEEP_FILE, _to_dict(sweep))
    if sweep_dir is None:
        replace_with_link(folder.parent / LATEST, folder.name)
    return sweep


def _to_dict(sweep: Sweep) -> dict[str, Any]:
    return {**sweep.definition(), "storage": sweep.storage, "study": sweep.study}


def find_sweep(resume: str, recipe: Recipe | None) -> Path:
    """The folder ``--resume`` names: a sweep folder, or ``latest`` (the recipe's newest)."""
    if resume != "latest":
        return Path(resume)
    if recipe is None:
        raise UserError("--resume: name the sweep folder (or give the RECIPE for its latest)")
    return recipe.output.dir / f"{recipe.name}-sweep" / LATEST


def read_sweep(folder: Path, allowed: Recipe | None = None) -> Sweep:
    """The sweep a folder holds, its recipe validated. Code that the recipe, or a swept value,
    names by import path is refused unless ``allowed`` (the user's own recipe) names it too
    (``check_imports``): the file is data, and importing would run what it names."""
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise UserError(f"--resume: {folder} is not a sweep folder (no {SWEEP_FILE})")
    try:
        data = json.loads(path.read_text())
        sweep = Sweep(
            folder.resolve(),
            SweepSpec.from_dict(data["spec"]),
            data["recipe"],
            data["storage"],
            data["study"],
        )
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a sweep file finetune wrote ({error!r})") from None
    swept = [{axis.key: value} for axis in sweep.spec.axes for value in axis.values]
    for override in [{}, *swept]:
        recipe = Recipe.from_dict(apply_overrides(sweep.recipe, override), source=str(path))
        check_imports(recipe, source=path, allowed=allowed)
    return sweep


# ----------------------------------------------------------------------------- the worker
def run_sweep(sweep: Sweep, *, console: Console, resuming: bool = False) -> list[dict[str, Any]]:
    """Work on the sweep until no trial is left to claim or running elsewhere; return the rows
    of ``results.csv`` (also written to the sweep folder, with ``results.md`` and ``sweep.png``).

    Args:
        resuming: ``--resume``: also queue what a grid's creator, stopped early, did not.
    """
    lock = claim_lock(sweep.storage)
    with lock.held():
        study = open_study(
            url=sweep.storage,
            name=sweep.study,
            spec=sweep.spec,
            definition=sweep.definition(),
            seed=Recipe.from_dict(sweep.recipe).seed,
            queue=resuming,
        )
    try:
        _work(study, sweep, lock, console)
    finally:
        rows = result_rows(study.get_trials(deepcopy=False), sweep.spec)
        _write(sweep, rows, plot=True)
    return rows


def _work(study: Any, sweep: Sweep, lock: ClaimLock, console: Console) -> None:
    objective = Objective(sweep, lock, console)
    waiting_for: set[int] = set()
    while True:
        with lock.held():
            queue_stale_trials(study)  # the trials of workers that died are queued again
            trials = study.get_trials(deepcopy=False)
            if claimable(trials, sweep.spec):
                # The objective releases the lock as soon as its trial is claimed.
                study.optimize(objective, n_trials=1, catch=(TrainingDiverged,))
                _write(sweep, result_rows(study.get_trials(deepcopy=False), sweep.spec))
                continue
        others = running(trials)
        if not others:
            return
        if others != waiting_for:
            console.print(
                f"waiting for trial(s) {', '.join(map(str, sorted(others)))}, running in other "
                f"workers (taken over if one stops for {grace_seconds()} s)",
                highlight=False,
            )
            waiting_for = others
        time.sleep(heartbeat_seconds())


class Objective:
    """Optuna's objective: a trial trained as a run in its run folder; the value is the best
    of the monitored metric (``output.save_best``) over its epochs."""

    def __init__(self, sweep: Sweep, lock: ClaimLock, console: Console) -> None:
        self.sweep, self.lock, self.console = sweep, lock, console

    def __call__(self, trial: Any) -> float:
        self.lock.release()  # the trial is ours now
        metric = self.sweep.spec.metric
        label, position = claim_label(trial, self.sweep.spec)
        try:
            summary = self._train(trial, label, position)
        except (Interrupted, KeyboardInterrupt):
            trial.set_user_attr("status", "interrupted")
            requeue(trial.study, trial)  # the next attempt continues from its checkpoint
            raise
        except TrainingDiverged:
            raise  # recorded; the sweep goes on (optimize's catch)
        except Exception:
            trial.set_user_attr("status", "failed")
            raise
        record_outcome(trial, summary, metric)
        if summary["status"] == "pruned":
            raise import_optuna().TrialPruned(f"pruned after epoch {summary['epochs']}")
        return summary["best"][metric]

    def _train(self, trial: Any, label: int, position: int) -> dict[str, Any]:
        """Train the trial's run, continuing an earlier attempt's, and return its summary."""
        spec = self.sweep.spec
        values = {axis.key: axis.suggest(trial) for axis in spec.axes}
        folder = self.sweep.run_folder(label)
        trial.set_user_attr("run_dir", str(folder))
        recipe = Recipe.from_dict(
            apply_overrides(self.sweep.recipe, values), source=f"{SWEEP_FILE}, trial {label}"
        )
        resume = None
        if RunFolder(folder).recipe_file.is_file():  # an earlier attempt started it
            resume, recipe = resolve_resume(str(folder), recipe, None, [])
        self.console.print(
            f"sweep: trial {label} ({position} of {spec.trials}): "
            + ", ".join(f"{key}={value!r}" for key, value in values.items())
            + (f"; continuing {resume} from its last checkpoint" if resume else ""),
            highlight=False,
        )
        observers = [Pruning(trial, spec.metric)]
        try:
            return run(
                recipe, run_dir=folder, resume=resume, console=self.console, observers=observers
            ).summary
        except TrainingDiverged:
            record_outcome(trial, json.loads((folder / SUMMARY_FILE).read_text()), spec.metric)
            raise


class Pruning(Observer):
    """Reports the monitored metric to an Optuna trial after each epoch, and ends the run as
    ``pruned`` when the study's pruner (a search's median pruner) says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def end_epoch(self, row: dict[str, Any], model: Any) -> None:
        self.trial.report(row[self.metric], row["epoch"])
        if self.trial.should_prune():
            raise StopRun("pruned", f"{self.metric} {row[self.metric]:.4f} at epoch {row['epoch']}")


def _write(sweep: Sweep, rows: list[dict[str, Any]], plot: bool = False) -> None:
    spec = sweep.spec
    write_results(
        sweep.folder,
        rows,
        keys=[axis.key for axis in spec.axes],
        metric=spec.metric,
        log_keys=[axis.key for axis in spec.axes if axis.log],
        plot=plot,
    )
