"""The run folder: the only module that knows where a run keeps each of its files.

Layout (a contract scripts rely on)::

    checkpoints/<name>/<timestamp>/
      recipe.yaml  metrics.jsonl  summary.json  classes.json  normalization.json
      load_report.json
      last/  best/          model.safetensors + state.pt (optimizer, scheduler, scaler, epoch, RNG)
      model.safetensors     -> best/model.safetensors: "the run's model", for `pretrained:` paths
      plots/curves.png  lr_find/  export/
    checkpoints/<name>/latest -> <timestamp>

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file. ``state.pt`` holds only tensors and plain values: it loads with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from finetune.errors import UserError
from finetune.weights import read_state_dict

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
RECIPE_FILE = "recipe.yaml"
CLASSES_FILE = "classes.json"
NORMALIZATION_FILE = "normalization.json"
LOAD_REPORT_FILE = "load_report.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LATEST = "latest"
TAGS = ("best", "last")  # the checkpoints a run keeps, in the order a weights lookup tries them


# ------------------------------------------------------------------------------ atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def replace_with_link(link: Path, target: str) -> None:
    """Make ``link`` a symbolic link to ``target`` (relative to it), atomically, replacing any
    link or file there (a run folder copied with its links followed holds a file)."""
    tmp = link.parent / f".{link.name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


# ------------------------------------------------------------------------------ finding runs
def new_run_dir(output_dir: Path, name: str) -> Path:
    """``<output_dir>/<name>/<timestamp>``, unique even for two runs in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = output_dir / name
    candidate, n = parent / stamp, 1
    while candidate.exists():
        candidate, n = parent / f"{stamp}-{n}", n + 1
    return candidate


def latest_run(output_dir: Path, name: str) -> Path:
    """``<output_dir>/<name>/latest``: the recipe's most recent run (a link)."""
    return output_dir / name / LATEST


def find_run_folder(path: Path) -> Path:
    """The run folder that holds ``path`` (itself, or a parent of a checkpoint inside it)."""
    for candidate in (path, *path.parents[:3]):
        if (candidate / RECIPE_FILE).is_file() and (candidate / CLASSES_FILE).is_file():
            return candidate
    raise UserError(f"{path}: not inside a run folder (no {RECIPE_FILE} and {CLASSES_FILE} found)")


def weights_file(path: str | Path) -> Path:
    """A weights file, or the one a folder stands for (``best/``, else ``last/``).

    A folder may be a run folder, its ``best/`` or ``last/``, or a recipe's output folder
    holding a ``latest`` link.
    """
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / tag / WEIGHTS_FILE for tag in TAGS]
    candidates += [path / WEIGHTS_FILE, path / LATEST / TAGS[0] / WEIGHTS_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise UserError(f"{path}: a folder without {WEIGHTS_FILE} (nor best/ or last/ with one)")
    raise UserError(f"weights file not found: {path}")


def is_resumable(path: Path) -> bool:
    """Whether ``path`` is a run folder with a ``last/`` checkpoint to continue from."""
    return (path / RECIPE_FILE).is_file() and (path / "last").is_dir()


class RunFolder:
    """Writes and reads one run folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--run-dir: cannot create {self.path}: {error}") from None

    def link_latest(self) -> None:
        """Point ``<run folder>/../latest`` at this run."""
        replace_with_link(self.path.parent / LATEST, self.path.name)

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def lr_find(self) -> Path:
        return self.path / "lr_find"

    @property
    def export(self) -> Path:
        """Where ``finetune export`` writes by default."""
        return self.path / "export"

    def weights(self, tag: str = "best") -> Path:
        return self.path / tag / WEIGHTS_FILE

    # ------------------------------------------------------------------------ metadata
    def write_start(
        self,
        *,
        recipe_yaml: str,
        classes: list[str],
        normalization: dict[str, Any],
        load_report: dict[str, Any] | None,
    ) -> None:
        """What a run knows before its first step: recipe, classes, normalisation, load report."""
        atomic_write_text(self.recipe_file, recipe_yaml)
        write_json(self.path / CLASSES_FILE, {str(i): name for i, name in enumerate(classes)})
        write_json(self.path / NORMALIZATION_FILE, normalization)
        if load_report is not None:
            write_json(self.path / LOAD_REPORT_FILE, load_report)

    def read_classes(self) -> list[str]:
        mapping = json.loads((self.path / CLASSES_FILE).read_text())
        return [mapping[str(i)] for i in range(len(mapping))]

    def read_normalization(self) -> dict[str, Any] | None:
        """The mean/std the run trained with (``None`` for runs older than the file)."""
        path = self.path / NORMALIZATION_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY_FILE, summary)

    # ------------------------------------------------------------------------- metrics
    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Add one epoch's row, dropping rows of later epochs left by an interrupted run."""
        rows = [r for r in self.read_metrics() if r["epoch"] < row["epoch"]] + [row]
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))

    # ----------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, tag: str, model: torch.nn.Module, state: dict[str, Any]) -> None:
        """``<tag>/model.safetensors`` then ``<tag>/state.pt`` (both carry the epoch)."""
        folder = self.path / tag
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"epoch": str(state["epoch"])})
        os.replace(tmp, folder / WEIGHTS_FILE)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".state.", suffix=".tmp")
        os.close(fd)
        torch.save(state, tmp)
        os.replace(tmp, folder / STATE_FILE)
        if tag == "best":
            replace_with_link(self.path / WEIGHTS_FILE, f"{tag}/{WEIGHTS_FILE}")

    def load_checkpoint(self, tag: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model tensors, state) of ``<tag>/``, checked to belong to the same epoch."""
        folder = self.path / tag
        if not (folder / STATE_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise UserError(f"--resume: {folder} has no complete checkpoint to resume from")
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        tensors = read_state_dict(folder / WEIGHTS_FILE)
        from safetensors import safe_open

        with safe_open(folder / WEIGHTS_FILE, "pt") as handle:
            epoch = (handle.metadata() or {}).get("epoch")
        if epoch != str(state["epoch"]):
            raise UserError(
                f"--resume: {folder}: weights (epoch {epoch}) and state "
                f"(epoch {state['epoch']}) disagree; the save was interrupted"
            )
        return tensors, state
