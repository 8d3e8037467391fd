"""``finetune inspect``: pictures of what a trained model learnt and how fine-tuning changed it.

Written into the output folder, with ``inspect.json`` listing them and every number shown:

- ``filters.png``: the first convolution's filters as an image grid;
- ``weights.png``: a histogram of the weights of each stage, and the norm of every layer;
- ``change.png``: for a run, how far each layer moved from the weights it started from
  (``model.pretrained``): ``|w - w0| / |w0|`` over the layer's parameters loaded from there;
- per image: ``<n>-<name>-features.png`` (the most active feature maps of every stage, the
  stages of timm's ``feature_info``) and ``<n>-<name>-gradcam.png`` (Grad-CAM for the top class).

Grad-CAM (Selvaraju et al., 2017) weights a stage's feature maps by the spatial mean of the
top-class score's gradient with respect to them, sums them, and keeps the positive part. It is a
few lines over two hooks, so no library is needed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from finetune.errors import UserError
from finetune.freezing import stage_names
from finetune.images import load_rgb
from finetune.inference import TrainedModel, is_export, load_trained
from finetune.model import build_model
from finetune.report import pyplot, save_png
from finetune.run_folder import write_json

FILTERS_SHOWN = 64  # first-layer filters in the grid
CHANNELS_SHOWN = 8  # feature maps per stage: the most active ones for the image
# Grad-CAM uses the last stage whose maps are at least this wide: the final 7x7 maps of a
# 224-px ResNet, where the method was introduced; later, smaller stages give blurrier maps.
CAM_MIN_SIZE = 7


def inspect_model(
    source: str | Path,
    images: list[Path],
    out: str | Path,
    *,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Write the pictures of a run or an export (``load_trained``'s ``source``) into ``out``.

    Returns:
        What ``inspect.json`` holds: ``pictures`` (file names), ``first_conv``, ``images``
        (per image: top class, probability, the stages' map shapes, Grad-CAM layer, its
        pictures), ``layers`` (per layer: stage, norm and relative change), ``change_from``
        and ``notes`` (what was skipped, and why).

    Raises:
        UserError: naming the file, for a missing or unreadable image or source, or an ``out``
            that is not a folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a folder")
    for path in images:
        if not Path(path).is_file():
            raise UserError(f"--image: {path}: no such image file")
    decoded = [load_rgb(path) for path in images]  # an unreadable one fails before any work
    trained = load_trained(source, trust_code=trust_code)
    if isinstance(trained.model, torch.jit.ScriptModule):
        raise UserError(f"{source}: a TorchScript model hides its layers; inspect its run folder")
    model = trained.model
    result: dict[str, Any] = {"source": str(source), "pictures": [], "notes": []}
    _filters(model, out, result)
    start, result["change_from"] = starting_weights(trained, source, result["notes"])
    result["layers"] = layer_table(model, start)
    _plot_weights(model, result["layers"], out / "weights.png")
    result["pictures"].append("weights.png")
    if start is not None:
        _plot_change(result["layers"], result["change_from"], out / "change.png")
        result["pictures"].append("change.png")
    result["images"] = [
        _inspect_image(trained, i, path, image, out, result)
        for i, (path, image) in enumerate(zip(images, decoded, strict=True))
    ]
    write_json(out / "inspect.json", result)
    return result


# ------------------------------------------------------------------------------ the weights
def first_conv(model: nn.Module) -> tuple[str, torch.Tensor] | None:
    """The name and weight ``(out, in, kh, kw)`` of the model's first 2-d convolution."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module.weight.detach().float().cpu()
    return None


def filter_grid(weight: torch.Tensor) -> np.ndarray:
    """The first ``FILTERS_SHOWN`` filters as one image: RGB for 3 input channels, else their
    mean (grey); white lines between them."""
    filters = weight[:FILTERS_SHOWN]
    if filters.shape[1] != 3:
        filters = filters.mean(dim=1, keepdim=True)
    return tile(filters, math.ceil(math.sqrt(len(filters))), pad=1.0)


def tile(images: torch.Tensor, columns: int, pad: float = math.nan) -> np.ndarray:
    """``(n, c, h, w)`` images side by side in rows of ``columns``, one ``pad`` pixel apart,
    ``(height, width)`` or ``(height, width, 3)``. Each image is scaled to [0, 1] on its own:
    its pattern matters here, not its size."""
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-12)
    rows = math.ceil(len(images) / columns)
    _, channels, height, width = images.shape
    grid = torch.full((channels, rows * (height + 1) - 1, columns * (width + 1) - 1), pad)
    for index, image in enumerate(images):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        grid[:, top : top + height, left : left + width] = image
    return grid.permute(1, 2, 0).squeeze(-1).numpy()


