"""``finetune plan`` (``finetune.describe``): counts checked against the model's own
parameters, text and JSON output."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from rich.console import Console
from safetensors.torch import save_file

from finetune.build import build
from finetune.describe import plan_to_dict, print_load_report, print_plan
from finetune.errors import UserError
from finetune.recipe import Recipe
from finetune.weights import LoadReport
from tests.conftest import invoke_cli, tiny_recipe, write_recipe

SURGERY = {
    "freeze": {
        "until": "layer3",
        "patterns": ["layer4.0.conv1.*"],
        "batchnorm": "frozen",
        "unfreeze": [
            {"epoch": 3, "patterns": ["layer2.*"], "lr": 1.0e-3},
            {"epoch": 5, "patterns": ["layer1.*"]},
        ],
    },
    "optimizer": {
        "name": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1.0e-4,
        "no_decay": True,
        "param_groups": [{"match": "fc.*", "lr": 0.5}, {"match": "layer4.*", "lr_mult": 0.1}],
    },
    "train": {"epochs": 6, "device": "cpu"},
}


def plan(recipe: Recipe):
    """What ``finetune plan`` builds: no data, and no LR range test."""
    return build(recipe, data=False, auto_lr=False)


def _independent_counts() -> dict[str, int]:
    """What the plan must say, from a fresh timm model's named_parameters()."""
    model = timm.create_model("test_resnet", num_classes=3)
    named = dict(model.named_parameters())
    frozen = {
        n
        for n in named
        if n.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer4.0.conv1."))
    }
    return {
        "frozen_params": sum(named[n].numel() for n in frozen),
        "trainable_params": sum(p.numel() for n, p in named.items() if n not in frozen),
        "frozen_tensors": len(frozen),
        "trainable_tensors": len(named) - len(frozen),
        "fc_params": named["fc.weight"].numel() + named["fc.bias"].numel(),
        "layer2_params": sum(p.numel() for n, p in named.items() if n.startswith("layer2.")),
        "batchnorms": sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()),
    }


def test_plan_counts_equal_counts_from_named_parameters():
    info = plan_to_dict(plan(Recipe.from_dict(tiny_recipe(**SURGERY))))
    expected = _independent_counts()
    for key in ("frozen_params", "trainable_params", "frozen_tensors", "trainable_tensors"):
        assert info[key] == expected[key], key
    assert sum(g["params"] for g in info["groups"]) == expected["trainable_params"]
    assert sum(g["tensors"] for g in info["groups"]) == expected["trainable_tensors"]
    groups = {g["name"]: g for g in info["groups"]}
    assert set(groups) == {
        "default",
        "default/no_decay",
        "layer4.*",
        "layer4.*/no_decay",
        "fc.*",
        "fc.*/no_decay",
    }
    assert groups["fc.*"]["params"] + groups["fc.*/no_decay"]["params"] == expected["fc_params"]
    assert (groups["fc.*"]["lr"], groups["fc.*/no_decay"]["weight_decay"]) == (0.5, 0.0)
    assert groups["layer4.*"]["lr"] == pytest.approx(0.005)
    assert len(info["batchnorm"]["frozen_layers"]) == expected["batchnorms"]
    first, second = info["unfreeze"]
    assert (first["epoch"], first["lr"], first["params"]) == (3, 1e-3, expected["layer2_params"])
    assert {g["lr"] for g in first["groups"]} == {1e-3}
    assert {g["lr"] for g in second["groups"]} == {0.05}  # no lr: the rules' values
    assert info["load"] is None


def test_plan_prints_every_section():
    console = Console(record=True, width=120)
    print_plan(plan(Recipe.from_dict(tiny_recipe(**SURGERY))), console)
    text = console.export_text()
    for expected in (
        "test_resnet: ",
        "random initialisation",
        "parameter groups",
        "layer4.*/no_decay",
        "frozen: conv1 (",
        "BatchNorm: frozen",
        "unfreeze at the start of epoch 3: layer2.*",
        "unfreeze@3/default/no_decay",
    ):
        assert expected in text, expected


def test_plan_takes_num_classes_from_an_image_folder(image_folder):
    recipe = tiny_recipe(
        model={"backbone": "test_resnet"},
        data={"train": {"type": "imagefolder", "root": str(image_folder)}},
    )
    built = plan(Recipe.from_dict(recipe))
    assert built.num_classes == 3 and built.network.model.fc.out_features == 3


def test_plan_needs_a_number_for_the_lr():
    with pytest.raises(UserError, match="optimizer.lr: 'auto' is found when training starts"):
        plan(
            Recipe.from_dict(tiny_recipe()).model_copy(
                update={
                    "optimizer": Recipe.from_dict(tiny_recipe()).optimizer.model_copy(
                        update={"lr": "auto"}
                    )
                }
            )
        )


def _load_report_of(state: dict, tmp_path) -> tuple[LoadReport, str]:
    """The load report of test_resnet starting from ``state`` (as a weights file), and the text
    ``print_load_report`` shows for it, on one line."""
    save_file(state, tmp_path / "w.safetensors")
    model = {
        "backbone": "test_resnet",
        "num_classes": 3,
        "pretrained": str(tmp_path / "w.safetensors"),
    }
    report = plan(Recipe.from_dict(tiny_recipe(model=model))).network.load_report
    console = Console(record=True, width=200)
    print_load_report(report, console)
    return report, " ".join(console.export_text().split())


