"""Where images come from: image folders, CSV/JSONL manifests, torchvision datasets, digits, fake.

Every source is a map-style dataset of ``(PIL RGB image, class index)`` with ``classes`` (index ->
name) and ``targets`` (the label of every item, known without decoding an image). Sources apply
no transforms: ``finetune.data`` picks the split and the transform. Problems a user can fix (no
images, one class, a label out of range, a file that is not there) are found here, before
training, and name the folder or file.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from finetune.config.sources import (
    DataSource,
    DigitsSource,
    FakeSource,
    ImageFolderSource,
    ManifestSource,
    TorchvisionSource,
)
from finetune.errors import UserError
from finetune.images import IMAGE_EXTENSIONS, is_image_file, load_rgb, to_rgb


class ImageSource(Protocol):
    """What every source provides (``finetune.data`` relies on nothing else)."""

    classes: list[str]
    targets: list[int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...


# ------------------------------------------------------------------------------- image files
class ImageFiles(Dataset):
    """Image files and their labels (an image folder or a manifest), decoded on access.

    Args:
        samples: ``(path, class index)`` pairs.
        classes: class names by index.
        origin: the folder or file the samples came from, for messages.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], origin: Path) -> None:
        self.samples = samples
        self.classes = classes
        self.targets = [label for _, label in samples]
        self.origin = origin

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_rgb(path), label


def image_folder(root: Path, key: str) -> ImageFiles:
    """``root/<class>/**/<image>``; other files and hidden folders are ignored.

    Raises:
        UserError: when ``root`` has no class folder, or a class folder has no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{key}: {root} is not a folder")
    classes = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise UserError(f"{key}: {root} has no class folders (expected {root}/<class>/<image>)")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(path for path in _walk(root / name) if is_image_file(path))
        if not files:
            raise UserError(
                f"{key}: class folder {root / name} has no images (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        samples += [(path, index) for path in files]
    return ImageFiles(samples, classes, root)


def _walk(folder: Path) -> list[Path]:
    found = []
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(parent) / name for name in files]
    return found


def manifest(
    path: Path,
    key: str,
    *,
    kind: str,
    path_key: str = "path",
    label_key: str = "label",
    num_classes: int | None = None,
) -> ImageFiles:
    """A CSV (with a header) or JSON-lines list of images; image paths relative to ``path``.

    Labels are class names (classes sorted by name), or, when every label is an integer, class
    indices below ``num_classes`` (by default the largest label + 1).

    Raises:
        UserError: naming the file and line for a missing column, a missing image file, a label
            out of range or mixed label kinds, and for a manifest without rows.
    """
    path = Path(path)
    rows = _read_rows(path, kind)
    if not rows:
        raise UserError(f"{key}: {path} lists no images")
    entries = []
    for line, row in rows:
        missing = [name for name in (path_key, label_key) if row.get(name) in (None, "")]
        if missing:
            raise UserError(
                f"{key}: {path}, line {line}: no {' or '.join(missing)} (columns: "
                f"{', '.join(row)}); set {key}.path_key / label_key"
            )
        image = path.parent / str(row[path_key])
        if not image.is_file():
            raise UserError(f"{key}: {path}, line {line}: image not found: {image}")
        entries.append((line, image, row[label_key]))
    return _labelled(entries, path, key, num_classes)


def _read_rows(path: Path, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank row."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        if kind == "csv":
            reader = csv.DictReader(handle)
            return [(reader.line_num, row) for row in reader if any(row.values())]
        rows = []
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {line}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {line}: expected a JSON object")
            rows.append((line, row))
        return rows


def _labelled(
    entries: list[tuple[int, Path, Any]], path: Path, key: str, num_classes: int | None
) -> ImageFiles:
    """Labels are names unless every one is an integer (an int, or a CSV cell of digits)."""
    as_int = [_as_index(label) for _, _, label in entries]
    if all(index is not None for index in as_int):
        count = num_classes or max(as_int) + 1
        for (line, _, _), index in zip(entries, as_int, strict=True):
            if not 0 <= index < count:
                raise UserError(
                    f"{key}: {path}, line {line}: label {index} is outside "
                    f"0..{count - 1} ({count} classes)"
                )
        unused = sorted(set(range(count)) - set(as_int))
        if unused and num_classes is None:
            raise UserError(
                f"{key}: {path}: integer labels are class indices from 0, but no row "
                f"has label {unused[0]}; set model.num_classes to keep unused classes, "
                "or label the rows with class names"
            )
        classes = [str(index) for index in range(count)]
        return ImageFiles(
            [(image, index) for (_, image, _), index in zip(entries, as_int, strict=True)],
            classes,
            path,
        )
    if any(not isinstance(label, str) for _, _, label in entries):
        line = next(line for line, _, label in entries if not isinstance(label, str))
        raise UserError(f"{key}: {path}, line {line}: labels mix class names and other values")
    classes = sorted({label for _, _, label in entries})
    index = {name: i for i, name in enumerate(classes)}
    return ImageFiles([(image, index[label]) for _, image, label in entries], classes, path)


def _as_index(label: Any) -> int | None:
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label)
    return None


# ------------------------------------------------------------------------- in-memory sources
class LabelledImages(Dataset):
    """Any dataset of (image, label) with its class names and labels, images made RGB."""

    def __init__(self, dataset: Sequence, classes: list[str], targets: list[int]) -> None:
        self.dataset, self.classes, self.targets = dataset, classes, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.dataset[index]
        return to_rgb(image), int(label)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits as RGB PIL images, labels relabelled 0..k-1."""

    def __init__(self, source: DigitsSource) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        indices = _digits_split(digits.target, source.split)
        keep = [i for i in indices if digits.target[i] in source.classes]
        if source.per_class is not None:
            keep = _first_per_class(keep, digits.target, source.per_class, source.seed)
        relabel = {digit: index for index, digit in enumerate(source.classes)}
        pixels = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [Image.fromarray(img, mode="L").convert("RGB") for img in pixels]
        self.targets = [relabel[int(digits.target[i])] for i in keep]
        self.classes = [str(digit) for digit in source.classes]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.targets[index]


