"""Shared fixtures: tiny image folders, tiny recipes and a runner for the real CLI."""

from __future__ import annotations

import os

# Tests run two at a time (pytest-xdist, see pyproject.toml) on small models: one thread per
# process beats two processes fighting over every core. Set before numpy or torch load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import contextlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def make_image_folder(
    root: Path, classes: list[str], per_class: int, size: int = 20, seed: int = 0
) -> Path:
    """Class folders of PNG and JPEG images whose colour depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), dtype=np.float32)
            base[..., index % 3] = 200
            pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            suffix = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(pixels).save(folder / f"img{i}.{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", ["cat", "dog", "fox"], per_class=6)


ODD_MODES = ("L", "P", "RGBA", "CMYK", "I;16")


def add_odd_files(root: Path, size: int = 20) -> dict[str, Path]:
    """One image per odd mode in ``root/cat``, a truncated JPEG in ``root/dog``, and files that
    must be ignored: a text file, a hidden file, a hidden folder."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    files = {}
    for mode in ODD_MODES:
        if mode == "I;16":
            image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
        elif mode == "P":
            image = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        else:
            image = Image.fromarray(pixels).convert(mode)
        path = root / "cat" / f"odd_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        image.save(path, **({"transparency": 0} if mode == "P" else {}))
        files[mode] = path
    whole = (root / "dog" / "img1.jpg").read_bytes()
    files["truncated"] = root / "dog" / "truncated.jpg"
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"macOS metadata")
    (root / ".ipynb_checkpoints").mkdir()
    return files


@pytest.fixture
def odd_folder(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    root = make_image_folder(tmp_path / "images", ["cat", "dog", "fox"], per_class=4)
    return root, add_odd_files(root)


def tiny_recipe(**sections) -> dict:
    """A recipe for a tiny timm model on random images that trains in about a second."""
    recipe = {
        "name": "tiny",
        "seed": 0,
        "model": {"backbone": "test_resnet", "num_classes": 3},
        "data": {
            "train": {"type": "fake", "num_samples": 24, "num_classes": 3},
            "val": {"type": "fake", "num_samples": 12, "num_classes": 3, "seed": 1},
            "image_size": 32,
            "batch_size": 8,
            "num_workers": 0,
        },
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 2, "device": "cpu"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m finetune ARGS`` in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def invoke_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command line in this process (typer's ``CliRunner``), as ``run_cli`` reports it:
    for tests of what a command writes and prints, without the seconds a new interpreter spends
    importing torch. What only a process shows (signals, torchrun, imports, environment read
    at import) stays with ``run_cli``."""
    from typer.testing import CliRunner

    from finetune.cli import app, with_resume_value

    with contextlib.chdir(cwd or Path.cwd()):
        result = CliRunner().invoke(app, with_resume_value(list(args)), prog_name="finetune")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an escaped exception is a bug: show its traceback
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def cli(*args: str) -> str:
    """``invoke_cli`` of a command that must succeed; its stdout."""
    result = invoke_cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_on_image_folder(root: Path, classes: list[str]) -> tuple[Path, Path]:
    """``finetune run`` of test_resnet for one epoch on a small image folder made under
    ``root`` (train and val alike); the run folder and the image folder."""
    images = make_image_folder(root / "images", classes, per_class=4)
    recipe = tiny_recipe(
        data={
            "train": {"type": "imagefolder", "root": str(images)},
            "val": {"type": "imagefolder", "root": str(images)},
        },
        train={"epochs": 1, "device": "cpu"},
    )
    cli("run", str(write_recipe(root / "r.yaml", recipe)), "--run-dir", str(root / "run"))
    return root / "run", images


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package), loaded once, with
    benchmarks/ on ``sys.path`` for the helpers the scripts share."""
    if name not in sys.modules:
        folder = str(REPO / "benchmarks")
        if folder not in sys.path:
            sys.path.append(folder)
        spec = importlib.util.spec_from_file_location(name, f"{folder}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while defined
        spec.loader.exec_module(module)
    return sys.modules[name]
