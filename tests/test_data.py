"""Data sources, checks before training, bad images, splits, samplers and loaders, on real files."""

from __future__ import annotations

import gc
import json
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.augment import build_transforms
from finetune.data import (
    BalancedSampler,
    Split,
    build_datasets,
    build_loader,
    build_train_sampler,
    class_weights,
    skipped_images,
    stratified_split,
)
from finetune.distributed import SampleKey, ShuffleShardSampler
from finetune.errors import UserError
from finetune.images import BadImageError
from finetune.recipe import Recipe
from finetune.sources import image_folder
from tests.conftest import make_image_folder, tiny_recipe


def _data(train: dict, **data) -> Recipe:
    train = train or {"type": "fake"}
    recipe = tiny_recipe(data={"train": train, "val": None, "val_split": 0.25, **data})
    return Recipe.from_dict(recipe).data


# ------------------------------------------------------------------ checks before training
@pytest.mark.parametrize(
    "layout, message",
    [
        ({"cat": 2, "dog": 0}, "class folder {root}/dog has no images"),
        ({"cat": 3}, "found 1 class (cat)"),
        ({}, "{root} has no class folders"),
    ],
)
def test_folder_problems_fail_before_training_naming_the_folder(tmp_path, layout, message):
    root = tmp_path / "data"
    root.mkdir()
    for name, count in layout.items():
        (root / name).mkdir()
        if count:
            make_image_folder(root, [name], per_class=count)
    with pytest.raises(UserError, match="^data.train") as caught:
        build_datasets(_data({"type": "imagefolder", "root": str(root)}), seed=0)
    assert message.format(root=root) in str(caught.value)


def test_train_and_val_with_other_classes_fail_naming_both(tmp_path):
    train = make_image_folder(tmp_path / "train", ["cat", "dog"], per_class=2)
    val = make_image_folder(tmp_path / "val", ["cat", "wolf"], per_class=2)
    data = Recipe.from_dict(
        tiny_recipe(
            data={
                "train": {"type": "imagefolder", "root": str(train)},
                "val": {"type": "imagefolder", "root": str(val)},
            }
        )
    ).data
    with pytest.raises(UserError) as caught:
        build_datasets(data, seed=0)
    text = str(caught.value)
    assert str(val) in text and str(train) in text
    assert "missing ['dog'], extra ['wolf']" in text


def test_num_classes_must_match_the_folders(tmp_path):
    root = make_image_folder(tmp_path / "train", ["cat", "dog", "fox"], per_class=2)
    with pytest.raises(UserError) as caught:
        build_datasets(_data({"type": "imagefolder", "root": str(root)}), seed=0, num_classes=2)
    assert str(caught.value).startswith(f"model.num_classes is 2 but data.train ({root}) has 3")


