"""The run folder on real files: finding weights and runs, atomic writes, metrics, checkpoints."""

from __future__ import annotations

import json
import os
import pickle
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
    find_run_folder,
    is_resumable,
    new_run_dir,
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


def test_new_run_dir_is_unique_for_two_runs_in_the_same_second(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder.time, "strftime", lambda _: "20240101-120000")
    first = new_run_dir(tmp_path, "tiny")
    first.mkdir(parents=True)
    second = new_run_dir(tmp_path, "tiny")
    second.mkdir()
    third = new_run_dir(tmp_path, "tiny")
    assert first == tmp_path / "tiny" / "20240101-120000"
    assert len({first, second, third}) == 3 and second.parent == third.parent == first.parent


def test_is_resumable_needs_a_recipe_and_a_last_checkpoint(tmp_path):
    run = _started(tmp_path / "run")
    assert not is_resumable(run.path)
    (run.path / "last").mkdir()
    assert is_resumable(run.path)
    (run.path / "recipe.yaml").unlink()
    assert not is_resumable(run.path)
    assert not is_resumable(tmp_path / "missing")


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


def test_append_metrics_drops_rows_left_by_an_interrupted_run(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.create()
    assert run.read_metrics() == []
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "train/loss": float(epoch)})
    run.append_metrics({"epoch": 2, "train/loss": 0.5})  # resumed from epoch 1's checkpoint
    assert run.read_metrics() == [{"epoch": 1, "train/loss": 1.0}, {"epoch": 2, "train/loss": 0.5}]


# -------------------------------------------------------------------------------- checkpoints
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3)


def test_checkpoint_round_trip(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = {
        "epoch": 2,
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "best": {"epoch": 1, "val/top1": 0.5},
    }
    run = RunFolder(tmp_path / "run")
    run.save_checkpoint("last", model, state)
    tensors, loaded = run.load_checkpoint("last")
    expected = model.state_dict()
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    assert loaded["epoch"] == 2 and loaded["best"] == state["best"]
    assert torch.equal(loaded["rng"], state["rng"])
    restored = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(loaded["optimizer"])  # the optimizer state is whole
    momentum = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert not list((run.path / "last").glob("*.tmp"))


def test_the_state_is_loaded_with_weights_only(tmp_path):
    """A state holding an arbitrary Python object is refused: unpickling it could run code."""
    run = RunFolder(tmp_path / "run")
    run.save_checkpoint("last", _model(), {"epoch": 1, "where": Path("/tmp")})
    with pytest.raises(pickle.UnpicklingError):
        run.load_checkpoint("last")


def test_weights_and_state_of_different_epochs_are_refused(tmp_path):
    """An interruption between writing the weights and the state leaves epoch 2 weights beside
    epoch 1's state: resuming from them would mix two epochs."""
    model = _model()
    run = RunFolder(tmp_path / "run")
    (run.path / "last").mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(run.weights("last")), metadata={"epoch": "2"})
    torch.save({"epoch": 1}, run.path / "last" / "state.pt")
    with pytest.raises(UserError, match=r"weights \(epoch 2\) and state \(epoch 1\) disagree"):
        run.load_checkpoint("last")


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    run = RunFolder(tmp_path / "run")
    _weights(run.weights("last"))
    with pytest.raises(UserError, match="no complete checkpoint") as caught:
        run.load_checkpoint("last")
    assert str(run.path / "last") in str(caught.value)


def test_saving_best_links_the_run_model_to_it(tmp_path):
    model = _model()
    run = RunFolder(tmp_path / "run")
    run.save_checkpoint("last", model, {"epoch": 1})
    assert not (run.path / "model.safetensors").exists()  # only best/ is "the run's model"
    run.save_checkpoint("best", model, {"epoch": 1})
    link = run.path / "model.safetensors"
    assert link.is_symlink() and os.readlink(link) == "best/model.safetensors"
    assert link.resolve() == run.weights("best").resolve()
    with torch.no_grad():
        model.fc.bias.fill_(7.0)
    run.save_checkpoint("best", model, {"epoch": 2})  # replaces the link, still resolves
    assert link.resolve() == run.weights("best").resolve()
    assert torch.equal(run_folder.read_state_dict(link)["fc.bias"], torch.full((3,), 7.0))
