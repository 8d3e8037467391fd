"""Reading weight files safely and loading them partially into a model, with a report.

Every user brings weights from somewhere else: a torchvision checkpoint, a DataParallel save, a run
of ours with another head. ``load_partial`` renames keys by explicit rules, loads what fits, and
returns a ``LoadReport`` that names everything it did not load, so nothing is dropped silently.
"""

from __future__ import annotations

import fnmatch
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from finetune.errors import UserError

WEIGHTS_FILE = "model.safetensors"
TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
# Containers that training scripts wrap a state_dict in, most specific first.
NESTED_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "module")
COMMON_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "net.", "_orig_mod.")


def resolve_weights_path(path: str | Path) -> Path:
    """A weights file, or the file inside a run folder (``best/``, else ``last/``).

    A directory may be a run folder, a ``best/`` or ``last/`` folder, or a recipe's output folder
    holding a ``latest`` link.
    """
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / WEIGHTS_FILE, path / "best" / WEIGHTS_FILE, path / "last" / WEIGHTS_FILE,
                      path / "latest" / "best" / WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise UserError(f"{path}: a folder without {WEIGHTS_FILE} (nor best/ or last/ with one)")
    raise UserError(f"weights file not found: {path}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors or torch file, unwrapped from ``state_dict``/``model``/... keys.

    Torch files are read with ``weights_only=True``: a pickle that needs code to run is refused.
    """
    path = resolve_weights_path(path)
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    else:
        raise UserError(f"{path}: unknown weights format; use .safetensors, "
                        f"{', '.join(sorted(TORCH_SUFFIXES))}")
    return _unwrap(state, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path}: refused to load: the file needs code execution to unpickle "
            f"(weights_only=True). Re-save it as a plain state_dict or safetensors. ({error})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise UserError(f"{path}: not a readable torch file, truncated or corrupt ({error})") from None


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not _is_tensor_mapping(state):
        inner = next((state[key] for key in NESTED_KEYS if isinstance(state.get(key), Mapping)), None)
        if inner is None:
            raise UserError(f"{path}: no state_dict found; top-level keys: {sorted(state)[:10]}")
        state = inner
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: expected a state_dict, found {type(state).__name__}")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _is_tensor_mapping(state: Mapping) -> bool:
    return bool(state) and all(isinstance(value, torch.Tensor) for value in state.values())


@dataclass
class LoadReport:
    """What ``load_partial`` did: every key of the model and of the file is in one list."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[dict] = field(default_factory=list)  # {key, file_shape, model_shape}
    excluded: list[str] = field(default_factory=list)
    suggestion: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name))
                for name in ("loaded", "missing", "unexpected", "mismatched", "excluded")}

    @property
    def almost_nothing_loaded(self) -> bool:
        expected = len(self.loaded) + len(self.missing)
        return expected > 0 and len(self.loaded) < 0.5 * expected

    def to_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts}


def load_partial(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    strip_prefix: Iterable[str] = (),
    add_prefix: str = "",
    rename: Mapping[str, str] | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    on_shape_mismatch: str = "skip",
    strict: bool = False,
    new_head: Iterable[str] = (),
) -> LoadReport:
    """Load the tensors of ``source`` that fit ``model`` and report on every key.

    Key rules apply in this order: ``strip_prefix`` (each prefix, once), ``add_prefix``,
    ``rename`` (regex -> replacement, in order), then ``include``/``exclude`` globs on the renamed
    key. Tensors whose shape differs from the model's are skipped and reported, or raise with
    ``on_shape_mismatch="error"``. With ``strict``, any model tensor outside ``new_head`` (glob
    patterns of the freshly made head) that stays unloaded is an error.

    Example:
        >>> report = load_partial(model, "resnet50_tv.pth", exclude=["fc.*"])
        >>> report.counts["missing"]
    """
    if on_shape_mismatch not in {"skip", "error"}:
        raise UserError(f"on_shape_mismatch must be skip or error, got {on_shape_mismatch!r}")
    name = str(source) if not isinstance(source, Mapping) else "<state_dict>"
    file_state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    target = model.state_dict()
    report = LoadReport(source=name)
    renamed = _renamed(file_state, tuple(strip_prefix), add_prefix, dict(rename or {}))
    include, exclude = list(include), list(exclude)
    to_load = {}
    for key, tensor in renamed.items():
        if (include and not _matches(key, include)) or _matches(key, exclude):
            report.excluded.append(key)
        elif key not in target:
            report.unexpected.append(key)
        elif tensor.shape != target[key].shape:
            report.mismatched.append({"key": key, "file_shape": list(tensor.shape),
                                      "model_shape": list(target[key].shape)})
        else:
            to_load[key] = tensor
    report.loaded = sorted(to_load)
    report.missing = sorted(set(target) - set(to_load))
    if report.mismatched and on_shape_mismatch == "error":
        shapes = [f"{m['key']}: file {m['file_shape']} vs model {m['model_shape']}"
                  for m in report.mismatched]
        raise UserError(f"{name}: tensors with the wrong shape (on_shape_mismatch: error)", shapes)
    if strict:
        _check_strict(report, list(new_head))
    if report.almost_nothing_loaded:
        report.suggestion = _suggest_prefix(file_state, target)
    model.load_state_dict(to_load, strict=False)
    return report


def _renamed(state: Mapping[str, torch.Tensor], strip: tuple[str, ...], add: str,
             rename: dict[str, str]) -> dict[str, torch.Tensor]:
    result = {}
    for key, tensor in state.items():
        for prefix in strip:
            key = key.removeprefix(prefix)
        key = add + key
        for pattern, replacement in rename.items():
            key = re.sub(pattern, replacement, key)
        result[key] = tensor
    return result


def _matches(key: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _check_strict(report: LoadReport, new_head: list[str]) -> None:
    unloaded = [key for key in report.missing if not _matches(key, new_head)]
    if unloaded:
        raise UserError(f"{report.source}: strict load left {len(unloaded)} model tensors "
                        "unloaded", unloaded[:20])


def _suggest_prefix(file_state: Mapping[str, torch.Tensor], target: Mapping) -> str | None:
    """The prefix rule under which most file keys would find a model key, if any helps."""
    first_parts = Counter(key.split(".", 1)[0] + "." for key in file_state if "." in key)
    candidates = {f"strip_prefix: [{p}]": p for p, _ in first_parts.most_common(3)}
    candidates.update({f"strip_prefix: [{p}]": p for p in COMMON_PREFIXES})
    best, best_hits = None, sum(key in target for key in file_state)
    for rule, prefix in candidates.items():
        hits = sum(key.removeprefix(prefix) in target for key in file_state)
        if hits > best_hits:
            best, best_hits = rule, hits
    for prefix in COMMON_PREFIXES:
        hits = sum(prefix + key in target for key in file_state)
        if hits > best_hits:
            best, best_hits = f"add_prefix: {prefix}", hits
    return f"{best} would match {best_hits} of {len(file_state)} keys" if best else None
