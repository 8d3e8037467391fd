"""`finetune predict` and `finetune eval` on a trained run and on its export, checked against
the model's own logits computed here from the saved weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2

from tests.conftest import cli, run_on_image_folder

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A run of test_resnet trained one epoch on a small image folder, and that folder."""
    return run_on_image_folder(tmp_path_factory.mktemp("inference"), CLASSES)


def direct_logits(run_dir: Path, paths: list[Path]) -> torch.Tensor:
    """The logits of the run's best weights, with its recorded normalisation and the documented
    eval transform (resize to image_size / crop_pct, centre crop), written out here."""
    model = timm.create_model("test_resnet", num_classes=len(CLASSES))
    model.load_state_dict(load_file(run_dir / "best" / "model.safetensors"))
    stats = json.loads((run_dir / "normalization.json").read_text())
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(32 / 0.875)),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(stats["mean"], stats["std"]),
        ]
    )
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        return model.eval()(batch)


def test_predict_gives_the_softmax_of_the_models_logits_and_its_class_names(trained):
    run_dir, images = trained
    files = [sorted((images / name).iterdir())[0] for name in CLASSES]
    classes = json.loads((run_dir / "classes.json").read_text())
    assert sorted(classes.values()) == CLASSES
    probabilities = direct_logits(run_dir, files).softmax(dim=1)

    predictions = json.loads(
        cli("predict", str(run_dir), *map(str, files), "--top-k", "3", "--json")
    )
    assert [item["image"] for item in predictions] == [str(f) for f in files]
    for item, expected in zip(predictions, probabilities, strict=True):
        top = item["top_k"]
        assert len(top) == 3 and sum(p["probability"] for p in top) == pytest.approx(1, abs=1e-5)
        for entry in top:  # every class once, named as classes.json names its index
            assert entry["class"] == classes[str(entry["index"])]
            assert entry["probability"] == pytest.approx(expected[entry["index"]].item(), abs=1e-5)
        assert top[0]["index"] == expected.argmax().item()

    top1 = json.loads(cli("predict", str(run_dir), str(files[0]), "--top-k", "1", "--json"))
    (only,) = top1[0]["top_k"]
    assert only["class"] in classes.values() and only["probability"] < 1
    assert only["probability"] == pytest.approx(probabilities[0].max().item(), abs=1e-5)


def test_eval_of_an_export_folder_equals_eval_of_the_run(trained, tmp_path):
    run_dir, images = trained
    out = tmp_path / "exported"
    cli("export", str(run_dir), "--format", "safetensors", "--out", str(out))
    assert (out / "model.safetensors").is_file()
    from_run = json.loads(cli("eval", str(run_dir), str(images), "--json"))
    from_export = json.loads(cli("eval", str(out), str(images), "--json"))
    assert from_export["images"] == from_run["images"] == 4 * len(CLASSES)
    assert from_export["top1"] == pytest.approx(from_run["top1"], abs=1e-4)
    assert from_export["loss"] == pytest.approx(from_run["loss"], abs=1e-4)
    assert {name: c["images"] for name, c in from_export["per_class"].items()} == {
        name: c["images"] for name, c in from_run["per_class"].items()
    }
    # And both are the loss of the logits computed here, not merely equal to each other.
    files = sorted(path for name in CLASSES for path in (images / name).iterdir())
    labels = torch.tensor([CLASSES.index(path.parent.name) for path in files])
    loss = torch.nn.functional.cross_entropy(direct_logits(run_dir, files), labels)
    assert from_run["loss"] == pytest.approx(loss.item(), abs=1e-4)
