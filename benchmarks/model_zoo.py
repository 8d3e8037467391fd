"""Does every model family fit? Build, train one step, export (fused, verified) and predict.

For each model, with random initial weights (``pretrained: false``): a real ``finetune.run`` of
a one-epoch recipe on 2 random training images at batch size 2 (one optimizer step) and 2
validation images, then ``finetune.export_run`` with BatchNorm folded and every written file
checked against the original model, then one image predicted from the export's safetensors
file. A model fits when all of that works and each classifier the model has (two for distilled
models) became a new head. Models with a fixed input size (ViTs, DeiT, LeViT, Swin) run at their
pretrained config's size; the others at 64 px, unless ``MODELS`` gives a size.

Prints one row per model (family, head modules replaced, parameters, train seconds, BatchNorms
folded/left, the worst relative logit difference of the export) and "N of M fit"; exits 1 if
any model did not fit, with the step that failed and why.

    python benchmarks/model_zoo.py                                    # the whole sample
    python benchmarks/model_zoo.py --models dla34 levit_128s torchvision:resnet18 inception_v3:96
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from torch import nn

from finetune.export import export_run
from finetune.inference import load_trained, predict_images
from finetune.model import TORCHVISION_PREFIX, build_model, pretrained_config
from finetune.recipe import Recipe
from finetune.training import run

NUM_CLASSES = 3
DEFAULT_SIZE = 64  # px for models that take any input size: small enough for a CPU

# The sample: name -> image size (None: the default rule above), grouped by what each covers.
MODELS: dict[str, int | None] = {
    # CNNs with a linear classifier
    "resnet18": None,
    "resnet50": None,
    "efficientnet_b0": None,
    "mobilenetv3_small_100": None,
    "convnext_atto": None,
    "regnetx_002": None,
    "densenet121": None,
    "repvgg_a0": None,
    "inception_v3": 96,  # unpadded stem convolutions: 64 px shrinks to nothing
    # 1x1-convolution classifiers; ResNetV2 and BiT are also pre-activation designs
    "dla34": None,
    "resnetv2_50": None,
    "resnetv2_50x1_bit": None,
    # normalizer-free (weight-standardised convolutions, no BatchNorm)
    "nf_resnet26": None,
    "eca_nfnet_l0": None,
    # vision transformers, distilled ones with two heads
    "vit_tiny_patch16_224": None,
    "deit_tiny_distilled_patch16_224": None,
    "swin_tiny_patch4_window7_224": None,
    # hybrids: convolutions and attention
    "levit_128s": None,
    "coat_lite_tiny": None,
    "mobilevit_xxs": None,
    "efficientformer_l1": None,
    # torchvision
    "torchvision:resnet18": None,
    "torchvision:mobilenet_v3_small": None,
    "torchvision:efficientnet_b0": None,
    "torchvision:convnext_tiny": None,
}


@dataclass
class Row:
    """What happened to one model; ``error`` is empty when it fit."""

    name: str
    family: str = ""
    image_size: int = 0
    heads: tuple[str, ...] = ()
    params: int = 0
    train_seconds: float = 0.0
    folded: int = 0  # BatchNorms folded into the layer before them
    remaining: int = 0  # BatchNorms left in place
    max_rel_diff: float = float("nan")  # worst export file (or fused model) vs the original
    prediction: str = ""  # the class predicted for one image from the export
    step: str = "build"  # the step reached: build, train, export, predict
    error: str = ""
    trace: str = ""  # the failure's traceback

    @property
    def fits(self) -> bool:
        return not self.error


def family_of(name: str) -> str:
    """The module that defines the model: timm's ``resnetv2``, ``deit``; ``torchvision.resnet``."""
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        builder = torchvision.models.get_model_builder(name.removeprefix(TORCHVISION_PREFIX))
        return "torchvision." + builder.__module__.rpartition(".")[2]
    import timm

    return timm.models.model_entrypoint(name).__module__.rpartition(".")[2]


def default_image_size(name: str) -> int:
    """The pretrained config's size for a model that takes no other, else ``DEFAULT_SIZE``."""
    cfg = pretrained_config(name)
    return cfg["input_size"][-1] if cfg.get("fixed_input_size") else DEFAULT_SIZE


def zoo_recipe(name: str, image_size: int, output_dir: Path) -> dict[str, Any]:
    """One epoch of one step (2 images, batch 2) on random images, plus 2 validation images."""
    return {
        "name": "zoo",
        "seed": 0,
        "model": {"backbone": name, "pretrained": False, "num_classes": NUM_CLASSES},
        "data": {
            "train": {"type": "fake", "num_samples": 2, "num_classes": NUM_CLASSES},
            "val": {"type": "fake", "num_samples": 2, "num_classes": NUM_CLASSES, "seed": 1},
            "image_size": image_size,
            "batch_size": 2,
            "num_workers": 0,
        },
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "scheduler": {"name": "none"},
        "train": {"epochs": 1, "device": "cpu", "precision": "fp32"},
        "output": {"dir": str(output_dir)},
    }


