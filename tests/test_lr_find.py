"""The LR range test: it puts everything back, its suggestion trains, its command and lr: auto."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from finetune import lr_find
from finetune.build import build, range_test
from finetune.cli import app
from finetune.lr_find import lr_range_test, suggest_lr
from finetune.recipe import Recipe
from finetune.training import run
from tests.conftest import tiny_recipe, write_recipe


def random_batches(n: int = 32, classes: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=generator),
        torch.randint(0, classes, (n,), generator=generator),
    )
    return DataLoader(data, batch_size=8, shuffle=True)


def test_range_test_puts_weights_optimizer_and_rng_back():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    optimizer = torch.optim.SGD(
        [
            {"params": list(model.fc.parameters()), "lr": 0.1, "name": "fc.*"},
            {
                "params": [p for n, p in model.named_parameters() if not n.startswith("fc.")],
                "lr": 0.01,
                "name": "default",
            },
        ],
        lr=0.01,
        momentum=0.9,
    )
    loader = random_batches()
    images, labels = next(iter(loader))
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()  # momentum buffers exist: they must come back too
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    buffers = {k: v["momentum_buffer"].clone() for k, v in state["state"].items()}
    model.eval()
    rng = torch.get_rng_state()

    result = lr_range_test(model, optimizer, loader, start_lr=1e-4, end_lr=10, steps=12)

    assert len(result.lrs) >= 2 and result.lrs[0] == pytest.approx(1e-4)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    after = optimizer.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [0.1, 0.01]
    for key, buffer in buffers.items():
        assert torch.equal(after["state"][key]["momentum_buffer"], buffer)
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    # The ramp kept the groups' ratio, and reports each group's LR at the suggestion.
    assert result.group_lrs["fc.*"] == pytest.approx(10 * result.group_lrs["default"])
    assert result.group_lrs["default"] == pytest.approx(result.suggestion)


def test_suggestion_rules():
    lrs = [10 ** (i / 4 - 5) for i in range(24)]
    losses = [2.0] * 8 + [2.0 - 0.25 * i for i in range(1, 7)] + [0.5] * 4 + [1, 2, 4, 8, 16, 32]
    lr, rule = suggest_lr(lrs, losses, "steepest")
    assert rule == "steepest" and lrs[8] <= lr <= lrs[13]
    assert suggest_lr(lrs, losses, "min10") == (pytest.approx(lrs[13] / 10), "min10")
    # Too few points before the minimum for a slope: a tenth of the minimum's LR.
    assert suggest_lr(lrs[:4], [2.0, 1.0, 3.0, 9.0], "steepest")[1] == "min10"


def digits_recipe() -> Recipe:
    """A small real problem: five handwritten digits, resnet10t at 32 px, from scratch.

    The head starts at zero, so the loss starts at log(5) and the test shows what each LR does
    rather than how far a random head happens to be from the answer.
    """
    return Recipe.from_dict(
        {
            "name": "digits-lr-find",
            "seed": 0,
            "model": {"backbone": "resnet10t", "pretrained": False, "head": {"init": "zeros"}},
            "data": {
                "train": {"type": "digits", "split": "train", "classes": [0, 1, 2, 3, 4]},
                "val": {"type": "digits", "split": "val", "classes": [0, 1, 2, 3, 4]},
                "image_size": 32,
                "crop_pct": 1.0,
                "batch_size": 16,
                "num_workers": 0,
                "augment": [],
                "normalize": "imagenet",
            },
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "train": {"epochs": 1, "device": "cpu"},
        }
    )


def short_training(recipe: Recipe, steps: int) -> list[float]:
    """The training losses of ``steps`` plain optimizer steps on the recipe's data."""
    built = build(recipe)
    model, loader, optimizer = built.model, built.train_loader, built.optimizer
    loader.sampler.set_epoch(1)
    model.train()
    losses = []
    for (images, labels), _ in zip(loader, range(steps), strict=False):
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_suggested_lr_trains_a_real_problem():
    recipe = digits_recipe()
    result = range_test(build(recipe), start_lr=1e-5, end_lr=10, steps=25)
    assert result.diverged_at is not None  # the ramp went far enough to see the loss blow up
    diverged = result.lrs[-1]
    assert 1e-5 < result.suggestion < diverged / 5, result.describe()

    found = recipe.optimizer.model_copy(update={"lr": result.suggestion})
    losses = short_training(recipe.model_copy(update={"optimizer": found}), steps=30)
    assert losses[0] == pytest.approx(math.log(5), rel=1e-3)
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(5), (result.describe(), losses)


