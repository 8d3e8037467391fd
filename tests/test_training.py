"""`finetune run` from weights in a local file: the run folder's load_report.json."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from finetune.cli import app
from tests.conftest import tiny_recipe, write_recipe


def test_run_from_a_weights_file_writes_load_report_json(tmp_path):
    """A file of test_resnet weights for 7 classes, plus a tensor the model has no place for,
    loaded into a 3-class model: the head is a shape mismatch (skipped and missing), the stray
    tensor unexpected, everything else loaded, and the loaded tensors are really in the model."""
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=7).state_dict()
    weights = {key: value.contiguous() for key, value in source.items()}
    weights["extra.weight"] = torch.ones(2, 2)
    path = tmp_path / "pretrained.safetensors"
    save_file(weights, str(path))
    model_keys = set(timm.create_model("test_resnet", num_classes=3).state_dict())

    recipe = tiny_recipe(
        model={"backbone": "test_resnet", "num_classes": 3, "pretrained": str(path)},
        optimizer={"lr": 1e-12, "momentum": 0.0},  # the weights stay put
        train={"epochs": 1, "device": "cpu"},
    )
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--run-dir", str(run_dir)]
    )
    assert result.exit_code == 0, result.output

    report = json.loads((run_dir / "load_report.json").read_text())
    head = {"fc.weight", "fc.bias"}
    assert report["source"].endswith("pretrained.safetensors")
    assert set(report["loaded"]) == model_keys - head
    assert set(report["missing"]) == head
    assert report["unexpected"] == ["extra.weight"]
    assert {item["key"] for item in report["mismatched"]} == head
    mismatch = {item["key"]: item for item in report["mismatched"]}["fc.weight"]
    assert list(mismatch["file_shape"])[0] == 7 and list(mismatch["model_shape"])[0] == 3
    assert report["counts"] == {
        "loaded": len(model_keys) - 2,
        "missing": 2,
        "unexpected": 1,
        "mismatched": 2,
        "excluded": 0,
    }
    assert report["warning"] is None

    trained = load_file(run_dir / "best" / "model.safetensors")
    convs = [key for key, value in source.items() if value.ndim == 4]  # untouched by lr 1e-12
    assert len(convs) > 10
    for key in convs:
        assert torch.allclose(trained[key], source[key], atol=1e-8), key
    assert trained["fc.weight"].shape == (3, source["fc.weight"].shape[1])


def test_excluded_head_is_listed_and_counted(tmp_path):
    path = tmp_path / "pretrained.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=7).state_dict(), str(path))
    recipe = tiny_recipe(
        model={
            "backbone": "test_resnet",
            "num_classes": 3,
            "pretrained": str(path),
            "load": {"exclude": ["fc.*"]},
        },
        train={"epochs": 1, "device": "cpu"},
    )
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(write_recipe(tmp_path / "r.yaml", recipe)), "--run-dir", str(run_dir)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "load_report.json").read_text())
    assert sorted(report["excluded"]) == ["fc.bias", "fc.weight"]
    assert report["mismatched"] == [] and report["unexpected"] == []
    assert report["counts"]["missing"] == 2
    assert report["counts"]["loaded"] == pytest.approx(len(report["loaded"]))


def test_ctrl_c_finishes_the_step_checkpoints_and_raises_interrupted(tmp_path, monkeypatch):
    """SIGINT (Ctrl-C) during epoch 2 sets the stop request: the loop finishes its optimizer
    step, commits a mid-epoch checkpoint, and raises Interrupted (exit code 130); the summary
    says interrupted. A second Ctrl-C within 2 s is the same request, not a second one."""
    import os
    import signal

    import finetune
    from finetune.errors import Interrupted
    from finetune.freezing import unfreeze_due
    from finetune.recipe import Recipe
    from finetune.run_folder import RunFolder

    def press_ctrl_c_twice(model, stages, epoch):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return unfreeze_due(model, stages, epoch)

    monkeypatch.setattr("finetune.loop.unfreeze_due", press_ctrl_c_twice)
    recipe = Recipe.from_dict(tiny_recipe(train={"epochs": 3, "device": "cpu"}))
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    with pytest.raises(Interrupted) as caught:
        finetune.run(recipe, run_dir=tmp_path / "run")
    assert caught.value.exit_code == 130 and "SIGINT" in str(caught.value)
    state = RunFolder(tmp_path / "run").read_checkpoint_state(tmp_path / "run" / "last")
    assert (state["epoch"], state["step"]) == (1, 1)  # one step into epoch 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps_into_next_epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
