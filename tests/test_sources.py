"""Where images come from, on real files: image folders, manifests, digits, fake images, by path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from finetune.config.sources import DigitsSource, FakeSource, ImageFolderSource, ManifestSource
from finetune.errors import UserError
from finetune.sources import (
    DigitsDataset,
    count_classes,
    image_folder,
    manifest,
    open_path,
    open_source,
)
from tests.conftest import ODD_MODES, make_image_folder


# ------------------------------------------------------------------------------ image folders
def test_image_folder_makes_every_mode_rgb_and_ignores_other_files(odd_folder):
    root, files = odd_folder
    images = image_folder(root, "data.train")
    assert images.classes == ["cat", "dog", "fox"]  # the hidden folder is no class
    names = {path.name for path, _ in images.samples}
    assert "notes.txt" not in names and ".hidden.png" not in names
    assert len(images) == 3 * 4 + len(ODD_MODES) + 1
    for mode in ODD_MODES:
        index = next(i for i, (path, _) in enumerate(images.samples) if path == files[mode])
        image, label = images[index]
        assert (image.mode, image.size, label) == ("RGB", (24, 20), 0), mode
    # 16-bit greyscale keeps its top 8 bits rather than saturating to white.
    sixteen = images[next(i for i, (p, _) in enumerate(images.samples) if p == files["I;16"])][0]
    expected = np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)[..., 0]
    assert np.array_equal(np.asarray(sixteen)[..., 0], expected)


def test_image_folder_finds_images_in_nested_folders_in_sorted_order(tmp_path):
    root = make_image_folder(tmp_path / "data", ["b", "a"], per_class=2)
    make_image_folder(root / "a" / "more", ["deep"], per_class=1)
    (root / "a" / ".cache").mkdir()
    make_image_folder(root / "a" / ".cache", ["skip"], per_class=1)  # hidden: ignored
    images = image_folder(root, "data.train")
    assert images.classes == ["a", "b"] and images.targets == [0, 0, 0, 1, 1]
    assert [p.relative_to(root).as_posix() for p, _ in images.samples] == [
        "a/img0.png",
        "a/img1.jpg",
        "a/more/deep/img0.png",
        "b/img0.png",
        "b/img1.jpg",
    ]


def test_image_folder_that_is_no_folder_names_it(tmp_path):
    with pytest.raises(UserError, match=f"^data.val: {tmp_path / 'nope'} is not a folder"):
        image_folder(tmp_path / "nope", "data.val")


# ---------------------------------------------------------------------------------- manifests
def _manifest_images(tmp_path: Path) -> list[str]:
    make_image_folder(tmp_path / "pics", ["a", "b"], per_class=2)
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "pics").rglob("img*"))


def test_csv_manifest_with_class_names_relative_to_the_file(tmp_path):
    files = _manifest_images(tmp_path)
    rows = "".join(f"{path},{'dog' if 'b/' in path else 'cat'},extra\n" for path in files)
    (tmp_path / "train.csv").write_text("file,species,note\n" + rows + "\n")
    images = manifest(
        tmp_path / "train.csv", "data.train", kind="csv", path_key="file", label_key="species"
    )
    assert images.classes == ["cat", "dog"] and Counter(images.targets) == {0: 2, 1: 2}
    assert images[0][0].mode == "RGB"


def test_jsonl_manifest_with_integer_labels(tmp_path):
    files = _manifest_images(tmp_path)
    lines = [json.dumps({"path": path, "label": i % 3}) for i, path in enumerate(files)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n\n")
    images = manifest(tmp_path / "train.jsonl", "data.train", kind="jsonl")
    assert images.classes == ["0", "1", "2"] and images.targets == [0, 1, 2, 0]
    assert manifest(tmp_path / "train.jsonl", "k", kind="jsonl", num_classes=5).classes[-1] == "4"


@pytest.mark.parametrize(
    "rows, message",
    [
        (["{path},7"], "line 2: label 7 is outside 0..2 (3 classes)"),
        (["{path},-1"], "line 2: label -1 is outside"),
        (["missing.png,0"], "line 2: image not found"),
        (["{path},"], "line 2: no label"),
        (["{path},2"], "no row has label 0"),
        ([], "lists no images"),
    ],
)
def test_manifest_problems_name_the_file_and_line(tmp_path, rows, message):
    path = _manifest_images(tmp_path)[0]
    (tmp_path / "m.csv").write_text(
        "path,label\n" + "".join(r.format(path=path) + "\n" for r in rows)
    )
    num_classes = 3 if "outside" in message else None
    with pytest.raises(UserError, match="^data.train: ") as caught:
        manifest(tmp_path / "m.csv", "data.train", kind="csv", num_classes=num_classes)
    assert str(tmp_path / "m.csv") in str(caught.value) and message in str(caught.value)


# ------------------------------------------------------------------------------------ by path
def test_open_path_reads_a_folder_or_a_manifest_by_its_suffix(tmp_path):
    files = _manifest_images(tmp_path)
    (tmp_path / "list.CSV").write_text("path,label\n" + "".join(f"{p},{p[5]}\n" for p in files))
    (tmp_path / "list.jsonl").write_text(
        "".join(json.dumps({"path": p, "label": p[5]}) + "\n" for p in files)
    )
    for path in (tmp_path / "list.CSV", tmp_path / "list.jsonl", tmp_path / "pics"):
        images = open_path(path)
        assert images.classes == ["a", "b"] and Counter(images.targets) == {0: 2, 1: 2}, path
        assert images.origin == path
    with pytest.raises(UserError, match=f"^DATA: {tmp_path / 'nope.csv'} does not exist"):
        open_path(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------- digits
def test_digits_splits_are_disjoint_and_relabelled():
    train = DigitsDataset(DigitsSource(type="digits", split="train", classes=[7, 2]))
    val = DigitsDataset(DigitsSource(type="digits", split="val", classes=[7, 2]))
    assert train.classes == val.classes == ["7", "2"]  # relabelled in the order given
    assert set(train.targets) == set(val.targets) == {0, 1}
    assert 0.19 < len(val) / (len(train) + len(val)) < 0.21  # the fixed 80/20 split
    train_pixels = {np.asarray(image).tobytes() for image in train.images}
    assert not any(np.asarray(image).tobytes() in train_pixels for image in val.images)
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (8, 8) and label in (0, 1)
    assert np.asarray(image).max() > 200  # 0..16 scaled to 0..255, not left dark


def test_digits_per_class_is_seeded():
    def pick(seed: int) -> list[bytes]:
        source = DigitsSource(type="digits", classes=[0, 1, 2], per_class=4, seed=seed)
        digits = DigitsDataset(source)
        assert Counter(digits.targets) == {0: 4, 1: 4, 2: 4}
        return [np.asarray(image).tobytes() for image in digits.images]

    assert pick(0) == pick(0) and pick(0) != pick(1)


def test_a_source_without_a_seed_follows_the_recipes_seed():
    """``--set seed=N`` draws other labelled digits too, unless the source names its own."""

    def pick(source: DigitsSource, seed: int) -> list[bytes]:
        opened = open_source(source, key="data.train", image_size=8, seed=seed)
        return [np.asarray(opened[i][0]).tobytes() for i in range(len(opened))]

    unseeded = DigitsSource(type="digits", classes=[0, 1, 2], per_class=4)
    assert pick(unseeded, 1) == pick(unseeded.model_copy(update={"seed": 1}), 7)
    assert pick(unseeded, 0) != pick(unseeded, 1)
    own = unseeded.model_copy(update={"seed": 3})
    assert pick(own, 0) == pick(own, 1)


# ------------------------------------------------------------------------------ class counting
def test_count_classes_agrees_with_the_opened_source(odd_folder):
    root, _ = odd_folder  # with a hidden folder and loose files beside the classes
    (root / "README.txt").write_text("three classes")
    sources = [
        ImageFolderSource(type="imagefolder", root=root),
        DigitsSource(type="digits", classes=[3, 1, 4], per_class=2),
        FakeSource(type="fake", num_samples=6, num_classes=5),
    ]
    for source in sources:
        opened = open_source(source, key="data.train", image_size=16)
        assert count_classes(source) == len(opened.classes), source.type
        assert set(opened.targets) <= set(range(len(opened.classes)))
    assert count_classes(sources[0]) == 3


def test_count_classes_refuses_what_needs_reading_the_data(tmp_path):
    one = make_image_folder(tmp_path / "one", ["only"], per_class=1)
    with pytest.raises(UserError, match=f"^data.val.root: {one} has 1 class folders"):
        count_classes(ImageFolderSource(type="imagefolder", root=one), "data.val")
    (tmp_path / "m.csv").write_text("path,label\n")
    with pytest.raises(UserError, match="model.num_classes: needed to plan"):
        count_classes(ManifestSource(type="csv", path=tmp_path / "m.csv"))
