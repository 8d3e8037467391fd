"""``data.cache: memory`` (``finetune.image_cache``): the cached splits give the images the
uncached ones give, in loader workers too; random_resized_crop's pre-crop size; the RAM limit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from finetune import image_cache
from finetune.build import build
from finetune.cli import app
from finetune.config.data import DataConfig
from finetune.data import build_datasets, build_loader, build_train_sampler
from finetune.describe import describe_run
from finetune.distributed import SampleKey
from finetune.errors import UserError
from finetune.image_cache import CachedSplit, cache_images, total_ram
from finetune.images import BadImageError
from finetune.recipe import Recipe
from finetune.run_folder import RunFolder
from tests.conftest import make_image_folder, tiny_recipe, write_recipe


def folder_recipe(root: Path, **data) -> Recipe:
    """A tiny recipe on an image folder at 16 px (evaluation resizes to 18, then crops)."""
    source = {"train": {"type": "imagefolder", "root": str(root)}, "val": None}
    return Recipe.from_dict(
        tiny_recipe(data={**source, "val_split": 0.25, "image_size": 16, "cache": "memory", **data})
    )


def both(data: DataConfig):
    """The splits without and with the cache, built alike."""
    return build_datasets(data, seed=0), cache_images(build_datasets(data, seed=0), data)


def keys(split, epoch: int) -> list[SampleKey]:
    """Every item of ``split`` as a training sampler names it (last item first)."""
    order = reversed(range(len(split)))
    return [SampleKey(i, 0, epoch, position) for position, i in enumerate(order)]


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> None:
    """Noisy images of the given (width, height), named so that they sort in this order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")


@pytest.mark.parametrize(
    "augment",
    [
        ["hflip"],  # resize + centre crop: cached at the final size
        ["random_crop", "vflip", {"rotate": 10}, {"color_jitter": 0.3}, "random_erasing"],
    ],
)
def test_cached_splits_give_the_same_tensors_as_uncached_ones(image_folder, augment):
    data = folder_recipe(image_folder, augment=augment).data
    plain, cached = both(data)
    assert isinstance(cached.train, CachedSplit) and isinstance(cached.val, CachedSplit)
    for epoch in (1, 2):  # the random draws change with the epoch, and match in both
        for key in keys(plain.train, epoch):
            (image, label), (cached_image, cached_label) = plain.train[key], cached.train[key]
            assert torch.equal(image, cached_image) and label == cached_label
    for i in range(len(plain.val)):  # the deterministic evaluation transform
        assert torch.equal(plain.val[i][0], cached.val[i][0])
    assert cached.train.targets == plain.train.targets and cached.test is None


def test_random_resized_crop_crops_images_cached_at_the_pre_crop_size(tmp_path):
    """Images larger than the pre-crop size (18 px for 16) are shrunk to it, so the crops are
    alike but softer; smaller images are cached as decoded and give the very same crops."""
    make_image_folder(tmp_path / "large", ["cat", "dog"], per_class=6, size=48)
    make_image_folder(tmp_path / "small", ["cat", "dog"], per_class=6, size=12)
    large = folder_recipe(tmp_path / "large", augment=["random_resized_crop"]).data
    plain, cached = both(large)
    assert {min(cached.train.images[i].shape[-2:]) for i in range(len(cached.train))} == {18}
    images = torch.stack([plain.train[key][0] for key in keys(plain.train, 1)])
    from_cache = torch.stack([cached.train[key][0] for key in keys(plain.train, 1)])
    assert from_cache.shape == images.shape and from_cache.dtype == images.dtype
    assert torch.allclose(from_cache.mean(dim=(0, 2, 3)), images.mean(dim=(0, 2, 3)), atol=0.15)
    assert from_cache.std() < images.std()  # the shrink averaged the noise away
    plain, cached = both(folder_recipe(tmp_path / "small", augment=["random_resized_crop"]).data)
    assert all(torch.equal(plain.train[k][0], cached.train[k][0]) for k in keys(plain.train, 1))


def test_loader_workers_share_the_cache_and_see_the_uncached_batches(image_folder):
    """Filled by two loader processes, read by two others: the batches of the uncached split
    read in the main process."""
    data = folder_recipe(image_folder, augment=["random_crop", "hflip"], num_workers=2).data
    plain, cached = both(data)

    def batches(split, workers: int) -> list:
        sampler = build_train_sampler("shuffle", split.targets, seed=0, batch_size=4)
        sampler.set_epoch(3)
        loader = build_loader(
            split,
            batch_size=4,
            train=True,
            sampler=sampler,
            num_workers=workers,
            pin_memory=False,
            persistent_workers=False,
        )
        return list(loader)

    expected, got = batches(plain.train, 0), batches(cached.train, 2)
    assert len(got) == len(expected) == len(plain.train) // 4
    for (images, labels), (cached_images, cached_labels) in zip(expected, got, strict=True):
        assert torch.equal(images, cached_images) and torch.equal(labels, cached_labels)


