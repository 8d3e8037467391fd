"""Checking every image file before a run starts (``data.verify``), so a bad file stops the run
before its folder exists rather than in the middle of an epoch.

``header`` opens each file and reads its header (format and size, no pixels: about as cheap as
listing the folder); ``full`` decodes every image as training will; ``none`` checks nothing. Only
image files are checked (image folders and manifests); generated and torchvision sources have
none. Files are checked by a thread pool: Pillow releases the GIL while it reads and decodes.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import track

from finetune.data import Datasets
from finetune.errors import UserError
from finetune.images import BadImageError, load_rgb
from finetune.sources import ImageFiles

PROGRESS_FROM = 2000  # files; fewer are checked before a bar would be worth drawing
CHUNK = 4096  # files handed to the pool at a time
LISTED = 10  # bad files named in the error; the rest are counted
VERIFY_CHOICES = ("header", "full", "none")


@dataclass
class VerifyReport:
    """What ``verify_images`` checked: how many files, which could not be read (path, reason)."""

    verify: str
    checked: int = 0
    bad: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0


def verify_images(
    datasets: Datasets,
    *,
    verify: Literal["header", "full", "none"] = "header",
    on_bad_image: Literal["error", "skip"] = "error",
    num_workers: int = 0,
    progress: bool = True,
) -> VerifyReport:
    """Check that every image file of the training, validation and test splits can be read.

    Args:
        datasets: the splits, as ``finetune.data.build_datasets`` made them.
        verify: ``header`` (open each file and read its header), ``full`` (decode every image)
            or ``none``.
        on_bad_image: ``error`` raises; ``skip`` warns with a count and leaves the bad files to
            the loader, which skips them.
        num_workers: loader processes (``data.num_workers``, resolved): the pool uses as many
            threads, and at least a few, since the check waits on the disk more than the CPU.
        progress: a progress bar for large folders (more than ``PROGRESS_FROM`` files), on a
            terminal only.

    Raises:
        UserError: with ``error``, naming the first bad files, what is wrong with each, and how
            many there are in all; with ``skip``, when no image of a split can be read.

    Example:
        >>> report = verify_images(datasets, verify="full")  # doctest: +SKIP
        >>> report.checked, report.bad
        (18, [])
    """
    if verify not in VERIFY_CHOICES:
        raise ValueError(f"verify: expected {' | '.join(VERIFY_CHOICES)}, got {verify!r}")
    report = VerifyReport(verify)
    splits = _image_splits(datasets)
    files = list(dict.fromkeys(path for _, paths in splits for path in paths))
    if verify == "none" or not files:
        return report
    check = _read_header if verify == "header" else _decode
    threads = max(1, num_workers, min(4, os.cpu_count() or 1))
    started = time.perf_counter()
    with ThreadPoolExecutor(threads, thread_name_prefix="verify") as pool:
        # In chunks: pool.map submits every file at once (a million futures for ImageNet).
        chunks = (files[i : i + CHUNK] for i in range(0, len(files), CHUNK))
        checked = (problem for chunk in chunks for problem in pool.map(check, chunk))
        results = _collect(checked, len(files), progress=progress)
        problems = {path: problem for path, problem in zip(files, results, strict=True) if problem}
    report.checked, report.seconds = len(files), time.perf_counter() - started
    report.bad = list(problems.items())
    if not report.bad:
        return report
    if on_bad_image == "error":
        raise UserError(_message(report))
    for key, paths in splits:
        if all(path in problems for path in paths):
            raise UserError(
                f"{key}: none of its {len(paths)} images can be read\n{_listing(report)}"
            )
    warnings.warn(
        f"data.verify: {len(report.bad)} of {report.checked} images cannot be read and will be "
        f"skipped (data.on_bad_image: skip), e.g. {report.bad[0][0]}: {report.bad[0][1]}",
        stacklevel=2,
    )
    return report


def _image_splits(datasets: Datasets) -> list[tuple[str, list[Path]]]:
    """(recipe key, image paths) of each split read from image files, in sample order."""
    splits = {"data.train": datasets.train, "data.val": datasets.val, "data.test": datasets.test}
    return [
        (key, [Path(split.source.samples[i][0]) for i in split.indices])
        for key, split in splits.items()
        if split is not None and isinstance(split.source, ImageFiles)
    ]


def _read_header(path: Path) -> str | None:
    """What is wrong with ``path``'s header (``None``: nothing). Pillow reads the header on
    open and the pixels only on ``load()``, so this costs one small read per file."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            width, height = image.size
        if width == 0 or height == 0:
            return f"its header gives a size of {width}x{height}"
    except UnidentifiedImageError:
        return "not an image (Pillow does not recognise its contents)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"cannot read its header ({error})"
    return None


def _decode(path: Path) -> str | None:
    """What is wrong with ``path`` when decoded as training will decode it (``None``: nothing)."""
    problem = _read_header(path)  # the clearer message for an empty or non-image file
    if problem is not None:
        return problem
    try:
        load_rgb(path)
    except BadImageError as error:
        return str(error).removeprefix(f"{path}: ")
    return None


def _collect(results: Iterable[str | None], total: int, *, progress: bool) -> list[str | None]:
    """``list(results)``, behind a transient bar on a terminal when there are many files."""
    if not progress or total <= PROGRESS_FROM or not sys.stderr.isatty():
        return list(results)
    console = Console(stderr=True)
    return list(track(results, "checking images", total, transient=True, console=console))


def _listing(report: VerifyReport) -> str:
    lines = [f"  {path}: {problem}" for path, problem in report.bad[:LISTED]]
    if len(report.bad) > LISTED:
        lines.append(f"  ... and {len(report.bad) - LISTED} more")
    return "\n".join(lines)


def _message(report: VerifyReport) -> str:
    count = len(report.bad)
    return (
        f"data.verify: {count} of {report.checked} image files cannot be read "
        f"({report.verify} check):\n{_listing(report)}\n"
        "fix or remove these files, or set data.on_bad_image: skip to train without them"
    )
