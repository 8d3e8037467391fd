"""Using a trained model: rebuild it from a run folder or an export, evaluate, predict.

A run folder carries everything needed: ``recipe.yaml`` (architecture, image size),
``normalization.json``, ``classes.json`` (index -> name) and the weights. An export
(``finetune export``) carries the same facts in a model card inside each file. Evaluation and
prediction use the model's own eval transforms and class mapping, never defaults.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchvision.transforms import v2

from finetune.augment import build_transforms
from finetune.config.model import HeadConfig
from finetune.data import Split, build_loader
from finetune.errors import UserError
from finetune.fusion import restructure
from finetune.images import load_rgb
from finetune.loop import evaluate
from finetune.model import build_model, pretrained_config
from finetune.recipe import Recipe
from finetune.run_folder import RunFolder, find_run_folder, weights_file
from finetune.runtime import Runtime
from finetune.sources import ImageFiles, open_path
from finetune.stats import normalization
from finetune.weights import read_state_dict

# An export folder: one file per format, export.json, and a model card inside every file.
FILES = {
    "safetensors": "model.safetensors",
    "torchscript": "model.torchscript.pt",
    "onnx": "model.onnx",
    "pt2": "model.pt2",
}
EXPORT_FILE = "export.json"
CARD_KEY = "finetune_export"  # safetensors metadata key / extra-file stem holding the model card
CARD_FILE = f"{CARD_KEY}.json"
LOADABLE = ("safetensors", "torchscript")  # what load_exported (and so predict) reads, in order


@dataclass
class TrainedModel:
    """A model ready to classify images, with what its inputs must look like."""

    model: nn.Module
    classes: list[str]
    recipe: Recipe
    runtime: Runtime
    mean: list[float] | None  # the normalisation it was trained with (None: none)
    std: list[float] | None
    image_size: int

    @cached_property
    def transform(self) -> v2.Transform:
        """The eval transforms: resize, crop, tensor, normalise, as in training's evaluation."""
        return build_transforms(self.recipe.data, self.mean, self.std, False)


def load_trained(source: str | Path, device: str = "auto") -> TrainedModel:
    """Rebuild the model of a run (``best/`` weights unless ``source`` names another file).

    ``source`` may also be an export (``finetune export``): its folder, or its safetensors or
    TorchScript file (``load_exported``).
    """
    source = Path(source)
    if is_export(source):
        return load_exported(source, device=device)
    if not source.exists():
        raise UserError(f"{source}: no such run folder or checkpoint")
    folder = RunFolder(find_run_folder(source.resolve()))
    recipe = Recipe.load(folder.recipe_file, check_paths=False)
    classes = folder.read_classes()
    built = build_model(
        backbone=recipe.model.backbone, num_classes=len(classes), head=recipe.model.head
    )
    weights = weights_file(source)
    try:
        built.model.load_state_dict(read_state_dict(weights))
    except RuntimeError as error:
        raise UserError(f"{weights}: does not fit the run's model: {error}") from None
    saved = folder.read_normalization()
    if saved is not None:
        mean, std = saved.get("mean"), saved.get("std")
    else:  # a run folder from before normalization.json
        mean, std = normalization(recipe.data, pretrained_config(recipe.model.backbone))
    runtime = Runtime.create(device=device, precision="fp32", channels_last=False)
    return TrainedModel(
        runtime.prepare(built.model).eval(),
        classes,
        recipe,
        runtime,
        mean and list(mean),
        std and list(std),
        recipe.data.image_size,
    )


def evaluate_folder(
    trained: TrainedModel, root: str | Path, batch_size: int = 64
) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy on an image folder or a CSV/JSONL manifest,
    classes matched to the model's by name."""
    found = open_path(Path(root), key="DATA", num_classes=len(trained.classes))
    unknown = [name for name in found.classes if name not in trained.classes]
    if unknown:
        raise UserError(
            f"{root}: classes the model was not trained on: {unknown}; it knows {trained.classes}"
        )
    to_model_index = [trained.classes.index(name) for name in found.classes]
    dataset = ImageFiles(
        [(path, to_model_index[label]) for path, label in found.samples],
        trained.classes,
        found.origin,
    )
    loader = build_loader(
        Split(dataset, transform=trained.transform),
        batch_size=batch_size,
        train=False,
        num_workers=0,
        pin_memory=trained.runtime.pin_memory,
    )
    metrics = evaluate(trained.model, loader, trained.runtime, len(trained.classes), per_class=True)
    images, correct = metrics.pop("per_class_images"), metrics.pop("per_class_correct")
    metrics = {key.removeprefix("val/"): value for key, value in metrics.items()}
    metrics["images"] = len(dataset)
    metrics["per_class"] = {
        name: {"images": images[i], "top1": correct[i] / images[i] if images[i] else None}
        for i, name in enumerate(trained.classes)
        if images[i]
    }
    return metrics