def test_unreadable_images_are_skipped_or_refused_as_without_the_cache(odd_folder):
    root, files = odd_folder
    skip = folder_recipe(root, on_bad_image="skip", augment=["hflip"]).data
    plain, cached = both(skip)
    with pytest.warns(UserWarning, match="skipped"):  # the truncated file is in one split
        for name in ("train", "val"):
            split, cached_split = getattr(plain, name), getattr(cached, name)
            expected = [split[key] for key in keys(split, 1)]
            got = [cached_split[key] for key in keys(split, 1)]
            for (image, label), (cached_image, cached_label) in zip(expected, got, strict=True):
                assert torch.equal(image, cached_image) and label == cached_label
            assert cached_split.take_skipped() == split.take_skipped()
    assert sum(len(split.images.errors) for split in (cached.train, cached.val)) == 1
    refuse = folder_recipe(root, on_bad_image="error", augment=["hflip"]).data
    _, cached = both(refuse)
    split = next(s for s in (cached.train, cached.val) if s.images.errors)
    with pytest.raises(BadImageError, match=f"{files['truncated']}.*data.on_bad_image: skip"):
        split[next(iter(split.images.errors))]


def test_a_cache_over_the_ram_share_is_refused_before_it_fills(image_folder, monkeypatch):
    data = folder_recipe(image_folder, cache_max_ram_fraction=1e-9).data
    with pytest.raises(UserError) as refused:
        cache_images(build_datasets(data, seed=0), data)
    message = str(refused.value)
    assert "data.cache_max_ram_fraction" in message
    assert "12 train images of 16x16 + 6 val images of 16x16" in message
    # Each process of a multi-process run on this machine caches every image.
    per_image = 16 * 16 * 3
    fraction = 18 * per_image * 1.5 / total_ram()
    data = folder_recipe(image_folder, cache_max_ram_fraction=fraction).data
    assert len(cache_images(build_datasets(data, seed=0), data).train) == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="in each of 2 processes"):
        cache_images(build_datasets(data, seed=0), data)


def test_images_larger_than_the_first_are_refused_while_the_cache_fills(tmp_path):
    """The estimate takes every image as large as the first; the fill counts real bytes."""
    sizes = [(18, 18)] + [(72, 18)] * 5  # resized to 18 px on the shorter side: 18x18, 18x72
    for name in ("cat", "dog"):
        write_images(tmp_path / "train" / name, sizes)
        write_images(tmp_path / "val" / name, [(18, 18)])
    estimate = (12 + 2) * 18 * 18 * 3
    fraction = 2 * estimate / total_ram()  # room for the estimate, not for what the files hold
    recipe = folder_recipe(
        tmp_path / "train",
        val={"type": "imagefolder", "root": str(tmp_path / "val")},
        val_split=None,
        augment=["random_crop"],
        cache_max_ram_fraction=fraction,
    )
    with pytest.raises(UserError, match=r"the train images \(\d+ of 12 read so far\)"):
        cache_images(build_datasets(recipe.data, seed=0), recipe.data)


def test_a_bar_shows_the_cache_filling_on_a_terminal(image_folder, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    data = folder_recipe(image_folder).data
    cache_images(build_datasets(data, seed=0), data, progress=False)  # another rank's
    assert capsys.readouterr().err == ""
    cache_images(build_datasets(data, seed=0), data)
    shown = capsys.readouterr().err
    assert "caching train images" in shown and "caching val images" in shown and "100%" in shown


def test_total_ram_is_the_container_limit_when_lower(tmp_path, monkeypatch):
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(image_cache, "CGROUP_MEMORY_MAX", limit)
    limit.write_text("max\n")
    physical = total_ram()
    assert physical is not None and physical > 2**20
    limit.write_text(f"{2**20}\n")
    assert total_ram() == 2**20


def test_plan_and_run_say_what_is_cached(tmp_path):
    recipe = tiny_recipe(data={"cache": "memory", "augment": ["random_resized_crop"]})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = CliRunner().invoke(app, ["plan", str(path)], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert (
        "data.cache: memory: images decoded once and kept as uint8 (train at most 37 px on the "
        "shorter side, val 32x32), at most 50% of RAM; random_resized_crop crops the cached "
        "images (shorter side at most 37 px), not the files" in result.output
    )
    console = Console(record=True, width=300)
    describe_run(build(Recipe.from_dict(recipe)), RunFolder(tmp_path / "run"), console)
    assert "24 + 12 images in 108.0 KiB" in console.export_text()  # 36 x 32 x 32 x 3 bytes


def test_a_run_whose_cache_would_not_fit_exits_2_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(data={"cache": "memory"}))
    tiny = ["--set", "data.cache_max_ram_fraction=1e-9"]
    result = CliRunner().invoke(app, ["run", str(path), *tiny], terminal_width=300)
    assert result.exit_code == 2
    assert "data.cache_max_ram_fraction: data.cache: memory would hold 24 train" in result.output
    assert not (tmp_path / "checkpoints").exists()  # refused before the run folder is made