def starting_weights(
    trained: TrainedModel, source: str | Path, notes: list[str]
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The weights the run started from, for the tensors that came from ``model.pretrained``.

    A path is read as at the start of the run (``build_model`` with the recipe's ``model.load``
    rules); ``true`` gives the published weights (the backbone's, not the new head's). Returns
    ``(None, None)`` and appends a note when there is nothing to compare with.
    """
    pretrained = trained.recipe.model.pretrained
    if is_export(source):
        notes.append("an export: inspect its run folder to compare with the starting weights")
        return None, None
    if pretrained is False:
        notes.append("model.pretrained is false: the run started from random weights")
        return None, None
    try:
        built = build_model(
            backbone=trained.recipe.model.backbone,
            num_classes=len(trained.classes),
            pretrained=pretrained,
            head=trained.recipe.model.head,
            load=trained.recipe.model.load,
        )
    except UserError as error:
        notes.append(f"no layer change: the starting weights are not available: {error}")
        return None, None
    state = built.model.state_dict()
    if built.load_report is not None:
        kept = built.load_report.loaded
    else:  # the published weights: everything but the new head came from them
        kept = [k for k in state if not any(k.startswith(f"{h}.") for h in built.head_names)]
    origin = built.load_report.source if built.load_report is not None else "published weights"
    return {key: state[key] for key in kept}, origin


def layer_table(model: nn.Module, start: dict[str, torch.Tensor] | None) -> list[dict[str, Any]]:
    """Per layer (a module with parameters), in the model's order: its stage, the L2 norm of its
    parameters, and with ``start`` their relative change ``|w - w0| / |w0|`` (``None`` for
    layers that did not come from ``start``, such as a new head)."""
    stages = stage_names(model)
    sums: dict[str, list[float]] = {}
    for name, parameter in model.named_parameters():
        layer = name.rpartition(".")[0]
        row = sums.setdefault(layer, [0.0, 0.0, 0.0])  # |w|^2, |w0|^2, |w - w0|^2
        value = parameter.detach().float().cpu()
        row[0] += float(value.square().sum())
        if start is not None and name in start and start[name].shape == value.shape:
            initial = start[name].float()
            row[1] += float(initial.square().sum())
            row[2] += float((value - initial).square().sum())
    return [
        {
            "layer": layer,
            "stage": _stage_of(layer, stages),
            "norm": math.sqrt(squares[0]),
            "change": math.sqrt(squares[2] / squares[1]) if squares[1] > 0 else None,
        }
        for layer, squares in sums.items()
    ]


def _stage_of(layer: str, stages: list[str]) -> str:
    """The longest stage name that ``layer`` lies in (``layer3`` for ``layer3.0.conv1``)."""
    inside = [s for s in stages if layer == s or layer.startswith(f"{s}.")]
    return max(inside, key=len) if inside else layer.partition(".")[0]


# ------------------------------------------------------------------------------ the activations
def feature_stages(model: nn.Module) -> list[tuple[str, int | None]]:
    """``(module name, channels)`` of timm's ``feature_info`` stages; for other models (e.g.
    torchvision's), the top-level children, channels unknown."""
    info = [i for i in getattr(model, "feature_info", None) or [] if isinstance(i, dict)]
    if info:
        return [(i["module"], i.get("num_chs")) for i in info]
    return [(name, None) for name, _ in model.named_children()]


def as_map(output: Any, model: nn.Module, channels: int | None) -> torch.Tensor | None:
    """A stage's output as ``(batch, channels, height, width)``, or None when it is not a map.

    A channels-last output (Swin's stages) is permuted, and a ViT's tokens lose the class and
    register tokens and are laid out on the patch grid.
    """
    if not isinstance(output, torch.Tensor):
        return None
    if output.dim() == 4:
        if channels is not None and output.shape[1] != channels and output.shape[3] == channels:
            return output.permute(0, 3, 1, 2)
        return output
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    prefix = getattr(model, "num_prefix_tokens", 0)
    if output.dim() == 3 and grid and output.shape[1] == prefix + grid[0] * grid[1]:
        return output[:, prefix:].transpose(1, 2).reshape(len(output), -1, *grid)
    return None


def stage_activations(
    model: nn.Module, images: torch.Tensor, stages: list[tuple[str, int | None]]
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Logits, and each stage's maps with the gradient of the top class's score over them.

    The gradient of image ``i``'s own top logit, for every image at once (in eval mode the
    images of a batch do not interact). Stages whose output is not a map are left out.
    """
    outputs: dict[str, Any] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: outputs.__setitem__(name, output)
        )
        for name, _ in stages
    ]
    try:
        with torch.enable_grad():
            logits = model(images.requires_grad_(True))
            score = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
            names = [n for n, _ in stages if isinstance(outputs.get(n), torch.Tensor)]
            tensors = [outputs[n] for n in names]
            grads = torch.autograd.grad(score, tensors, allow_unused=True) if names else ()
    finally:
        for handle in handles:
            handle.remove()
    channels = dict(stages)
    maps = {}
    for name, grad in zip(names, grads, strict=True):
        output = outputs[name].detach()
        activation = as_map(output, model, channels[name])
        if activation is not None:
            gradient = torch.zeros_like(output) if grad is None else grad
            maps[name] = (activation.float(), as_map(gradient, model, channels[name]).float())
    return logits.detach(), maps


def grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at a layer's resolution, ``(batch, height, width)``: ReLU of the maps summed
    with weights that are the spatial means of their gradients."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return (weights * activation).sum(dim=1).relu()


def cam_layer(maps: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """The last stage with maps at least ``CAM_MIN_SIZE`` wide that the score depends on
    (a ViT's last block passes only its class token on); else the first stage it depends on;
    None when there is none."""
    useful = [name for name, (_, gradient) in maps.items() if gradient.abs().sum() > 0]
    wide = [name for name in useful if min(maps[name][0].shape[-2:]) >= CAM_MIN_SIZE]
    return wide[-1] if wide else next(iter(useful), None)


def _inspect_image(
    trained: TrainedModel,
    index: int,
    path: Path,
    image: Image.Image,
    out: Path,
    result: dict[str, Any],
) -> dict[str, Any]:
    """Feature maps and Grad-CAM of one image; returns its entry of ``inspect.json``."""
    batch = trained.transform(image)[None].to(trained.runtime.device)
    logits, maps = stage_activations(trained.model, batch, feature_stages(trained.model))
    probabilities = logits.float().softmax(dim=1)[0].cpu()
    top = int(probabilities.argmax())
    stem = f"{index + 1}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(path).stem)}"
    title = f"{Path(path).name}: {trained.classes[top]} {probabilities[top]:.1%}"
    item = {
        "image": str(path),
        "top_class": trained.classes[top],
        "probability": float(probabilities[top]),
        "stages": [{"name": n, "shape": list(a.shape[1:])} for n, (a, _) in maps.items()],
        "cam_layer": cam_layer(maps),
        "features": None,
        "gradcam": None,
    }
    shown = {name: pair for name, pair in maps.items() if min(pair[0].shape[-2:]) > 1}
    if shown:
        item["features"] = f"{stem}-features.png"
        _plot_features(shown, title, out / item["features"])
    layer = item["cam_layer"]
    if layer is None:
        result["notes"].append(f"{path}: no stage has maps the top class depends on: no Grad-CAM")
    else:
        item["gradcam"] = f"{stem}-gradcam.png"
        cam = grad_cam(*maps[layer])[0].cpu()
        picture = _display_image(batch[0].detach().cpu(), trained)
        _plot_grad_cam(picture, cam, f"{title}; Grad-CAM at {layer}", out / item["gradcam"])
    result["pictures"] += [name for name in (item["features"], item["gradcam"]) if name]
    return item


def _display_image(tensor: torch.Tensor, trained: TrainedModel) -> np.ndarray:
    """The model's input as the image it shows: normalisation undone, ``(h, w, 3)`` in [0, 1]."""
    if trained.mean is not None and trained.std is not None:
        std = torch.tensor(trained.std)[:, None, None]
        tensor = tensor * std + torch.tensor(trained.mean)[:, None, None]
    return tensor.clamp(0, 1).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------ pictures
def _filters(model: nn.Module, out: Path, result: dict[str, Any]) -> None:
    found = first_conv(model)
    if found is None:
        result["notes"].append("no 2-d convolution: no filters picture")
        result["first_conv"] = None
        return
    name, weight = found
    result["first_conv"] = {"name": name, "shape": list(weight.shape)}
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(4.5, 4.8))
    axis.imshow(filter_grid(weight), cmap="gray", interpolation="nearest")
    axis.axis("off")
    shown = f", first {FILTERS_SHOWN}" if len(weight) > FILTERS_SHOWN else ""
    axis.set_title(f"{name}: {len(weight)} filters {tuple(weight.shape[1:])}{shown}", fontsize=9)
    fig.tight_layout()
    save_png(fig, out / "filters.png")
    result["pictures"].append("filters.png")


def _per_layer_bars(axis, layers: list[dict[str, Any]], key: str) -> None:
    """Bars over the layers in model order; labels: each layer when few (``-`` marks a layer
    without a value), else each stage."""
    values = [row[key] if row[key] is not None else 0.0 for row in layers]
    axis.bar(range(len(layers)), values, color="tab:blue")
    if len(layers) <= 60:
        names = [row["layer"] + (" -" if row[key] is None else "") for row in layers]
        axis.set_xticks(range(len(layers)), names, rotation=90)
    else:
        starts = [
            i for i, row in enumerate(layers) if i == 0 or row["stage"] != layers[i - 1]["stage"]
        ]
        axis.set_xticks(starts, [layers[i]["stage"] for i in starts], rotation=90)
    axis.tick_params(axis="x", labelsize=6)
    axis.set_xlim(-0.6, len(layers) - 0.4)


def _plot_weights(model: nn.Module, layers: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    stages = stage_names(model)
    values: dict[str, list[torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() > 1:  # weights of convolutions and linear layers, not biases or norms
            stage = _stage_of(name.rpartition(".")[0], stages)
            values.setdefault(stage, []).append(parameter.detach().float().cpu().flatten())
    columns = min(4, len(values))
    rows = math.ceil(len(values) / columns) + 1
    fig = plt.figure(figsize=(3 * columns, 2.1 * rows + 0.6))
    for index, (stage, tensors) in enumerate(values.items()):
        axis = fig.add_subplot(rows, columns, index + 1)
        counts, edges = np.histogram(torch.cat(tensors).numpy(), bins=60)
        # log10 on a linear axis: a log-scale axis costs seconds of tick layout per figure
        axis.stairs(np.log10(counts + 1), edges, fill=True, color="tab:blue")
        axis.set_title(stage, fontsize=8)
        axis.tick_params(labelsize=6)
    norms = fig.add_subplot(rows, 1, rows)
    _per_layer_bars(norms, layers, "norm")
    norms.set_ylabel("L2 norm", fontsize=8)
    fig.suptitle(
        "weights per stage (histograms, log10 of count + 1) and the norm of each layer", fontsize=9
    )
    fig.tight_layout()
    save_png(fig, path)


def _plot_change(layers: list[dict[str, Any]], origin: str, path: Path) -> None:
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(min(16.0, max(6.0, 0.16 * len(layers) + 1.5)), 4.2))
    _per_layer_bars(axis, layers, "change")
    axis.set_ylabel("|w - w0| / |w0|", fontsize=8)
    axis.set_title(
        f"change of each layer from the weights it started from (-: not loaded)\n{origin}",
        fontsize=8,
    )
    fig.tight_layout()
    save_png(fig, path)


def _plot_features(
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]], title: str, path: Path
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(
        len(maps), 1, figsize=(1.1 * CHANNELS_SHOWN, 1.25 * len(maps) + 0.4), squeeze=False
    )
    for axis, (name, (activation, _)) in zip(axes[:, 0], maps.items(), strict=True):
        channels = activation[0].cpu()
        strongest = channels.mean(dim=(1, 2)).argsort(descending=True)[:CHANNELS_SHOWN]
        axis.imshow(tile(channels[strongest, None], CHANNELS_SHOWN), cmap="viridis")
        axis.set_title(f"{name} {tuple(channels.shape)}", fontsize=7, loc="left")
        axis.axis("off")
    fig.suptitle(f"{title}; the {CHANNELS_SHOWN} most active maps of each stage", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def _plot_grad_cam(picture: np.ndarray, cam: torch.Tensor, title: str, path: Path) -> None:
    plt = pyplot()
    size = picture.shape[:2]
    heat = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    heat = (heat / heat.max().clamp_min(1e-12)).numpy()
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    axes[0].imshow(picture)
    axes[1].imshow(heat, cmap="jet", vmin=0, vmax=1)
    axes[2].imshow(picture)
    axes[2].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    for axis, label in zip(axes, ("input", f"Grad-CAM {tuple(cam.shape)}", "overlay"), strict=True):
        axis.set_title(label, fontsize=8)
        axis.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
