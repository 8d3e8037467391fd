"""Export a trained model: deployable formats, parity with the original, ``export.json``, loading.

``export_run`` folds BatchNorm first (``finetune.fusion.fuse_bn``), writes the formats asked for
and ``export.json``, then runs the original model and every written file on the same batch; a
file whose logits differ from the original's by more than the tolerance fails the export
(exit 1), and the folder is kept as ``<out>.failed``.

Every artefact carries a model card (backbone, head, classes, normalisation, the folded pairs and
the resolved recipe), so ``load_exported`` rebuilds a ``TrainedModel`` from the file alone.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.config.train import EXPORT_FORMATS, ExportConfig
from finetune.errors import UserError
from finetune.fusion import fuse_bn_with_report, unfused_report
from finetune.inference import (
    CARD_FILE,
    CARD_KEY,
    EXPORT_FILE,
    FILES,
    TrainedModel,
    is_export,
    load_trained,
    read_card,
    rebuild_exported,
)
from finetune.run_folder import RunFolder, find_run_folder, weights_file
from finetune.weights import write_safetensors


class ExportVerificationError(Exception):
    """An exported file does not reproduce the original model's logits (exit code 1)."""


# ------------------------------------------------------------------------------ verification
def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Max absolute difference, the same relative to the largest ``|reference|``, top-1 agreement.

    The relative figure is what a tolerance is compared with: logits of one model can be 1e-2 or
    1e3 in scale, and float rounding grows with the scale.
    """
    reference, candidate = reference.detach().float().cpu(), candidate.detach().float().cpu()
    if reference.shape != candidate.shape:
        raise ExportVerificationError(
            f"output shape {tuple(candidate.shape)}, expected {tuple(reference.shape)}"
        )
    max_abs = (reference - candidate).abs().max().item()
    scale = reference.abs().max().item()
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / scale if scale > 0 else float(max_abs > 0),
        "top1_agreement": (reference.argmax(1) == candidate.argmax(1)).float().mean().item(),
    }


def _run_artefact(fmt: str, path: Path, batch: torch.Tensor) -> torch.Tensor | None:
    """Load a written file back as a user would and run it on ``batch``; None if it cannot run
    here (ONNX without onnxruntime)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        if fmt == "safetensors":
            # Our own file, just written from a run already checked (load_trained).
            return rebuild_exported(path, read_card(path) or {}, trust_code=True)(batch)
        if fmt == "torchscript":
            return torch.jit.load(str(path), map_location="cpu")(batch)
        if fmt == "pt2":
            return torch.export.load(str(path)).module()(batch)
    if not _installed("onnxruntime"):
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])


def _verify(
    original: nn.Module,
    fused: nn.Module,
    files: dict[str, Path],
    batch: torch.Tensor,
    tolerance: float,
) -> dict[str, Any]:
    """The fused model and each written file against the original, on ``batch``."""
    with torch.no_grad():
        reference = original(batch)
        outputs = {"fused": fused(batch)} if fused is not original else {}
    outputs.update({fmt: _run_artefact(fmt, path, batch) for fmt, path in files.items()})
    results = {name: _check(reference, logits, tolerance) for name, logits in outputs.items()}
    return {
        "batch": {"size": len(batch), "input": "normal(0, 1) images, seed 0"},
        "tolerance": tolerance,
        "passed": all(r.get("passed", True) for r in results.values()),
        "results": results,
    }


def _check(
    reference: torch.Tensor, logits: torch.Tensor | None, tolerance: float
) -> dict[str, Any]:
    if logits is None:
        return {"skipped": "onnxruntime is not installed: written, not run"}
    result: dict[str, Any] = compare_logits(reference, logits)
    return {**result, "passed": result["max_rel_diff"] <= tolerance}


# ----------------------------------------------------------------------------------- formats
def parse_formats(values: list[str]) -> list[str]:
    """Formats from ``--format`` values (repeated or comma-separated), checked to be writable."""
    formats = [f.strip().lower() for v in values for f in v.split(",") if f.strip()]
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise UserError(
            f"--format: unknown format {', '.join(map(repr, unknown)) or '(none)'}; "
            f"valid formats: {', '.join(EXPORT_FORMATS)}"
        )
    if "onnx" in formats and not _installed("onnx"):
        raise UserError(
            "--format onnx needs the onnx package: pip install onnx onnxruntime "
            "(onnxruntime runs the parity check)"
        )
    return list(dict.fromkeys(formats))


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _save(fmt: str, model: nn.Module, path: Path, example: torch.Tensor, card: str) -> None:
    """Write ``model`` as ``fmt`` with the model card inside the file (for safetensors, with a
    checksum of tensors and card, verified when the file is read)."""
    with warnings.catch_warnings():  # tracer and legacy-exporter chatter, not the user's concern
        warnings.simplefilter("ignore")
        if fmt == "safetensors":
            write_safetensors(model.state_dict(), path, metadata={CARD_KEY: card})
        elif fmt == "torchscript":  # traced: the path the example takes through any branch
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={CARD_FILE: card})
        elif fmt == "pt2":
            program = torch.export.export(
                model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
            )
            torch.export.save(program, str(path), extra_files={CARD_FILE: card})
        else:
            _save_onnx(model, path, example, card)


def _save_onnx(model: nn.Module, path: Path, example: torch.Tensor, card: str) -> None:
    import onnx

    # The TorchScript-based exporter needs only `onnx`; the dynamo one also needs onnxscript.
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {CARD_KEY: card})
    onnx.save(proto, str(path))


