"""The ``finetune`` command. Each command parses, calls the library, and maps errors to exit codes.

Exit codes: 0 success; 2 bad input (``UserError``: recipe, paths, checkpoints, data); 3 training
diverged; 130 after Ctrl-C and 143 after SIGTERM (a checkpoint written first); 1 anything else.
Torch is imported inside commands so that ``finetune --help`` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="Fine-tune pretrained image models from a YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)
_debug = False

RecipeArg = Annotated[Path, typer.Argument(help="The YAML recipe.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key: --set optimizer.lr=3e-4 (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
TrainedSourceArg = Annotated[
    Path,
    typer.Argument(help="A run folder, a checkpoint inside one, or an export folder or file."),
]
TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow what runs code from the files read: a TorchScript file, a head or "
        "schedule named by import path in the run's recipe.yaml or the export's card. "
        "Only for files you trust.",
    ),
]


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option(help="Show tracebacks for every error.")] = False,
) -> None:
    global _debug
    _debug = debug


def handles_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Map ``UserError`` to exit 2, Ctrl-C to 130 and anything else to 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from finetune.errors import Interrupted, TrainingDiverged, UserError

        try:
            return command(*args, **kwargs)
        except UserError as error:
            if _debug:
                raise
            errors.print(f"error: {error}", markup=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("interrupted", markup=False)
            raise typer.Exit(130) from None
        except (Interrupted, TrainingDiverged) as error:
            errors.print(f"{error}", markup=False)
            raise typer.Exit(error.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the top of the program: report, exit 1
            if _debug:
                raise
            errors.print(f"error: {type(error).__name__}: {error}", markup=False)
            errors.print("(run with --debug for the traceback)", markup=False)
            raise typer.Exit(1) from None

    return wrapper


def _load_recipe(path: Path, overrides: list[str] | None):
    from finetune.recipe import Recipe

    return Recipe.load(path, overrides or [])


@app.command()
@handles_errors
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe without building anything: prints "ok" or every error (exit 2)."""
    loaded = _load_recipe(recipe, set_)
    console.print(f"ok: {recipe} (name {loaded.name}, backbone {loaded.model.backbone})")


