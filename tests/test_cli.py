"""The real ``finetune`` command: runs, run folders, resume, exit codes. In subprocesses where the
process itself is tested (a whole run, signals, imports); in this process (``invoke_cli``) where
only what the command prints and writes is."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.run_folder import RunFolder
from tests.conftest import REPO, invoke_cli, run_cli, tiny_recipe, write_recipe


def test_help_does_not_import_torch():
    code = (
        "import sys; from finetune.cli import app; import typer.testing as t; "
        "r = t.CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_validate_ok(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    result = invoke_cli("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"optimizer": {"lr": 0.1, "momentun": 0.9}}, "did you mean 'momentum'"),
        ({"train": {"epochs": "three"}}, "train.epochs:"),
        (
            {"data": {"train": {"type": "imagefolder", "root": "/no/such/folder"}}},
            "data.train.root",
        ),
        ({"colour": 1}, "colour: unknown key"),
    ],
)
def test_bad_recipe_exits_2_without_traceback_or_run_folder(tmp_path, change, expected):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**change))
    for command in ("validate", "run"):
        result = invoke_cli(command, str(path), "--set", f"output.dir={tmp_path / 'out'}")
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_backbone_suggests_timm_names(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(model={"backbone": "resnet_50"}))
    result = invoke_cli("run", str(path), "--set", f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert "unknown model 'resnet_50'" in result.stderr and "resnet50" in result.stderr
    assert not (tmp_path / "out").exists()


def test_run_writes_the_whole_run_folder(tmp_path, image_folder):
    recipe = tiny_recipe(
        data={
            "train": {"type": "imagefolder", "root": str(image_folder)},
            "val": None,
            "val_split": 0.34,
        }
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_dir = tmp_path / "run"
    result = run_cli("run", str(path), "--set", "train.epochs=1", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(run_dir)
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "summary.json",
        "classes.json",
        "last/model.safetensors",
        "last/state.safetensors",
        "last/state.json",
        "best/model.safetensors",
        "best/state.json",
        "plots/curves.png",
    ):
        assert (run_dir / name).is_file(), name
    model_link = run_dir / "model.safetensors"  # `pretrained: <run>/model.safetensors` works
    assert (
        model_link.is_symlink()
        and model_link.resolve() == (run_dir / "best" / "model.safetensors").resolve()
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["epoch"] == 1 and 0 <= summary["best"]["val/top1"] <= 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1]
    assert {"train/loss", "val/loss", "val/top1", "lr", "seconds", "img_per_s"} <= set(rows[0])
    assert json.loads((run_dir / "classes.json").read_text()) == {
        "0": "cat",
        "1": "dog",
        "2": "fox",
    }
    resolved = (run_dir / "recipe.yaml").read_text()
    assert "epochs: 1" in resolved and "grad_accum_steps: 1" in resolved  # defaults written
    state = RunFolder(run_dir).read_checkpoint_state(run_dir / "last")
    assert {"optimizer", "scheduler", "scaler", "epoch", "step", "rng", "history"} <= set(state)
    assert state["history"] == rows  # metrics.jsonl is the checkpoint's own record


def test_a_copied_run_folder_gets_its_model_link_back(tmp_path):
    """`cp -rL` leaves model.safetensors as a file; the next best/ save makes it a link again."""
    folder = RunFolder(tmp_path / "copy")
    folder.create()
    (folder.path / "model.safetensors").write_bytes(b"a dereferenced copy")
    state = {"epoch": 1, "step": 0, "history": []}
    folder.commit_checkpoint(torch.nn.Linear(2, 2), state, best=True)
    link = folder.path / "model.safetensors"
    assert (
        link.is_symlink()
        and link.resolve() == (folder.path / "best" / "model.safetensors").resolve()
    )


def test_default_run_folder_and_latest_link(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(train={"epochs": 1, "device": "cpu"}))
    result = invoke_cli("run", str(path), "--set", f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "out" / "tiny"
    assert (tmp_path / "out" / "tiny" / "latest").resolve() == run_dir.resolve()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "last" / "model.safetensors")


@pytest.fixture(scope="module")
def interruptible(tmp_path_factory) -> tuple[Path, Path]:
    """A recipe that checkpoints every 4 steps, and its uninterrupted run."""
    tmp = tmp_path_factory.mktemp("interruptible")
    recipe = tiny_recipe(
        data={
            "train": {"type": "fake", "num_samples": 128, "num_classes": 3},
            "augment": ["hflip", {"random_crop": 4}],
        },
        model={"backbone": "test_resnet", "num_classes": 3, "head": {"dropout": 0.3}},
        train={"epochs": 3, "device": "cpu", "checkpoint_every": {"steps": 3}},
        scheduler={"name": "cosine", "warmup_epochs": 1},
    )
    path = write_recipe(tmp / "r.yaml", recipe)
    straight = tmp / "straight"
    assert invoke_cli("run", str(path), "--run-dir", str(straight)).returncode == 0
    return path, straight


def test_sigterm_checkpoints_and_the_resume_ends_bit_identical(tmp_path, interruptible):
    """SIGTERM arrives during epoch 2: the run finishes its optimizer step, checkpoints
    mid-epoch, writes summary.json (interrupted) and exits 143; --resume continues with the very
    next batch and ends with the uninterrupted run's weights, bit for bit. (Ctrl-C takes the same
    path: tests/test_training.py checks it in-process.)"""
    path, straight = interruptible
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "run", str(path), "--run-dir", str(interrupted)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = interrupted / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "--resume" in stderr
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    state = RunFolder(interrupted).read_checkpoint_state(interrupted / "last")
    assert 1 <= state["epoch"] < 3, "the run finished before it could be interrupted"

    resumed = run_cli("run", str(path), "--resume", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(interrupted.resolve())
    expected, actual = _weights(straight), _weights(interrupted)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    straight_rows = [
        json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["lr"] for row in rows] == pytest.approx([row["lr"] for row in straight_rows])
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "completed"


def test_resume_of_a_folder_that_is_no_run_exits_2(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    result = invoke_cli("run", str(path), "--resume", str(tmp_path))
    assert result.returncode == 2
    assert "not a run folder" in result.stderr


def test_bare_resume_continues_the_recipes_latest_run(tmp_path):
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(train={"epochs": 1, "device": "cpu"}))
    first = invoke_cli("run", str(path), "--set", f"output.dir={out}")
    assert first.returncode == 0, first.stderr
    run_dir = first.stdout.strip().splitlines()[-1]
    resumed = invoke_cli(
        "run", str(path), "--set", f"output.dir={out}", "--resume", "--set", "train.epochs=2"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(Path(run_dir).resolve())
    rows = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "r.yaml", "--resume"], ["run", "r.yaml", "--resume=latest"]),
        (
            ["run", "r.yaml", "--resume", "--nproc", "2"],
            ["run", "r.yaml", "--resume=latest", "--nproc", "2"],
        ),
        (["run", "r.yaml", "--resume", "runs/a"], ["run", "r.yaml", "--resume", "runs/a"]),
        (["run", "r.yaml", "--resume=runs/a"], ["run", "r.yaml", "--resume=runs/a"]),
    ],
)
def test_bare_resume_gets_the_value_latest(argv, expected):
    from finetune.cli import with_resume_value

    assert with_resume_value(argv) == expected


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run trained on a small image folder, shared by the eval and predict tests."""
    from tests.conftest import make_image_folder

    tmp = tmp_path_factory.mktemp("trained")
    images = make_image_folder(tmp / "images", ["cat", "dog", "fox"], per_class=8)
    recipe = tiny_recipe(
        data={
            "train": {"type": "imagefolder", "root": str(images)},
            "val": {"type": "imagefolder", "root": str(images)},
        },
        train={"epochs": 3, "device": "cpu"},
    )
    path = write_recipe(tmp / "r.yaml", recipe)
    result = invoke_cli("run", str(path), "--run-dir", str(tmp / "run"))
    assert result.returncode == 0, result.stderr
    return tmp / "run", images


