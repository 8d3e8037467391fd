"""The run folder on real files: finding weights and runs, atomic writes, metrics, checkpoints."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import finetune.run_folder as run_folder
from finetune.errors import UserError
from finetune.run_folder import (
    RunFolder,
    atomic_write_text,
    claim_run_dir,
    find_run_folder,
    weights_file,
    write_json,
)


def _weights(path: Path, epoch: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2,), float(epoch))}, str(path), metadata={"epoch": str(epoch)})
    return path


def _started(path: Path) -> RunFolder:
    run = RunFolder(path)
    run.create()
    run.write_start(
        recipe_yaml="name: tiny\n",
        classes=["cat", "dog"],
        normalization={"normalize": "imagenet"},
        load_report=None,
    )
    return run


# ----------------------------------------------------------------------------- weights_file
def test_weights_file_of_a_file_is_the_file(tmp_path):
    path = _weights(tmp_path / "any-name.safetensors")
    assert weights_file(path) == path
    assert weights_file(str(path)) == path


def test_weights_file_of_a_run_folder_prefers_best_then_last(tmp_path):
    last = _weights(tmp_path / "run" / "last" / "model.safetensors")
    assert weights_file(tmp_path / "run") == last
    best = _weights(tmp_path / "run" / "best" / "model.safetensors")
    assert weights_file(tmp_path / "run") == best


def test_weights_file_of_a_checkpoint_folder(tmp_path):
    best = _weights(tmp_path / "run" / "best" / "model.safetensors")
    assert weights_file(tmp_path / "run" / "best") == best


def test_weights_file_of_a_recipe_output_folder_follows_latest(tmp_path):
    old = RunFolder(tmp_path / "tiny" / "20240101-000000")
    new = RunFolder(tmp_path / "tiny" / "20240102-000000")
    for run in (old, new):
        _weights(run.weights("best"))
        run.link_latest()
    assert weights_file(tmp_path / "tiny").resolve() == new.weights("best").resolve()


def test_weights_file_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without model.safetensors") as caught:
        weights_file(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(caught.value)
    with pytest.raises(UserError, match="weights file not found") as caught:
        weights_file(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(caught.value)


# ------------------------------------------------------------------------ finding run folders
def test_find_run_folder_from_a_checkpoint_file_two_levels_down(tmp_path):
    run = _started(tmp_path / "run")
    checkpoint = _weights(run.weights("best"))
    assert find_run_folder(checkpoint) == run.path
    assert find_run_folder(run.path / "best") == run.path
    assert find_run_folder(run.path) == run.path


def test_find_run_folder_outside_a_run_names_the_path(tmp_path):
    stray = _weights(tmp_path / "loose" / "model.safetensors")
    with pytest.raises(UserError, match="not inside a run folder") as caught:
        find_run_folder(stray)
    assert str(stray) in str(caught.value)


def test_claimed_run_folders_are_distinct_for_two_runs_in_the_same_second(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder.time, "strftime", lambda _: "20240101-120000")
    claimed = [claim_run_dir(tmp_path, "tiny") for _ in range(3)]
    assert claimed[0] == tmp_path / "tiny" / "20240101-120000"
    assert len(set(claimed)) == 3 and all(path.is_dir() for path in claimed)


def test_claiming_under_a_file_names_the_path(tmp_path):
    (tmp_path / "out").write_text("a file, not a folder")
    with pytest.raises(UserError, match="cannot write") as caught:
        claim_run_dir(tmp_path / "out", "tiny")
    assert str(tmp_path / "out") in str(caught.value)


def test_link_latest_points_at_the_newest_run(tmp_path):
    first, second = RunFolder(tmp_path / "tiny" / "a"), RunFolder(tmp_path / "tiny" / "b")
    for run in (first, second):
        run.create()
        run.link_latest()
        latest = tmp_path / "tiny" / "latest"
        assert latest.is_symlink() and os.readlink(latest) == run.path.name  # relative: movable
        assert latest.resolve() == run.path.resolve()
    assert not list((tmp_path / "tiny").glob(".latest*"))  # no temporary link left behind


# ------------------------------------------------------------------------------ atomic writes
def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "notes.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["notes.txt"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"top1": 0.5})

    def broken_rename(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_folder.os, "replace", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"top1": 0.9})
    assert json.loads(path.read_text()) == {"top1": 0.5}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------------------- metadata, metrics
def test_write_start_files_read_back(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.create()
    assert run.read_normalization() is None  # runs older than the file
    normalization = {"normalize": "dataset", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    report = {"loaded": 10, "missing": ["fc.weight"]}
    classes = [f"class {i}" for i in range(12)]  # beyond 10: read back in index order
    run.write_start(
        recipe_yaml="name: tiny\nseed: 0\n",
        classes=classes,
        normalization=normalization,
        load_report=report,
    )
    assert run.recipe_file.read_text() == "name: tiny\nseed: 0\n"
    assert run.read_classes() == classes
    assert run.read_normalization() == normalization
    assert json.loads((run.path / "load_report.json").read_text()) == report
    assert json.loads((run.path / "classes.json").read_text())["11"] == "class 11"


def test_write_start_without_a_load_report_writes_none(tmp_path):
    run = _started(tmp_path / "run")
    assert not (run.path / "load_report.json").exists()


# -------------------------------------------------------------------------------- checkpoints
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3)


def _state(epoch: int, step: int = 0, **extra) -> dict:
    rows = [{"epoch": e, "train/loss": float(e)} for e in range(1, epoch + 1)]
    return {"epoch": epoch, "step": step, "history": rows, **extra}


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = _state(
        2,
        optimizer=optimizer.state_dict(),
        rng={"torch": torch.get_rng_state(), "python": random.getstate()},
        best={"epoch": 1, "val/top1": 0.5, "loss": float("inf")},
    )
    run = _started(tmp_path / "run")
    run.commit_checkpoint(model, state, best=False)
    tensors, loaded = run.load_checkpoint("last")
    expected = model.state_dict()
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    assert loaded["epoch"] == 2 and loaded["best"] == state["best"]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["rng"]["python"] == state["rng"]["python"]  # tuples come back as tuples
    restored = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(loaded["optimizer"])  # int keys and all: the optimizer is whole
    momentum = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert run.read_metrics() == state["history"]
    assert not (run.path / "best").exists() and not (run.path / "model.safetensors").exists()


def test_the_state_holds_data_only(tmp_path):
    """Nothing but tensors and plain values goes in: no pickle is ever written or read."""
    run = _started(tmp_path / "run")
    with pytest.raises(TypeError, match="not data"):
        run.commit_checkpoint(_model(), _state(1, where=Path("/tmp")), best=False)
    assert not (run.path / "last").exists()
    assert [p.name for p in (run.path / "ckpt").iterdir()] == []  # the staging folder is gone


def test_a_new_checkpoint_moves_last_and_best_and_prunes_the_rest(tmp_path):
    model, run = _model(), _started(tmp_path / "run")
    first = run.commit_checkpoint(model, _state(1), best=True)
    second = run.commit_checkpoint(model, _state(1, step=5), best=False)  # mid-epoch
    assert (run.path / "best").resolve().name == first
    assert (run.path / "last").resolve().name == second
    third = run.commit_checkpoint(model, _state(2), best=True)
    assert {p.name for p in (run.path / "ckpt").iterdir()} == {third}
    assert run.load_checkpoint("best")[1]["best_checkpoint"] == third
    link = run.path / "model.safetensors"
    assert link.is_symlink() and os.readlink(link) == "best/model.safetensors"
    assert link.resolve() == (run.path / "ckpt" / third / "model.safetensors")


def test_recover_takes_the_newest_complete_checkpoint_and_cleans_up(tmp_path):
    """What a kill during a save leaves: a staging folder, a complete folder that last does
    not point at yet, a best link behind, a metrics file cut short."""
    model, run = _model(), _started(tmp_path / "run")
    run.commit_checkpoint(model, _state(1), best=True)
    newest = run.commit_checkpoint(model, _state(2), best=True)
    older = run.commit_checkpoint(model, _state(3), best=False)
    # Simulate: epoch 3's folder is complete but the kill came before any link moved.
    os.rename(run.path / "ckpt" / older, run.path / "ckpt" / "e0004-s000000-9")
    staging = run.path / "ckpt" / ".staging-x"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    (run.path / "last").unlink()
    (run.path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    run.write_summary({"status": "interrupted", "epochs": 2})  # from an earlier invocation
    assert run.recover().name == "e0004-s000000-9"
    assert not (run.path / "summary.json").exists()
    assert (run.path / "last").resolve().name == "e0004-s000000-9"
    assert (run.path / "best").resolve().name == newest
    assert [row["epoch"] for row in run.read_metrics()] == [1, 2, 3]
    assert {p.name for p in (run.path / "ckpt").iterdir()} == {"e0004-s000000-9", newest}


def test_recover_without_a_checkpoint_starts_over(tmp_path):
    run = _started(tmp_path / "run")
    (run.path / "ckpt" / ".staging-x").mkdir(parents=True)
    (run.path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert run.recover() is None
    assert not (run.path / "ckpt").exists() and run.read_metrics() == []


def test_weights_and_state_of_different_positions_are_refused(tmp_path):
    run = _started(tmp_path / "run")
    name = run.commit_checkpoint(_model(), _state(1), best=False)
    folder = run.path / "ckpt" / name
    tensors = {k: v.contiguous() for k, v in _model().state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"epoch": "2", "step": "0"})
    with pytest.raises(UserError, match="disagree"):
        run.load_checkpoint("last")


@pytest.mark.parametrize("damage", ["truncated state", "state json", "missing file"])
def test_a_damaged_checkpoint_is_a_user_error_naming_the_file(tmp_path, damage):
    run = _started(tmp_path / "run")
    folder = run.path / "ckpt" / run.commit_checkpoint(_model(), _state(1), best=False)
    if damage == "truncated state":
        data = (folder / "state.safetensors").read_bytes()
        (folder / "state.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "state json":
        (folder / "state.json").write_text('{"epoch": ')
    else:
        (folder / "state.json").unlink()
    with pytest.raises(UserError) as caught:
        run.load_checkpoint("last")
    assert str(run.path / "last") in str(caught.value)
    assert "weights_only" not in str(caught.value)