def _fake_mnist(root: Path, count: int = 12) -> None:
    """The four raw files torchvision's MNIST reads, in its idx format, with random digits."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes()
        )
        labels = (np.arange(count) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, count) + labels.tobytes()
        )


def test_torchvision_dataset_by_name_from_local_files(tmp_path):
    _fake_mnist(tmp_path)
    data = Recipe.from_dict(
        tiny_recipe(
            data={
                "train": {"type": "torchvision", "name": "MNIST", "root": str(tmp_path)},
                "val": {
                    "type": "torchvision",
                    "name": "MNIST",
                    "root": str(tmp_path),
                    "split": "test",
                },
                "normalize": "imagenet",
            }
        )
    ).data
    datasets = build_datasets(data, seed=0)
    assert len(datasets.classes) == 10 and datasets.classes[0] == "0 - zero"
    image, label = datasets.train[3]
    assert image.shape == (3, 32, 32) and label == 3  # greyscale made RGB, then transformed


@pytest.mark.parametrize(
    "source, message",
    [
        ({"name": "CIFAR10"}, "found no usable files under {root}"),
        ({"name": "CIFAR10"}, "download=True"),
        (
            {"name": "CIFAR11"},
            "data.train.name: torchvision has no dataset 'CIFAR11'; close names: CIFAR10",
        ),
        ({"name": "MNIST", "split": "val"}, "data.train.split: MNIST has splits train and test"),
    ],
)
def test_torchvision_dataset_errors_say_what_to_do(tmp_path, source, message):
    data = _data({"type": "torchvision", "root": str(tmp_path), **source})
    with pytest.raises(UserError) as caught:
        build_datasets(data, seed=0)
    assert message.format(root=tmp_path) in str(caught.value)


# ------------------------------------------------------------------------------- bad images
def test_truncated_image_fails_with_its_path_also_from_a_worker(odd_folder):
    root, files = odd_folder
    split = Split(image_folder(root, "data.train"))
    bad = next(i for i, (path, _) in enumerate(split.source.samples) if path == files["truncated"])
    with pytest.raises(BadImageError, match=f"^{files['truncated']}: cannot read this image"):
        split[bad]
    loader = build_loader(
        Split(split.source, [bad]), batch_size=1, train=False, num_workers=1, pin_memory=False
    )
    with pytest.raises(BadImageError) as caught:
        next(iter(loader))
    message = str(caught.value)
    del caught
    gc.collect()  # now, not in a later test: the abandoned loader stops its worker
    assert message.startswith(f"{files['truncated']}: cannot read this image")
    assert "Traceback" not in message and "on_bad_image: skip" in message


def test_skip_replaces_a_bad_image_and_counts_it_each_epoch(odd_folder):
    root, _ = odd_folder
    transform = build_transforms(_data({}, augment=[]), None, None, train=True)
    train = Split(image_folder(root, "data.train"), transform=transform, on_bad_image="skip")
    loader = build_loader(train, batch_size=4, train=False, num_workers=0, pin_memory=False)
    for _ in range(2):
        with pytest.warns(UserWarning, match="skipped: .*truncated.jpg: cannot read this image"):
            sizes = [len(labels) for _, labels in loader]
        assert sum(sizes) == len(train)  # the bad image was replaced, not dropped
        assert skipped_images(train=loader) == {"train/skipped_images": 1}
    strict = build_loader(
        Split(train.source), batch_size=4, train=False, num_workers=0, pin_memory=False
    )
    assert skipped_images(train=strict) == {}  # nothing counted unless skipping is on


# ----------------------------------------------------------------------- splits and loaders
def test_val_split_is_stratified_and_seeded():
    labels = [0] * 10 + [1] * 20 + [2] * 3
    train, val = stratified_split(labels, 0.2, seed=0)
    assert Counter(labels[i] for i in val) == {0: 2, 1: 4, 2: 1}
    assert sorted(train + val) == list(range(len(labels)))
    assert stratified_split(labels, 0.2, seed=0) == (train, val)
    assert stratified_split(labels, 0.2, seed=1)[1] != val
    few = [0, 0, 1, 1, 1, 1]
    train, val = stratified_split(few, 0.75, seed=0)  # every class keeps a training image
    assert Counter(few[i] for i in val) == {0: 1, 1: 3}
    assert Counter(few[i] for i in train) == {0: 1, 1: 1}


def test_balanced_sampler_draws_classes_equally_seeded_per_epoch():
    labels = [0] * 90 + [1] * 10
    sampler = BalancedSampler(labels, seed=0, batch_size=10)
    sampler.set_epoch(1)
    first = list(sampler)
    drawn = Counter(labels[i] for i in first)
    assert len(first) == 100 and 35 <= drawn[1] <= 65  # ~50 of the rare class, not ~10
    assert list(sampler) == first
    sampler.set_epoch(2)
    assert list(sampler) != first
    shards = [BalancedSampler(labels, seed=0, batch_size=5, rank=r, world_size=2) for r in (0, 1)]
    for shard in shards:
        shard.set_epoch(1)
    assert sorted(list(shards[0]) + list(shards[1])) == sorted(first)


def test_class_weights():
    weights = class_weights("balanced", [0, 0, 0, 1], 3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])
    assert class_weights("none", [0, 1], 2) is None
    with pytest.raises(UserError, match="data.class_weights: 3 weights for 2 classes"):
        class_weights([1.0, 2.0, 3.0], [0, 1], 2)


def test_loader_options_and_seeded_workers(image_folder):
    data = _data(
        {"type": "imagefolder", "root": str(image_folder)},
        augment=["trivialaugment"],
        normalize="none",
    )
    train = build_datasets(data, seed=0).train

    def first_batch(seed: int) -> torch.Tensor:
        loader = build_loader(
            train,
            batch_size=4,
            train=False,
            num_workers=1,
            pin_memory=False,
            seed=seed,
            prefetch_factor=3,
            persistent_workers=False,
        )
        assert loader.prefetch_factor == 3 and not loader.persistent_workers
        return next(iter(loader))[0]

    assert torch.equal(first_batch(5), first_batch(5))  # worker RNGs come from the seed
    assert not torch.equal(first_batch(5), first_batch(6))
    plain = build_loader(train, batch_size=4, train=True, num_workers=0, pin_memory=False)
    assert plain.drop_last and plain.prefetch_factor is None


# ------------------------------------------------------------------- seeded augmentations
AUGMENT = ["hflip", "random_resized_crop", {"color_jitter": 0.4}]


@pytest.fixture(scope="module")
def augmented_train(tmp_path_factory) -> Split:
    root = make_image_folder(tmp_path_factory.mktemp("aug"), ["a", "b", "c"], per_class=6)
    data = _data({"type": "imagefolder", "root": str(root)}, augment=AUGMENT, image_size=16)
    return build_datasets(data, seed=0).train  # 12 images


def _train_loader(train: Split, num_workers: int, **options) -> torch.utils.data.DataLoader:
    sampler = build_train_sampler("shuffle", train.targets, seed=0, batch_size=4)
    return build_loader(
        train,
        batch_size=4,
        train=True,
        num_workers=num_workers,
        pin_memory=False,
        sampler=sampler,
        seed=0,
        **options,
    )


def _epoch(loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch, start=start)
    return list(loader)


def _assert_same(batches, others) -> None:
    assert len(batches) == len(others)
    for (images, labels), (other_images, other_labels) in zip(batches, others, strict=True):
        assert torch.equal(images, other_images) and torch.equal(labels, other_labels)


def test_augmented_batches_do_not_depend_on_the_workers(augmented_train):
    """The same images with 0 and 2 workers, and with persistent workers that drew before."""
    plain = _train_loader(augmented_train, 0)
    expected = [_epoch(plain, epoch) for epoch in (1, 2)]
    assert not torch.equal(expected[0][0][0], expected[1][0][0])  # each epoch its own draws
    workers = _train_loader(augmented_train, 2, persistent_workers=True)
    for epoch in (1, 2):  # epoch 2 from workers that already augmented epoch 1
        _assert_same(_epoch(workers, epoch), expected[epoch - 1])


def test_a_resumed_epoch_gives_the_tail_of_the_epoch(augmented_train):
    loader = _train_loader(augmented_train, 0)
    full = _epoch(loader, 3)
    _assert_same(_epoch(loader, 3, start=2 * 4), full[2:])


def test_iterating_a_training_loader_leaves_the_process_rng_alone(augmented_train):
    loader = _train_loader(augmented_train, 0)
    before = torch.get_rng_state()
    _epoch(loader, 1)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_skipped_image_is_replaced_with_the_keys_randomness(odd_folder):
    root, files = odd_folder
    transform = build_transforms(_data({}, augment=AUGMENT, image_size=16), None, None, True)
    split = Split(image_folder(root, "data.train"), transform=transform, on_bad_image="skip")
    bad = next(i for i, (path, _) in enumerate(split.source.samples) if path == files["truncated"])
    with pytest.warns(UserWarning, match="skipped: .*truncated.jpg"):
        image, label = split[SampleKey(bad, 0, 1, 5)]
    assert torch.equal(image, split[SampleKey(bad + 1, 0, 1, 5)][0])  # the next readable one
    assert not torch.equal(image, split[SampleKey(bad + 1, 0, 1, 6)][0])


def test_no_training_batch_of_one_image():
    dataset = torch.utils.data.TensorDataset(torch.arange(9))
    loader = build_loader(dataset, batch_size=4, train=True, num_workers=0, pin_memory=False)
    assert [len(batch) for (batch,) in loader] == [4, 4]  # the ninth image is dropped
    with pytest.raises(UserError, match="^data.batch_size: .* is a single image"):
        build_loader(  # 3 images over 2 processes: one each
            dataset,
            batch_size=4,
            train=True,
            num_workers=0,
            pin_memory=False,
            sampler=ShuffleShardSampler(3, seed=0, batch_size=4, rank=1, world_size=2),
        )


# ----------------------------------------------------------------------------- end to end
def test_a_run_with_every_data_feature(tmp_path, odd_folder):
    """Skipped images in the metrics, measured normalisation saved and reused, mixup with label
    smoothing, balanced class weights: one short run through the real loop."""
    from finetune.training import run

    root, _ = odd_folder
    recipe = Recipe.from_dict(
        tiny_recipe(
            data={
                "train": {"type": "imagefolder", "root": str(root)},
                "val": None,
                "val_split": 0.3,
                "on_bad_image": "skip",
                "normalize": "dataset",
                "class_weights": "balanced",
                "augment": ["hflip", "mixup", {"cutmix": 0.5}],
                "batch_size": 4,
            },  # every training image is used: none dropped with the last batch
            model={"backbone": "test_resnet"},
            train={"epochs": 1, "device": "cpu", "label_smoothing": 0.1},
        )
    )
    with pytest.warns(UserWarning) as warned:
        result = run(recipe, run_dir=tmp_path / "run")
    messages = "\n".join(str(warning.message) for warning in warned)
    assert "data.verify: 1 of 18 images cannot be read and will be skipped" in messages
    assert re.search("skipped: .*truncated.jpg", messages)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert {"train/skipped_images", "val/skipped_images"} <= set(row)
    assert row["train/skipped_images"] + row["val/skipped_images"] == 1
    assert 0 <= row["train/top1"] <= 1
    saved = json.loads((tmp_path / "run" / "normalization.json").read_text())
    assert saved["normalize"] == "dataset" and len(saved["mean"]) == 3
    resolved = Recipe.load(result.run_dir / "recipe.yaml")  # `dataset` became the values
    assert resolved.data.normalize.mean == pytest.approx(saved["mean"])


def _train(root: Path, run_dir: Path, workers: int, epochs: int = 3, resume=None) -> dict:
    """A short run on ``root`` with augmentations, mixup and dropout (which draws from the
    process's generator: no loader may draw from it too); its last weights."""
    from finetune.training import run

    recipe = tiny_recipe(
        data={
            "train": {"type": "imagefolder", "root": str(root)},
            "val": None,
            "val_split": 0.25,
            "image_size": 16,
            "batch_size": 4,
            "num_workers": workers,
            "augment": [*AUGMENT, "mixup"],
        },
        model={"backbone": "test_resnet", "num_classes": 3, "head": {"dropout": 0.3}},
        train={"epochs": epochs, "device": "cpu"},
        scheduler={"name": "constant"},  # the same LRs for a run cut after epoch 1
    )
    result = run(Recipe.from_dict(recipe), run_dir=run_dir, resume=resume)
    return load_file(result.run_dir / "last" / "model.safetensors")


def _assert_same_weights(weights: dict, others: dict) -> None:
    assert weights.keys() == others.keys()
    for key, value in weights.items():
        assert torch.equal(value, others[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    """Image folder and the weights of three epochs without loader workers."""
    tmp = tmp_path_factory.mktemp("workers")
    root = make_image_folder(tmp / "images", ["a", "b", "c"], per_class=6)
    return root, _train(root, tmp / "run0", workers=0)


def test_final_weights_do_not_depend_on_the_workers(uninterrupted, tmp_path):
    """0 and 2 loader workers (persistent): bitwise the same weights after three epochs."""
    root, weights = uninterrupted
    _assert_same_weights(_train(root, tmp_path / "run2", workers=2), weights)


def test_a_resumed_run_with_workers_ends_bitwise_as_an_uninterrupted_one(uninterrupted, tmp_path):
    root, weights = uninterrupted
    _train(root, tmp_path / "cut", workers=2, epochs=1)
    _assert_same_weights(_train(root, None, workers=2, resume=tmp_path / "cut"), weights)
