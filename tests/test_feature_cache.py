"""``train.cache_features``: the head trained on features computed once gives the run the
uncached loop gives, and the cache is used exactly when that holds."""

from __future__ import annotations

import json
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from finetune.build import build
from finetune.cli import app
from finetune.errors import Interrupted, UserError
from finetune.feature_cache import CACHE_FOLDER, head_input
from finetune.freezing import unfreeze_due
from finetune.loop import StopRequest, fit
from finetune.recipe import Recipe
from finetune.resume import restore
from finetune.run_folder import RunFolder
from finetune.training import fit_options
from tests.conftest import tiny_recipe, write_recipe

TIMING = {"seconds", "img_per_s"}  # the only keys of a metrics row that may differ


def _recipe(tmp_path, **train) -> dict:
    """A linear probe: all but the head frozen, BatchNorm frozen, no random augmentation, and
    a dropout in the head (its masks must come from the same random numbers)."""
    return tiny_recipe(
        model={"backbone": "test_resnet", "num_classes": 3, "head": {"dropout": 0.3}},
        freeze={"until": "fc", "batchnorm": "frozen"},
        data={
            "train": {"type": "digits", "split": "train", "classes": [0, 1, 2], "per_class": 8},
            "val": {"type": "digits", "split": "val", "classes": [0, 1, 2], "per_class": 4},
            "augment": [],
        },
        train={"epochs": 2, "device": "cpu", **train},
        output={"dir": str(tmp_path / "out")},
    )


def _fit(recipe: dict, resume: RunFolder | None = None, **fit_args):
    """Build and train ``recipe`` in this process (from ``resume``'s last checkpoint), as
    ``finetune.run`` does without writing its own files; the rows, the model and the cache."""
    built = build(Recipe.from_dict(recipe))
    state = restore(resume, built, set()) if resume is not None else None
    state = fit(
        built.model,
        built.train_loader,
        built.val_loader,
        built.optimizer,
        built.schedule,
        built.runtime,
        fit_options(built),
        state=state,
        unfreeze=built.unfreeze,
        features=built.features,
        **fit_args,
    )
    return state.history, built.model, built.features


def _assert_same_rows(rows, expected):
    assert len(rows) == len(expected)
    for row, reference in zip(rows, expected, strict=True):
        assert row.keys() == reference.keys()
        for key in row.keys() - TIMING:
            assert row[key] == pytest.approx(reference[key], abs=1e-5), key


def _feature_files(tmp_path) -> dict:
    folder = tmp_path / "out" / CACHE_FOLDER
    return {path: path.stat().st_mtime_ns for path in folder.glob("*/*.npy")}


def test_cached_epochs_give_the_uncached_rows_and_head_and_the_features_are_reused(tmp_path):
    rows, model, features = _fit(_recipe(tmp_path, cache_features=False))
    assert features is not None and not features.plan.used and not _feature_files(tmp_path)
    cached_rows, cached_model, cache = _fit(_recipe(tmp_path, cache_features=True))
    assert cache.computed and len(_feature_files(tmp_path)) == 4  # train, val and their labels
    _assert_same_rows(cached_rows, rows)
    trained = model.state_dict()
    for name, tensor in cached_model.state_dict().items():  # the head trained in place
        torch.testing.assert_close(tensor, trained[name], atol=1e-5, rtol=0, msg=name)

    # A second run over the same data and weights, memory-mapping them (a tiny memory limit):
    # nothing is recomputed, and the run is the same.
    files = _feature_files(tmp_path)
    again, _, cache = _fit(_recipe(tmp_path, cache_features="auto", cache_features_memory_gb=1e-9))
    assert cache.plan.used and not cache.computed and _feature_files(tmp_path) == files
    assert isinstance(cache.inputs(1).train_loader.dataset.features, np.memmap)
    _assert_same_rows(again, rows)
    # A sweep of head learning rates shares them too.
    _, _, cache = _fit({**_recipe(tmp_path), "optimizer": {"name": "sgd", "lr": 0.2}})
    assert not cache.computed and _feature_files(tmp_path) == files