# ------------------------------------------------------------------------------ exporting a run
@dataclass
class ExportResult:
    """The export folder and the content of its ``export.json``."""

    out: Path
    info: dict[str, Any]


def export_run(
    source: str | Path,
    *,
    out: str | Path | None = None,
    formats: list[str] | None = None,
    fuse_bn: bool | None = None,
    tolerance: float | None = None,
    trust_code: bool = False,
) -> ExportResult:
    """Export a run's model (``best/`` unless ``source`` names a checkpoint) and verify it.

    ``formats``, ``fuse_bn`` and ``tolerance`` left as None take the run recipe's ``export:``
    section (``ExportConfig``: safetensors and torchscript, fused, 1e-4 unless it says otherwise).

    Args:
        source: a run folder, or a checkpoint file inside one.
        out: the export folder; ``<run folder>/export`` by default. An existing export there is
            replaced once the new one has passed.
        formats: any of ``EXPORT_FORMATS``.
        fuse_bn: fold BatchNorm first (``finetune.fuse_bn``).
        tolerance: the largest accepted logit difference, relative to the largest ``|logit|``.
        trust_code: allow a head named by import path in the run's ``recipe.yaml``
            (``load_trained``).

    Raises:
        UserError: a source without a checkpoint, an unknown format, an unwritable ``out``.
        ExportVerificationError: a file differs from the original beyond ``tolerance``; the
            folder is kept as ``<out>.failed``.
    """
    source = Path(source)
    asked = parse_formats(formats) if formats is not None else None  # fail before loading
    if is_export(source):
        raise UserError(f"{source}: already an export; export the run folder it came from")
    trained = load_trained(source, device="cpu", trust_code=trust_code)
    defaults: ExportConfig = trained.recipe.export
    formats = asked or parse_formats(defaults.formats)
    fuse = defaults.fuse_bn if fuse_bn is None else fuse_bn
    tolerance = defaults.tolerance if tolerance is None else tolerance
    out = Path(out) if out is not None else RunFolder(find_run_folder(source.resolve())).export
    staging = _staging_folder(out)
    try:
        info = _write_export(trained, staging, formats, fuse, tolerance)
        info = {"source": str(weights_file(source).resolve()), **info}
        (staging / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        _keep_failed(staging, out)
        raise
    if not info["verification"]["passed"]:
        failed = _keep_failed(staging, out)
        raise ExportVerificationError(_failure_message(info["verification"], failed))
    _publish(staging, out)
    return ExportResult(out, info)


def _write_export(
    trained: TrainedModel, folder: Path, formats: list[str], fuse: bool, tolerance: float
) -> dict[str, Any]:
    """Fuse, write each format and the recipe into ``folder``, verify; the export.json content."""
    original = trained.model.eval()
    size = trained.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    model, report = (
        fuse_bn_with_report(original, example_input=example)
        if fuse
        else (original, unfused_report(original))
    )
    card = model_card(trained, fused=fuse, folded=report.folded)
    files = {fmt: folder / FILES[fmt] for fmt in formats}
    for fmt, path in files.items():
        try:
            _save(fmt, model, path, example, json.dumps(card))
        except Exception as error:  # name the format: the exporters' own messages do not
            raise RuntimeError(f"{fmt}: could not export the model: {error}") from error
    (folder / "recipe.yaml").write_text(card["recipe"])
    batch = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {
        **{key: value for key, value in card.items() if key not in ("recipe", "folded")},
        "formats": {fmt: FILES[fmt] for fmt in formats},
        "batchnorm": {"folded": report.folded, "remaining": report.remaining},
        "parameters": {"before": report.params_before, "after": report.params_after},
        "verification": _verify(original, model, files, batch, tolerance),
    }


def model_card(
    trained: TrainedModel, *, fused: bool, folded: list[dict[str, str]]
) -> dict[str, Any]:
    """Everything needed to rebuild and use the model: stored inside every exported file."""
    recipe = trained.recipe
    mean, std, size = trained.mean, trained.std, trained.image_size
    return {
        "format_version": 1,
        "backbone": recipe.model.backbone,
        "num_classes": len(trained.classes),
        "head": recipe.model.head.model_dump(mode="json"),
        "classes": trained.classes,
        "input_size": [3, size, size],
        "mean": mean,
        "std": std,
        "fused": fused,
        "folded": folded,
        "recipe": recipe.to_yaml(),
    }


def _staging_folder(out: Path) -> Path:
    """A new folder beside ``out`` to write into, so a failed export never leaves half an
    ``out``; checks first that ``out`` is not a folder of something else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise UserError(f"--out: {out} is neither empty nor an export folder; choose another")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as error:
        raise UserError(f"--out: cannot write to {out}: {error}") from None
    umask = os.umask(0o022)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the published folder private
    return staging


def _publish(staging: Path, out: Path) -> None:
    """Move the verified export into place, replacing an earlier export."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _keep_failed(staging: Path, out: Path) -> Path:
    failed = out.with_name(f"{out.name}.failed")
    if failed.is_dir():
        shutil.rmtree(failed)
    os.replace(staging, failed)
    return failed


def _failure_message(verification: dict[str, Any], failed: Path) -> str:
    worst = [
        f"{name} differs by {r['max_rel_diff']:.2e} of the logit scale"
        for name, r in verification["results"].items()
        if r.get("passed") is False
    ]
    return (
        f"verification failed: {'; '.join(worst)} (tolerance "
        f"{verification['tolerance']:.1e}); files kept in {failed}"
    )