@app.command()
@handles_errors
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    run_dir: Annotated[Path | None, typer.Option(help="Write the run here.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue a run from its last/ checkpoint: a run folder, or with no value the "
            "recipe's latest run.",
            show_default=False,
        ),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train with N processes (one per GPU) under torchrun, with DDP; 1 runs the "
            "distributed path in one process.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Validate, build, train, evaluate and checkpoint. The last line printed is the run folder."""
    loaded = _load_recipe(recipe, set_)
    if nproc is not None:
        from finetune.launch import is_torchrun_child, launch_torchrun

        if not is_torchrun_child():
            raise typer.Exit(launch_torchrun(nproc, _argv_without_nproc(sys.argv[1:])))
    from finetune.errors import Interrupted
    from finetune.training import resolve_resume
    from finetune.training import run as run_training

    resume_dir = None
    if resume is not None:
        resume_dir, loaded = resolve_resume(resume, loaded, run_dir, set_ or [])
    try:
        result = run_training(loaded, run_dir=run_dir, resume=resume_dir, console=console)
    except (KeyboardInterrupt, Interrupted):
        errors.print(
            f"continue with `finetune run {recipe} --resume <run folder>"
            f"{_nproc_option()}` (the run folder is printed above)",
            markup=False,
        )
        raise
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    best = result.summary["best"]
    metric = loaded.output.save_best
    if best["epoch"] is not None:
        console.print(f"best {metric} {best[metric]:.4f} at epoch {best['epoch']}")
    console.print(str(result.run_dir), markup=False)


def _nproc_option() -> str:
    """`` --nproc N`` for a message printed by a torchrun worker (its argv lost the option)."""
    from finetune.launch import is_torchrun_child

    return f" --nproc {os.environ['WORLD_SIZE']}" if is_torchrun_child() else ""


def _argv_without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


@app.command("eval")
@handles_errors
def eval_(
    source: TrainedSourceArg,
    data: Annotated[Path, typer.Argument(help="An image folder with one sub-folder per class.")],
    json_: JsonOpt = False,
    trust_code: TrustCodeOpt = False,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Also write pictures into this folder: confusion matrix, per-class precision, "
            "recall and F1, the most confidently wrong images, a reliability diagram; and "
            "report.json.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Loss, top-1, top-5 and per-class accuracy of a trained model on an image folder."""
    from finetune.inference import evaluate_folder, load_trained

    trained = load_trained(source, trust_code=trust_code)
    if report is None:
        result = evaluate_folder(trained, data)
    else:
        from finetune.report import write_report

        result = write_report(trained, data, report)
    if json_:
        console.print_json(json.dumps(result))
        return
    from rich.table import Table

    console.print("  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    scores = ("precision", "recall", "f1") if report is not None else ()
    table = Table("class", "images", "top-1", *scores)
    for name, row in result["per_class"].items():
        cells = (f"{row[key]:.3f}" for key in scores)
        table.add_row(name, str(row["images"]), f"{row['top1']:.1%}", *cells)
    console.print(table)
    if report is not None:
        ece = result["calibration"]["ece"]
        console.print(f"ECE {ece:.4f}; pictures and report.json in {report}", markup=False)


@app.command()
@handles_errors
def predict(
    source: TrainedSourceArg,
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to show per image.")] = 5,
    json_: JsonOpt = False,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Top-k classes and probabilities for each image."""
    from finetune.inference import load_trained, predict_images

    trained = load_trained(source, trust_code=trust_code)
    predictions = predict_images(trained, images, top_k=top_k)
    if json_:
        console.print_json(json.dumps(predictions))
        return
    for item in predictions:
        ranked = ", ".join(f"{p['class']} {p['probability']:.1%}" for p in item["top_k"])
        console.print(f"{item['image']}: {ranked}", markup=False)


@app.command("inspect")
@handles_errors
def inspect_(
    source: TrainedSourceArg,
    out: Annotated[Path, typer.Option(help="The folder the pictures go into.")],
    image: Annotated[
        list[Path] | None,
        typer.Option(help="An image to show feature maps and Grad-CAM for (repeatable)."),
    ] = None,
    json_: JsonOpt = False,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Pictures of a trained model: first-layer filters, weights per layer, each layer's change
    from the weights the run started from, and per image the feature maps of every stage and
    Grad-CAM for the top class. The last line is the folder."""
    from finetune.inspection import inspect_model

    result = inspect_model(source, image or [], out, trust_code=trust_code)
    if json_:
        console.print_json(json.dumps(result))
        return
    for note in result["notes"]:
        console.print(f"note: {note}", markup=False)
    for item in result["images"]:
        console.print(
            f"{item['image']}: {item['top_class']} {item['probability']:.1%} "
            f"(Grad-CAM at {item['cam_layer']})",
            markup=False,
        )
    console.print(f"pictures: {', '.join(result['pictures'])}", markup=False)
    console.print(str(out), markup=False)


@app.command()
@handles_errors
def export(
    source: Annotated[
        Path, typer.Argument(help="A run folder (its best/ weights) or a checkpoint inside one.")
    ],
    fuse_bn: Annotated[
        bool | None,
        typer.Option(
            "--fuse-bn/--no-fuse-bn",
            help="Fold BatchNorm into the conv or linear layer before it "
            "(default: the recipe's export.fuse_bn, true).",
            show_default=False,
        ),
    ] = None,
    format_: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help="safetensors, torchscript, onnx or pt2; repeat or comma-separate "
            "(default: the recipe's export.formats, safetensors,torchscript).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="The export folder (default: <run folder>/export).", show_default=False),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Largest accepted logit difference, relative to the largest |logit| "
            "(default: the recipe's export.tolerance, 1e-4).",
            show_default=False,
        ),
    ] = None,
    json_: JsonOpt = False,
    trust_code: Annotated[
        bool,
        typer.Option(
            "--trust-code",
            help="Allow a head named by import path in the run's recipe.yaml (its code is "
            "imported and run). Only for runs you trust.",
        ),
    ] = False,
) -> None:
    """Fold BatchNorm, write deployable files, and check each against the original model.

    Exit 1 when a file's logits differ beyond --tolerance (the folder is kept as <out>.failed).
    """
    from finetune.export import export_run

    result = export_run(
        source,
        out=out,
        formats=format_,
        fuse_bn=fuse_bn,
        tolerance=tolerance,
        trust_code=trust_code,
    )
    info = result.info
    if json_:
        console.print_json(json.dumps(info))
        return
    batchnorm, params = info["batchnorm"], info["parameters"]
    console.print(
        f"BatchNorm folded {len(batchnorm['folded'])}, remaining "
        f"{len(batchnorm['remaining'])}; parameters {params['before']:,} -> "
        f"{params['after']:,}"
    )
    for name, check in info["verification"]["results"].items():
        line = check.get("skipped") or (
            f"max abs diff {check['max_abs_diff']:.2e}, relative "
            f"{check['max_rel_diff']:.2e}, top-1 agreement "
            f"{check['top1_agreement']:.0%}"
        )
        console.print(f"{name:12s} {line}", markup=False)
    console.print(str(result.out), markup=False)


@app.command()
@handles_errors
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    steps_per_epoch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Optimizer steps per epoch for the LR preview (the plan reads no data, so "
            "by default an epoch counts as one step).",
        ),
    ] = 1,
    lr_plot: Annotated[
        Path | None, typer.Option(help="Also write the LR of every group over the run to this PNG.")
    ] = None,
) -> None:
    """Build the model with its weights (no data, no training) and show the load report,
    parameter groups, frozen and trainable counts, BatchNorm policy, unfreeze schedule and the
    LR of each group at the start, end of warmup, middle and end."""
    loaded = _load_recipe(recipe, set_)
    from finetune.build import build
    from finetune.describe import plan_to_dict, print_plan, write_schedule_plot

    built = build(loaded, data=False, steps_per_epoch=steps_per_epoch, auto_lr=False)
    if lr_plot is not None:
        write_schedule_plot(built, lr_plot)
    if json_:
        console.print_json(json.dumps(plan_to_dict(built)))
        return
    print_plan(built, console)
    if lr_plot is not None:
        console.print(f"LR schedule plot: {lr_plot}", markup=False)


