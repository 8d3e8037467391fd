"""Using a trained model: rebuild it from a run folder or an export, evaluate, predict.

A run folder carries everything needed: ``recipe.yaml`` (architecture, image size),
``normalization.json``, ``classes.json`` (index -> name) and the weights. An export
(``finetune export``) carries the same facts in a model card inside each file. Evaluation and
prediction use the model's own eval transforms and class mapping, never defaults.

Nothing a file says is executed: an export is rebuilt from its safetensors file and its card
(data), a TorchScript file (a program) is loaded only with ``trust_code``, and a recipe or card
that names code by import path (``"package.module:Name"``) is refused unless ``trust_code``
(``finetune.recipe.check_imports``). Weights are checked against the model before loading
(``finetune.weights.load_weights``).
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
from finetune.recipe import Recipe, check_import_paths, check_imports
from finetune.run_folder import RunFolder, find_run_folder, weights_file
from finetune.runtime import Runtime
from finetune.sources import ImageFiles, open_path
from finetune.stats import normalization
from finetune.weights import load_weights, read_state_dict

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
TRUST_CODE = (
    "loading TorchScript runs code stored in the file (it can read and write files); "
    "use the export's model.safetensors (or its folder) instead, or pass --trust-code if you "
    "trust this file"
)


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


def load_trained(
    source: str | Path, device: str = "auto", *, trust_code: bool = False
) -> TrainedModel:
    """Rebuild the model of a run (``best/`` weights unless ``source`` names another file).

    ``source`` may also be an export (``finetune export``): its folder, or its safetensors or
    TorchScript file (``load_exported``).

    Args:
        trust_code: allow what runs code from the files read: a TorchScript file, and a head or
            schedule named by import path in the run's ``recipe.yaml`` or the export's card.

    Raises:
        UserError: naming the file, for anything unreadable, untrusted or not fitting the model.
    """
    source = Path(source)
    if is_export(source):
        return load_exported(source, device=device, trust_code=trust_code)
    if not source.exists():
        raise UserError(f"{source}: no such run folder or checkpoint")
    folder = RunFolder(find_run_folder(source.resolve()))
    recipe = Recipe.load(folder.recipe_file, check_paths=False)
    check_imports(recipe, source=folder.recipe_file, trust_code=trust_code)
    classes = folder.read_classes()
    weights = weights_file(source)
    tensors = read_state_dict(weights)  # before building: a bad file fails fast
    built = build_model(
        backbone=recipe.model.backbone, num_classes=len(classes), head=recipe.model.head
    )
    load_weights(built.model, tensors, source=weights)
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
    """The model card stored in an exported safetensors or TorchScript file, else None.

    Only reads data: the safetensors header, or the TorchScript archive as a zip file.

    Raises:
        UserError: naming the file, when its card is not a JSON object.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                text = (handle.metadata() or {}).get(CARD_KEY)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise UserError(
                f"{path}: not a readable safetensors file, truncated or corrupt ({error})"
            ) from None
    else:
        try:
            if not zipfile.is_zipfile(path):
                return None
            with zipfile.ZipFile(path) as archive:  # TorchScript and pt2 keep extra files here
                names = [n for n in archive.namelist() if n.endswith(f"/extra/{CARD_FILE}")]
                text = archive.read(names[0]).decode() if names else None
        except (OSError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as error:
            raise UserError(f"{path}: not a readable export ({error})") from None
    if not text:
        return None
    try:
        card = json.loads(text)
    except ValueError as error:
        raise UserError(f"{path}: its {CARD_KEY} model card is not valid JSON ({error})") from None
    if not isinstance(card, dict):
        raise UserError(f"{path}: its {CARD_KEY} model card is not a JSON object")
    return card


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") for name in archive.namelist())


def load_exported(
    path: str | Path, device: str = "auto", *, trust_code: bool = False
) -> TrainedModel:
    """A ``TrainedModel`` from an export folder or an exported safetensors/TorchScript file.

    A folder is read through its safetensors file: the model is rebuilt from the card's
    architecture and the file's tensors, so nothing from the file is executed. The eval
    transforms and class names come from the card, as the run's would. A TorchScript file is a
    program: it is loaded (and its code run) only with ``trust_code``; pt2 files are not loaded.

    Raises:
        UserError: naming the file, for anything unreadable, untrusted or not fitting the model.
    """
    path = Path(path)
    if path.is_dir():
        path = _loadable_file(path, trust_code)
    if path.suffix != ".safetensors":
        _refuse_program(path, trust_code)
    card = read_card(path)
    if card is None:
        raise UserError(f"{path}: not a finetune export (no {CARD_KEY} model card inside)")
    if path.suffix == ".safetensors":
        model = rebuild_exported(path, card, trust_code=trust_code)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            model = torch.jit.load(str(path), map_location="cpu")
    recipe = _card_recipe(path, card, trust_code)
    runtime = Runtime.create(device=device, precision="fp32", channels_last=False)
    return TrainedModel(
        runtime.prepare(model).eval(),
        _card_field(path, card, "classes"),
        recipe,
        runtime,
        _card_field(path, card, "mean"),
        _card_field(path, card, "std"),
        recipe.data.image_size,
    )


def _refuse_program(path: Path, trust_code: bool) -> None:
    """A TorchScript file unless ``trust_code``, and a pt2 file always, are refused."""
    if not zipfile.is_zipfile(path) or not _is_torchscript(path):
        raise UserError(
            f"{path}: a pt2 export or another program, which finetune does not load (loading "
            "one runs code from the file); use the export's model.safetensors or its folder"
        )
    if not trust_code:
        raise UserError(f"{path}: a TorchScript file, refused: {TRUST_CODE}")


def _card_field(path: Path, card: dict[str, Any], key: str) -> Any:
    if key not in card:
        raise UserError(f"{path}: its {CARD_KEY} model card has no {key!r}")
    return card[key]


def _card_recipe(path: Path, card: dict[str, Any], trust_code: bool) -> Recipe:
    """The card's recipe, refused when it names code to import (unless ``trust_code``)."""
    text = _card_field(path, card, "recipe")
    try:
        data = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: its card's recipe is not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: its card's recipe is not a mapping of keys")
    recipe = Recipe.from_dict(data, source=f"{path} (its recipe)", check_paths=False)
    check_imports(recipe, source=f"{path} (the recipe in its card)", trust_code=trust_code)
    return recipe


def _loadable_file(folder: Path, trust_code: bool) -> Path:
    """The file an export folder is read through: its safetensors file; its TorchScript file
    only with ``trust_code``. Fixed names: ``export.json`` does not choose what is opened."""
    safetensors, torchscript = folder / FILES["safetensors"], folder / FILES["torchscript"]
    if safetensors.is_file():
        return safetensors
    if trust_code and torchscript.is_file():
        return torchscript
    also = f" ({torchscript.name} is there: {TRUST_CODE})" if torchscript.is_file() else ""
    raise UserError(
        f"{folder}: has no {safetensors.name} to load; export again with --format safetensors{also}"
    )


def rebuild_exported(path: Path, card: dict[str, Any], *, trust_code: bool = False) -> nn.Module:
    """The card's architecture, given the fused structure, with the file's weights.

    The file's tensors are read (and their checksum verified) before the card is used, and a
    head named by import path in the card is refused unless ``trust_code``.
    """
    if "backbone" not in card or not isinstance(card.get("head"), dict):
        raise UserError(f"{path}: not a finetune export (no {CARD_KEY} model card inside)")
    tensors = read_state_dict(path)
    head_type = card["head"].get("type", "linear")
    if isinstance(head_type, str) and ":" in head_type:
        check_import_paths(
            {"head.type": head_type}, source=f"{path} (its model card)", trust_code=trust_code
        )
    try:
        head = HeadConfig(**card["head"])
    except ValueError as error:  # pydantic's ValidationError
        raise UserError(f"{path}: its model card's head is invalid ({error})") from None
    built = build_model(
        backbone=card["backbone"], num_classes=_card_field(path, card, "num_classes"), head=head
    )
    try:
        model = restructure(built.model, _card_field(path, card, "folded"))
    except (AttributeError, KeyError, TypeError) as error:
        raise UserError(f"{path}: its model card's folded layers do not fit ({error})") from None
    load_weights(model, tensors, source=path)
    return model.eval()
