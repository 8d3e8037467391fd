"""A sweep's Optuna study: storage, heartbeats, the queue of trials, and what each trial records.

A grid's combinations are queued in the study when it is created and claimed one by one, so
none runs twice however many workers share the study; a search's trials are sampled by TPE
until ``--trials`` have started. Each trial carries its number as the user attribute ``trial``,
which its later attempts keep: a trial that stops unfinished is queued again (``requeue``) with
its number and parameters, at once after Ctrl-C or SIGTERM, and after a kill or a lost machine
once its heartbeat is ``STALE_HEARTBEATS`` heartbeats old (Optuna's ``fail_stale_trials``, with
``requeue`` as the callback), so a trial that a live worker runs is never taken.

Optuna is imported only here, and only when a sweep runs (it is the ``sweep`` extra).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.sweep_results import metric_columns, sort_rows
from finetune.sweep_space import SweepSpec, encode

HEARTBEAT_ENV = "FINETUNE_SWEEP_HEARTBEAT"  # seconds between a running trial's heartbeats
STALE_HEARTBEATS = 5  # heartbeats missed before a running trial counts as abandoned
SPARE = "spare"  # the status of a trial that lost a race for the last one: not a sweep trial
_DEFINITION, _QUEUED = "finetune_sweep", "finetune_grid_queued"  # study attributes
# Trial attributes: the trial's number (kept by its later attempts), a grid trial's values as
# queued, and what the trial ended with.
_LABEL, _QUEUED_PARAMS, _OUTCOME = "trial", "queued_params", "outcome"


def import_optuna() -> Any:
    """Optuna, quiet (finetune prints its own lines), or a UserError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise UserError("finetune sweep needs Optuna: pip install 'finetune[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def open_study(
    *, url: str, name: str, spec: SweepSpec, definition: dict[str, Any], seed: int, queue: bool
) -> Any:
    """Create the study, or join it when it holds the same sweep (``definition``).

    Args:
        seed: the TPE sampler's seed in the process that creates the study (one worker that is
            never interrupted samples reproducibly).
        queue: complete a grid's queue if its creator was stopped while queueing (``--resume``).

    Raises:
        UserError: the storage cannot be opened, or its study holds another sweep.
    """
    optuna = import_optuna()
    pruner = optuna.pruners.MedianPruner() if spec.search else optuna.pruners.NopPruner()
    options = {"study_name": name, "storage": _storage(url), "pruner": pruner}
    try:
        study = optuna.create_study(
            sampler=optuna.samplers.TPESampler(seed=seed),
            direction="maximize" if spec.maximize else "minimize",
            **options,
        )
        study.set_user_attr(_DEFINITION, definition)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(sampler=optuna.samplers.TPESampler(), **options)
        if study.user_attrs.get(_DEFINITION) != definition:
            raise UserError(
                f"--storage {url}: study {name!r} holds another sweep (its recipe or swept "
                "keys differ); name a new one with --study"
            ) from None
        created = False
    if not spec.search and (created or queue) and not study.user_attrs.get(_QUEUED):
        _queue_grid(study, spec)
    return study


def _queue_grid(study: Any, spec: SweepSpec) -> None:
    """Queue every combination not queued yet (all of them, unless a creator was killed while
    queueing), each numbered by its position in the grid."""
    queued = {trial.user_attrs.get(_LABEL) for trial in study.get_trials(deepcopy=False)}
    for label, values in enumerate(spec.combinations()):
        if label not in queued:
            params = {key: encode(value) for key, value in values.items()}
            study.enqueue_trial(params, user_attrs={_LABEL: label, _QUEUED_PARAMS: params})
    study.set_user_attr(_QUEUED, True)


def _storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats, so a trial whose worker died is queued again."""
    optuna = import_optuna()
    options = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with _quiet_experimental():
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=options,
                heartbeat_interval=heartbeat_seconds(),
                grace_period=grace_seconds(),
                heartbeat_stale_trial_callback=requeue,
            )
    except (ImportError, ValueError, RuntimeError) as error:  # driver missing, bad URL, ...
        raise UserError(f"--storage {url}: cannot open it ({error})") from None


def heartbeat_seconds() -> int:
    """Seconds between heartbeats of a running trial (``FINETUNE_SWEEP_HEARTBEAT``, 10)."""
    raw = os.environ.get(HEARTBEAT_ENV, "10")
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"{HEARTBEAT_ENV}: a whole number of seconds, at least 1; got {raw!r}")
    return int(raw)


def grace_seconds() -> int:
    """How long a running trial may go without a heartbeat before it is taken over."""
    return STALE_HEARTBEATS * heartbeat_seconds()


def queue_stale_trials(study: Any) -> None:
    """Fail the running trials whose heartbeat is stale, and queue them again (``requeue``)."""
    with _quiet_experimental():
        import_optuna().storages.fail_stale_trials(study)


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Heartbeats are an experimental Optuna feature; it says so at every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", import_optuna().exceptions.ExperimentalWarning)
        yield


def requeue(study: Any, trial: Any) -> None:
    """Queue ``trial`` (a stale or interrupted one) again: the same number, parameters and run
    folder. It is the storage's heartbeat-stale callback, and is called on Ctrl-C and SIGTERM."""
    params = trial.params or trial.user_attrs.get(_QUEUED_PARAMS, {})  # killed before suggesting
    study.enqueue_trial(params, user_attrs=dict(trial.user_attrs))


