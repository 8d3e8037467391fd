"""Where ``data.train`` / ``data.val`` / ``data.test`` come from: one class per source ``type``.

``finetune.sources`` opens each (``SOURCE_KINDS``, one entry per class here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator

from finetune.config.common import PathValue, PositiveInt, Section, existing_path


class ImageFolderSource(Section):
    """A folder with one sub-folder of images per class (``root/<class>/**/<image>``).

    Class names are the sub-folder names, sorted. Files without an image extension and hidden
    files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are ignored.
    """

    type: Literal["imagefolder"]
    root: PathValue

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: Path, info: ValidationInfo) -> Path:
        return existing_path(value, info)


class ManifestSource(Section):
    """A CSV file (with a header row) or a JSON-lines file that lists one image per row.

    ``path_key`` and ``label_key`` name the columns (CSV) or keys (JSONL). Image paths are
    relative to the manifest's folder. Labels are class names (classes sorted by name) or, when
    every label is an integer, class indices ``0..num_classes-1``.
    """

    type: Literal["csv", "jsonl"]
    path: PathValue
    path_key: str = "path"
    label_key: str = "label"

    @field_validator("path")
    @classmethod
    def _manifest_exists(cls, value: Path, info: ValidationInfo) -> Path:
        return existing_path(value, info)


class TorchvisionSource(Section):
    """A classification dataset of ``torchvision.datasets`` by class name, from local files.

    ``root`` is the folder torchvision's own ``download=True`` fills; finetune never downloads.
    ``split`` is ``train`` or ``test`` for datasets with a ``train`` flag (CIFAR10, MNIST...),
    else the dataset's own split name (``Flowers102``: train | val | test).
    """

    type: Literal["torchvision"]
    name: Annotated[str, Field(min_length=1)]
    root: PathValue
    split: str = "train"

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: Path, info: ValidationInfo) -> Path:
        return existing_path(value, info)


class DigitsSource(Section):
    """scikit-learn's bundled 8x8 handwritten digits, upscaled to RGB; no download.

    ``split`` picks a fixed stratified 80/20 division of the 1,797 images, so that a train and a
    val source never share an image. ``classes`` selects digits (relabelled 0..k-1 in the given
    order); ``per_class`` keeps that many images of each class, chosen with ``seed`` (by
    default the recipe's, so ``--set seed=N`` draws other images too).
    """

    type: Literal["digits"]
    split: Literal["train", "val", "all"] = "all"
    classes: list[Annotated[int, Field(ge=0, le=9)]] = list(range(10))
    per_class: PositiveInt | None = None
    seed: int | None = None  # None: the recipe's seed

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or len(value) < 2:
            raise ValueError("needs at least two distinct digits")
        return value


class FakeSource(Section):
    """Random images (torchvision's ``FakeData``), for tests and benchmarks."""

    type: Literal["fake"]
    num_samples: PositiveInt = 64
    num_classes: Annotated[int, Field(ge=2)] = 4
    seed: int | None = None  # None: the recipe's seed


DataSource = Annotated[
    ImageFolderSource | ManifestSource | TorchvisionSource | DigitsSource | FakeSource,
    Field(discriminator="type"),
]

# Every source class, and every value of ``type`` (pydantic puts it into error paths).
SOURCE_CLASSES: tuple[type[Section], ...] = get_args(get_args(DataSource)[0])
SOURCE_TYPES: tuple[str, ...] = tuple(
    tag for cls in SOURCE_CLASSES for tag in get_args(cls.model_fields["type"].annotation)
)
