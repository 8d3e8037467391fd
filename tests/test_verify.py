"""``data.verify``: every image file is checked before the run folder or the model exist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.data import build_datasets
from finetune.errors import UserError
from finetune.verify import LISTED, verify_images
from tests.conftest import invoke_cli, make_image_folder, tiny_recipe, write_recipe


def bad_folder(root: Path) -> tuple[Path, list[Path]]:
    """A two-class image folder with a zero-byte file and a text file named ``.png``."""
    make_image_folder(root, ["cat", "dog"], per_class=4, size=8)
    empty, text = root / "cat" / "empty.png", root / "dog" / "notes.png"
    empty.write_bytes(b"")
    text.write_text("not an image")
    return root, [empty, text]


def truncated_png(path: Path) -> Path:
    """A PNG cut in the middle of its pixel data: its header is whole."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


def datasets_of(train: dict, **data) -> object:
    config = DataConfig(train=train, val_split=0.25, image_size=8, **data)
    return build_datasets(config, seed=0)


def folder_recipe(tmp_path: Path, root: Path, **data) -> Path:
    recipe = tiny_recipe(
        model={"backbone": "test_resnet", "num_classes": 2},
        data={"train": {"type": "imagefolder", "root": str(root)}, "val_split": 0.25, **data},
        train={"epochs": 1, "device": "cpu"},
        output={"dir": str(tmp_path / "out")},
    )
    del recipe["data"]["val"]
    return write_recipe(tmp_path / "recipe.yaml", recipe)


# ---------------------------------------------------------------------------- finetune run
def test_bad_files_stop_the_run_before_its_folder_exists(tmp_path):
    root, bad = bad_folder(tmp_path / "images")
    result = invoke_cli("run", str(folder_recipe(tmp_path, root)))
    assert result.returncode == 2, result.stderr
    assert f"{bad[0]}: empty file" in result.stderr
    assert f"{bad[1]}: not an image" in result.stderr
    assert "data.on_bad_image: skip" in result.stderr
    assert not (tmp_path / "out").exists()  # no run folder, no `latest` link


def test_verify_none_leaves_bad_files_to_training(tmp_path):
    root, bad = bad_folder(tmp_path / "images")
    result = invoke_cli("run", str(folder_recipe(tmp_path, root, verify="none")))
    assert result.returncode == 2, result.stderr
    assert "data.verify" not in result.stderr
    assert str(bad[0]) in result.stderr or str(bad[1]) in result.stderr
    assert (tmp_path / "out" / "tiny" / "latest").exists()  # the run had started


def test_skip_warns_with_a_count_and_trains(tmp_path):
    root, _ = bad_folder(tmp_path / "images")
    with pytest.warns(UserWarning) as warned:  # on stderr outside pytest
        result = invoke_cli("run", str(folder_recipe(tmp_path, root, on_bad_image="skip")))
    assert result.returncode == 0, result.stderr
    messages = [str(warning.message) for warning in warned]
    assert any("2 of 10 images cannot be read and will be skipped" in m for m in messages)


# ------------------------------------------------------------------------------ verify_images
def test_a_truncated_png_passes_the_header_check_but_not_the_full_one(tmp_path):
    root = make_image_folder(tmp_path / "images", ["cat", "dog"], per_class=4, size=8)
    cut = truncated_png(root / "cat" / "cut.png")
    datasets = datasets_of({"type": "imagefolder", "root": root})
    report = verify_images(datasets, verify="header")
    assert (report.checked, report.bad) == (9, [])
    with pytest.raises(UserError, match=f"1 of 9 image files .*full check.*\n  {cut}: "):
        verify_images(datasets, verify="full")
    assert verify_images(datasets, verify="none").checked == 0


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_images_are_checked(tmp_path, kind):
    root, bad = bad_folder(tmp_path / "images")
    rows = [
        {"path": str(path.relative_to(tmp_path)), "label": path.parent.name}
        for path in sorted(root.rglob("*.*"))
    ]
    listing = tmp_path / f"list.{kind}"
    if kind == "csv":
        listing.write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    else:
        listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    test = {"type": kind, "path": listing}
    datasets = datasets_of({"type": kind, "path": listing}, test=test)
    with pytest.raises(UserError) as error:
        verify_images(datasets)
    assert all(str(path) in str(error.value) for path in bad)
    assert "2 of 10 image files" in str(error.value)  # train and test share the files


def test_the_error_names_the_first_files_and_counts_the_rest(tmp_path):
    root = make_image_folder(tmp_path / "images", ["cat", "dog"], per_class=2, size=8)
    for i in range(LISTED + 3):
        (root / "dog" / f"bad{i:02}.png").write_bytes(b"")
    datasets = datasets_of({"type": "imagefolder", "root": root})
    with pytest.raises(UserError) as error:
        verify_images(datasets, num_workers=3)
    message = str(error.value)
    assert message.count(": empty file (0 bytes)") == LISTED
    assert f"{LISTED + 3} of {LISTED + 7} image files" in message and "and 3 more" in message


def test_skip_returns_the_bad_files_with_a_warning(tmp_path):
    root, bad = bad_folder(tmp_path / "images")
    datasets = datasets_of({"type": "imagefolder", "root": root}, on_bad_image="skip")
    with pytest.warns(UserWarning, match="2 of 10 images cannot be read"):
        report = verify_images(datasets, on_bad_image="skip")
    assert sorted(path for path, _ in report.bad) == sorted(bad)


def test_skip_still_stops_when_a_split_has_no_readable_image(tmp_path):
    root = make_image_folder(tmp_path / "images", ["cat", "dog"], per_class=2, size=8)
    test = tmp_path / "test"
    for name in ("cat", "dog"):
        (test / name).mkdir(parents=True)
        (test / name / "x.png").write_bytes(b"")
    datasets = datasets_of(
        {"type": "imagefolder", "root": root}, test={"type": "imagefolder", "root": test}
    )
    with pytest.raises(UserError, match="data.test: none of its 2 images can be read"):
        verify_images(datasets, on_bad_image="skip")


def test_generated_sources_have_nothing_to_check():
    datasets = datasets_of({"type": "fake", "num_samples": 8, "num_classes": 2})
    assert verify_images(datasets, verify="full").checked == 0
