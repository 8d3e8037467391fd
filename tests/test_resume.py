"""``--resume --set``: what may change, and how the run continues from where it stands."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.errors import UserError
from finetune.freezing import unfreeze_due
from finetune.recipe import Recipe
from finetune.resume import changes_on_resume
from finetune.run_folder import RunFolder
from tests.conftest import tiny_recipe, write_recipe

RECIPE = tiny_recipe(
    train={"epochs": 4, "device": "cpu"},
    optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    scheduler={"name": "cosine", "warmup_epochs": 1},
)


def _stopped(tmp_path, monkeypatch, name: str, recipe: Recipe, at_epoch: int, **kwargs):
    """Run ``recipe``, stopped (as Ctrl-C would) when epoch ``at_epoch`` starts."""

    def stop(model, stages, epoch):
        if epoch == at_epoch:
            raise KeyboardInterrupt
        return unfreeze_due(model, stages, epoch)

    with monkeypatch.context() as patch:
        patch.setattr("finetune.loop.unfreeze_due", stop)
        with pytest.raises(KeyboardInterrupt):
            finetune.run(recipe, run_dir=tmp_path / name, **kwargs)
    return tmp_path / name


def _lrs(run_dir) -> list[float]:
    return [row["lr"] for row in RunFolder(run_dir).read_metrics()]


def _with(recipe: Recipe, **values) -> Recipe:
    data = recipe.model_dump(mode="json")
    for dotted, value in values.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return Recipe.from_dict(data)


@pytest.mark.parametrize(
    "key, value",
    [("model__num_classes", 4), ("data__batch_size", 4), ("freeze__batchnorm", "frozen")],
)
def test_a_key_that_makes_another_run_cannot_change(key, value):
    saved = Recipe.from_dict(RECIPE)
    with pytest.raises(UserError, match="cannot change when a run continues") as caught:
        changes_on_resume(saved, _with(saved, **{key: value}))
    assert caught.value.problems == [key.replace("__", ".")]


def test_changeable_keys_are_reported():
    saved = Recipe.from_dict(RECIPE)
    new = _with(saved, train__epochs=6, optimizer__lr=0.01, data__num_workers=2)
    assert changes_on_resume(saved, new) == {"train.epochs", "optimizer.lr", "data.num_workers"}


def test_cache_features_may_change_on_a_resume_except_to_from_or_between_views():
    saved = Recipe.from_dict(RECIPE)
    assert changes_on_resume(saved, _with(saved, train__cache_features=False)) == {
        "train.cache_features"
    }
    views = _with(saved, train__cache_features={"views": 2})
    for old, new in [
        (saved, views),
        (views, saved),
        (views, _with(views, train__cache_features={"views": 3})),
    ]:
        with pytest.raises(UserError, match=r"\{views: K\} .* cannot change on a resume"):
            changes_on_resume(old, new)


def test_more_epochs_continue_the_cosine_from_where_it_stands(tmp_path, monkeypatch):
    """Stopped after epoch 2 of 4, continued to 6: the LR goes on down from its value, never
    back up, and ends at the floor."""
    recipe = Recipe.from_dict(RECIPE)
    run_dir = _stopped(tmp_path, monkeypatch, "run", recipe, at_epoch=3)
    before = _lrs(run_dir)
    assert len(before) == 2
    finetune.run(_with(recipe, train__epochs=6), resume=run_dir)
    lrs = _lrs(run_dir)
    assert len(lrs) == 6 and lrs[:2] == before
    assert all(later <= earlier for earlier, later in zip(lrs[1:], lrs[2:], strict=False))
    saved = RunFolder(run_dir).read_checkpoint_state(run_dir / "last")
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert 0 < lrs[-1] < lrs[1] / 10  # the last step's LR, one step before the floor
    assert saved["schedule_start"] == [2, 0]


def test_a_new_lr_and_weight_decay_reach_the_restored_optimizer(tmp_path, monkeypatch):
    recipe = Recipe.from_dict(RECIPE)
    run_dir = _stopped(tmp_path, monkeypatch, "run", recipe, at_epoch=3)
    lr_at_stop = RunFolder(run_dir).read_checkpoint_state(run_dir / "last")["optimizer"][
        "param_groups"
    ][0]["lr"]
    stopped = _stopped(
        tmp_path,
        monkeypatch,
        "run",
        _with(recipe, optimizer__lr=0.025, optimizer__weight_decay=0.0),
        at_epoch=4,
        resume=run_dir,
    )
    group = RunFolder(stopped).read_checkpoint_state(stopped / "last")["optimizer"]["param_groups"][
        0
    ]
    assert group["weight_decay"] == 0.0
    # Halved, then cosine from there over the 6 steps left: epoch 3's last step is step 2 of 6.
    assert _lrs(stopped)[2] == pytest.approx(lr_at_stop / 2 * (1 + math.cos(math.pi / 3)) / 2)
    assert group["lr"] == pytest.approx(lr_at_stop / 4)


def test_a_second_resume_after_a_changed_one_is_bit_identical(tmp_path, monkeypatch):
    """The continued schedule is rebuilt from the checkpoint: stopping again and resuming ends
    where the changed resume alone ends."""
    recipe = Recipe.from_dict(RECIPE)
    first = _stopped(tmp_path, monkeypatch, "first", recipe, at_epoch=3)
    second = tmp_path / "second"
    shutil.copytree(first, second, symlinks=True)
    longer = _with(recipe, train__epochs=5)
    finetune.run(longer, resume=first)
    _stopped(tmp_path, monkeypatch, "second", longer, at_epoch=4, resume=second)
    finetune.run(longer, resume=second)
    expected = load_file(first / "last" / "model.safetensors")
    actual = load_file(second / "last" / "model.safetensors")
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert _lrs(second) == _lrs(first)


def test_the_cli_names_a_key_that_cannot_change(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(train={"epochs": 1, "device": "cpu"}))
    finetune.run(Recipe.load(path), run_dir=tmp_path / "run")
    result = CliRunner().invoke(
        app, ["run", str(path), "--resume", str(tmp_path / "run"), "--set", "data.batch_size=4"]
    )
    assert result.exit_code == 2
    assert "data.batch_size" in result.output and "cannot change" in result.output
