"""Reading and writing weight files safely, and loading them partially into a model, with a report.

Every user brings weights from somewhere else: a torchvision checkpoint, a DataParallel save, a run
of ours with another head. ``load_partial`` renames keys by explicit rules, loads what fits, and
returns a ``LoadReport`` that names everything it did not load, so nothing is dropped silently.

Nothing read here can run code: torch files are unpickled with ``weights_only=True`` (and torch's
advice to retry without it is never passed on), safetensors files are data. The safetensors files
finetune writes (``write_safetensors``) carry a checksum of their tensors and metadata, verified on
every read; and every tensor is checked against the model before it is loaded into it
(``check_fits``: dtype kind, shape, finite values), since a file's header says nothing about
whether its values make sense.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import UserError, at_most
from finetune.load_suggestion import key_examples, suggest_rule
from finetune.patterns import matches_any, unmatched_patterns

TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
# Entries that training scripts wrap a state_dict in, tried in this order (``load.key`` picks one).
NESTED_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema", "ema")
# Prefixes that wrappers add to every key: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LISTED = 20  # keys listed in an error; the rest are counted
# Harmless classes that checkpoints carry beside the weights (torchvision's reference scripts
# save their argparse options): allowed by the weights_only unpickler.
SAFE_GLOBALS = [argparse.Namespace]
# The safetensors metadata key holding the checksum ``write_safetensors`` records.
CHECKSUM_KEY = "finetune_sha256"
# The metadata keys of a run-folder checkpoint's model.safetensors whose unchanged (frozen)
# tensors are in a second file beside it: that file's name, and the checksum recorded in it.
FROZEN_FILE_KEY, FROZEN_CHECKSUM_KEY = "finetune_frozen_file", "finetune_frozen_sha256"


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors or torch file, unwrapped from ``state_dict``/``model``/... keys.

    Torch files are read with ``weights_only=True``: a pickle that needs code to run is refused.

    Args:
        key: the entry of a nested checkpoint to read (e.g. ``state_dict_ema``); by default the
            first of ``NESTED_KEYS`` that holds tensors.
    """
    return read_checkpoint(path, key)[0]


def read_checkpoint(
    path: str | Path, key: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``read_state_dict`` plus the nested keys it went through (``["state_dict"]``)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path}: a folder; give a weights file (for a run folder, "
            "finetune.run_folder.weights_file finds its best/ weights)"
        )
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state: object = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    else:
        raise UserError(
            f"{path}: unknown weights format; use .safetensors, {', '.join(sorted(TORCH_SUFFIXES))}"
        )
    return _unwrap(state, path, key)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_model_safetensors(path)[0]


def read_model_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``read_safetensors``, plus the frozen tensors a run-folder checkpoint keeps beside it.

    A checkpoint's ``model.safetensors`` holds the tensors that changed; when its metadata names
    a frozen file (``frozen.safetensors``, in the folder the file really is in, links followed),
    that file's tensors complete it. The pair must be the one written together: the frozen
    file's checksum is recorded in the model file.

    Raises:
        UserError: naming the files, when the frozen file is missing or not the one recorded.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    name = metadata.get(FROZEN_FILE_KEY)
    if name is None:
        return tensors, metadata
    if Path(name).name != name:  # a file beside it, never a path to elsewhere
        raise UserError(f"{path}: names {name!r} as its frozen file: not a file name")
    frozen_path = path.resolve().parent / name
    if not frozen_path.is_file():
        raise UserError(
            f"{path}: its frozen tensors are in {name} beside it ({frozen_path}), which is "
            "missing: copy checkpoint folders whole"
        )
    frozen, frozen_metadata = read_safetensors(frozen_path)
    if frozen_metadata.get(CHECKSUM_KEY) != metadata.get(FROZEN_CHECKSUM_KEY):
        raise UserError(
            f"{frozen_path}: not the frozen tensors {path} was written with (their checksums "
            "differ); use the checkpoint folder as it was written"
        )
    return {**frozen, **tensors}, metadata  # a tensor in both: the checkpoint's own wins


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, its checksum verified when it has one.

    Raises:
        UserError: naming the file, when it is unreadable, truncated, or does not match the
            checksum ``write_safetensors`` recorded in it (changed or damaged since).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        raise UserError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({error})"
        ) from None
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is not None and recorded != tensors_checksum(tensors, metadata):
        raise UserError(
            f"{path}: damaged or altered: its tensors or metadata do not match the checksum "
            "finetune recorded when it wrote the file; use an intact copy"
        )
    return tensors, metadata