def test_gradual_unfreezing_uses_the_cache_until_the_backbone_trains(tmp_path):
    unfreeze = {
        "until": "fc",
        "batchnorm": "frozen",
        "unfreeze": [{"epoch": 2, "patterns": ["layer4.*"]}],
    }
    rows, _, _ = _fit({**_recipe(tmp_path, cache_features=False), "freeze": unfreeze})
    cached_rows, model, cache = _fit({**_recipe(tmp_path), "freeze": unfreeze})
    assert cache.plan.until == 2 and cache.computed
    assert cache.inputs(1) is not None and cache.inputs(2) is None
    _assert_same_rows(cached_rows, rows)
    assert model.layer4[0].conv1.weight.requires_grad  # epoch 2 trained the backbone


def test_true_where_it_cannot_hold_is_an_error_naming_each_condition(tmp_path):
    recipe = _recipe(tmp_path, cache_features=True)
    recipe["data"]["augment"] = ["hflip", {"rotate": 10}]
    recipe["freeze"] = {"until": "layer4", "batchnorm": "train"}
    with pytest.raises(UserError) as caught:
        build(Recipe.from_dict(recipe), data=False)
    message = str(caught.value)
    assert message.startswith("train.cache_features: true, but data.augment: hflip, rotate are")
    assert "freeze: 9 parameter tensors below the head train (layer4.0.conv1.weight, " in message
    assert "freeze.batchnorm: train updates the statistics of " in message
    recipe["train"]["cache_features"] = "auto"  # then simply not used
    assert not build(Recipe.from_dict(recipe), data=False).features.plan.used


def _views_recipe(tmp_path, views: int, **train) -> dict:
    recipe = _recipe(tmp_path, cache_features={"views": views}, **train)
    recipe["data"]["augment"] = ["hflip"]
    return recipe


def test_views_are_augmented_features_that_the_epochs_take_in_turn(tmp_path):
    """Each cached row of a view is the features of the image or of its mirror image (hflip),
    the views differ, epochs 1, 2, 3 train on views 0, 1, 0, and the views are the same when
    computed again, by a loader worker this time."""
    rows, model, cache = _fit(_views_recipe(tmp_path, 2, epochs=3))
    assert cache.computed and cache.plan.views == 2
    train = np.load(cache.folder / "train.npy")
    assert train.shape == (2, 24, 96) and np.load(cache.folder / "val.npy").shape == (1, 12, 96)

    built = build(Recipe.from_dict(_views_recipe(tmp_path, 2)))
    split, evaluate = built.train_loader.dataset, built.val_loader.dataset.transform
    images = torch.stack([evaluate(split.source[i][0]) for i in split.indices])
    _, features_of = head_input(model.eval(), ["fc"])
    with torch.no_grad():
        plain, mirrored = features_of(images).numpy(), features_of(images.flip(-1)).numpy()
    is_plain = np.isclose(train, plain, atol=1e-5).all(-1)
    assert (is_plain | np.isclose(train, mirrored, atol=1e-5).all(-1)).all()
    assert is_plain.any() and not is_plain.all() and (is_plain[0] != is_plain[1]).any()

    assert [cache.inputs(epoch).train_loader.dataset.view for epoch in (1, 2, 3)] == [0, 1, 0]
    single, _, _ = _fit(_views_recipe(tmp_path, 1, epochs=3))  # view 0 is the same draw
    _assert_same_rows(single[:1], rows[:1])
    assert single[1]["train/loss"] != pytest.approx(rows[1]["train/loss"], abs=1e-5)

    shutil.rmtree(cache.folder)
    recipe = _views_recipe(tmp_path, 2, epochs=3)
    recipe["data"]["num_workers"] = 1
    again, _, cache = _fit(recipe)
    assert cache.computed and np.array_equal(np.load(cache.folder / "train.npy"), train)
    _assert_same_rows(again, rows)


