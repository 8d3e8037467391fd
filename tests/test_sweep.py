"""``finetune sweep``: grids and searches parsed and checked, trials trained as run folders,
pruning, Ctrl-C and SIGKILL resumed, two workers sharing one SQLite study, the results files."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from finetune.errors import Interrupted, UserError
from finetune.observers import StopRun
from finetune.recipe import Recipe
from finetune.sweep import Pruning, create_sweep, read_sweep, run_sweep
from finetune.sweep_results import sort_rows
from finetune.sweep_space import build_spec, parse_grid, parse_search
from finetune.sweep_study import claim_label, open_study, result_rows
from tests.conftest import REPO, run_cli, tiny_recipe, write_recipe

QUIET = Console(quiet=True)


def _sweep(tmp_path: Path, grid=(), search=(), trials=None, **sections):
    base = tiny_recipe(**sections)
    spec = build_spec(base, list(grid), list(search), trials, source="r.yaml")
    return create_sweep(base, spec, sweep_dir=tmp_path / "sweep")


def _csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_values_are_yaml_typed_and_a_grid_runs_every_combination():
    assert parse_grid("optimizer.lr=[1e-2,1e-3]").values == (0.01, 0.001)
    assert parse_grid("data.augment=[[hflip], []]").values == (["hflip"], [])
    assert parse_search("optimizer.lr=loguniform(1e-4, 1e-1)").values == (1e-4, 0.1)
    assert parse_search("data.batch_size=int(8,64)").values == (8, 64)
    assert parse_search("optimizer.name=choice(sgd,adamw)").values == ("sgd", "adamw")
    spec = build_spec(
        tiny_recipe(), ["optimizer.lr=[0.1,0.01]", "data.batch_size=[4,8]"], [], None, "r.yaml"
    )
    assert spec.trials == 4 and spec.maximize and spec.metric == "val/top1"
    assert list(spec.combinations()) == [
        {"optimizer.lr": lr, "data.batch_size": size} for lr in (0.1, 0.01) for size in (4, 8)
    ]


@pytest.mark.parametrize(
    "grid, search, trials, expected",
    [
        (["optimizer.lrr=[0.1,0.01]"], [], None, "optimizer.lrr: unknown key; did you mean 'lr'"),
        (["optimizer.lr=[]"], [], None, "--grid optimizer.lr: the list is empty"),
        (["optimizer.lr=0.1"], [], None, "--grid optimizer.lr: expects a YAML list"),
        (["train.epochs=[1,0]"], [], None, "--grid train.epochs=0: the recipe is invalid"),
        ([], ["optimizer.lr=loguniform(0.1,1e-3)"], 2, "low (0.1) must be below high (0.001)"),
        ([], ["optimizer.lr=uniform(0.1,0.1)"], 2, "low (0.1) must be below high (0.1)"),
        ([], ["optimizer.lr=loguniform(0,1)"], 2, "a log scale needs low > 0"),
        ([], ["data.batch_size=int(2.5,8)"], 2, "int(low,high) takes two integers"),
        ([], ["optimizer.lr=normal(0,1)"], 2, "--search optimizer.lr: expects one of"),
        ([], ["optimizer.lr=loguniform(1e-3,0.1)"], None, "--search needs --trials"),
        (["optimizer.lr=[0.1]"], [], 3, "--trials goes with --search"),
        (["optimizer.lr=[0.1]"], ["optimizer.lr=uniform(0,1)"], 2, "swept more than once"),
    ],
)
def test_bad_grid_or_search_is_refused_naming_it(grid, search, trials, expected):
    with pytest.raises(UserError) as error:
        build_spec(tiny_recipe(), grid, search, trials, "r.yaml")
    assert expected in str(error.value)


def test_cli_refuses_an_unknown_key_with_exit_2_before_creating_anything(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep", str(path), "--grid", "optimizer.lrr=[0.1,0.01]", "--sweep-dir", str(out)
    )
    assert result.returncode == 2, result.stderr
    assert "optimizer.lrr: unknown key; did you mean 'lr'" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_a_sweep_folder_refuses_another_sweep(tmp_path):
    _sweep(tmp_path, grid=["optimizer.lr=[0.1,0.01]"])
    with pytest.raises(UserError, match="holds another sweep"):
        _sweep(tmp_path, grid=["optimizer.lr=[0.1,0.02]"])


def test_resume_refuses_a_sweep_file_whose_grid_names_code(tmp_path):
    sweep = _sweep(tmp_path, grid=["optimizer.lr=[0.1]"])
    saved = json.loads((sweep.folder / "sweep.json").read_text())
    saved["spec"]["axes"].append(
        {"key": "model.head.type", "kind": "grid", "values": ["os:system"]}
    )
    (sweep.folder / "sweep.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="refused") as error:
        read_sweep(sweep.folder)
    assert "model.head.type: 'os:system'" in str(error.value)


def test_pruning_reports_each_epoch_and_stops_a_trial_below_the_median():
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1)
    )
    study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={1: 0.8, 2: 0.9}))
    trial = study.ask()
    pruning = Pruning(trial, "val/top1")
    pruning.end_epoch({"epoch": 1, "val/top1": 0.85}, model=None)  # above the median: goes on
    with pytest.raises(StopRun) as stop:
        pruning.end_epoch({"epoch": 2, "val/top1": 0.3}, model=None)
    assert stop.value.status == "pruned"
    assert study.trials[-1].intermediate_values == {1: 0.85, 2: 0.3}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize(): the race
@pytest.mark.parametrize(
    "grid, search, trials",
    [(["optimizer.lr=[0.1]"], [], None), ([], ["optimizer.lr=uniform(0.01,0.1)"], 1)],
)
def test_a_trial_beyond_the_sweep_ends_as_spare_and_is_no_row(tmp_path, grid, search, trials):
    """Two workers see the last trial free; the one that loses the race is handed a fresh
    trial by Optuna, which must not run: a grid has no such combination, a search no budget."""
    spec = build_spec(tiny_recipe(), grid, search, trials, "r.yaml")
    study = open_study(
        url=f"sqlite:///{tmp_path / 'study.db'}",
        name="tiny", spec=spec, definition={}, seed=0, queue=False,
    )  # fmt: skip
    won, lost = study.ask(), study.ask()
    assert claim_label(won, spec) == (0, 1)
    with pytest.raises(optuna.TrialPruned):
        claim_label(lost, spec)
    study.tell(lost, state=optuna.trial.TrialState.PRUNED)
    spec.axes[0].suggest(won)
    study.tell(won, 0.5)
    assert [row["trial"] for row in result_rows(study.get_trials(), spec)] == [0]


def test_search_trains_sampled_values_records_a_pruned_trial_and_resume_adds_none(
    tmp_path, monkeypatch
):
    sweep = _sweep(
        tmp_path,
        search=["optimizer.lr=loguniform(1e-3,1e-1)", "data.batch_size=choice(8,12)"],
        trials=2,
        train={"epochs": 1, "device": "cpu"},
    )
    report = Pruning.end_epoch

    def prune_trial_1(self, row, model):
        report(self, row, model)
        if self.trial.number == 1:  # as the median pruner would, once five trials finished
            raise StopRun("pruned", "below the median")

    monkeypatch.setattr(Pruning, "end_epoch", prune_trial_1)
    rows = run_sweep(sweep, console=QUIET)
    assert sorted((row["trial"], row["status"]) for row in rows) == [
        (0, "completed"),
        (1, "pruned"),
    ]
    for row in rows:
        assert 1e-3 <= row["optimizer.lr"] <= 1e-1 and row["data.batch_size"] in (8, 12)
        run_dir = Path(row["run_dir"])
        trained = Recipe.load(run_dir / "recipe.yaml", check_paths=False)
        assert (trained.optimizer.lr, trained.data.batch_size) == (
            row["optimizer.lr"],
            row["data.batch_size"],
        )
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (row["status"], row["best val/top1"]) == (
            summary["status"],
            summary["best"]["val/top1"],
        )
    assert len(_csv(sweep.folder)) == 2
    again = run_sweep(read_sweep(sweep.folder), console=QUIET, resuming=True)
    assert again == rows and len(list((sweep.folder / "trials").iterdir())) == 2


def test_ctrl_c_requeues_the_trial_resume_continues_it_and_a_divergence_is_recorded(
    tmp_path, monkeypatch
):
    sweep = _sweep(tmp_path, grid=["optimizer.lr=[0.05,1e12]"])  # 2 epochs; 1e12 diverges
    report = Pruning.end_epoch

    def ctrl_c_after_epoch_1(self, row, model):
        report(self, row, model)
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # run() checkpoints at the next step and stops

    monkeypatch.setattr(Pruning, "end_epoch", ctrl_c_after_epoch_1)
    with pytest.raises(Interrupted):
        run_sweep(sweep, console=QUIET)
    assert [(row["trial"], row["status"]) for row in _csv(sweep.folder)] == [("0", "interrupted")]
    monkeypatch.undo()
    rows = run_sweep(read_sweep(sweep.folder), console=QUIET, resuming=True)
    outcomes = [(row["trial"], row["status"], row["epochs"], row["attempts"]) for row in rows]
    assert outcomes == [(0, "completed", 2, 2), (1, "diverged", 0, 1)]
    metrics = (Path(rows[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]


def test_rows_sort_best_first_by_the_metrics_direction():
    rows = [
        {"trial": 0, "best val/loss": 0.5},
        {"trial": 1, "best val/loss": None},
        {"trial": 2, "best val/loss": 0.2},
    ]
    assert [r["trial"] for r in sort_rows(rows, "val/loss", maximize=False)] == [2, 0, 1]
    assert [r["trial"] for r in sort_rows(rows, "val/loss", maximize=True)] == [0, 2, 1]


def _sweep_command(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FINETUNE_SWEEP_HEARTBEAT": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "sweep", *args],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_killed_sweep_resumed_by_two_workers_runs_each_trial_once(tmp_path, monkeypatch):
    """SIGKILL during trial 0's second epoch; then two workers resume the SQLite study at once,
    a ``finetune sweep --resume`` process and this one: trial 1 runs once, trial 0 is taken over
    once its heartbeat is stale and continues from its last/ checkpoint; each is recorded once."""
    monkeypatch.setenv("FINETUNE_SWEEP_HEARTBEAT", "1")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())  # 2 epochs
    folder = tmp_path / "sweep"
    first = _sweep_command(
        str(path), "--grid", "optimizer.lr=[0.05,0.01]", "--sweep-dir", str(folder),
        log=tmp_path / "first.log",
    )  # fmt: skip
    metrics = folder / "trials" / "0000" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, (
            tmp_path / "first.log"
        ).read_text()
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    epoch_1 = metrics.read_text().splitlines()
    assert not (metrics.parent / "summary.json").exists()  # killed mid-trial

    other = _sweep_command("--resume", str(folder), log=tmp_path / "other.log")
    here = io.StringIO()
    run_sweep(read_sweep(folder), console=Console(file=here, width=500), resuming=True)
    assert other.wait(timeout=180) == 0, (tmp_path / "other.log").read_text()
    started = [
        line.split()[2]
        for output in (here.getvalue(), (tmp_path / "other.log").read_text())
        for line in output.splitlines()
        if line.startswith("sweep: trial")
    ]
    assert sorted(started) == ["0", "1"]  # neither worker ran a trial the other ran

    rows = _csv(folder)
    assert [(r["trial"], r["status"]) for r in sorted(rows, key=lambda r: r["trial"])] == [
        ("0", "completed"),
        ("1", "completed"),
    ]
    assert {r["trial"]: r["attempts"] for r in rows} == {"0": "2", "1": "1"}
    resumed = metrics.read_text().splitlines()
    assert resumed[0] == epoch_1[0] and [json.loads(r)["epoch"] for r in resumed] == [1, 2]
    best = [float(r["best val/top1"]) for r in rows]
    assert best == sorted(best, reverse=True)
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert float(row["best val/top1"]) == summary["best"]["val/top1"]
        assert int(row["epochs"]) == summary["epochs"] == 2
    assert len((folder / "results.md").read_text().splitlines()) == 2 + len(rows)  # head, rule
    assert (folder / "sweep.png").read_bytes().startswith(b"\x89PNG")