def tensors_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and every metadata entry but the
    checksum itself, in sorted order: the same whatever the file's layout."""
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != CHECKSUM_KEY:
            digest.update(json.dumps(["meta", key, metadata[key]]).encode() + b"\n")
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        header = ["tensor", name, str(tensor.dtype), list(tensor.shape)]
        digest.update(json.dumps(header).encode() + b"\n")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
    return digest.hexdigest()


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file whose metadata records their checksum.

    ``read_state_dict`` and ``read_safetensors`` verify it, so a file changed or damaged after it
    was written is refused rather than loaded with wrong values. The file is written in place:
    write into a staging folder (or a temporary name) when it must appear atomically.

    Args:
        metadata: string entries to store beside the checksum (covered by it too).

    Example:
        >>> write_safetensors(model.state_dict(), "ckpt/model.safetensors", {"epoch": "3"})
    """
    from safetensors.torch import save_file

    if metadata and CHECKSUM_KEY in metadata:
        raise ValueError(f"metadata key {CHECKSUM_KEY!r} is reserved for the checksum")
    plain = _unshared(
        {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    )
    entries = dict(metadata or {})
    entries[CHECKSUM_KEY] = tensors_checksum(plain, entries)
    save_file(plain, str(path), metadata=entries)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with memory of its own: safetensors refuses tensors that share storage, as
    the parameters of a module used in several places do (CoaT's position encodings). Every
    name keeps its values, and loading puts them back into the one shared parameter."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return result


def _read_torch(path: Path) -> object:
    if _is_torchscript(path):  # refused here: torch.load would warn, then refuse with advice
        raise UserError(
            f"{path}: a TorchScript archive: a program, not weights (loading it would run code "
            "from the file); load its weights from a safetensors file or a plain state_dict"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a corrupt file
        raise UserError(f"{path}: {_torch_refusal(error)}") from None


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``constants.pkl``, as torch tells)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torch_refusal(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in our words. Torch's own message advises
    retrying with ``weights_only=False``, which would run the file's code: never passed on."""
    text = str(error)
    reason = _without_torch_advice(text) or type(error).__name__
    if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in text:
        # torch names the offending global ("Unsupported global: GLOBAL x.y", or "... GLOBAL
        # posix.system whose module posix is blocked").
        return (
            f"refused to load: unpickling it would run code ({reason}). If you trust the file, "
            "re-save its weights as a plain state_dict or as .safetensors and load that."
        )
    return f"not a readable torch weights file: truncated or corrupt, or more than data ({reason})"


# Sentences of torch.load's messages that advise loading with weights_only=False (or say the
# file "can still be loaded"), or point at torch's issue tracker and docs: not for our users.
_TORCH_ADVICE = (
    "weights_only",
    "weights only",
    "re-running",
    "trusted source",
    "still be loaded",
    "trust the source",
    "file an issue",
    "documentation",
)


def _without_torch_advice(text: str) -> str:
    sentences = [
        part.strip()
        for line in text.splitlines()
        for part in line.replace("WeightsUnpickler error:", "").split(". ")
        if part.strip()
    ]
    kept = [s.rstrip(".") for s in sentences if not any(a in s.lower() for a in _TORCH_ADVICE)]
    return kept[0] if kept else ""


def _unwrap(
    state: object, path: Path, key: str | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    trail: list[str] = []
    if key is not None:
        if not isinstance(state, Mapping) or not isinstance(state.get(key), Mapping):
            found = sorted(map(str, state))[:10] if isinstance(state, Mapping) else []
            raise UserError(f"{path}: model.load.key: no entry {key!r}; top-level keys: {found}")
        state, trail = state[key], [key]
    # A checkpoint holds the state_dict under a known entry, beside numbers and other dicts.
    while isinstance(state, Mapping):
        inner = next((name for name in NESTED_KEYS if isinstance(state.get(name), Mapping)), None)
        if inner is None:
            break
        state = state[inner]
        trail.append(inner)
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: expected a state_dict, found {type(state).__name__}")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(
            f"{path}: no state_dict found; top-level keys: {sorted(map(str, state))[:10]}"
        )
    return tensors, trail


