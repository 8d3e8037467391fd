"""`finetune run --nproc 2` as one command: a signal stops every process at one checkpoint, a kill
leaves no process behind, and an error found in the workers is reported once with its own code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune.launch import _Launch
from tests.conftest import REPO, run_cli, tiny_recipe, write_recipe

# Long enough (a few seconds on two cores) for a signal sent after the first epoch to land
# mid-run; num_workers: 0 keeps the process count at torchrun + 2.
RECIPE = tiny_recipe(train={"epochs": 20, "device": "cpu"})


def start(recipe: Path, run_dir: Path, *args: str) -> subprocess.Popen:
    """``finetune run --nproc 2`` in a session of its own, as a shell would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "run", str(recipe), "--run-dir", str(run_dir)]
        + [*args, "--nproc", "2"],
        cwd=REPO,
        # TMPDIR: the launch folder a SIGKILLed launcher cannot remove stays in the test's tmp.
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(run_dir.parent)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_training(process: subprocess.Popen) -> None:
    """Until rank 0 prints its first epoch: every process is past start-up and training."""
    for line in process.stdout:
        if line.startswith("epoch 1/"):
            return
    pytest.fail(f"no epoch ended (exit {process.wait()}): {process.stderr.read()[-3000:]}")


def processes_of(run_dir: Path) -> list[str]:
    """Every process (launcher, torchrun, workers) whose command line names ``run_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        if str(run_dir).encode() in command:
            found.append(entry.name + ": " + command.replace(b"\0", b" ").decode()[:200])
    return found


def assert_none_left(run_dir: Path, within: float) -> None:
    deadline = time.monotonic() + within
    while (left := processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, left


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("launch") / "r.yaml", RECIPE)


@pytest.fixture(scope="module")
def uninterrupted(recipe: Path) -> Iterator[Callable[[], Path]]:
    """One full `--nproc 2` run of the recipe, to compare a resumed run with. It starts at once
    and overlaps the interrupted run (start-up is mostly imports); call the result to wait."""
    run_dir = recipe.parent / "uninterrupted"
    process = start(recipe, run_dir)

    def finished() -> Path:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        return run_dir

    yield finished
    if process.poll() is None:  # the test failed before waiting
        process.kill()
        process.communicate()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_stops_every_process_at_one_checkpoint_and_resumes_exactly(
    recipe: Path, uninterrupted: Callable[[], Path], tmp_path: Path
):
    run_dir = tmp_path / "run"
    process = start(recipe, run_dir)
    wait_for_training(process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert_none_left(run_dir, within=5)
    assert stderr.count("interrupted by SIGTERM") == 1, stderr  # once, not once per rank
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"

    resumed = run_cli("run", str(recipe), "--resume", str(run_dir), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    expected = load_file(uninterrupted() / "last" / "model.safetensors")
    got = load_file(run_dir / "last" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].equal(expected[key]), key  # bitwise, not close


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; parent-death signals")
def test_sigkill_to_the_command_leaves_no_process_behind(recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    process = start(recipe, run_dir)
    wait_for_training(process)
    process.kill()
    process.wait()
    assert_none_left(run_dir, within=5)


def test_bad_input_found_by_the_workers_exits_2_with_one_message(recipe: Path, tmp_path: Path):
    # A valid recipe key whose value only the workers' build rejects.
    result = run_cli(
        "run",
        str(recipe),
        "--run-dir",
        str(tmp_path / "run"),
        "--nproc",
        "2",
        "--set",
        "model.backbone=resnet_nonexistent",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("unknown model 'resnet_nonexistent'") == 1, result.stderr
    assert "Traceback" not in result.stderr and "exitcode" not in result.stderr, result.stderr


def recorded(folder: Path, *exits: tuple[int, int, str]) -> _Launch:
    """A launch whose workers left these (rank, exit code, message) records."""
    for rank, code, message in exits:
        (folder / f"exit-{rank}").write_text(
            json.dumps({"rank": rank, "code": code, "message": message})
        )
    return _Launch(folder)


def test_bad_input_on_one_rank_is_the_reported_cause(tmp_path: Path, capsys):
    # Rank 1 read a bad image; rank 0 then failed in its next collective.
    launch = recorded(
        tmp_path, (0, 1, "error: RuntimeError: peer closed\n"), (1, 2, "error: bad\n")
    )
    assert launch.report(1) == 2
    assert capsys.readouterr().err == "error: bad\n"


def test_a_signal_is_reported_once_with_rank_0s_message(tmp_path: Path, capsys):
    launch = recorded(tmp_path, (1, 143, "interrupted\n"), (0, 143, "interrupted at step 3\n"))
    assert launch.report(1) == 143
    assert capsys.readouterr().err == "interrupted at step 3\n"


def test_a_signal_before_any_worker_recorded_still_gives_its_code(tmp_path: Path, capsys):
    launch = recorded(tmp_path)
    launch.signals.append(signal.SIGTERM)
    assert launch.report(1) == 143
    assert capsys.readouterr().err == "interrupted by SIGTERM\n"


def test_unexpected_failures_show_every_distinct_message(tmp_path: Path, capsys):
    launch = recorded(tmp_path, (1, 1, "error: B\n"), (0, 1, "error: A\n"), (2, 1, "error: A\n"))
    assert launch.report(1) == 1
    assert capsys.readouterr().err == "error: A\nerror: B\n"


def test_success_reports_nothing(tmp_path: Path, capsys):
    assert recorded(tmp_path, (0, 0, ""), (1, 0, "")).report(0) == 0
    assert capsys.readouterr().err == ""