def test_load_report_warns_loudly_when_almost_nothing_matches(tmp_path):
    state = {f"encoder.{k}": v for k, v in timm.create_model("test_resnet").state_dict().items()}
    _, text = _load_report_of(state, tmp_path)
    assert "WARNING: only 0 of the model's" in text
    assert "model.load: {strip_prefix: [encoder.]} would load 90 of the file" in text


def test_load_report_shows_a_rule_that_would_load_more_even_when_most_loaded(tmp_path):
    """The last stage under another prefix: no loud warning, but the rule is shown."""
    state = timm.create_model("test_resnet").state_dict()
    state = {(f"encoder.{k}" if k.startswith("layer3") else k): v for k, v in state.items()}
    report, text = _load_report_of(state, tmp_path)
    assert report.warning is None and "WARNING" not in text
    assert "hint: model.load: {strip_prefix: [encoder.]} would load" in text


def _weights_with_another_head(tmp_path) -> tuple[dict, dict]:
    """A DataParallel-style weights file of a 10-class model, and a 3-class recipe loading it."""
    source = timm.create_model("test_resnet", num_classes=10)
    save_file(
        {f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.safetensors"
    )
    recipe = tiny_recipe(
        **SURGERY,
        model={
            "backbone": "test_resnet",
            "num_classes": 3,
            "pretrained": str(tmp_path / "w.safetensors"),
        },
    )
    return source.state_dict(), recipe


def test_plan_prints_the_load_report_table(tmp_path):
    _, recipe = _weights_with_another_head(tmp_path)
    console = Console(record=True, width=200)
    print_plan(plan(Recipe.from_dict(recipe)), console)
    text = console.export_text()
    assert "shape mismatch │ 2" in text
    assert "fc.bias (file [10] vs model [3]), fc.weight (file [10, 96] vs model [3, 96])" in text
    assert "note: stripped the 'module.' prefix every key carried" in text
    assert "WARNING" not in text


def test_plan_json_from_the_cli(tmp_path):
    state, recipe = _weights_with_another_head(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = invoke_cli("plan", str(path), "--json", "--set", "optimizer.lr=0.1")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    expected = _independent_counts()
    assert info["frozen_params"] == expected["frozen_params"]
    assert info["trainable_params"] == expected["trainable_params"]
    assert {g["name"] for g in info["groups"]} >= {"default", "fc.*"}
    assert {"name", "tensors", "params", "lr", "weight_decay"} <= set(info["groups"][0])
    assert next(g for g in info["groups"] if g["name"] == "default")["lr"] == 0.1  # --set
    load = info["load"]
    assert load["missing"] == ["fc.bias", "fc.weight"] and load["unexpected"] == []
    assert load["mismatched"] == [
        {"key": "fc.bias", "file_shape": [10], "model_shape": [3]},
        {"key": "fc.weight", "file_shape": [10, 96], "model_shape": [3, 96]},
    ]
    assert len(load["loaded"]) == len(state) - 2
    assert info["batchnorm"]["policy"] == "frozen"
    assert [stage["epoch"] for stage in info["unfreeze"]] == [3, 5]


def test_plan_previews_each_group_schedule_with_torch_values(tmp_path):
    recipe = Recipe.from_dict(
        tiny_recipe(
            optimizer={"name": "sgd", "lr": 0.1, "param_groups": [{"match": "fc.*", "lr": 1.0}]},
            scheduler={"name": "cosine", "warmup_epochs": 2, "warmup_start_factor": 0.5},
            train={"epochs": 10, "device": "cpu"},
        )
    )
    schedule = plan_to_dict(plan(recipe))["schedule"]["groups"]
    # Driven directly: LinearLR(0.5 -> 1 over 2 steps), then CosineAnnealingLR over 8 steps.
    params = [torch.zeros(1, requires_grad=True)]
    optimizer = torch.optim.SGD([{"params": params, "lr": 1.0}])
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
    torch_schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], [2])
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        torch_schedule.step()
    for name, base in (("default", 0.1), ("fc.*", 1.0)):
        points = {p["point"]: (p["epoch"], p["lr"]) for p in schedule[name]}
        assert set(points) == {"start", "warmup end", "middle", "end"}
        for epoch, value in points.values():
            assert value == pytest.approx(base * lrs[int(epoch)])


def test_plan_shows_linear_lr_scaling_and_writes_the_lr_plot(tmp_path):
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny_recipe(
            optimizer={"name": "sgd", "lr": 0.1, "lr_scaling": "linear", "base_batch_size": 4}
        ),
    )
    result = invoke_cli("plan", str(path), "--json", "--lr-plot", str(tmp_path / "lr.png"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["lr_scale"] == 2.0  # batch 8 / base 4
    assert info["schedule"]["groups"]["default"][0]["lr"] == pytest.approx(0.2)
    assert (tmp_path / "lr.png").stat().st_size > 0
