"""Does ``finetune run`` train as fast as a bare PyTorch script, Lightning and fastai?

The same task for every contender: a folder of generated JPEGs (made here, in a temporary
folder), torchvision's resnet18 without pretrained weights, the same batch size, SGD with
momentum 0.9 at the same learning rate, epochs, CPU threads and loader workers, a horizontal
flip for training, the validation split scored after every epoch. On a GPU (device auto) every
contender gets the same precision (bf16 autocast where the GPU has it) and channels_last, as
``finetune run`` picks them; ``--compile`` compiles every model (inductor). The contenders:

    finetune   ``finetune run recipe.yaml``, the real command (its recipe is printed)
    bare       the textbook script: torchvision ``ImageFolder``, ``DataLoader``, the loop
    lightning  a ``LightningModule`` and ``Trainer.fit``, on the same loaders as ``bare``
    fastai     ``ImageDataLoaders.from_folder``, ``vision_learner`` (the same resnet18 and
               linear head), ``fine_tune`` (no frozen epoch: the weights are random)

Each run is a fresh process of its own (Lightning and fastai may come from another virtual
environment, ``--peers-python``), in rounds whose order rotates. One global optimizer-step hook,
the same in every process, takes the times: start-up is launch to the end of the first
optimizer step, wall is launch to the return of the training call, and steady img/s is an
epoch's batches after its first divided by the time between its first and its last step (CUDA
is synchronised at those two steps only). CPU per image is the training process's own CPU
time over the same steps, per image (loader workers not counted): a CPU shared with other work
slows wall time more than it adds CPU time. A peer that is not installed is skipped, and said so.

    python benchmarks/vs_peers.py                               # CPU-sized: 64 px, 2 epochs
    python benchmarks/vs_peers.py --size 160 --images 4096 --batch 128 --epochs 3 --workers 8
    python benchmarks/vs_peers.py --peers-python /tmp/peers-venv/bin/python --compile

Lightning and fastai: ``pip install -e ".[bench]"``, or a separate environment for them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONTENDERS = ("finetune", "bare", "lightning", "fastai")
PEER_MODULES = {"lightning": "lightning", "fastai": "fastai.vision.all"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as finetune's auto


# ----------------------------------------------------------------------------- the parent
def make_image_folder(root: Path, images: int, classes: int, size: int) -> None:
    """``train/`` with ``images`` JPEGs and ``val/`` with a quarter as many, in ``classes``
    class folders; each class has its own colour under the noise (the task is learnable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(classes, images // 4))):
        for index in range(count):
            label = index % classes
            pixels = rng.normal(128, 40, (size, size, 3))
            pixels[..., label % 3] += 60 * (1 + label // 3)
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(folder / f"{index:05d}.jpg", quality=90)


def settings(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """What every contender is told: the parent resolves device and precision once."""
    import torch

    cuda = torch.cuda.is_available()
    precision = "bf16" if args.precision == "auto" and cuda else args.precision
    if precision == "auto" or (precision == "bf16" and cuda and not torch.cuda.is_bf16_supported()):
        precision = "fp32"
    return {
        "root": str(root / "data"),
        "out": str(root / "out"),
        "classes": args.classes,
        "size": args.size,
        "batch": args.batch,
        "epochs": args.epochs,
        "lr": args.lr,
        "workers": args.workers,
        "device": "cuda" if cuda else "cpu",
        "precision": precision,
        "channels_last": cuda,  # finetune's train.channels_last: auto
        "compile": args.compile,
        "steps_per_epoch": args.images // args.batch,
    }


def available(name: str, python: str) -> str | None:
    """Why contender ``name`` cannot run with ``python``, or ``None``."""
    if name not in PEER_MODULES:
        return None
    found = subprocess.run([python, "-c", f"import {PEER_MODULES[name]}"], capture_output=True)
    return None if found.returncode == 0 else f"absent: cannot import {name} with {python}"


def run_one(name: str, python: str, spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Launch one contender in a fresh process; its times relative to the launch."""
    result = Path(spec["out"]) / f"{name}.json"
    result.unlink(missing_ok=True)
    command = [python, __file__, "--child", name, "--spec", json.dumps(spec)]
    # Each run compiles from cold: no contender finds kernels another one built.
    cache = tempfile.mkdtemp(prefix=f"{name}-compile-cache-", dir=spec["out"])
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": f"{cache}/triton"}
    launch = time.time()
    with log.open("a") as output:
        done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"{name} failed (exit {done.returncode}); its output is in {log}")
    report = json.loads(result.read_text())
    steps, per_epoch = report["steps"], spec["steps_per_epoch"]
    if len(steps) != spec["epochs"] * per_epoch:  # the epochs would be split in the wrong places
        raise SystemExit(
            f"{name} took {len(steps)} optimizer steps, not {spec['epochs']} x {per_epoch}"
        )

    def per_image(times: list[float]) -> list[float]:
        """Each epoch's seconds per image, from its first step to its last."""
        epochs = [times[i : i + per_epoch] for i in range(0, len(times), per_epoch)]
        return [(e[-1] - e[0]) / ((len(e) - 1) * spec["batch"]) for e in epochs]

    return {
        "wall": report["end"] - launch,
        "first_step": steps[0] - launch,
        "img_per_s": [1 / seconds for seconds in per_image(steps)],
        "cpu_per_image": per_image(report["cpu"]),
        "torch": report["torch"],
    }


def steady(values: list[float]) -> float:
    """The steady state of a per-epoch figure: the median epoch after the first (which warms up
    caches, cuDNN's algorithm search and compilation), or the only one."""
    return statistics.median(values[1:] or values)


def medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's figures, each the median over the rounds."""
    epochs = len(results[0]["img_per_s"])
    return {
        "wall": statistics.median(r["wall"] for r in results),
        "first_step": statistics.median(r["first_step"] for r in results),
        "img_per_s": [statistics.median(r["img_per_s"][i] for r in results) for i in range(epochs)],
        "steady": statistics.median(steady(r["img_per_s"]) for r in results),
        "cpu": statistics.median(steady(r["cpu_per_image"]) for r in results),
    }


def print_table(rows: dict[str, list[dict[str, Any]]]) -> None:
    """A Markdown table of the medians; the ratios and differences are against ``bare``."""
    figures = {name: medians(results) for name, results in rows.items()}
    bare = figures.get("bare")
    columns = (
        "contender, wall s, first step s, img/s per epoch, steady img/s, epoch time / bare, "
        "CPU per image / bare, first step - bare s, wall - bare s"
    ).split(", ")
    print(f"\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}")
    for name, got in figures.items():
        rates = ", ".join(f"{rate:.1f}" for rate in got["img_per_s"])
        versus = (
            f"{bare['steady'] / got['steady']:.3f} | {got['cpu'] / bare['cpu']:.3f} "
            f"| {got['first_step'] - bare['first_step']:+.2f} | {got['wall'] - bare['wall']:+.2f}"
            if bare
            else "- | - | - | -"
        )
        print(
            f"| {name} | {got['wall']:.2f} | {got['first_step']:.2f} | {rates} "
            f"| {got['steady']:.1f} | {versus} |"
        )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=512, help="training images (val: 1/4)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2, help="data loader workers")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--peers-python", default=sys.executable, help="for lightning, fastai")
    return parser.parse_args()


def compare(args: argparse.Namespace) -> None:
    """Make the image folder, run the contenders in rotating rounds, print the table."""
    # Every process, ours and the peers', computes with the same number of threads.
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    pythons = {
        name: args.peers_python if name in PEER_MODULES else sys.executable for name in args.only
    }
    contenders = []
    for name in args.only:
        reason = available(name, pythons[name])
        if reason:
            print(f"{name}: skipped ({reason}; pip install -e '.[bench]' or --peers-python)")
        else:
            contenders.append(name)
    with tempfile.TemporaryDirectory(prefix="vs-peers-") as folder:
        root = Path(folder)
        make_image_folder(root / "data", args.images, args.classes, args.size)
        spec = settings(args, root)
        Path(spec["out"]).mkdir()
        log = Path(tempfile.gettempdir()) / "vs_peers.log"
        log.write_text("")
        print(
            f"resnet18 @ {args.size}px, {args.images} train / {args.images // 4} val JPEGs, "
            f"batch {args.batch}, SGD, {args.epochs} epochs, {args.workers} workers, "
            f"{args.threads} threads, {spec['device']}, {spec['precision']}"
            f"{', compiled' if args.compile else ''}; the runs' output: {log}"
        )
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
        for round_index in range(args.rounds):
            shift = round_index % len(contenders)
            for name in contenders[shift:] + contenders[:shift]:  # the order rotates
                result = run_one(name, pythons[name], spec, log)
                rows[name].append(result)
                rates = " ".join(f"{rate:.1f}" for rate in result["img_per_s"])
                print(
                    f"round {round_index + 1} {name:10} wall {result['wall']:6.2f} s  first "
                    f"step {result['first_step']:5.2f} s  img/s per epoch {rates}  "
                    f"(torch {result['torch']})",
                    flush=True,
                )
    print_table({name: rows[name] for name in CONTENDERS if name in rows})


def main() -> None:
    args = parse_arguments()
    if args.child:
        run_child(args.child, json.loads(args.spec))
    else:
        compare(args)


# ------------------------------------------------------------------------------ the children
def run_child(name: str, spec: dict[str, Any]) -> None:
    """Train as contender ``name`` and write the optimizer steps' times for the parent."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds at each step (loader workers not counted)
    per_epoch = spec["steps_per_epoch"]

    def timed(optimizer: Any, args: Any, kwargs: Any) -> None:
        # Synchronise at an epoch's first and last step only: the others stay asynchronous.
        if len(steps) % per_epoch in (0, per_epoch - 1) and torch.cuda.is_available():
            torch.cuda.synchronize()
        steps.append(time.time())
        cpu.append(time.process_time())

    register_optimizer_step_post_hook(timed)
    {"finetune": finetune_run, "bare": bare, "lightning": lightning, "fastai": fastai}[name](spec)
    end = time.time()
    report = {"steps": steps, "cpu": cpu, "end": end, "torch": torch.__version__}
    (Path(spec["out"]) / f"{name}.json").write_text(json.dumps(report))


def finetune_run(spec: dict[str, Any]) -> None:
    """``finetune run recipe.yaml --run-dir ...``, through the command's own entry point."""
    import yaml

    from finetune.cli import main as finetune_main

    root, out = Path(spec["root"]), Path(spec["out"])
    recipe = {
        "name": "vs-peers",
        "model": {"backbone": "torchvision:resnet18", "pretrained": False},
        "data": {
            "train": {"type": "imagefolder", "root": str(root / "train")},
            "val": {"type": "imagefolder", "root": str(root / "val")},
            "image_size": spec["size"],
            "batch_size": spec["batch"],
            "num_workers": spec["workers"],
            "augment": ["hflip"],
        },
        "optimizer": {"name": "sgd", "lr": spec["lr"], "momentum": 0.9},
        "scheduler": {"name": "none"},
        "train": {
            "epochs": spec["epochs"],
            "device": spec["device"],
            "precision": spec["precision"],
            "channels_last": spec["channels_last"],
            "compile": spec["compile"],
        },
        "output": {"dir": str(out / "checkpoints")},
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    print(path.read_text())
    run_dir = tempfile.mkdtemp(prefix="finetune-run-", dir=out)  # a new run folder every time
    sys.argv = ["finetune", "run", str(path), "--run-dir", run_dir]
    try:
        finetune_main()
    except SystemExit as exit:  # typer ends with sys.exit(0)
        if exit.code:
            raise


def torchvision_loaders(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The textbook ``ImageFolder`` loaders (bare and Lightning); evaluation resizes to
    size / 0.875 and crops the centre, as finetune does."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    size, root = spec["size"], Path(spec["root"])
    train_tf = T.Compose(
        [
            T.Resize(size),
            T.CenterCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    val_tf = T.Compose(
        [T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    cuda = spec["device"] == "cuda"
    common = {"num_workers": spec["workers"], "pin_memory": cuda}
    train = DataLoader(
        ImageFolder(root / "train", train_tf),
        batch_size=spec["batch"],
        shuffle=True,
        drop_last=True,
        **common,
    )
    val = DataLoader(ImageFolder(root / "val", val_tf), batch_size=2 * spec["batch"], **common)
    return train, val


def resnet18(spec: dict[str, Any]) -> Any:
    import torch
    import torchvision

    model = torchvision.models.resnet18(num_classes=spec["classes"])
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(spec: dict[str, Any]) -> Any:
    import torch

    bf16 = spec["precision"] == "bf16"
    return torch.autocast(spec["device"], dtype=torch.bfloat16, enabled=bf16)


def bare(spec: dict[str, Any]) -> None:
    """The loop as the PyTorch tutorials write it."""
    import torch
    import torch.nn.functional as F

    device = torch.device(spec["device"])
    train, val = torchvision_loaders(spec)
    model = resnet18(spec).to(device)
    if spec["compile"]:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=0.9)
    for epoch in range(spec["epochs"]):
        model.train()
        for images, labels in train:
            images, labels = (
                images.to(device, non_blocking=True),
                labels.to(device, non_blocking=True),
            )
            with autocast(spec):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad(), autocast(spec):
            for images, labels in val:
                logits = model(images.to(device, non_blocking=True))
                correct += (logits.argmax(1).cpu() == labels).sum().item()
        print(f"epoch {epoch + 1}: val top1 {correct / len(val.dataset):.3f}", flush=True)
    torch.save(model.state_dict(), Path(spec["out"]) / "bare.pt")


def lightning(spec: dict[str, Any]) -> None:
    """A ``LightningModule`` with the same model and optimizer, and ``Trainer.fit``."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = resnet18(spec)
            if spec["compile"]:
                self.model.compile()

        def training_step(self, batch: Any, index: int) -> Any:
            images, labels = batch
            return F.cross_entropy(self.model(images), labels)

        def validation_step(self, batch: Any, index: int) -> None:
            images, labels = batch
            accuracy = (self.model(images).argmax(1) == labels).float().mean()
            self.log("val_top1", accuracy, prog_bar=True)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=spec["lr"], momentum=0.9)

    trainer = L.Trainer(
        max_epochs=spec["epochs"],
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if spec["precision"] == "bf16" else "32-true",
        logger=False,
        default_root_dir=Path(spec["out"]) / "lightning",
    )
    trainer.fit(Classifier(), *torchvision_loaders(spec))


def fastai(spec: dict[str, Any]) -> None:
    """``vision_learner`` + ``fine_tune``, with torchvision's resnet18 head (avg pool, linear)
    instead of fastai's larger one, so that the three train the same model."""
    from functools import partial

    import torch
    from fastai.vision.all import (
        FlipItem,
        ImageDataLoaders,
        Normalize,
        OptimWrapper,
        Resize,
        accuracy,
        vision_learner,
    )
    from torch import nn
    from torchvision.models import resnet18 as torchvision_resnet18

    dls = ImageDataLoaders.from_folder(
        spec["root"],
        train="train",
        valid="val",
        item_tfms=[Resize(spec["size"]), FlipItem(0.5)],
        batch_tfms=Normalize.from_stats(MEAN, STD),
        bs=spec["batch"],
        num_workers=spec["workers"],
        device=torch.device(spec["device"]),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, spec["classes"]))
    learn = vision_learner(
        dls,
        torchvision_resnet18,
        pretrained=False,
        custom_head=head,
        metrics=accuracy,
        opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=0.9),
        path=Path(spec["out"]) / "fastai",
    )
    if spec["precision"] == "bf16":
        learn = learn.to_bf16()
    if spec["channels_last"]:
        learn.model.to(memory_format=torch.channels_last)
    if spec["compile"]:
        learn.model.compile()
    learn.fine_tune(spec["epochs"], base_lr=spec["lr"], freeze_epochs=0)


if __name__ == "__main__":
    main()
