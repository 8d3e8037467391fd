"""Every shipped recipe in recipes/ runs end to end with `finetune run`, shrunk by --set to one
epoch on a few tiny images. digits-finetune runs after digits-pretrain, whose run folder is its
`model.pretrained`, exactly as the quickstart chains them. The runs share this process
(``invoke_cli``): the recipes are under test here, and test_cli.py runs the command itself.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, invoke_cli, make_image_folder

RECIPES = REPO / "recipes"
SHRINK = ["train.epochs=1", "train.device=cpu", "data.num_workers=0"]
DIGITS = [*SHRINK, "data.train.per_class=2", "data.val.per_class=1"]  # 10 and 5 images


def overrides(tmp: Path) -> dict[str, list[str]]:
    """The --set values that shrink each recipe; every file in recipes/ must have an entry."""
    images = make_image_folder(tmp / "photos", ["cat", "dog"], per_class=3, size=24)
    return {
        "digits-pretrain": DIGITS,
        "digits-finetune": [*DIGITS, f"model.pretrained={tmp / 'digits-pretrain'}"],
        "digits-scratch": DIGITS,
        "resnet50-imagefolder": [
            *SHRINK,
            f"data.train.root={images}",
            f"data.val.root={images}",
            "model.backbone=resnet10t",
            "model.pretrained=false",
            "data.image_size=32",
            "data.batch_size=4",
        ],
    }


def run_recipe(name: str, sets: list[str], tmp: Path) -> subprocess.CompletedProcess:
    args = ["run", str(RECIPES / f"{name}.yaml"), "--run-dir", str(tmp / name)]
    for item in sets:
        args += ["--set", item]
    # cwd: the recipes' relative default paths (checkpoints/...) must not touch the repository.
    return invoke_cli(*args, cwd=tmp)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    tmp = tmp_path_factory.mktemp("recipes")
    sets = overrides(tmp)
    done: dict[str, subprocess.CompletedProcess] = {}
    for name in sets:  # digits-pretrain first
        if name == "digits-finetune" and done["digits-pretrain"].returncode != 0:
            continue  # nothing to load: its test says why
        done[name] = run_recipe(name, sets[name], tmp)
    return tmp, done


def test_every_recipe_has_a_shrunk_run(tmp_path):
    shipped = {path.stem for path in RECIPES.rglob("*.yaml")}
    assert shipped == set(overrides(tmp_path))


@pytest.mark.parametrize(
    "name", ["digits-pretrain", "digits-finetune", "digits-scratch", "resnet50-imagefolder"]
)
def test_recipe_runs_end_to_end(runs, name):
    tmp, done = runs
    assert name in done, "digits-pretrain failed, so digits-finetune had nothing to load"
    result = done[name]
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp / name
    assert result.stdout.strip().splitlines()[-1] == str(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    assert summary["processes"] == 1 and summary["backend"] is None  # no --nproc: no DDP
    assert (run_dir / "best" / "model.safetensors").is_file()
    assert not (tmp / "checkpoints").exists()  # --run-dir: nothing in the default place


def test_digits_finetune_loads_the_pretrain_run_without_its_head(runs):
    tmp, done = runs
    assert done.get("digits-finetune") and done["digits-finetune"].returncode == 0
    report = json.loads((tmp / "digits-finetune" / "load_report.json").read_text())
    assert sorted(report["excluded"]) == ["fc.bias", "fc.weight"]
    assert report["counts"]["loaded"] > 10 and report["unexpected"] == []
    assert not (tmp / "digits-scratch" / "load_report.json").exists()  # pretrained: false