def predict_images(trained: TrainedModel, paths: list[Path], top_k: int = 5) -> list[dict]:
    """For each image: its ``top_k`` classes with probabilities."""

    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such image file")
    batch = torch.stack([trained.transform(load_rgb(str(p))) for p in paths])
    with torch.inference_mode():
        logits = trained.model(batch.to(trained.runtime.device)).float()
    probabilities = logits.softmax(dim=1).cpu()
    k = min(top_k, len(trained.classes))
    results = []
    for path, probs in zip(paths, probabilities, strict=True):
        values, indices = probs.topk(k)
        results.append(
            {
                "image": str(path),
                "top_k": [
                    {"class": trained.classes[i], "index": int(i), "probability": float(v)}
                    for v, i in zip(values.tolist(), indices.tolist(), strict=True)
                ],
            }
        )
    return results


# ------------------------------------------------------------------------------------ exports
def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an export folder, or a safetensors/TorchScript file with a model card."""
    path = Path(path)
    if path.is_dir():
        return (path / EXPORT_FILE).is_file()
    return path.is_file() and read_card(path) is not None


def read_card(path: Path) -> dict[str, Any] | None:
    """The model card stored in an exported safetensors or TorchScript file, else None."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                text = (handle.metadata() or {}).get(CARD_KEY)
        except (SafetensorError, OSError):
            return None
        return json.loads(text) if text else None
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:  # TorchScript and pt2 files keep extra files here
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{CARD_FILE}")]
        return json.loads(archive.read(names[0])) if names else None


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") for name in archive.namelist())


def load_exported(path: str | Path, device: str = "auto") -> TrainedModel:
    """A ``TrainedModel`` from an export folder or an exported safetensors/TorchScript file.

    A folder is read through its safetensors file, else its TorchScript file. The eval
    transforms and class names come from the card inside the file, as the run's would.
    """
    path = Path(path)
    if path.is_dir():
        path = _loadable_file(path)
    card = read_card(path)
    if card is None:
        raise UserError(f"{path}: not a finetune export (no {CARD_KEY} model card inside)")
    recipe = Recipe.from_dict(
        yaml.safe_load(card["recipe"]), source=f"{path} (its recipe)", check_paths=False
    )
    if path.suffix == ".safetensors":
        model = rebuild_exported(path, card)
    elif not _is_torchscript(path):
        raise UserError(
            f"{path}: a pt2 export; load the export's folder, or its safetensors or "
            "TorchScript file (torch.export.load reads this one)"
        )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            model = torch.jit.load(str(path), map_location="cpu")
    runtime = Runtime.create(device=device, precision="fp32", channels_last=False)
    return TrainedModel(
        runtime.prepare(model).eval(),
        card["classes"],
        recipe,
        runtime,
        card["mean"],
        card["std"],
        recipe.data.image_size,
    )


def _loadable_file(folder: Path) -> Path:
    info = json.loads((folder / EXPORT_FILE).read_text())
    for fmt in LOADABLE:
        if fmt in info.get("formats", {}) and (folder / info["formats"][fmt]).is_file():
            return folder / info["formats"][fmt]
    raise UserError(
        f"{folder}: has no {' or '.join(LOADABLE)} file to load; export again with "
        "--format safetensors"
    )


def rebuild_exported(path: Path, card: dict[str, Any]) -> nn.Module:
    """The card's architecture, given the fused structure, with the file's weights."""
    if "backbone" not in card:
        raise UserError(f"{path}: not a finetune export (no {CARD_KEY} model card inside)")
    built = build_model(
        backbone=card["backbone"], num_classes=card["num_classes"], head=HeadConfig(**card["head"])
    )
    model = restructure(built.model, card["folded"])
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as error:
        raise UserError(
            f"{path}: weights do not fit the model its card describes: {error}"
        ) from None
    return model.eval()
