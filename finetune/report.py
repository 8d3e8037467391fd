"""The visual evaluation report of ``finetune eval SOURCE DATA --report DIR``.

Besides the numbers ``finetune.inference.evaluate_folder`` gives, it writes into ``DIR``:

- ``confusion.png``: the confusion matrix (rows: true class, colour: share of the row); with
  more than ``MATRIX_CLASSES`` classes, a bar chart of the most frequent confusions instead;
- ``per_class.png``: precision, recall and F1 per class (scikit-learn's definitions);
- ``worst.png``: the most confidently wrong images, with their true and predicted classes;
- ``calibration.png``: a reliability diagram and the expected calibration error (ECE);
- ``report.json``: every number shown, and more (all confusions, the calibration bins).

The model runs once: the logits that ``evaluate_folder`` computes are kept by a forward hook.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.errors import UserError
from finetune.images import load_rgb
from finetune.inference import TrainedModel, evaluate_folder
from finetune.run_folder import atomic_write_bytes, write_json
from finetune.sources import open_path

MATRIX_CLASSES = 25  # beyond this a confusion matrix is unreadable: show the top confusions
TOP_CONFUSIONS = 20  # bars in the top-confusions chart
CLASS_BARS = 30  # classes in the per-class chart (the lowest F1 first when there are more)
WORST_IMAGES = 16  # images in the most-confidently-wrong grid
CALIBRATION_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)
PICTURES = ("confusion.png", "per_class.png", "worst.png", "calibration.png")


@dataclass
class Predictions:
    """One row per image: the model's class probabilities and the true class (model indices)."""

    probabilities: np.ndarray  # (images, classes)
    labels: np.ndarray  # (images,)
    paths: list[Path]
    classes: list[str]

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)


def write_report(
    trained: TrainedModel, root: str | Path, out: str | Path, batch_size: int = 64
) -> dict[str, Any]:
    """Evaluate ``trained`` on ``root`` (as ``evaluate_folder``) and write the report into ``out``.

    Returns:
        What ``report.json`` holds: ``evaluate_folder``'s metrics, with precision, recall and F1
        added to each class of ``per_class``, plus ``macro_avg``, ``weighted_avg``,
        ``calibration``, ``confusions``, ``worst``, ``pictures``, ``confusion_picture``
        (``matrix`` or ``top confusions``) and ``report`` (the folder).

    Raises:
        UserError: naming ``out`` when it is not a folder, or the data as ``evaluate_folder``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--report: {out} is a file, not a folder")
    with kept_outputs(trained.model) as batches:
        metrics = evaluate_folder(trained, root, batch_size=batch_size)
    predictions = _predictions(trained, root, batches)
    scores = per_class_scores(predictions)
    report = {**metrics, **scores}
    report["per_class"] = {
        name: {**row, **scores["per_class"][name]} for name, row in metrics["per_class"].items()
    }
    report["calibration"] = calibration(predictions.probabilities, predictions.labels)
    report["confusions"] = confusions(predictions)
    report["worst"] = most_confident_mistakes(predictions, WORST_IMAGES)
    report["pictures"] = list(PICTURES)
    report["report"] = str(out)
    report["confusion_picture"] = plot_confusion(
        predictions, report["confusions"], out / "confusion.png"
    )
    _plot_per_class(report["per_class"], out / "per_class.png")
    _plot_worst(report["worst"], out / "worst.png")
    _plot_calibration(report["calibration"], out / "calibration.png")
    write_json(out / "report.json", report)
    return report


@contextmanager
def kept_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect every output of ``model`` (on the CPU, as float) while the block runs."""
    outputs: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, i, output: outputs.append(output.float().cpu()))
    try:
        yield outputs
    finally:
        handle.remove()


def _predictions(
    trained: TrainedModel, root: str | Path, batches: list[torch.Tensor]
) -> Predictions:
    """The logits ``evaluate_folder`` computed, in its (unshuffled) order of the data's images."""
    found = open_path(Path(root), key="DATA", num_classes=len(trained.classes))
    labels = np.array([trained.classes.index(found.classes[label]) for _, label in found.samples])
    probabilities = torch.cat(batches).softmax(dim=1).numpy()
    if len(probabilities) != len(labels):  # evaluate_folder read the data in another way
        raise RuntimeError(f"kept {len(probabilities)} outputs for {len(labels)} images")
    return Predictions(
        probabilities, labels, [path for path, _ in found.samples], list(trained.classes)
    )


# ---------------------------------------------------------------------------------- numbers
def per_class_scores(predictions: Predictions) -> dict[str, Any]:
    """Precision, recall and F1 of every class with images (``per_class``), and their macro and
    weighted means (``macro_avg``, ``weighted_avg``).

    Precision counts every prediction of the class, also on images of classes the data lacks.
    """
    from sklearn.metrics import precision_recall_fscore_support

    present = np.unique(predictions.labels)
    columns = precision_recall_fscore_support(
        predictions.labels, predictions.predicted, labels=present, zero_division=0
    )
    per_class = {
        predictions.classes[index]: {
            "precision": float(columns[0][i]),
            "recall": float(columns[1][i]),
            "f1": float(columns[2][i]),
        }
        for i, index in enumerate(present)
    }
    averages = {}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            predictions.labels,
            predictions.predicted,
            labels=present,
            average=average,
            zero_division=0,
        )
        averages[f"{average}_avg"] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
        }
    return {"per_class": per_class, **averages}