def test_eval_reports_metrics_per_class(trained_run):
    run_dir, images = trained_run
    result = invoke_cli("eval", str(run_dir), str(images), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 24
    assert set(report["per_class"]) == {"cat", "dog", "fox"}
    summary = json.loads((run_dir / "summary.json").read_text())
    # The same images were the validation set: eval must reproduce the run's own number.
    best_row = next(
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["epoch"] == summary["best"]["epoch"]
    )
    assert report["top1"] == pytest.approx(best_row["val/top1"])
    assert report["loss"] == pytest.approx(best_row["val/loss"], rel=1e-4)


def test_eval_on_a_folder_with_unknown_classes_exits_2(trained_run, tmp_path):
    from tests.conftest import make_image_folder

    run_dir, _ = trained_run
    other = make_image_folder(tmp_path / "other", ["cat", "wolf"], per_class=2)
    result = invoke_cli("eval", str(run_dir), str(other))
    assert result.returncode == 2
    assert "wolf" in result.stderr


def test_predict_gives_top_k(trained_run):
    run_dir, images = trained_run
    files = sorted((images / "dog").iterdir())[:2]
    result = invoke_cli("predict", str(run_dir), *map(str, files), "--top-k", "2", "--json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert [p["image"] for p in predictions] == [str(f) for f in files]
    for item in predictions:
        assert len(item["top_k"]) == 2
        probabilities = [p["probability"] for p in item["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True)


def test_predict_missing_image_exits_2(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = invoke_cli("predict", str(run_dir), str(tmp_path / "missing.png"))
    assert result.returncode == 2
    assert "missing.png" in result.stderr


def test_test_split_is_scored_with_the_best_weights(tmp_path):
    from tests.conftest import make_image_folder

    train = make_image_folder(tmp_path / "train", ["cat", "dog", "fox"], per_class=6)
    test = make_image_folder(tmp_path / "test", ["cat", "dog", "fox"], per_class=3, seed=5)
    recipe = tiny_recipe(
        data={
            "train": {"type": "imagefolder", "root": str(train)},
            "val": None,
            "val_split": 0.34,
            "test": {"type": "imagefolder", "root": str(test)},
        }
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_dir = tmp_path / "run"
    result = invoke_cli("run", str(path), "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluated = json.loads(invoke_cli("eval", str(run_dir), str(test), "--json").stdout)
    assert summary["test"]["test/top1"] == pytest.approx(evaluated["top1"])
    assert summary["test"]["test/loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
    assert "data.test with the best/ weights" in result.stdout