def check_model(name: str, tmp_dir: str | Path, image_size: int | None = None) -> Row:
    """Build, train one step, export (BatchNorm folded, verified) and predict with ``name``.

    Never raises for the model's sake: a failure is the row's ``error``, prefixed by the
    ``step`` it happened in. ``tmp_dir`` receives the run folder, the export and the image.
    """
    row = Row(name, image_size=image_size or 0)
    try:
        _build_train_export_predict(row, Path(tmp_dir))
    except Exception as error:  # noqa: BLE001 - any failure is this model's result
        lines = str(error).strip().splitlines() or [""]
        row.error = f"{row.step}: {type(error).__name__}: {lines[0]}"[:300]
        row.trace = traceback.format_exc()
    return row


def _build_train_export_predict(row: Row, tmp_dir: Path) -> None:
    built = build_model(backbone=row.name, num_classes=NUM_CLASSES)
    row.family = family_of(row.name)
    row.image_size = row.image_size or default_image_size(row.name)
    row.heads = built.head_names
    row.params = sum(p.numel() for p in built.model.parameters())
    del built  # training builds its own: hold one copy at a time

    row.step = "train"
    recipe = Recipe.from_dict(zoo_recipe(row.name, row.image_size, tmp_dir / "checkpoints"))
    result = run(recipe, run_dir=tmp_dir / "run", console=Console(quiet=True))
    if result.summary["status"] != "completed":
        raise RuntimeError(f"the run ended {result.summary['status']}")
    row.train_seconds = result.summary["train_seconds"]

    row.step = "export"
    export = export_run(result.run_dir, out=tmp_dir / "export", fuse_bn=True)
    row.folded = len(export.info["batchnorm"]["folded"])
    row.remaining = len(export.info["batchnorm"]["remaining"])
    checks = export.info["verification"]["results"].values()
    row.max_rel_diff = max(c["max_rel_diff"] for c in checks if "max_rel_diff" in c)

    row.step = "predict"
    trained = load_trained(export.out, device="cpu")
    _check_heads(trained.model, row.heads)
    (prediction,) = predict_images(trained, [_write_image(tmp_dir / "image.png")])
    row.prediction = prediction["top_k"][0]["class"]


def _check_heads(model: nn.Module, head_names: tuple[str, ...]) -> None:
    """Each classifier of the rebuilt model is a new ``NUM_CLASSES``-way head."""
    for name in head_names:
        linear = [m for m in model.get_submodule(name).modules() if isinstance(m, nn.Linear)]
        if not linear or linear[-1].out_features != NUM_CLASSES:
            raise RuntimeError(f"{name} is not a new {NUM_CLASSES}-class head")


def _write_image(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------------ report
HEADER = (
    f"{'model':34s} {'family':24s} {'size':>4s} {'head replaced':16s} {'params':>7s} "
    f"{'train s':>7s} {'BN fold/left':>12s} {'max rel diff':>12s}  status"
)


def format_row(row: Row) -> str:
    """One line of the table: the figures, then OK or FAIL with the reason."""
    folds = f"{row.folded}/{row.remaining}" if row.step == "predict" else "-"  # exported
    return (
        f"{row.name:34s} {row.family:24s} {row.image_size:4d} {', '.join(row.heads):16s} "
        f"{row.params / 1e6:6.1f}M {row.train_seconds:7.1f} {folds:>12s} "
        f"{row.max_rel_diff:12.1e}  {'OK' if row.fits else 'FAIL ' + row.error}"
    )


def parse_model(spec: str) -> tuple[str, int | None]:
    """``name`` or ``name:size`` (``torchvision:resnet18:96`` too); a size from ``MODELS``."""
    head, _, tail = spec.rpartition(":")
    if head and tail.isdigit():
        return head, int(tail)
    return spec, MODELS.get(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), help="timm or torchvision:<name>[:size]"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--debug", action="store_true", help="print each failure's traceback")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(HEADER, flush=True)
    rows = []
    for spec in args.models:
        name, size = parse_model(spec)
        with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
            rows.append(check_model(name, tmp, size))
        print(format_row(rows[-1]), flush=True)
        if args.debug and rows[-1].trace:
            print(rows[-1].trace, flush=True)
    fitted = sum(row.fits for row in rows)
    print(f"{fitted} of {len(rows)} fit")
    sys.exit(0 if fitted == len(rows) else 1)


if __name__ == "__main__":
    main()
