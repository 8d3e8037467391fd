"""The run folder on real files: finding weights and runs, atomic writes, metrics, checkpoints."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import finetune
import finetune.run_folder as run_folder
from finetune.errors import UserError
from finetune.export import export_run
from finetune.freezing import unfreeze_due
from finetune.recipe import Recipe
from finetune.run_folder import (
    RunFolder,
    atomic_write_text,
    claim_run_dir,
    find_run_folder,
    weights_file,
    write_json,
)
from finetune.weights import read_state_dict, write_safetensors
from tests.conftest import tiny_recipe


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


# ----------------------------------------------------------------------- frozen tensors shared
def _head_only() -> torch.nn.Module:
    model = _model()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("fc."))
    return model


def _train_head(model: torch.nn.Module) -> None:
    """What an epoch changes: the head, and BatchNorm statistics (buffers)."""
    with torch.no_grad():
        model.fc.weight.add_(0.1)
    model.train()(torch.randn(2, 3, 32, 32))


def _assert_whole(tensors: dict, model: torch.nn.Module) -> None:
    expected = model.state_dict()
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key


def test_frozen_parameters_are_written_once_and_hard_linked(tmp_path):
    model, run = _head_only(), _started(tmp_path / "run")
    first = run.commit_checkpoint(model, _state(1), best=True)
    frozen = run.path / "ckpt" / first / "frozen.safetensors"
    inode = frozen.stat().st_ino
    _train_head(model)
    run.commit_checkpoint(model, _state(2), best=False)
    _train_head(model)
    third = run.commit_checkpoint(model, _state(3), best=True)  # prunes the first two
    folder = run.path / "ckpt" / third
    assert {p.name for p in (run.path / "ckpt").iterdir()} == {third}
    assert (folder / "frozen.safetensors").stat().st_ino == inode  # never rewritten
    trained = load_file(folder / "model.safetensors")  # what plain safetensors sees
    buffers = {name for name, _ in model.named_buffers()}
    assert set(trained) == {"fc.weight", "fc.bias"} | buffers
    assert set(load_file(folder / "frozen.safetensors")).isdisjoint(trained)
    _assert_whole(run.load_checkpoint("last")[0], model)  # resume, eval of the test split
    _assert_whole(read_state_dict(run.path / "model.safetensors"), model)  # pretrained: <run>/...
    _assert_whole(read_state_dict(weights_file(run.path)), model)  # predict, export, load:


@pytest.mark.parametrize("change", ["unfrozen", "changed in place"])
def test_a_frozen_tensor_that_changes_is_never_taken_from_the_shared_file(tmp_path, change):
    model, run = _head_only(), _started(tmp_path / "run")
    first = run.commit_checkpoint(model, _state(1), best=True)
    if change == "unfrozen":  # gradual unfreezing: it trains from now on
        model.conv1[0].weight.requires_grad_(True)
    with torch.no_grad():
        model.conv1[0].weight.mul_(-1.0)
    second = run.commit_checkpoint(model, _state(2), best=False)
    old, new = (run.path / "ckpt" / name / "frozen.safetensors" for name in (first, second))
    assert old.stat().st_ino != new.stat().st_ino
    assert "conv1.0.weight" in load_file(old) and "conv1.0.weight" not in load_file(new)
    assert set(load_file(new)) == set(load_file(old)) - {"conv1.0.weight"}
    _assert_whole(run.load_checkpoint("last")[0], model)
    assert torch.equal(run.load_checkpoint("best")[0]["conv1.0.weight"], -model.conv1[0].weight)


def test_a_failed_save_leaves_no_extra_link_to_the_shared_file(tmp_path):
    model, run = _head_only(), _started(tmp_path / "run")
    first = run.commit_checkpoint(model, _state(1), best=True)
    with pytest.raises(TypeError, match="not data"):  # fails after the frozen file is linked
        run.commit_checkpoint(model, _state(2, where=Path("/tmp")), best=False)
    assert [p.name for p in (run.path / "ckpt").iterdir()] == [first]
    assert (run.path / "ckpt" / first / "frozen.safetensors").stat().st_nlink == 1
    _assert_whole(run.load_checkpoint("last")[0], model)


@pytest.mark.parametrize("damage", ["missing", "another checkpoint's"])
def test_a_checkpoint_without_its_own_frozen_file_is_refused(tmp_path, damage):
    model, run = _head_only(), _started(tmp_path / "run")
    run.commit_checkpoint(model, _state(1), best=True)
    weights = run.path / "last" / "model.safetensors"
    frozen = weights.resolve().parent / "frozen.safetensors"
    frozen.unlink()
    if damage == "another checkpoint's":
        model.conv1[0].weight.requires_grad_(True)
        other = _started(tmp_path / "other")
        other.commit_checkpoint(model, _state(1), best=True)
        frozen.write_bytes((other.path / "last" / "frozen.safetensors").read_bytes())
    expected = "which is missing" if damage == "missing" else "not the frozen tensors"
    with pytest.raises(UserError, match=expected) as caught:
        read_state_dict(weights)
    assert "frozen.safetensors" in str(caught.value)
    with pytest.raises(UserError, match=expected):
        run.load_checkpoint("last")


def test_a_frozen_file_named_by_a_path_is_refused(tmp_path):
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.parent.mkdir()
    write_safetensors(
        {"w": torch.ones(1)}, weights, {"finetune_frozen_file": "../elsewhere.safetensors"}
    )
    with pytest.raises(UserError, match="not a file name"):
        read_state_dict(weights)


def test_gradual_unfreezing_resumes_bit_identically_and_exports_the_trained_values(
    tmp_path, monkeypatch
):
    """layer1 is frozen in epoch 1 (in the shared file) and trains from epoch 2 (in the
    checkpoint's own model file); a run stopped between the two resumes to the same weights."""
    monkeypatch.setattr("finetune.training.plot_curves", lambda folder: None)  # 2 s a run
    recipe = Recipe.from_dict(
        tiny_recipe(
            data={"train": {"type": "fake", "num_samples": 16, "num_classes": 3}},
            freeze={"until": "layer2", "unfreeze": [{"epoch": 2, "patterns": ["layer1.*"]}]},
        )
    )
    straight = finetune.run(recipe, run_dir=tmp_path / "straight").run_dir

    def stop(model, stages, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return unfreeze_due(model, stages, epoch)

    monkeypatch.setattr("finetune.loop.unfreeze_due", stop)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(recipe, run_dir=tmp_path / "stopped")
    monkeypatch.setattr("finetune.loop.unfreeze_due", unfreeze_due)
    stopped = tmp_path / "stopped"
    before = load_file(stopped / "last" / "frozen.safetensors")
    layer1 = [key for key in before if key.startswith("layer1.")]
    assert layer1 and not set(layer1) & set(load_file(stopped / "last" / "model.safetensors"))
    finetune.run(recipe, resume=stopped)

    expected = read_state_dict(straight / "last" / "model.safetensors")
    resumed = read_state_dict(stopped / "last" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    own = load_file(stopped / "last" / "model.safetensors")
    assert set(layer1) <= set(own) and not set(layer1) & set(
        load_file(stopped / "last" / "frozen.safetensors")
    )
    assert not any(torch.equal(own[key], before[key]) for key in layer1 if key.endswith("weight"))
    result = export_run(
        stopped / "last" / "model.safetensors", formats=["safetensors"], fuse_bn=False
    )
    exported = load_file(result.out / "model.safetensors")
    for key in expected:
        assert torch.equal(exported[key], expected[key]), key
