"""The run folder: the only module that knows where a run keeps each of its files.

Layout (a contract scripts rely on)::

    checkpoints/<name>/<timestamp>/
      recipe.yaml  metrics.jsonl  summary.json  classes.json  normalization.json
      load_report.json
      ckpt/e0003-s000000/   one checkpoint: model.safetensors, state.safetensors, state.json,
                            and frozen.safetensors when some parameters do not train
      last -> ckpt/...      the newest checkpoint (what --resume continues from)
      best -> ckpt/...      the checkpoint of the best epoch
      model.safetensors     -> best/model.safetensors: "the run's model", for `pretrained:` paths
      plots/curves.png  lr_find/  export/
    checkpoints/<name>/latest -> <timestamp>

A checkpoint is one atomic commit (``commit_checkpoint``): its files are written and fsynced in
a fresh staging folder, the folder is renamed to its final name, and only then do the ``last``
(and ``best``) links move, each with one ``os.replace``. A kill at any instant leaves the
previous checkpoint whole and the links pointing at complete folders; ``recover`` (on
``--resume``) takes the newest complete checkpoint, repairs the links, removes what an
interrupted save left, and rewrites ``metrics.jsonl`` from the checkpoint, which carries every
row up to its position. Other files are written to a temporary name and renamed into place.
Nothing in a checkpoint is a pickle: tensors are safetensors, the rest JSON.

A checkpoint writes what changed. Parameters that do not train (``requires_grad`` off) go to
``frozen.safetensors``, written once and hard-linked into each later checkpoint while its values
are bit-identical to theirs; ``model.safetensors`` holds the rest (the trained parameters and
every buffer) and records the frozen file's name and checksum, and finetune's readers
(``read_model_safetensors``) merge the two. A hard link makes every checkpoint folder whole on
its own: pruning the checkpoint that first wrote the file leaves the data to the others. When
some of those values change (a stage unfrozen), that checkpoint writes a new frozen file with
the tensors still unchanged, and the changed ones go to its ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.errors import UserError
from finetune.state_files import read_state, write_state
from finetune.weights import (
    CHECKSUM_KEY,
    FROZEN_CHECKSUM_KEY,
    FROZEN_FILE_KEY,
    read_model_safetensors,
    write_safetensors,
)

WEIGHTS_FILE = "model.safetensors"
FROZEN_FILE = "frozen.safetensors"  # a checkpoint's parameters that do not train (hard-linked)
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
CHECKPOINTS = "ckpt"
STAGING = ".staging-"  # prefix of a checkpoint being written
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
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The file gets the permissions the umask gives a new file. A write that fails (a full disk,
    no permission) leaves no temporary file and is a ``UserError`` naming ``path``.
    """
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private (0600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write (disk full, permissions, read-only file system) into a UserError."""
    try:
        yield
    except OSError as error:
        if error.errno in (
            errno.ENOSPC,
            errno.EDQUOT,
            errno.EACCES,
            errno.EPERM,
            errno.EROFS,
            errno.ENOTDIR,
            errno.EEXIST,
        ):
            raise UserError(f"{path}: cannot write ({error.strerror or error})") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
def claim_run_dir(output_dir: Path, name: str) -> Path:
    """Create and return ``<output_dir>/<name>/<timestamp>``: the folder is claimed by its
    ``mkdir``, so two runs started in the same second get ``<timestamp>`` and
    ``<timestamp>-1``, never one folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = output_dir / name
    with _writing(parent):
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            candidate = parent / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return candidate
    raise UserError(f"{parent}: cannot find a free run folder name for {stamp}")


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


def checkpoint_name(epoch: int, step: int) -> str:
    """``e0003-s000120-<ns>``: after ``epoch`` whole epochs and ``step`` optimizer steps of the
    next, made unique by the time; names sort in training order."""
    return f"e{epoch:04d}-s{step:06d}-{time.time_ns()}"


class RunFolder:
    """Writes and reads one run folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def create(self) -> None:
        """Make the folder (``--run-dir``: it may exist already, e.g. to continue in it)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(
                f"{self.path}: cannot create the run folder: {error.strerror or error}"
            ) from None

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

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files (``output.tensorboard``): ``tensorboard --logdir
        checkpoints`` lists every run by its folder."""
        return self.path / "tensorboard"

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

    # ----------------------------------------------------------------------- checkpoints
    def commit_checkpoint(
        self, model: torch.nn.Module, state: dict[str, Any], *, best: bool
    ) -> str:
        """Save ``model`` and ``state`` as one checkpoint, make it ``last`` (and ``best``), and
        return its name (with ``best``, also recorded as the state's ``best_checkpoint``).

        ``state`` carries ``epoch``, ``step`` and the ``history`` of metrics rows so far; the
        metrics file is rewritten from it, so it never runs ahead of or behind the checkpoint.
        """
        folder = self.path / CHECKPOINTS
        name = checkpoint_name(state["epoch"], state["step"])
        if best:
            state = {**state, "best_checkpoint": name}
        with _writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=folder))
            try:
                self._write_checkpoint(staging, model, state)
                os.rename(staging, folder / name)  # the commit: a complete folder or none
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _fsync(folder)
            replace_with_link(self.path / "last", f"{CHECKPOINTS}/{name}")
            if best:
                replace_with_link(self.path / "best", f"{CHECKPOINTS}/{name}")
                if not (self.path / WEIGHTS_FILE).is_symlink():
                    replace_with_link(self.path / WEIGHTS_FILE, f"best/{WEIGHTS_FILE}")
            _fsync(self.path)
        self._write_metrics(state["history"])
        self._prune()
        return name

    def _write_checkpoint(
        self, folder: Path, model: torch.nn.Module, state: dict[str, Any]
    ) -> None:
        folder.chmod(0o777 & ~_umask())  # mkdtemp makes folders private (0700)
        tensors = model.state_dict()
        metadata = {"epoch": str(state["epoch"]), "step": str(state["step"])}
        frozen = self._share_frozen(folder, tensors, _not_training(model))
        if frozen:
            metadata[FROZEN_FILE_KEY] = FROZEN_FILE
            metadata[FROZEN_CHECKSUM_KEY] = _recorded_checksum(folder / FROZEN_FILE)
        trained = {key: value for key, value in tensors.items() if key not in frozen}
        write_safetensors(trained, folder / WEIGHTS_FILE, metadata=metadata)
        written = [
            folder / WEIGHTS_FILE,
            *write_state(folder, state, tensors_file=STATE_TENSORS, json_file=STATE_JSON),
        ]
        _publish(written)
        _fsync(folder)

    def _share_frozen(
        self, folder: Path, tensors: dict[str, torch.Tensor], candidates: set[str]
    ) -> set[str]:
        """Put the tensors that do not train in ``folder``'s frozen file; return their keys.

        While the ``last`` checkpoint's frozen file holds exactly these values, bit for bit, the
        file is hard-linked, not written. Otherwise a new one is written: at the first
        checkpoint with every parameter that does not train, later with those of the previous
        file that still have the same value and still do not train (a tensor that changed is
        never taken from it).
        """
        previous = self.path / "last" / FROZEN_FILE
        same, stored = _unchanged(tensors, previous) if previous.is_file() else (candidates, set())
        keys = same & candidates
        target = folder / FROZEN_FILE
        if keys and keys == stored:
            try:
                os.link(previous.resolve(), target)
                return keys
            except OSError:  # a file system without hard links: write the file instead
                pass
        if keys:
            write_safetensors({key: tensors[key] for key in keys}, target)
            _publish([target])
        return keys

    def _prune(self) -> None:
        """Remove checkpoints that neither ``last`` nor ``best`` points at, and staging folders
        an interrupted save left."""
        kept = {
            link.resolve() for link in (self.path / "last", self.path / "best") if link.exists()
        }
        for folder in (self.path / CHECKPOINTS).iterdir():
            if folder.resolve() not in kept:
                shutil.rmtree(folder, ignore_errors=True)

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))

    def recover(self) -> Path | None:
        """Before a resume: the newest complete checkpoint (``None`` if there is none), with
        ``last`` and ``best`` pointing where it says, leftovers of an interrupted save removed,
        ``metrics.jsonl`` cut back to the rows it covers, and the last summary removed: it
        describes how an invocation ended, and this one has not (it is written again when this
        one ends), so no stale summary sits beside newer checkpoints."""
        (self.path / SUMMARY_FILE).unlink(missing_ok=True)
        folder = self.path / CHECKPOINTS
        complete = (
            sorted(
                path
                for path in folder.glob("e*-s*")
                if not path.name.startswith(STAGING) and _is_complete(path)
            )
            if folder.is_dir()
            else []
        )
        if not complete:
            if folder.is_dir():
                shutil.rmtree(folder)
            for link in ("last", "best", WEIGHTS_FILE):
                (self.path / link).unlink(missing_ok=True)
            (self.path / METRICS_FILE).unlink(missing_ok=True)
            return None
        newest = complete[-1]
        state = self.read_checkpoint_state(newest)
        for copied in (self.path / "last", self.path / "best"):
            if copied.is_dir() and not copied.is_symlink():  # a copy made with links followed
                shutil.rmtree(copied)
        replace_with_link(self.path / "last", f"{CHECKPOINTS}/{newest.name}")
        best = state.get("best_checkpoint")
        if best and (folder / best).is_dir():
            replace_with_link(self.path / "best", f"{CHECKPOINTS}/{best}")
            replace_with_link(self.path / WEIGHTS_FILE, f"best/{WEIGHTS_FILE}")
        self._write_metrics(state["history"])
        self._prune()
        return newest

    def read_checkpoint_state(self, checkpoint: Path) -> dict[str, Any]:
        return read_state(checkpoint, tensors_file=STATE_TENSORS, json_file=STATE_JSON)

    def load_checkpoint(self, tag: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model tensors, state) of the checkpoint ``tag`` points at, checked to belong to the
        same position."""
        folder = self.path / tag
        if not _is_complete(folder):
            raise UserError(f"{folder}: no complete checkpoint here")
        state = self.read_checkpoint_state(folder)
        tensors, metadata = read_model_safetensors(folder / WEIGHTS_FILE)  # checksums verified
        position = {key: metadata.get(key) for key in ("epoch", "step")}
        if position != {"epoch": str(state.get("epoch")), "step": str(state.get("step"))}:
            raise UserError(
                f"{folder}: its weights ({position}) and state (epoch "
                f"{state.get('epoch')}, step {state.get('step')}) disagree"
            )
        return tensors, state


def _publish(paths: list[Path]) -> None:
    """Give new files the umask's permissions and flush them to the disk."""
    for path in paths:
        path.chmod(0o666 & ~_umask())
        _fsync(path)


def _not_training(model: torch.nn.Module) -> set[str]:
    """The state-dict keys of the parameters that get no gradient (tied names included)."""
    return {
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if not param.requires_grad
    }


def _unchanged(tensors: dict[str, torch.Tensor], path: Path) -> tuple[set[str], set[str]]:
    """(the keys of ``path``'s tensors that ``tensors`` holds with the same dtype, shape and
    bytes, all its keys). A file that cannot be read holds nothing: a new one is written."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt", device="cpu") as handle:
            stored = set(handle.keys())
            same = {
                key
                for key in stored
                if key in tensors and _same_bytes(tensors[key], handle.get_tensor(key))
            }
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return set(), set()
    return same, stored


def _same_bytes(tensor: torch.Tensor, stored: torch.Tensor) -> bool:
    """Bit-identical: compared as integers of the element's width, since comparing values
    would take -0.0 for 0.0 and a NaN for a change. numpy compares a resnet18 in 20 ms where
    ``torch.equal`` takes 0.4 s on a busy 2-core machine."""
    if tensor.dtype != stored.dtype or tensor.shape != stored.shape:
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(tensor.element_size(), torch.int64)
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(bits)
    return np.array_equal(flat.numpy(), stored.contiguous().reshape(-1).view(bits).numpy())


def _recorded_checksum(path: Path) -> str:
    """The checksum ``write_safetensors`` recorded in ``path`` (its header only is read)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt", device="cpu") as handle:
        return (handle.metadata() or {})[CHECKSUM_KEY]


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (WEIGHTS_FILE, STATE_TENSORS, STATE_JSON))
