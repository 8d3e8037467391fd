"""`finetune eval --report`: its numbers checked against counts made here from the model's own
probabilities (``predict_images``), the calibration error against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from finetune.inference import load_trained, predict_images
from finetune.report import PICTURES, Predictions, calibration, confusions, plot_confusion
from tests.conftest import cli, make_image_folder, run_on_image_folder

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A run trained on an image folder, and a test folder whose classes have swapped colours
    (the model is wrong on most of it)."""
    root = tmp_path_factory.mktemp("report")
    run, _ = run_on_image_folder(root, CLASSES)
    return run, make_image_folder(root / "test", ["dog", "fox", "cat"], per_class=3)


def test_eval_report_writes_pictures_and_numbers_that_match_the_models_predictions(
    trained, tmp_path
):
    run_dir, data = trained
    out = tmp_path / "report"
    printed = json.loads(cli("eval", str(run_dir), str(data), "--report", str(out), "--json"))

    report = json.loads((out / "report.json").read_text())
    assert printed == report
    for name in PICTURES:
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.width > 100
    assert report["confusion_picture"] == "matrix"
    assert set(report["per_class"]) == set(CLASSES)

    files = sorted(data.rglob("img*"))
    truth = np.array([CLASSES.index(path.parent.name) for path in files])
    rows = predict_images(load_trained(run_dir, device="cpu"), files, top_k=3)
    best = [max(row["top_k"], key=lambda p: p["probability"]) for row in rows]
    predicted = np.array([p["index"] for p in best])
    assert report["top1"] == pytest.approx(np.mean(predicted == truth))
    for index, name in enumerate(CLASSES):  # precision, recall and F1 counted by hand
        hits = np.sum((predicted == index) & (truth == index))
        precision = hits / max(np.sum(predicted == index), 1)
        recall = hits / np.sum(truth == index)
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        row = report["per_class"][name]
        assert row["images"] == 3 and row["top1"] == pytest.approx(recall)
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (precision, recall, f1)
        )
    assert report["macro_avg"]["f1"] == pytest.approx(
        np.mean([report["per_class"][name]["f1"] for name in CLASSES])
    )
    pairs = {
        (CLASSES[t], CLASSES[p]): int(np.sum((truth == t) & (predicted == p)))
        for t in range(3)
        for p in range(3)
        if t != p and np.any((truth == t) & (predicted == p))
    }
    assert {(c["true"], c["predicted"]): c["images"] for c in report["confusions"]} == pairs
    counts = [c["images"] for c in report["confusions"]]
    assert counts == sorted(counts, reverse=True)

    wrong = [
        (str(path), p["probability"])
        for path, p, t in zip(files, best, truth, strict=True)
        if p["index"] != t
    ]
    assert wrong, "the swapped colours should make mistakes"
    worst = sorted((item["image"], item["confidence"]) for item in report["worst"])
    assert [path for path, _ in worst] == [path for path, _ in sorted(wrong)]
    assert [c for _, c in worst] == pytest.approx([c for _, c in sorted(wrong)], abs=1e-5)
    confidences = [item["confidence"] for item in report["worst"]]
    assert confidences == sorted(confidences, reverse=True)
    assert sum(b["images"] for b in report["calibration"]["bins"]) == len(files)


def test_calibration_error_matches_a_hand_computation():
    probabilities = np.array(
        [
            [0.90, 0.05, 0.05],  # confidence 0.9, right
            [0.10, 0.90, 0.00],  # 0.9, wrong
            [0.50, 0.30, 0.20],  # 0.5, right
            [0.35, 0.40, 0.25],  # 0.4 (on a bin edge: the bin below), wrong
        ]
    )
    labels = np.array([0, 0, 0, 2])
    result = calibration(probabilities, labels, bins=5)
    # Bins of width 0.2: (0.8, 1] holds 2 images at accuracy 0.5, confidence 0.9; (0.4, 0.6]
    # one at 1 vs 0.5; (0.2, 0.4] one at 0 vs 0.4.
    assert result["ece"] == pytest.approx(2 / 4 * 0.4 + 1 / 4 * 0.5 + 1 / 4 * 0.4)
    assert [b["images"] for b in result["bins"]] == [0, 1, 1, 0, 2]
    assert result["bins"][4]["accuracy"] == 0.5
    assert result["bins"][4]["confidence"] == pytest.approx(0.9)


def test_many_classes_show_the_top_confusions_instead_of_a_matrix(tmp_path):
    classes = [f"class{i}" for i in range(40)]
    labels = np.repeat(np.arange(40), 2)
    predicted = labels.copy()
    predicted[:6] = 7  # both images of class0, class1 and class2 taken for class7
    probabilities = np.eye(40)[predicted] * 0.9 + 0.1 / 40
    predictions = Predictions(probabilities, labels, [Path("x.png")] * len(labels), classes)
    pairs = confusions(predictions)
    assert pairs == [{"true": f"class{i}", "predicted": "class7", "images": 2} for i in range(3)]
    assert plot_confusion(predictions, pairs, tmp_path / "confusion.png") == "top confusions"
    assert (tmp_path / "confusion.png").is_file()  # a matrix for few classes: the test above


def test_eval_report_exits_2_naming_missing_data_or_a_file_given_as_folder(trained, tmp_path):
    run_dir, data = trained
    missing = tmp_path / "no-such-folder"
    result = CliRunner().invoke(app, ["eval", str(run_dir), str(missing), "--report", "r"])
    assert result.exit_code == 2 and str(missing) in result.output
    taken = tmp_path / "taken"
    taken.write_text("a file")
    result = CliRunner().invoke(app, ["eval", str(run_dir), str(data), "--report", str(taken)])
    assert result.exit_code == 2 and str(taken) in result.output