def test_lr_find_command_writes_the_plot_and_the_numbers(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    result = CliRunner().invoke(
        app,
        [
            "lr-find",
            str(path),
            "--steps",
            "15",
            "--start-lr",
            "1e-4",
            "--out",
            str(tmp_path / "found"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("suggested optimizer.lr ") and lines[-1] == str(tmp_path / "found")
    saved = json.loads((tmp_path / "found" / "lr_find.json").read_text())
    assert saved["rule"] in ("steepest", "min10") and len(saved["lrs"]) == len(saved["losses"])
    assert (tmp_path / "found" / "lr_find.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--start-lr", "1", "--end-lr", "0.1"], "need 0 < start LR < end LR"),
        (["--rule", "valley"], "unknown rule 'valley'"),
    ],
)
def test_lr_find_bad_input_exits_2(tmp_path, args, message):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    result = CliRunner().invoke(app, ["lr-find", str(path), *args])
    assert result.exit_code == 2 and message in result.output


def test_auto_lr_runs_the_range_test_first_and_records_the_result(tmp_path, monkeypatch):
    monkeypatch.setattr(lr_find, "STEPS", 20)  # 100 by default
    data = tiny_recipe(train={"epochs": 1, "device": "cpu"}, optimizer={"lr": "auto"})
    data["optimizer"]["param_groups"] = [{"match": "fc.*", "lr_mult": 10}]
    result = run(Recipe.from_dict(data), run_dir=tmp_path / "run")
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    found = json.loads((result.run_dir / "lr_find" / "lr_find.json").read_text())
    assert saved["optimizer"]["lr"] == pytest.approx(found["suggestion"], rel=1e-2)
    assert Recipe.load(result.run_dir / "recipe.yaml").optimizer.lr == saved["optimizer"]["lr"]
    assert (result.run_dir / "lr_find" / "lr_find.png").is_file()


def test_lr_find_json_and_saved_numbers_describe_a_geometric_ramp(tmp_path):
    """The data behind lr_find.png: a geometric, increasing ramp from --start-lr, one loss per
    LR, and a suggestion inside the ramp; `--json` prints the same suggestion."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    out = tmp_path / "found"
    result = CliRunner().invoke(
        app,
        [
            "lr-find",
            str(path),
            "--steps",
            "12",
            "--start-lr",
            "1e-4",
            "--end-lr",
            "1",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["out"] == str(out) and printed["rule"] in ("steepest", "min10")
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["suggestion"] == pytest.approx(printed["suggestion"])
    assert saved["group_lrs"] == pytest.approx(printed["group_lrs"])
    assert (saved["start_lr"], saved["end_lr"], saved["steps"]) == (1e-4, 1.0, 12)
    lrs = saved["lrs"]
    assert len(saved["losses"]) == len(saved["smoothed"]) == len(lrs) >= 2
    steps = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert lrs[0] == pytest.approx(1e-4) and all(step > 1 for step in steps)  # increasing
    ratio = (1.0 / 1e-4) ** (1 / 11)  # 12 LRs spaced evenly on a log scale
    assert steps == pytest.approx([ratio] * (len(lrs) - 1))
    if saved["diverged_at"] is None:
        assert len(lrs) == 12 and lrs[-1] == pytest.approx(1.0)
    else:
        # A non-finite loss is not kept; a finite one that diverged is, as the last point.
        assert saved["diverged_at"] <= len(lrs) <= saved["diverged_at"] + 1
    assert all(math.isfinite(loss) for loss in saved["losses"])
    if saved["rule"] == "steepest":  # an LR the ramp tried
        assert lrs[0] <= printed["suggestion"] <= lrs[-1]
    else:  # a tenth of the LR at the lowest loss
        assert printed["suggestion"] * 10 == pytest.approx(
            lrs[saved["smoothed"].index(min(saved["smoothed"]))]
        )
    assert 1e-4 / 10 <= printed["suggestion"] <= 1.0
    assert printed["group_lrs"] == {"default": pytest.approx(printed["suggestion"])}