def calibration(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """The expected calibration error and the reliability diagram's bins.

    Each image falls in the equal-width bin of its top probability (its confidence). The ECE is
    the mean over bins of |accuracy - mean confidence|, weighted by the bin's share of images.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lower, upper]; a confidence of exactly 0 cannot happen (it is at least 1/classes).
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        row = {"lower": float(edges[b]), "upper": float(edges[b + 1]), "images": count}
        if count:
            row["confidence"] = float(confidence[inside].mean())
            row["accuracy"] = float(correct[inside].mean())
            ece += count / len(labels) * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return {"ece": float(ece), "bins": rows}


def confusions(predictions: Predictions) -> list[dict[str, Any]]:
    """Every (true, predicted) pair of different classes that occurs, the most frequent first."""
    pairs, counts = np.unique(
        np.stack([predictions.labels, predictions.predicted], axis=1), axis=0, return_counts=True
    )
    rows = [
        {"true": predictions.classes[t], "predicted": predictions.classes[p], "images": int(n)}
        for (t, p), n in zip(pairs.tolist(), counts.tolist(), strict=True)
        if t != p
    ]
    return sorted(rows, key=lambda row: -row["images"])  # a stable sort: ties in class order


def most_confident_mistakes(predictions: Predictions, count: int) -> list[dict[str, Any]]:
    """The ``count`` wrongly classified images with the highest confidence, highest first."""
    wrong = np.flatnonzero(predictions.predicted != predictions.labels)
    order = wrong[np.argsort(-predictions.confidence[wrong], kind="stable")][:count]
    return [
        {
            "image": str(predictions.paths[i]),
            "true": predictions.classes[predictions.labels[i]],
            "predicted": predictions.classes[predictions.predicted[i]],
            "confidence": float(predictions.confidence[i]),
        }
        for i in order
    ]


# ---------------------------------------------------------------------------------- pictures
def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 90) -> None:
    """Write ``fig`` to ``path`` atomically (a failed write is a ``UserError`` naming it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_confusion(predictions: Predictions, pairs: list[dict[str, Any]], path: Path) -> str:
    """The confusion matrix (``"matrix"``) of the classes in the data or the predictions, or
    with more than ``MATRIX_CLASSES`` of them, the most frequent ``pairs`` (``"top confusions"``).
    """
    from sklearn.metrics import confusion_matrix

    plt = pyplot()
    shown = np.union1d(predictions.labels, predictions.predicted)
    if len(shown) > MATRIX_CLASSES:
        top = pairs[:TOP_CONFUSIONS]
        fig, axis = plt.subplots(figsize=(7, 1.2 + 0.28 * max(len(top), 1)))
        axis.barh([f"{p['true']} -> {p['predicted']}" for p in top], [p["images"] for p in top])
        axis.invert_yaxis()
        axis.set_xlabel("images")
        axis.set_title(f"top confusions (true -> predicted) of {len(shown)} classes", fontsize=9)
        fig.tight_layout()
        save_png(fig, path)
        return "top confusions"
    matrix = confusion_matrix(predictions.labels, predictions.predicted, labels=shown)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    names = [predictions.classes[i] for i in shown]
    size = 2.5 + 0.35 * len(shown)
    fig, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            color = "white" if share[row, column] > 0.5 else "black"
            axis.text(column, row, str(count), ha="center", va="center", fontsize=7, color=color)
    rotation = 90 if max(len(name) for name in names) > 3 else 0
    axis.set_xticks(range(len(names)), names, rotation=rotation, fontsize=7)
    axis.set_yticks(range(len(names)), names, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("confusion matrix (images; colour: share of the true class)", fontsize=9)
    fig.colorbar(image, ax=axis, fraction=0.046)
    fig.tight_layout()
    save_png(fig, path)
    return "matrix"


def _plot_per_class(rows: dict[str, dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    names = list(rows)
    if len(names) > CLASS_BARS:
        names = sorted(names, key=lambda name: rows[name]["f1"])[:CLASS_BARS]
    fig, axis = plt.subplots(figsize=(2 + 0.45 * len(names), 3.6))
    x = np.arange(len(names))
    for offset, key in zip((-0.27, 0.0, 0.27), ("precision", "recall", "f1"), strict=True):
        axis.bar(x + offset, [rows[name][key] for name in names], width=0.27, label=key)
    axis.set_xticks(x, names, rotation=90 if len(names) > 8 else 0, fontsize=7)
    axis.set_ylim(0, 1.2)  # room for the legend above the bars
    shown = "" if len(names) == len(rows) else f" ({len(names)} lowest F1 of {len(rows)})"
    axis.set_title(f"per class{shown}", fontsize=9)
    axis.legend(fontsize=7, ncols=3, loc="upper right")
    fig.tight_layout()
    save_png(fig, path)


def _plot_worst(worst: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    columns = min(4, max(len(worst), 1))
    rows = max(1, -(-len(worst) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, item in zip(axes.flat, worst, strict=False):
        axis.imshow(load_rgb(item["image"]))
        axis.set_title(
            f"true {item['true']}\npredicted {item['predicted']} {item['confidence']:.0%}",
            fontsize=7,
        )
    if not worst:
        axes[0, 0].text(0.5, 0.5, "no wrongly classified image", ha="center", va="center")
    fig.suptitle("most confidently wrong", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def _plot_calibration(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    bins = result["bins"]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.6, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    lower = [row["lower"] for row in bins]
    width = bins[0]["upper"] - bins[0]["lower"]
    accuracy = [row.get("accuracy", 0.0) for row in bins]
    confidence = [row.get("confidence", 0.0) for row in bins]
    top.bar(lower, accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
    top.bar(
        lower,
        np.subtract(confidence, accuracy),
        bottom=accuracy,
        width=width,
        align="edge",
        fill=False,
        hatch="//",
        edgecolor="tab:red",
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"reliability diagram, ECE {result['ece']:.3f}", fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(lower, [row["images"] for row in bins], width=width, align="edge", color="grey")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    save_png(fig, path)
