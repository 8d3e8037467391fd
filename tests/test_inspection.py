"""`finetune inspect`: pictures of a real fine-tuned run, its per-layer change checked against
the weights files, and Grad-CAM against a hand computation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.inference import load_trained
from finetune.inspection import (
    cam_layer,
    feature_stages,
    grad_cam,
    stage_activations,
    starting_weights,
)
from finetune.weights import write_safetensors
from tests.conftest import cli, make_image_folder, tiny_recipe, write_recipe

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A run that fine-tuned test_resnet from a weights file with layer1 and layer2 frozen:
    the run folder, the weights it started from, and an image."""
    root = tmp_path_factory.mktemp("inspection")
    torch.manual_seed(0)
    start = root / "start.safetensors"  # a 1000-class head: skipped (shape mismatch) when loaded
    # Not timm's zero-initialised last BatchNorm of each block, which would leave the convs of
    # the blocks without a gradient (and unchanged) in the run's single step.
    write_safetensors(timm.create_model("test_resnet", zero_init_last=False).state_dict(), start)
    images = make_image_folder(root / "images", CLASSES, per_class=4)
    recipe = tiny_recipe(
        model={"backbone": "test_resnet", "num_classes": 3, "pretrained": str(start)},
        data={
            "train": {"type": "imagefolder", "root": str(images)},
            "val": {"type": "imagefolder", "root": str(images)},
        },
        freeze={"until": "layer3", "batchnorm": "frozen"},
        train={"epochs": 1, "device": "cpu"},
    )
    cli("run", str(write_recipe(root / "r.yaml", recipe)), "--run-dir", str(root / "run"))
    return root / "run", start, images / "dog" / "img0.png"


def _relative_change(final: dict, start: dict, layer: str) -> float:
    names = [n for n in final if n.startswith(f"{layer}.") and n.rpartition(".")[0] == layer]
    names = [n for n in names if not n.endswith(("running_mean", "running_var", "_tracked"))]
    moved = sum(float((final[n] - start[n]).square().sum()) for n in names)
    return (moved / sum(float(start[n].square().sum()) for n in names)) ** 0.5


def test_inspect_draws_a_run_and_shows_which_layers_fine_tuning_changed(finetuned, tmp_path):
    run_dir, start, image = finetuned
    out = tmp_path / "inspect"
    result = json.loads(
        cli("inspect", str(run_dir), "--image", str(image), "--out", str(out), "--json")
    )

    assert json.loads((out / "inspect.json").read_text()) == result
    assert result["notes"] == [] and result["change_from"] == str(start)
    for name in result["pictures"]:
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.width > 100
    assert {"filters.png", "weights.png", "change.png"} <= set(result["pictures"])
    assert result["first_conv"] == {"name": "conv1.0", "shape": [16, 3, 3, 3]}
    [item] = result["images"]
    assert item["image"] == str(image) and item["top_class"] in CLASSES
    assert {(out / item["features"]).is_file(), (out / item["gradcam"]).is_file()} == {True}
    assert [s["name"] for s in item["stages"]] == ["act1", "layer1", "layer2", "layer3", "layer4"]

    final, initial = load_file(run_dir / "best" / "model.safetensors"), load_file(start)
    layers = {row["layer"]: row for row in result["layers"]}
    assert layers["fc"]["change"] is None  # the new head did not come from the file
    for name in ("conv1.0", "layer1.0.conv1", "layer2.0.bn1"):  # frozen: did not move at all
        assert layers[name]["change"] == 0.0
    for name in ("layer3.0.conv1", "layer4.0.conv2"):
        assert layers[name]["change"] == pytest.approx(_relative_change(final, initial, name))
        assert layers[name]["change"] > 0
        assert layers[name]["stage"] == name.partition(".")[0]
    weight = final["layer4.0.conv2.weight"]
    assert layers["layer4.0.bn2"]["norm"] > 0
    assert layers["layer4.0.conv2"]["norm"] == pytest.approx(float(weight.norm()), rel=1e-5)