@pytest.mark.parametrize(
    "augment, views, reason",
    [
        (["hflip", {"mixup": 0.2}], 2, "data.augment: mixup mixes the images of a batch"),
        ([], 2, "data.augment: nothing is random, so every view would be the same; use true"),
    ],
)
def test_views_where_they_cannot_hold_are_an_error(tmp_path, augment, views, reason):
    recipe = _recipe(tmp_path, cache_features={"views": views})
    recipe["data"]["augment"] = augment
    with pytest.raises(UserError, match=rf"^train.cache_features: \{{views: {views}\}}, but "):
        build(Recipe.from_dict(recipe), data=False)
    with pytest.raises(UserError, match=re.escape(reason)):
        build(Recipe.from_dict(recipe), data=False)


@pytest.mark.parametrize(
    "backbone, freeze, where",
    [
        ("ghostnet_100", {"until": "classifier"}, "drop_rate 0.2"),  # timm: F.dropout in its head
        (
            "torchvision:mobilenet_v3_small",
            {"patterns": ["features.*", "classifier.0.*"]},
            "classifier.2",
        ),
    ],
)
def test_dropout_below_the_head_keeps_the_cache_off(tmp_path, backbone, freeze, where):
    recipe = _recipe(tmp_path, cache_features=True)
    recipe["model"] = {"backbone": backbone, "num_classes": 3}
    recipe["freeze"] = {**freeze, "batchnorm": "frozen"}
    with pytest.raises(UserError, match=rf"model: dropout or drop-path below the head \({where}\)"):
        build(Recipe.from_dict(recipe), data=False)


def test_plan_says_whether_the_cache_is_used_and_its_size(tmp_path):
    path = write_recipe(tmp_path / "probe.yaml", _recipe(tmp_path))
    result = CliRunner().invoke(app, ["plan", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert (
        "train.cache_features: auto (epochs 1-2 of 2 train the head on features computed once, "
        "384 bytes per image)" in result.output  # test_resnet: 96 float32 features
    )
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert json.loads(result.output)["feature_cache"]["epochs"] == [1, 2]
    flipped = ["plan", str(path), "--set", "data.augment=[hflip]"]
    result = CliRunner().invoke(app, [*flipped, "--set", "train.cache_features=true"])
    assert result.exit_code == 2 and "data.augment: hflip is random" in result.output
    views = [*flipped, "--set", "train.cache_features={views: 4}"]
    result = CliRunner().invoke(app, views, terminal_width=250)
    assert result.exit_code == 0, result.output
    assert (
        "train.cache_features: {views: 4} (epochs 1-2 of 2 train the head on features computed "
        "once: 4 augmented views of each training image, one per epoch in turn, 384 bytes per "
        "image and view)" in result.output
    )
    result = CliRunner().invoke(app, [*views, "--json"])
    assert json.loads(result.output)["feature_cache"]["setting"] == {"views": 4}


@pytest.mark.parametrize("views", [None, 2])
def test_a_run_resumed_mid_epoch_reuses_the_features_and_ends_the_same(
    tmp_path, monkeypatch, views
):
    recipe = (
        _recipe(tmp_path, epochs=3) if views is None else _views_recipe(tmp_path, views, epochs=3)
    )
    rows, _, _ = _fit(recipe)
    folder, stop = RunFolder(tmp_path / "run"), StopRequest()
    folder.create()

    def ctrl_c(model, stages, epoch):
        if epoch == 2:
            stop.signum = signal.SIGINT  # as Ctrl-C does: checkpoint after the next step, stop
        return unfreeze_due(model, stages, epoch)

    with monkeypatch.context() as patch:
        patch.setattr("finetune.loop.unfreeze_due", ctrl_c)
        with pytest.raises(Interrupted):
            _fit(recipe, run=folder, stop=stop)
    assert folder.read_checkpoint_state(folder.path / "last")["step"] == 1  # into epoch 2
    files = _feature_files(tmp_path)
    resumed, _, cache = _fit(recipe, resume=folder, run=folder)
    assert cache.inputs(2) is not None and not cache.computed and _feature_files(tmp_path) == files
    assert folder.read_checkpoint_state(folder.path / "last")["history"] == resumed
    _assert_same_rows(resumed, rows)
