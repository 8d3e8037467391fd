"""Do finetune's CUDA paths work on this GPU, and is its loop as fast as a bare one there?

One command on a CUDA machine, under 5 minutes on one GPU; it prints one table (and writes it as
Markdown with ``--markdown``). Every row goes through the real code (``finetune.run``, ``finetune
run --nproc 1`` in a subprocess, ``finetune.export_run``, ``finetune.load_trained``) on random
images (torchvision's FakeData) and random weights: nothing is downloaded.

    bf16            a run in bf16: finite losses; its logits under its autocast are bf16
    fp16            a run in fp16 with loss scaling: finite losses; the checkpoint holds the
                    GradScaler's scale
    channels-last   a run with channels_last: every 4-d weight is channels_last on the device
    pinned-memory   the training loader's batches come pinned (the copies are non_blocking)
    compile         a compiled run (torch.compile): its checkpoint has plain keys, no _orig_mod.
    feature-cache   a linear probe with ``train.cache_features`` true and false: the features
                    computed on the device, the same validation loss, the time saved
    nproc-1         ``finetune run --nproc 1``: one process, DDP over NCCL (gloo on a CPU)
    export          the bf16 run exported (BatchNorm folded, verified), then loaded on the
                    device: its logits equal those of the export on the CPU
    throughput      ``--bench-model`` at ``--bench-size``: finetune's ``train_one_epoch``
                    against the textbook loop with the same autocast, channels_last and pinned
                    batches, in alternating rounds (``benchmarks/loop_overhead.py``); the goal
                    is a median ratio of at least 0.95 on CUDA

A path that needs CUDA is "skipped" on other devices, which is how the test suite runs this script
(on the CPU, with a tiny model). Exit status 1 when a check fails or, on CUDA, the throughput ratio
is below the goal.

    python benchmarks/gpu_check.py                          # resnet18 @ 64 px; resnet50 @ 224 px
    python benchmarks/gpu_check.py --markdown gpu-check.md  # also the table as Markdown
    python benchmarks/gpu_check.py --only compile --only export --out runs  # rerun two, keep runs
    python benchmarks/gpu_check.py --device cpu --model test_resnet --size 32 --bench-model \\
        test_resnet --bench-size 32 --workers 0              # what the suite runs
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loop_overhead import compare  # benchmarks/loop_overhead.py
from rich.console import Console
from rich.table import Table

import finetune
from finetune.build import build
from finetune.run_folder import RunFolder
from finetune.runtime import Runtime, resolve_device

THROUGHPUT_GOAL = 0.95  # finetune's img/s over the bare loop's, on CUDA
EXPORT_TOLERANCE = 1e-2  # logits on the device vs. the CPU, relative to the largest |logit|


class Skipped(Exception):
    """This check does not apply on this device; the message says why."""


@dataclass
class Row:
    path: str
    status: str  # ok, FAIL or skipped
    detail: str
    seconds: float


class Check:
    """What the checks share: the arguments, a folder for runs, the runs already made."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root = args, root
        self.device = resolve_device(args.device)
        self.runs: dict[str, Path] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def need_cuda(self) -> None:
        if not self.cuda:
            raise Skipped(f"needs CUDA (device {self.device})")

    def recipe(self, name: str, **sections: dict[str, Any]) -> finetune.Recipe:
        """A one-epoch recipe on FakeData; ``sections`` override keys section by section."""
        args = self.args
        recipe: dict[str, Any] = {
            "name": name,
            "seed": 0,
            "model": {"backbone": args.model, "pretrained": False, "num_classes": 4},
            "data": {
                "train": {"type": "fake", "num_samples": args.images, "num_classes": 4},
                "val": {"type": "fake", "num_samples": args.images // 2, "num_classes": 4},
                "image_size": args.size,
                "batch_size": args.batch,
                "num_workers": args.workers,
                "augment": [],
            },
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "train": {
                "epochs": 1,
                "device": args.device,
                "precision": "fp32",
                "channels_last": False,
                "compile": False,
                "cache_features": False,
            },
            "output": {"dir": str(self.root / "checkpoints")},
        }
        for section, keys in sections.items():
            recipe[section] = {**recipe.get(section, {}), **keys}
        return finetune.Recipe.from_dict(recipe)

    def train(self, recipe: finetune.Recipe) -> dict[str, Any]:
        """``finetune.run`` into ``<root>/<name>`` (its output in ``<name>.log``); the summary,
        after checking that the run completed with finite losses."""
        output = io.StringIO()
        folder = self.root / recipe.name
        try:
            result = finetune.run(recipe, run_dir=folder, console=Console(file=output, width=120))
        finally:
            (self.root / f"{recipe.name}.log").write_text(output.getvalue())
        summary = result.summary
        assert summary["status"] == "completed", f"status {summary['status']}"
        losses = [summary["final"][key] for key in ("train/loss", "val/loss")]
        assert all(loss is not None and math.isfinite(loss) for loss in losses), losses
        self.runs[recipe.name] = folder
        return summary


def check_bf16(check: Check) -> str:
    recipe = check.recipe("bf16", train={"precision": "bf16"})
    summary = check.train(recipe)
    built = build(recipe)  # the model prepared as the run had it
    size = check.args.size
    with torch.no_grad(), built.runtime.autocast():
        logits = built.model(torch.randn(2, 3, size, size, device=check.device))
    assert logits.dtype == torch.bfloat16, f"logits are {logits.dtype} under bf16 autocast"
    return f"train loss {summary['final']['train/loss']:.3f}; logits {logits.dtype}"


def check_fp16(check: Check) -> str:
    check.need_cuda()
    summary = check.train(check.recipe("fp16", train={"precision": "fp16"}))
    _, state = RunFolder(check.runs["fp16"]).load_checkpoint("last")
    scale = state["scaler"].get("scale")
    assert scale is not None, "the checkpoint has no loss scale"
    return f"train loss {summary['final']['train/loss']:.3f}; loss scale {float(scale):g}"


def check_channels_last(check: Check) -> str:
    recipe = check.recipe("channels-last", train={"channels_last": True})
    summary = check.train(recipe)
    built = build(recipe)  # the model prepared as the run had it
    weights = [p for p in built.model.parameters() if p.dim() == 4]
    wrong = [p.shape for p in weights if not p.is_contiguous(memory_format=torch.channels_last)]
    assert not wrong, f"{len(wrong)} of {len(weights)} conv weights are not channels_last"
    return f"{len(weights)} conv weights channels_last; {summary['final']['img_per_s']:.0f} img/s"


def check_pinned(check: Check) -> str:
    check.need_cuda()
    built = build(check.recipe("pinned", data={"num_workers": max(check.args.workers, 1)}))
    assert built.train_loader is not None
    images, labels = next(iter(built.train_loader))
    assert images.is_pinned() and labels.is_pinned(), "the loader's batches are not pinned"
    return f"batches pinned ({built.train_loader.num_workers} workers); copies non_blocking"


def check_compile(check: Check) -> str:
    check.need_cuda()
    summary = check.train(check.recipe("compile", train={"compile": True}))
    tensors, _ = RunFolder(check.runs["compile"]).load_checkpoint("last")
    wrapped = [key for key in tensors if "_orig_mod." in key]
    assert not wrapped, f"checkpoint keys carry _orig_mod.: {wrapped[:3]}"
    return f"{len(tensors)} plain keys; first epoch {summary['final']['seconds']:.1f} s"


def check_feature_cache(check: Check) -> str:
    head = build(check.recipe("probe"), data=False).network.head_names[0]
    common = {"freeze": {"until": head, "batchnorm": "frozen"}}
    summaries = {}
    for cache in (False, True):
        recipe = check.recipe(
            f"probe-cache-{str(cache).lower()}",
            train={"epochs": 3, "cache_features": cache},
            **common,
        )
        summaries[cache] = check.train(recipe)
    stored = list((check.root / "checkpoints" / ".feature-cache").glob("*/train.npy"))
    assert stored, "no features were stored"
    uncached, cached = (summaries[cache]["final"]["val/loss"] for cache in (False, True))
    assert math.isclose(cached, uncached, rel_tol=1e-3), f"val loss {cached} vs {uncached}"
    seconds = [summaries[cache]["train_seconds"] for cache in (False, True)]
    return (
        f"val loss {cached:.5f} = {uncached:.5f}; training {seconds[0]:.1f} s -> {seconds[1]:.1f} s"
    )


def check_nproc(check: Check) -> str:
    recipe = check.recipe("nproc-1")
    path = check.root / "nproc-1.yaml"
    path.write_text(recipe.to_yaml())
    folder = check.root / "nproc-1"
    command = [sys.executable, "-m", "finetune", "run", str(path), "--nproc", "1"]
    result = subprocess.run(
        [*command, "--run-dir", str(folder)], capture_output=True, text=True, timeout=600
    )
    (check.root / "nproc-1.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    summary = json.loads((folder / "summary.json").read_text())
    expected = "nccl" if check.cuda else "gloo"
    assert summary["backend"] == expected, f"backend {summary['backend']}, not {expected}"
    return f"{summary['processes']} process, DDP over {summary['backend']}"


def check_export(check: Check) -> str:
    if "bf16" not in check.runs:
        raise Skipped("needs the bf16 run, which failed")
    exported = finetune.export_run(check.runs["bf16"], formats=["safetensors"])
    batchnorm = exported.info["batchnorm"]
    on_device = finetune.load_trained(exported.out, device=str(check.device))
    on_cpu = finetune.load_trained(exported.out, device="cpu")
    size = check.args.size
    batch = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = on_cpu.model(batch)
        logits = on_device.model(batch.to(check.device)).float().cpu()
    difference = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert difference <= EXPORT_TOLERANCE, f"logits differ by {difference:.2e} of the largest"
    return (
        f"{len(batchnorm['folded'])} BatchNorms folded, {len(batchnorm['remaining'])} left; "
        f"verified; on {check.device}: {difference:.1e} from the CPU"
    )


def check_throughput(check: Check) -> str:
    args = check.args
    runtime = Runtime.create(device=args.device, precision="auto", channels_last="auto")
    rounds = compare(
        args.bench_model, args.bench_size, args.bench_batch, args.bench_batches, 5, runtime
    )
    ratio = statistics.median(ours / bare for bare, ours in rounds)
    bare = statistics.median(bare for bare, _ in rounds)
    ours = statistics.median(ours for _, ours in rounds)
    detail = (
        f"{args.bench_model} @ {args.bench_size} px, batch {args.bench_batch}, "
        f"{runtime.precision}: finetune {ours:.0f} img/s, bare {bare:.0f} img/s, ratio {ratio:.3f}"
    )
    if check.cuda and ratio < THROUGHPUT_GOAL:
        raise AssertionError(f"{detail} (goal {THROUGHPUT_GOAL})")
    return detail


CHECKS: dict[str, Callable[[Check], str]] = {
    "bf16": check_bf16,
    "fp16": check_fp16,
    "channels-last": check_channels_last,
    "pinned-memory": check_pinned,
    "compile": check_compile,
    "feature-cache": check_feature_cache,
    "nproc-1": check_nproc,
    "export": check_export,
    "throughput": check_throughput,
}


def run_checks(check: Check, console: Console, chosen: set[str]) -> list[Row]:
    rows = []
    for path, function in CHECKS.items():
        console.print(f"[bold]{path}[/bold] ...", highlight=False)
        start = time.perf_counter()
        try:
            if path not in chosen:
                raise Skipped("not chosen (--only, --skip)")
            status, detail = "ok", function(check)
        except Skipped as skipped:
            status, detail = "skipped", str(skipped)
        except Exception as error:  # a failed check is a row of the table, not the end
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
        rows.append(Row(path, status, detail, time.perf_counter() - start))
        console.print(f"  {status}: {detail}", highlight=False, markup=False)
    return rows


def machine() -> str:
    if torch.cuda.is_available():
        return (
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def markdown(rows: list[Row], title: str) -> str:
    lines = [title, "", "| path | result | detail | s |", "|---|---|---|---|"]
    lines += [f"| {r.path} | {r.status} | {r.detail} | {r.seconds:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda", help="cuda (cuda:N) or, to check this script, cpu"
    )
    parser.add_argument("--model", default="resnet18", help="timm model for the paths' runs")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=256, help="training images per run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--bench-model", default="resnet50")
    parser.add_argument("--bench-size", type=int, default=224)
    parser.add_argument("--bench-batch", type=int, default=64)
    parser.add_argument("--bench-batches", type=int, default=20, help="batches per round")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--only", action="append", choices=list(CHECKS), help="run these only")
    parser.add_argument("--skip", action="append", choices=list(CHECKS), default=[])
    args = parser.parse_args()
    chosen = set(args.only or CHECKS) - set(args.skip)
    console = Console()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print(
            "no CUDA GPU here: this check is for a GPU machine (--device cpu checks the script)"
        )
        return 2
    root = args.out or Path(tempfile.mkdtemp(prefix="finetune-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"{machine()}; runs in {root}", highlight=False)
    started = time.perf_counter()
    rows = run_checks(Check(args, root), console, chosen)
    title = f"{machine()}; {time.perf_counter() - started:.0f} s in all"
    table = Table(title=title)
    for column in ("path", "result", "detail", "s"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.path, row.status, row.detail, f"{row.seconds:.1f}")
    console.print(table)
    if args.markdown:
        args.markdown.write_text(markdown(rows, title))
    failed = [row.path for row in rows if row.status == "FAIL"]
    if failed:
        console.print(f"failed: {', '.join(failed)}; the runs and their logs are in {root}")
    elif args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
