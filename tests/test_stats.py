"""Normalisation statistics: ``finetune stats`` against NumPy, and every ``data.normalize`` mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.errors import UserError
from finetune.images import BadImageError
from finetune.recipe import Recipe
from finetune.sources import image_folder, open_path
from finetune.stats import (
    IMAGENET_MEAN,
    image_statistics,
    normalization,
    resolve_normalization,
    with_measured_normalization,
)
from tests.conftest import add_odd_files, invoke_cli, make_image_folder, tiny_recipe


def numpy_rgb(path: Path) -> np.ndarray:
    """Pillow's RGB conversion; 16-bit greyscale scaled to 8 bits (Pillow would saturate it)."""
    with Image.open(path) as image:
        if image.mode.startswith("I"):
            grey = np.round(np.asarray(image, dtype=np.float64) / 257)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def numpy_statistics(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: every pixel of every image, on the 0-1 scale, in one array."""
    pixels = np.concatenate([numpy_rgb(p).reshape(-1, 3) / 255 for p in paths])
    return pixels.mean(axis=0), pixels.std(axis=0)


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Images of several sizes (PNG and JPEG), odd modes, a truncated file and a text file."""
    root = make_image_folder(tmp_path / "images", ["cat", "dog"], per_class=3, size=16)
    big = np.random.default_rng(3).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(big).save(root / "dog" / "big.png")
    files = add_odd_files(root)
    readable = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p not in (files["truncated"],)
        and p.suffix in (".png", ".jpg")
        and not p.name.startswith(".")
    ]
    return root, readable


def test_stats_command_matches_numpy(folder):
    root, readable = folder
    result = invoke_cli("stats", str(root), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    mean, std = numpy_statistics(readable)
    np.testing.assert_allclose(report["mean"], mean, atol=1e-4)
    np.testing.assert_allclose(report["std"], std, atol=1e-4)
    assert report["images"] == len(readable) == 12
    assert report["per_class"] == {"cat": 3 + 5, "dog": 4}  # the truncated dog is not counted
    assert report["width"] == [16, 28] and report["height"] == [16, 28]
    assert len(report["unreadable"]) == 1 and "truncated.jpg" in report["unreadable"][0]

    text = invoke_cli("stats", str(root), "--workers", "0")
    assert text.returncode == 0, text.stderr
    assert f"{len(readable)} images in 2 classes, 16-28 x 16-28 px" in text.stdout
    assert f"{mean[0]:.4f}" in text.stdout and "recipe: data.normalize: {mean: [" in text.stdout


def test_stats_of_a_manifest_and_of_nothing(tmp_path):
    root = make_image_folder(tmp_path / "pics", ["a", "b"], per_class=2)
    paths = sorted(root.rglob("img*"))
    rows = "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in paths)
    (tmp_path / "list.csv").write_text("path,label\n" + rows)
    stats = image_statistics(open_path(tmp_path / "list.csv"))  # what `finetune stats` calls
    np.testing.assert_allclose(stats.mean, numpy_statistics(paths)[0], atol=1e-9)
    assert stats.per_class == {"a": 2, "b": 2}
    with pytest.raises(UserError, match=f"DATA: {tmp_path / 'nope'} does not exist"):
        open_path(tmp_path / "nope")


def test_image_statistics_of_some_indices_with_workers(folder):
    root, _ = folder
    images = image_folder(root, "data.train")
    indices = [i for i, (path, _) in enumerate(images.samples) if path.suffix == ".png"][:5]
    stats = image_statistics(images, indices, num_workers=1)
    mean, std = numpy_statistics([images.samples[i][0] for i in indices])
    np.testing.assert_allclose(stats.mean, mean, atol=1e-9)
    np.testing.assert_allclose(stats.std, std, atol=1e-9)


def test_normalization_modes():
    def data(normalize):
        return Recipe.from_dict(tiny_recipe(data={"normalize": normalize})).data

    timm_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    assert normalization(data("auto"), timm_cfg) == ((0.5,) * 3, (0.25,) * 3)
    assert normalization(data("auto"), {})[0] == IMAGENET_MEAN  # torchvision backbones
    assert normalization(data("imagenet"), timm_cfg)[0] == IMAGENET_MEAN
    assert normalization(data("none"), timm_cfg) == (None, None)
    explicit = data({"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})
    assert normalization(explicit, timm_cfg) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    with pytest.raises(UserError, match="dataset is measured on the training images"):
        normalization(data("dataset"), timm_cfg)
    resolved = resolve_normalization(explicit, timm_cfg, train=None)
    assert resolved.to_dict() == {
        "normalize": "explicit",
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
    }


def test_dataset_normalization_is_measured_on_the_training_split(folder, tmp_path):
    root, _ = folder
    recipe = Recipe.from_dict(
        tiny_recipe(
            data={"train": {"type": "imagefolder", "root": str(root)}, "normalize": "dataset"}
        )
    )
    images = image_folder(root, "data.train")
    good = [i for i, (path, _) in enumerate(images.samples) if "truncated" not in path.name]
    with pytest.raises(BadImageError, match="truncated.jpg.*on_bad_image: skip"):
        resolve_normalization(recipe.data, {}, train=images)
    measured = resolve_normalization(recipe.data, {}, train=images, indices=good[:6])
    mean, _ = numpy_statistics([images.samples[i][0] for i in good[:6]])
    assert measured.normalize == "dataset" and measured.images == 6
    np.testing.assert_allclose(measured.mean, mean, atol=1e-9)
    frozen = with_measured_normalization(recipe, measured)
    assert frozen.data.normalize.mean == measured.mean
    (tmp_path / "r.yaml").write_text(frozen.to_yaml())
    assert Recipe.load(tmp_path / "r.yaml") == frozen  # the run's recipe.yaml reads back