def _digits_split(targets: np.ndarray, split: str) -> list[int]:
    """A fixed stratified 80/20 split: every fifth image of each digit is validation."""
    if split == "all":
        return list(range(len(targets)))
    position = np.zeros(len(targets), dtype=int)
    for digit in np.unique(targets):
        where = np.flatnonzero(targets == digit)
        position[where] = np.arange(len(where))
    is_val = position % 5 == 4
    return [i for i in range(len(targets)) if is_val[i] == (split == "val")]


def _first_per_class(
    indices: list[int], targets: np.ndarray, per_class: int, seed: int
) -> list[int]:
    order = np.random.default_rng(seed).permutation(indices)
    kept: dict[int, list[int]] = {}
    for index in order:
        bucket = kept.setdefault(int(targets[index]), [])
        if len(bucket) < per_class:
            bucket.append(int(index))
    return sorted(i for bucket in kept.values() for i in bucket)


def fake_images(source: FakeSource, image_size: int) -> LabelledImages:
    """torchvision's ``FakeData``: random images, labels drawn per image with ``seed``."""
    from torchvision.datasets import FakeData

    dataset = FakeData(
        size=source.num_samples,
        image_size=(3, image_size, image_size),
        num_classes=source.num_classes,
        random_offset=source.seed * 1_000_003,
    )
    targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return LabelledImages(dataset, [f"class_{i}" for i in range(source.num_classes)], targets)


def torchvision_dataset(source: TorchvisionSource, key: str) -> LabelledImages:
    """``torchvision.datasets.<name>`` from ``root``, never downloaded.

    Raises:
        UserError: for an unknown name, a bad split, or missing files (saying where they go).
    """
    import torchvision.datasets

    cls = getattr(torchvision.datasets, source.name, None)
    if not isinstance(cls, type) or source.name not in torchvision.datasets.__all__:
        close = difflib.get_close_matches(source.name, torchvision.datasets.__all__, n=3)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UserError(f"{key}.name: torchvision has no dataset {source.name!r}{hint}")
    parameters = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"root": str(source.root)}
    if "train" in parameters:
        if source.split not in ("train", "test"):
            raise UserError(
                f"{key}.split: {source.name} has splits train and test, not {source.split!r}"
            )
        kwargs["train"] = source.split == "train"
    elif "split" in parameters:
        kwargs["split"] = source.split
    if "download" in parameters:
        kwargs["download"] = False
    try:
        dataset = cls(**kwargs)
    except ValueError as error:
        raise UserError(f"{key}.split: {source.name}: {error}") from None
    except (RuntimeError, OSError) as error:
        raise UserError(
            f"{key}: torchvision's {source.name} found no usable files under {source.root} "
            f"({error}). finetune never downloads: on a machine with internet, run "
            f'`python -c "import torchvision; torchvision.datasets.{source.name}'
            f"(root='data', {'train=True, ' if 'train' in kwargs else ''}download=True)\"` (or "
            f"download the files by hand) and copy what it writes into {source.root}/, keeping "
            "its layout"
        ) from None
    return _labelled_torchvision(dataset, source, key)


