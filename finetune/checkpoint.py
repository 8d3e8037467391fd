"""The run folder: resolved recipe, metrics, summary, classes and the last/best checkpoints.

Layout (a contract scripts rely on)::

    checkpoints/<name>/<timestamp>/
      recipe.yaml  metrics.jsonl  summary.json  classes.json  load_report.json
      last/  best/          model.safetensors + state.pt (optimizer, scheduler, scaler, epoch, RNG)
      model.safetensors     -> best/model.safetensors: "the run's model", for `pretrained:` paths
      plots/curves.png
    checkpoints/<name>/latest -> <timestamp>

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file. ``state.pt`` holds only tensors and plain values: it loads with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from finetune.errors import UserError
from finetune.weights import WEIGHTS_FILE, read_state_dict

STATE_FILE = "state.pt"


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


def new_run_dir(output_dir: Path, name: str) -> Path:
    """``<output_dir>/<name>/<timestamp>``, unique even for two runs in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = output_dir / name
    candidate, n = parent / stamp, 1
    while candidate.exists():
        candidate, n = parent / f"{stamp}-{n}", n + 1
    return candidate


def link_latest(run_dir: Path) -> None:
    """Point ``<run_dir>/../latest`` at this run."""
    replace_with_link(run_dir.parent / "latest", run_dir.name)


def replace_with_link(link: Path, target: str) -> None:
    """Make ``link`` a symbolic link to ``target`` (relative to it), atomically, replacing any
    link or file there (a run folder copied with its links followed holds a file)."""
    tmp = link.parent / f".{link.name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


class RunFolder:
    """Writes and reads one run folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--run-dir: cannot create {self.path}: {error}") from None

    # ------------------------------------------------------------------------ metadata
    def write_recipe(self, recipe_yaml: str) -> None:
        atomic_write_text(self.path / "recipe.yaml", recipe_yaml)

    def write_classes(self, classes: list[str]) -> None:
        write_json(self.path / "classes.json", {str(i): name for i, name in enumerate(classes)})

    def read_classes(self) -> list[str]:
        mapping = json.loads((self.path / "classes.json").read_text())
        return [mapping[str(i)] for i in range(len(mapping))]

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)

    # ------------------------------------------------------------------------- metrics
    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Add one epoch's row, dropping rows of later epochs left by an interrupted run."""
        rows = [r for r in self.read_metrics() if r["epoch"] < row["epoch"]] + [row]
        atomic_write_text(self.path / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in rows))

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
            raise UserError(f"--resume: {folder}: weights (epoch {epoch}) and state "
                            f"(epoch {state['epoch']}) disagree; the save was interrupted")
        return tensors, state


def rng_state() -> dict[str, Any]:
    """The random generators that training draws from (python, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