def test_grad_cam_matches_a_hand_computation():
    """After the last stage a ResNet averages the maps and applies a linear layer, so the top
    class's gradient over map k is fc.weight[c, k] / (h * w) everywhere: Grad-CAM is then
    ReLU(sum_k fc.weight[c, k] * A_k) / (h * w), computed here without autograd."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    images = torch.randn(2, 3, 96, 96)
    logits, maps = stage_activations(model, images.clone(), feature_stages(model))
    cam = grad_cam(*maps["layer4"])

    with torch.no_grad():
        features = model.forward_features(images)  # layer4's output, (2, 96, 3, 3)
        top = model(images).argmax(dim=1)
    weights = model.fc.weight.detach()[top]  # (2, 96)
    expected = (weights[:, :, None, None] * features).sum(dim=1).relu() / (3 * 3)
    assert torch.allclose(logits.argmax(dim=1), top)
    assert cam.shape == (2, 3, 3) and expected.abs().sum() > 0
    assert torch.allclose(cam, expected, atol=1e-5, rtol=1e-4)
    assert cam_layer(maps) == "layer2"  # the last stage with maps of at least 7 x 7 (12 x 12)


def test_a_vits_tokens_become_maps_and_its_last_block_is_passed_over():
    """A ViT's stages output tokens; its last block passes only the class token to the head,
    so Grad-CAM uses the block before."""
    model = timm.create_model("test_vit", num_classes=3).eval()
    _, maps = stage_activations(model, torch.randn(1, 3, 160, 160), feature_stages(model))
    assert maps["blocks.0"][0].shape == (1, 64, 10, 10)
    assert float(maps["blocks.5"][1].abs().sum()) == 0.0
    assert cam_layer(maps) == "blocks.4"


def test_without_starting_weights_the_change_is_skipped_with_a_note(finetuned, tmp_path):
    run_dir, _, _ = finetuned
    trained = load_trained(run_dir, device="cpu")
    for pretrained, says in ((False, "random weights"), (str(tmp_path / "gone"), "gone")):
        model = trained.recipe.model.model_copy(update={"pretrained": pretrained})
        recipe = trained.recipe.model_copy(update={"model": model})
        notes: list[str] = []
        assert starting_weights(dataclasses.replace(trained, recipe=recipe), run_dir, notes) == (
            None,
            None,
        )
        assert len(notes) == 1 and says in notes[0]


def test_published_weights_are_compared_but_the_new_head_is_not(finetuned, monkeypatch):
    """``pretrained: true``: the published weights (here a fixed model instead of a download)."""

    def published(name: str, pretrained: bool) -> torch.nn.Module:
        torch.manual_seed(1)
        return timm.create_model(name)

    monkeypatch.setattr("finetune.model._timm_model", published)
    trained = load_trained(finetuned[0], device="cpu")
    recipe = trained.recipe.model_copy(
        update={"model": trained.recipe.model.model_copy(update={"pretrained": True})}
    )
    notes: list[str] = []
    start, origin = starting_weights(dataclasses.replace(trained, recipe=recipe), "run", notes)
    expected = published("test_resnet", True).state_dict()
    assert origin == "published weights" and notes == []
    assert sorted(start) == sorted(k for k in expected if not k.startswith("fc."))
    assert all(torch.equal(start[k], expected[k]) for k in start)


def test_inspect_exits_2_naming_a_missing_or_unreadable_image(finetuned, tmp_path):
    run_dir, _, _ = finetuned
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("text")
    for bad in (tmp_path / "missing.png", not_an_image):
        result = CliRunner().invoke(
            app, ["inspect", str(run_dir), "--image", str(bad), "--out", str(tmp_path / "o")]
        )
        assert result.exit_code == 2 and str(bad) in result.output