def _labelled_torchvision(dataset: Any, source: TorchvisionSource, key: str) -> LabelledImages:
    labels = next(
        (
            getattr(dataset, name)
            for name in ("targets", "labels", "_labels")
            if getattr(dataset, name, None) is not None
        ),
        None,
    )
    if labels is None:  # no label list: read them (decodes every image once)
        labels = [dataset[i][1] for i in range(len(dataset))]
    try:
        targets = [int(label) for label in labels]
    except (TypeError, ValueError):
        raise UserError(
            f"{key}: {source.name} is not an image classification dataset "
            "(its labels are not class indices)"
        ) from None
    classes = list(getattr(dataset, "classes", None) or [str(i) for i in range(max(targets) + 1)])
    if targets and not 0 <= min(targets) <= max(targets) < len(classes):
        raise UserError(f"{key}: {source.name} has labels outside 0..{len(classes) - 1}")
    return LabelledImages(dataset, [str(name) for name in classes], targets)


# ------------------------------------------------------------------------------------- opening
@dataclass(frozen=True)
class SourceKind:
    """How one kind of source (a class of ``finetune.config.sources``) is read.

    Attributes:
        open: ``(source, key, image_size, num_classes) -> dataset``; ``key`` names the source in
            messages (``data.train``), ``num_classes`` bounds integer labels when given.
        count_classes: ``(source, key) -> number of classes``, from the recipe alone (no image
            is read); ``None`` where that takes reading the data.
    """

    open: Callable[[Any, str, int, int | None], ImageSource]
    count_classes: Callable[[Any, str], int] | None = None


def _count_class_folders(source: ImageFolderSource, key: str) -> int:
    """The sub-folders of ``root`` that are not hidden (their images are not looked at)."""
    try:
        classes = [
            entry.name
            for entry in os.scandir(source.root)
            if entry.is_dir() and not entry.name.startswith(".")
        ]
    except OSError as error:
        raise UserError(f"{key}.root: cannot list {source.root}: {error}") from None
    if len(classes) < 2:
        raise UserError(
            f"{key}.root: {source.root} has {len(classes)} class folders; "
            "set model.num_classes or add one folder per class"
        )
    return len(classes)


# Every source class of the schema, and how to read it (a test checks that none is missing).
SOURCE_KINDS: dict[type, SourceKind] = {
    ImageFolderSource: SourceKind(
        open=lambda source, key, size, classes: image_folder(source.root, key),
        count_classes=_count_class_folders,
    ),
    ManifestSource: SourceKind(
        open=lambda source, key, size, classes: manifest(
            source.path,
            key,
            kind=source.type,
            path_key=source.path_key,
            label_key=source.label_key,
            num_classes=classes,
        )
    ),
    TorchvisionSource: SourceKind(
        open=lambda source, key, size, classes: torchvision_dataset(source, key)
    ),
    DigitsSource: SourceKind(
        open=lambda source, key, size, classes: DigitsDataset(source),
        count_classes=lambda source, key: len(source.classes),
    ),
    FakeSource: SourceKind(
        open=lambda source, key, size, classes: fake_images(source, size),
        count_classes=lambda source, key: source.num_classes,
    ),
}


def open_source(
    source: DataSource,
    *,
    key: str,
    image_size: int,
    seed: int = 0,
    num_classes: int | None = None,
) -> ImageSource:
    """The dataset a recipe's ``data.train`` / ``data.val`` names (``key`` is that name).

    ``seed``: the recipe's, for a source whose own ``seed`` (which images ``digits`` keeps,
    which ``fake`` images it makes) is left out. ``num_classes`` bounds integer labels of
    manifests (``model.num_classes`` when given).
    """
    if getattr(source, "seed", 0) is None:
        source = source.model_copy(update={"seed": seed})
    return SOURCE_KINDS[type(source)].open(source, key, image_size, num_classes)


def count_classes(source: DataSource, key: str = "data.train") -> int:
    """The number of classes of ``source`` from the recipe alone: no image is read.

    ``fake``: its ``num_classes``; ``digits``: its ``classes``; ``imagefolder``: its sub-folders
    that are not hidden.

    Raises:
        UserError: for the other sources (they need ``model.num_classes``), and for a folder
            that cannot be listed or has fewer than two class folders.
    """
    counter = SOURCE_KINDS[type(source)].count_classes
    if counter is None:
        raise UserError(
            f"model.num_classes: needed to plan without reading the "
            f"{source.type} data; set it in the recipe or with --set"
        )
    return counter(source, key)


def open_path(path: Path, key: str = "DATA", num_classes: int | None = None) -> ImageFiles:
    """An image folder, or a ``.csv`` / ``.jsonl`` manifest, by its path (for the CLI)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return manifest(path, key, kind=path.suffix.lower()[1:], num_classes=num_classes)
    if not path.exists():
        raise UserError(f"{key}: {path} does not exist")
    return image_folder(path, key)
