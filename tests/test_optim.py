"""Optimizers by name: torch's with torch's defaults, timm's registry, options, LR scaling."""

from __future__ import annotations

import inspect
from collections import OrderedDict

import pytest
import torch
from torch import nn

from finetune.config.optim import TORCH_OPTIMIZERS, OptimizerConfig, ParamGroupRule
from finetune.errors import UserError
from finetune.optim import (
    OPTIMIZERS,
    build_optimizer,
    list_optimizers,
    lr_scale_factor,
    optimizer_arguments,
    param_groups,
)
from finetune.recipe import Recipe
from tests.conftest import tiny_recipe


def model() -> nn.Module:
    return nn.Sequential(OrderedDict(body=nn.Linear(4, 8), fc=nn.Linear(8, 3)))


def groups(weight_decay: float = 1e-4) -> list[dict]:
    """Two groups with their own LR and weight decay: body at 0.01, the head at 0.1."""
    return param_groups(
        model(),
        lr=0.01,
        weight_decay=weight_decay,
        rules=[ParamGroupRule(match="fc.*", lr=0.1, weight_decay=0.0)],
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_torch_optimizers_keep_torch_defaults(name):
    """timm's factory builds them, but e.g. sgd is not made Nesterov with momentum 0.9."""
    built = build_optimizer(groups(), name=name, lr=0.01)
    cls = OPTIMIZERS[name]
    assert type(built) is cls
    reference = cls(model().parameters(), lr=0.01)
    assert {k: built.defaults[k] for k in reference.defaults if k != "weight_decay"} == {
        k: v for k, v in reference.defaults.items() if k != "weight_decay"
    }


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb", "lion", "adan"])
def test_groups_keep_their_own_lr_weight_decay_and_name(name):
    built = build_optimizer(groups(), name=name, lr=0.01, weight_decay=1e-4)
    summary = [(g["name"], g["lr"], g["weight_decay"]) for g in built.param_groups]
    assert summary == [("default", 0.01, 1e-4), ("fc.*", 0.1, 0.0)]
    assert all("param_names" not in g for g in built.param_groups)
    loss = sum(p.sum() for g in built.param_groups for p in g["params"])
    loss.backward()
    built.step()  # every optimizer takes a step


@pytest.mark.parametrize(
    "name, options, expected",
    [
        (
            "sgd",
            {"momentum": 0.9, "nesterov": True, "dampening": 0.0},
            {"momentum": 0.9, "nesterov": True, "dampening": 0.0},
        ),
        ("sgd", {"momentum": 0.5, "dampening": 0.1}, {"momentum": 0.5, "dampening": 0.1}),
        (
            "rmsprop",
            {"alpha": 0.9, "eps": 1e-8, "momentum": 0.9, "centered": True},
            {"alpha": 0.9, "eps": 1e-8, "momentum": 0.9, "centered": True},
        ),
        (
            "adam",
            {"betas": (0.8, 0.9), "eps": 1e-6, "options": {"amsgrad": True}},
            {"betas": (0.8, 0.9), "eps": 1e-6, "amsgrad": True},
        ),
        (
            "adagrad",
            {"options": {"lr_decay": 0.01, "initial_accumulator_value": 0.1}},
            {"lr_decay": 0.01, "initial_accumulator_value": 0.1},
        ),
        ("adadelta", {"eps": 1e-5, "options": {"rho": 0.8}}, {"eps": 1e-5, "rho": 0.8}),
        (
            "adan",
            {"betas": (0.9, 0.9, 0.9), "options": {"no_prox": True}},
            {"betas": (0.9, 0.9, 0.9), "no_prox": True},
        ),
    ],
)
def test_options_pass_through(name, options, expected):
    built = build_optimizer(groups(), name=name, lr=0.01, **options)
    assert {key: built.defaults[key] for key in expected} == expected


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("adam", {"momentum": 0.9}, "optimizer.momentum: adam (Adam) has no option 'momentum'"),
        ("sgd", {"options": {"rhoo": 0.9}}, "optimizer.options.rhoo: sgd (SGD) has no option"),
        ("lion", {"eps": 1e-8}, "optimizer.eps: lion (Lion) has no option 'eps'"),
        ("sgd", {"options": {"momentum": 0.9}}, "optimizer.options.momentum: momentum has its own"),
    ],
)
def test_an_option_the_optimizer_lacks_is_named(name, options, message):
    with pytest.raises(UserError, match="it takes|own key") as caught:
        build_optimizer(groups(), name=name, lr=0.01, **options)
    assert message in str(caught.value)


def test_unknown_optimizer_lists_the_names():
    with pytest.raises(UserError) as caught:
        build_optimizer(groups(), name="adamx", lr=0.01)
    message = str(caught.value)
    assert message.startswith("optimizer.name: unknown optimizer 'adamx'")
    assert "sgd, adam, adamw, rmsprop, adagrad, adadelta" in message and "lamb" in message


def test_the_recipe_checks_optimizer_names():
    assert Recipe.from_dict(tiny_recipe(optimizer={"name": "lamb"})).optimizer.name == "lamb"
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(tiny_recipe(optimizer={"name": "adamww"}))
    (line,) = caught.value.problems
    assert line.startswith("optimizer.name: unknown optimizer; did you mean 'adamw'?")
    assert "lion" in line


def test_recipe_names_torch_optimizers_like_optim():
    assert tuple(OPTIMIZERS) == TORCH_OPTIMIZERS
    assert list_optimizers()[: len(OPTIMIZERS)] == list(OPTIMIZERS)


def test_optimizer_section_maps_onto_build_optimizer():
    config = OptimizerConfig(
        name="rmsprop",
        lr=0.02,
        momentum=0.9,
        centered=True,
        options={"foreach": False},
        lr_scaling="linear",
    )
    arguments = optimizer_arguments(config)
    assert set(arguments) <= set(inspect.signature(build_optimizer).parameters)
    assert "lr_scaling" not in arguments and "param_groups" not in arguments
    built = build_optimizer(groups(), **arguments)
    assert built.defaults["centered"] is True and built.defaults["foreach"] is False


# ------------------------------------------------------------------------------------ LR scaling
def test_linear_scaling_rule(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert lr_scale_factor(lr_scaling="none", batch_size=512) == 1.0
    assert lr_scale_factor(lr_scaling="linear", batch_size=64, base_batch_size=256) == 0.25
    assert (
        lr_scale_factor(
            lr_scaling="linear",
            batch_size=64,
            grad_accum_steps=2,
            base_batch_size=256,
            world_size=4,
        )
        == 2.0
    )
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert lr_scale_factor(lr_scaling="linear", batch_size=32, base_batch_size=256) == 1.0


def test_lr_scale_multiplies_every_group_and_leaves_the_groups_alone():
    original = groups()
    built = build_optimizer(original, name="sgd", lr=0.01, lr_scale=4.0)
    assert [g["lr"] for g in built.param_groups] == pytest.approx([0.04, 0.4])
    assert built.defaults["lr"] == pytest.approx(0.04)
    assert [g["lr"] for g in original] == [0.01, 0.1]


def test_no_trainable_parameter_is_an_error():
    with pytest.raises(UserError, match="no trainable parameters"):
        build_optimizer([], name="sgd", lr=0.1)


def test_optimizer_state_is_saved_for_weights_only_loading(tmp_path):
    built = build_optimizer(groups(), name="lamb", lr=0.01)
    sum(p.sum() for g in built.param_groups for p in g["params"]).backward()
    built.step()
    torch.save(built.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert [g["name"] for g in loaded["param_groups"]] == ["default", "fc.*"]