@app.command()
@handles_errors
def stats(
    data: Annotated[
        Path,
        typer.Argument(help="An image folder (one sub-folder per class) or a CSV/JSONL manifest."),
    ],
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Processes that decode images (default: one per spare core).",
            show_default=False,
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Per-channel mean and std, images per class and image sizes of a dataset.

    Every pixel of every image counts once, on the 0-1 scale. Unreadable images are listed, not
    measured. The mean and std can go into a recipe as data.normalize: {mean: [...], std: [...]}.
    """
    from finetune.data import resolve_num_workers
    from finetune.sources import open_path
    from finetune.stats import image_statistics

    result = image_statistics(
        open_path(data), num_workers=resolve_num_workers("auto" if workers is None else workers)
    )
    if json_:
        console.print_json(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    console.print(
        f"{result.images} images in {len(result.per_class)} classes, "
        f"{result.width[0]}-{result.width[1]} x {result.height[0]}-{result.height[1]} "
        "px (width x height)"
    )
    table = Table("", "R", "G", "B")
    for name, values in (("mean", result.mean), ("std", result.std)):
        table.add_row(name, *(f"{v:.4f}" for v in values))
    console.print(table)
    classes = Table("class", "images")
    for name, count in result.per_class.items():
        classes.add_row(name, str(count))
    console.print(classes)
    for message in result.unreadable:
        console.print(f"unreadable: {message}", markup=False)
    mean, std = (", ".join(f"{v:.4f}" for v in values) for values in (result.mean, result.std))
    console.print(f"recipe: data.normalize: {{mean: [{mean}], std: [{std}]}}", markup=False)


@app.command("lr-find")
@handles_errors
def lr_find(
    recipe: RecipeArg,
    set_: SetOpt = None,
    start_lr: Annotated[float, typer.Option(min=0, help="The first LR of the ramp.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(min=0, help="The last LR of the ramp.")] = 10.0,
    steps: Annotated[int, typer.Option(min=2, help="Optimizer steps, one per LR.")] = 100,
    rule: Annotated[
        str,
        typer.Option(
            help="steepest: where the smoothed loss falls fastest; min10: a tenth of the LR with "
            "the lowest loss."
        ),
    ] = "steepest",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write lr_find.png and lr_find.json (default: <output.dir>/<name>/"
            "lr-find).",
            show_default=False,
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """LR range test: train STEPS steps at exponentially rising LRs, stop when the loss
    diverges, put the weights back, and suggest optimizer.lr. The last line is the folder."""
    loaded = _load_recipe(recipe, set_)
    from finetune.build import build, range_test
    from finetune.lr_find import check_range

    check_range(start_lr, end_lr, steps, rule)  # before anything is built
    if loaded.optimizer.lr == "auto":  # any LR will do: the ramp sets them all, relative to it
        loaded = loaded.model_copy(
            update={"optimizer": loaded.optimizer.model_copy(update={"lr": 1.0})}
        )
    result = range_test(build(loaded), start_lr=start_lr, end_lr=end_lr, steps=steps, rule=rule)
    folder = result.save(out or loaded.output.dir / loaded.name / "lr-find")
    if json_:
        console.print_json(
            json.dumps(
                {
                    "suggestion": result.suggestion,
                    "rule": result.rule,
                    "group_lrs": result.group_lrs,
                    "out": str(folder),
                }
            )
        )
        return
    console.print(result.describe(), markup=False)
    for name, lr in result.group_lrs.items():
        console.print(f"  group {name} trains at {lr:.3g}", markup=False)
    console.print(f"use it: --set optimizer.lr={result.suggestion:.3g}", markup=False)
    console.print(str(folder), markup=False)


@app.command()
@handles_errors
def sweep(
    recipe: Annotated[
        Path | None,
        typer.Argument(help="The YAML recipe (optional with --resume).", show_default=False),
    ] = None,
    set_: SetOpt = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help="KEY=[V1,V2,...]: a trial per value; several --grid: every combination.",
        ),
    ] = None,
    search: Annotated[
        list[str] | None,
        typer.Option(
            "--search",
            help="KEY=DIST sampled by Optuna (TPE): loguniform(low,high), uniform(low,high), "
            "int(low,high), logint(low,high) or choice(v1,v2,...). Needs --trials.",
        ),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="How many trials a --search runs.", show_default=False)
    ] = None,
    sweep_dir: Annotated[
        Path | None,
        typer.Option(
            help="The sweep folder (default: <output.dir>/<name>-sweep/<timestamp>).",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue a sweep folder (with no value: the recipe's latest sweep), or work "
            "on it beside another worker: finished trials are kept, an interrupted one "
            "continues from its last/ checkpoint.",
            show_default=False,
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="An Optuna storage URL that several workers share, e.g. "
            "postgresql://user@host/db (default: study.db in the sweep folder, SQLite).",
            show_default=False,
        ),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(
            help="The study's name in --storage (default: the recipe's name).", show_default=False
        ),
    ] = None,
) -> None:
    """Train a run per trial of a grid or an Optuna search, then print the table of results
    (also results.csv, results.md and sweep.png). The last line printed is the sweep folder."""
    from finetune.errors import Interrupted, UserError

    if resume is not None:
        given = {"--set": set_, "--grid": grid, "--search": search, "--trials": trials}
        given.update({"--sweep-dir": sweep_dir, "--storage": storage, "--study": study})
        if any(given.values()):
            flags = ", ".join(flag for flag, value in given.items() if value)
            raise UserError(f"--resume continues a sweep as it was started: drop {flags}")
        target = _resumed_sweep(resume, recipe)
    elif recipe is None:
        raise UserError("finetune sweep: give a RECIPE, or --resume SWEEP_DIR")
    else:
        from finetune.recipe import apply_overrides, read_recipe_dict
        from finetune.sweep_space import build_spec

        base = apply_overrides(read_recipe_dict(recipe), set_ or [])
        spec = build_spec(base, grid or [], search or [], trials, source=str(recipe))
        from finetune.sweep import create_sweep  # imports torch: after the checks

        target = create_sweep(base, spec, sweep_dir=sweep_dir, storage=storage, study=study)
    from finetune.sweep import run_sweep
    from finetune.sweep_results import print_results

    try:
        rows = run_sweep(target, console=console, resuming=resume is not None)
    except (KeyboardInterrupt, Interrupted):
        errors.print(f"continue with `finetune sweep --resume {target.folder}`", markup=False)
        raise
    keys = [axis.key for axis in target.spec.axes]
    print_results(rows, console, keys=keys, title=f"{target.study}: {len(rows)} trials")
    console.print(str(target.folder), markup=False)


def _resumed_sweep(resume: str, recipe: Path | None):
    from finetune.sweep import find_sweep, read_sweep

    allowed = _load_recipe(recipe, None) if recipe is not None else None
    return read_sweep(find_sweep(resume, allowed), allowed=allowed)


def with_resume_value(argv: list[str]) -> list[str]:
    """Give a bare ``--resume`` its implied value, ``latest``.

    ``--resume [DIR]`` takes an optional value, which Typer no longer supports (it deprecated
    click's ``is_flag=False, flag_value=...``), so the default is filled in before parsing.
    """
    filled = list(argv)
    for index, arg in enumerate(filled):
        if arg == "--":
            break
        following = filled[index + 1] if index + 1 < len(filled) else "-"
        if arg == "--resume" and following.startswith("-"):
            filled[index] = "--resume=latest"
    return filled


def main() -> None:
    from finetune.launch import is_torchrun_child, worker_process

    args = with_resume_value(sys.argv[1:])
    if not is_torchrun_child():
        app(args=args, prog_name="finetune")
        return
    with worker_process(errors):  # one of `run --nproc N`'s processes: the launcher reports
        app(args=args, prog_name="finetune")


if __name__ == "__main__":
    sys.exit(main())
