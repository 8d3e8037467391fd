"""Using a trained model: rebuild it from its run folder, evaluate it on a folder, predict images.

A run folder carries everything needed: ``recipe.yaml`` (architecture, image size, normalisation),
``classes.json`` (index -> name) and the weights. Evaluation and prediction use the run's own eval
transforms and class mapping, never defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from finetune.augment import build_transforms
from finetune.checkpoint import RunFolder
from finetune.data import Split, build_loader
from finetune.errors import UserError
from finetune.loop import evaluate
from finetune.model import build_model
from finetune.recipe import Recipe
from finetune.runtime import Runtime
from finetune.sources import ImageFiles, load_rgb, open_path
from finetune.stats import normalization
from finetune.training import pretrained_config
from finetune.weights import read_state_dict, resolve_weights_path


@dataclass
class TrainedModel:
    model: nn.Module
    classes: list[str]
    recipe: Recipe
    transform: v2.Transform
    runtime: Runtime


def find_run_folder(path: Path) -> Path:
    """The run folder that holds ``path`` (itself, or a parent of a checkpoint inside it)."""
    for candidate in (path, *path.parents[:3]):
        if (candidate / "recipe.yaml").is_file() and (candidate / "classes.json").is_file():
            return candidate
    raise UserError(f"{path}: not inside a run folder (no recipe.yaml and classes.json found)")


def load_trained(source: str | Path, device: str = "auto") -> TrainedModel:
    """Rebuild the model of a run (``best/`` weights unless ``source`` names another file).

    ``source`` may also be an export (``finetune export``): its folder, or its safetensors or
    TorchScript file; ``finetune.export.load_exported`` reads those.
    """
    source = Path(source)
    from finetune import export  # imported here: finetune.export imports this module

    if export.is_export(source):
        return export.load_exported(source, device=device)
    if not source.exists():
        raise UserError(f"{source}: no such run folder or checkpoint")
    folder = RunFolder(find_run_folder(source.resolve()))
    recipe = Recipe.load(folder.path / "recipe.yaml", check_paths=False)
    classes = folder.read_classes()
    built = build_model(backbone=recipe.model.backbone, num_classes=len(classes),
                        head=recipe.model.head)
    weights = resolve_weights_path(source)
    try:
        built.model.load_state_dict(read_state_dict(weights))
    except RuntimeError as error:
        raise UserError(f"{weights}: does not fit the run's model: {error}") from None
    mean, std = normalization(recipe.data, pretrained_config(recipe.model.backbone))
    runtime = Runtime.create(device=device, precision="fp32", channels_last=False)
    model = runtime.prepare(built.model).eval()
    return TrainedModel(model, classes, recipe, build_transforms(recipe.data, mean, std, False),
                        runtime)


def evaluate_folder(trained: TrainedModel, root: str | Path, batch_size: int = 64
                    ) -> dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy on an image folder or a CSV/JSONL manifest,
    classes matched to the model's by name."""
    found = open_path(Path(root), key="DATA", num_classes=len(trained.classes))
    unknown = [name for name in found.classes if name not in trained.classes]
    if unknown:
        raise UserError(f"{root}: classes the model was not trained on: {unknown}; "
                        f"it knows {trained.classes}")
    to_model_index = [trained.classes.index(name) for name in found.classes]
    dataset = ImageFiles([(path, to_model_index[label]) for path, label in found.samples],
                         trained.classes, found.origin)
    loader = build_loader(Split(dataset, transform=trained.transform), batch_size=batch_size,
                          train=False, num_workers=0, pin_memory=trained.runtime.pin_memory)
    metrics = evaluate(trained.model, loader, trained.runtime, len(trained.classes),
                       per_class=True)
    images, correct = metrics.pop("per_class_images"), metrics.pop("per_class_correct")
    metrics = {key.removeprefix("val/"): value for key, value in metrics.items()}
    metrics["images"] = len(dataset)
    metrics["per_class"] = {
        name: {"images": images[i], "top1": correct[i] / images[i] if images[i] else None}
        for i, name in enumerate(trained.classes) if images[i]
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
        results.append({"image": str(path), "top_k": [
            {"class": trained.classes[i], "index": int(i), "probability": float(v)}
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)]})
    return results