class ClaimLock:
    """Lets one process on this machine at a time choose and claim a trial of an SQLite study.

    SQLite has no row locks, so two processes could both claim one queued trial; server
    databases lock the row, and need no lock here (``path`` None, see ``claim_lock``).
    """

    def __init__(self, path: Path | None) -> None:
        self.path, self._fd = path, None

    def acquire(self) -> None:
        """Wait for the lock (nothing without a path, or when it is held already)."""
        if self.path is not None and self._fd is None:
            import fcntl

            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        """Release the lock (nothing if it is not held)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases its lock
            self._fd = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


def claim_lock(url: str) -> ClaimLock:
    """The lock for a storage: ``<database>.lock`` beside an SQLite file, none for others."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return ClaimLock(None)
    return ClaimLock(Path(f"{parsed.database}.lock"))


# ---------------------------------------------------------------------------------- trials
def claimable(trials: list[Any], spec: SweepSpec) -> bool:
    """A queued trial is waiting, or a search has started fewer than its trials."""
    if any(trial.state.name == "WAITING" for trial in trials):
        return True
    return spec.search and len(_labels(trials)) < spec.trials


def running(trials: list[Any]) -> set[int]:
    """The numbers of the trials running now (here or in other workers)."""
    return {_label(trial) for trial in trials if trial.state.name == "RUNNING"}


def claim_label(trial: Any, spec: SweepSpec) -> tuple[int, int]:
    """The number of a claimed trial (its own, or that of the trial it is another attempt of)
    and its position among the sweep's trials, from 1.

    Optuna's ``ask`` creates a trial when none is queued, so a worker that saw a queued trial
    and lost the race for it to another gets a fresh one; a search's fresh trial beyond
    ``--trials`` is the same. Such a trial ends at once as ``spare`` (``TrialPruned``).
    """
    labels = _labels(trial.study.get_trials(deepcopy=False))
    if _LABEL in trial.user_attrs:  # queued: a grid's trial, or another attempt
        label = trial.user_attrs[_LABEL]
        return label, labels.index(label) + 1
    if not spec.search or labels.index(trial.number) >= spec.trials:
        trial.set_user_attr("status", SPARE)
        raise import_optuna().TrialPruned("another worker took the last trial")
    trial.set_user_attr(_LABEL, trial.number)
    return trial.number, labels.index(trial.number) + 1


def _label(trial: Any) -> int:
    return trial.user_attrs.get(_LABEL, trial.number)


def _labels(trials: list[Any]) -> list[int]:
    """The sweep's trial numbers, in order, once each (attempts share one); spares left out."""
    return sorted({_label(trial) for trial in trials if trial.user_attrs.get("status") != SPARE})


def record_outcome(trial: Any, summary: dict[str, Any], metric: str) -> None:
    """Keep what a run's ``summary.json`` says in its trial (``result_rows`` reads it)."""
    trial.set_user_attr("status", summary["status"])
    outcome = {
        "best": summary["best"].get(metric),
        "best_epoch": summary["best"]["epoch"],
        "final": summary["final"].get(metric),
        "epochs": summary["epochs"],
        "seconds": summary["train_seconds"],
    }
    trial.set_user_attr(_OUTCOME, outcome)


def result_rows(trials: list[Any], spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial (its attempts merged: the latest started one speaks), sorted best
    first: number, swept values, status, best and final metric, epochs, seconds, attempts,
    run folder."""
    attempts: dict[int, list[Any]] = {}
    for trial in trials:
        if trial.state.name != "WAITING" and trial.user_attrs.get("status") != SPARE:
            attempts.setdefault(_label(trial), []).append(trial)
    best, final = metric_columns(spec.metric)
    rows = []
    for label, tries in attempts.items():
        last = max(tries, key=lambda trial: trial.number)
        outcome = last.user_attrs.get(_OUTCOME, {})
        status = "running" if last.state.name == "RUNNING" else last.user_attrs.get("status")
        row: dict[str, Any] = {"trial": label}
        for axis in spec.axes:
            stored = last.params.get(axis.key)
            row[axis.key] = None if stored is None else axis.decode(stored)
        row["status"] = status or last.state.name.lower()
        row[best], row["best epoch"] = outcome.get("best"), outcome.get("best_epoch")
        row[final], row["epochs"] = outcome.get("final"), outcome.get("epochs")
        row["seconds"], row["attempts"] = outcome.get("seconds"), len(tries)
        row["run_dir"] = last.user_attrs.get("run_dir")
        rows.append(row)
    return sort_rows(rows, spec.metric, spec.maximize)