# ------------------------------------------------------------------------------ model checks
def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def check_fits(
    tensors: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Refuse file tensors that cannot be values of the model's tensors of the same key.

    A file's header is checked by safetensors, its values are not: each tensor must have the
    model tensor's dtype kind (a float parameter never takes integers), its shape, and finite
    values wherever the model's own values are finite. Keys the model lacks are ignored.

    Raises:
        UserError: naming ``source`` and every tensor that does not fit.
    """
    problems = []
    for key, tensor in tensors.items():
        expected = target.get(key)
        if expected is None:
            continue
        if _kind(tensor.dtype) != _kind(expected.dtype):
            problems.append(
                f"{key}: {str(tensor.dtype).removeprefix('torch.')} in the file, but the model "
                f"holds {str(expected.dtype).removeprefix('torch.')}"
            )
        elif tensor.shape != expected.shape:
            problems.append(
                f"{key}: shape {list(tensor.shape)} in the file, the model's is "
                f"{list(expected.shape)}"
            )
        elif (
            tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())
            and bool(torch.isfinite(expected).all())  # a buffer may hold inf by design
        ):
            problems.append(f"{key}: holds NaN or infinite values")
    if problems:
        raise UserError(f"{source}: tensors that do not fit the model", at_most(problems, LISTED))


def load_weights(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str | Path
) -> None:
    """Load a complete state_dict into ``model``: every key, nothing more, each tensor checked
    with ``check_fits`` first.

    Raises:
        UserError: naming ``source``, for missing or unexpected keys or a tensor that does not
            fit; nothing is loaded then.
    """
    target = model.state_dict()
    missing = sorted(set(target) - set(tensors))
    unexpected = sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise UserError(
            f"{source}: does not fit the model ({len(missing)} of its tensors missing, "
            f"{len(unexpected)} unexpected)",
            [f"missing: {key}" for key in missing[:10]]
            + [f"unexpected: {key}" for key in unexpected[:10]],
        )
    check_fits(tensors, target, source=str(source))
    model.load_state_dict(dict(tensors))


# -------------------------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What ``load_partial`` did, by key of the model (after the renaming rules).

    ``loaded``: set from the file. ``missing``: model tensors left at their initial values
    (including those ``mismatched`` or ``excluded``). ``unexpected``: file tensors the model has
    no place for. ``mismatched``: ``{key, file_shape, model_shape}``, not loaded.
    ``excluded``: file keys dropped by ``include``/``exclude``.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggestion: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {
            name: len(getattr(self, name))
            for name in ("loaded", "missing", "unexpected", "mismatched", "excluded")
        }

    @property
    def almost_nothing_loaded(self) -> bool:
        """Fewer than half of the model's tensors came from the file: the keys likely differ."""
        expected = len(self.loaded) + len(self.missing)
        return expected > 0 and len(self.loaded) < 0.5 * expected

    @property
    def warning(self) -> str | None:
        """A loud one-line summary when the file barely fits the model, else ``None``."""
        if not self.almost_nothing_loaded:
            return None
        total = len(self.loaded) + len(self.missing)
        hint = f"; {self.suggestion}" if self.suggestion else ""
        return (
            f"only {len(self.loaded)} of the model's {total} tensors were loaded from "
            f"{self.source}: its keys do not match the model's{hint}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "counts": self.counts, "warning": self.warning}


def load_partial(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    key: str | None = None,
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

    ``source`` is a ``.safetensors`` or torch file (read with ``weights_only=True``) or a
    state_dict; for a run folder, pass ``finetune.run_folder.weights_file(folder)``. Key rules
    apply in this order: ``strip_prefix`` (each
    prefix, once, in order), ``add_prefix``, ``rename`` (regex -> replacement, in order), then
    ``include``/``exclude`` globs on the renamed key. A ``module.`` or ``_orig_mod.`` prefix on
    every key (DataParallel, DDP, torch.compile) is stripped first when the model has no such
    module, and noted in the report.

    Args:
        key: the entry of a nested checkpoint to read (default: ``state_dict``, ``model``, ...).
        on_shape_mismatch: ``"skip"`` leaves a tensor whose shape differs from the model's at
            its initial value and reports both shapes; ``"error"`` raises.
        strict: fail when any model tensor outside ``new_head`` (globs of the freshly made
            head) stays unloaded.

    Raises:
        UserError: an unreadable file, a bad rule, a shape mismatch with ``"error"``, a strict
            load that leaves tensors unloaded, or a tensor of another dtype kind than the
            model's or with non-finite values (``check_fits``). Nothing is loaded then.

    Example:
        >>> report = load_partial(model, "resnet50_tv.pth", exclude=["fc.*"])
        >>> report.counts["missing"], report.mismatched
        (2, [])
    """
    if on_shape_mismatch not in {"skip", "error"}:
        raise UserError(f"on_shape_mismatch must be skip or error, got {on_shape_mismatch!r}")
    if isinstance(source, Mapping):
        name, file_state, trail = "<state_dict>", dict(source), []
    else:
        name = str(source)
        file_state, trail = read_checkpoint(source, key)
    target = model.state_dict()
    report = LoadReport(source=name)
    if trail:
        report.notes.append(f"read the checkpoint's {'/'.join(trail)!r} entry")
    file_state = _strip_wrapper_prefix(file_state, target, report)
    renamed = _renamed(file_state, tuple(strip_prefix), add_prefix, dict(rename or {}))
    to_load = _sort_keys(renamed, target, list(include), list(exclude), report)
    report.loaded = sorted(to_load)
    report.missing = sorted(set(target) - set(to_load))
    if report.mismatched and on_shape_mismatch == "error":
        shapes = [
            f"{m['key']}: file {m['file_shape']} vs model {m['model_shape']}"
            for m in report.mismatched
        ]
        raise UserError(f"{name}: tensors with the wrong shape (on_shape_mismatch: error)", shapes)
    unloaded = [key for key in report.missing if not matches_any(key, list(new_head))]
    if unloaded:  # tensors below the head stay at their initial values: say what would help
        report.suggestion = suggest_rule(file_state, target)
        if report.suggestion is None and (strict or report.almost_nothing_loaded):
            report.suggestion = key_examples(file_state, target)
    if strict and unloaded:
        raise UserError(
            f"{name}: strict load (model.load.strict) left {len(unloaded)} of the model's "
            f"tensors unloaded; {report.suggestion}",
            at_most(unloaded, LISTED),
        )
    check_fits(to_load, target, source=name)
    model.load_state_dict(to_load, strict=False)
    return report


def _strip_wrapper_prefix(
    state: dict[str, torch.Tensor], target: Mapping[str, Any], report: LoadReport
) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if (
            state
            and all(k.startswith(prefix) for k in state)
            and not any(k.startswith(prefix) for k in target)
        ):
            report.notes.append(f"stripped the {prefix!r} prefix every key carried")
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _renamed(
    state: Mapping[str, torch.Tensor], strip: tuple[str, ...], add: str, rename: dict[str, str]
) -> dict[str, torch.Tensor]:
    patterns = []
    for pattern, replacement in rename.items():
        try:
            patterns.append((re.compile(pattern), replacement))
        except re.error as error:
            raise UserError(
                f"model.load.rename: {pattern!r} is not a regular expression ({error})"
            ) from None
    result: dict[str, torch.Tensor] = {}
    for original, tensor in state.items():
        key = original
        for prefix in strip:
            key = key.removeprefix(prefix)
        key = add + key
        for regex, replacement in patterns:
            key = regex.sub(replacement, key)
        if key in result:
            raise UserError(
                f"model.load: two file keys become {key!r} after the renaming "
                f"rules (one of them is {original!r})"
            )
        result[key] = tensor
    return result


def _sort_keys(
    renamed: dict[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    include: list[str],
    exclude: list[str],
    report: LoadReport,
) -> dict[str, torch.Tensor]:
    """Put each renamed file key in ``excluded``, ``unexpected``, ``mismatched`` or the result."""
    for rule, patterns in (("include", include), ("exclude", exclude)):
        for pattern in unmatched_patterns(patterns, renamed):
            report.notes.append(f"{rule} pattern {pattern!r} matched no key of the file")
    to_load = {}
    for key, tensor in renamed.items():
        if (include and not matches_any(key, include)) or matches_any(key, exclude):
            report.excluded.append(key)
        elif key not in target:
            report.unexpected.append(key)
        elif tensor.shape != target[key].shape:
            report.mismatched.append(
                {
                    "key": key,
                    "file_shape": list(tensor.shape),
                    "model_shape": list(target[key].shape),
                }
            )
        else:
            to_load[key] = tensor
    report.excluded.sort()
    report.unexpected.sort()
    report.mismatched.sort(key=lambda item: item["key"])
    return to_load
