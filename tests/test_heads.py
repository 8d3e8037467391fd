"""Heads: built-in linear and mlp, pooling, initialisation, custom heads and the README example."""

from __future__ import annotations

import shutil
import textwrap

import pytest
import torch
from torch import nn

import finetune
from finetune import heads
from finetune.config.model import HeadConfig
from finetune.errors import UserError
from finetune.model import build_model
from finetune.recipe import Recipe
from tests.conftest import REPO, tiny_recipe

SIZES = {"test_resnet": 32, "test_efficientnet": 32, "test_vit": 160, "test_convnext": 64}


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    """Heads registered by a test stay in that test."""
    monkeypatch.setattr(heads, "HEADS", dict(heads.HEADS))


# ------------------------------------------------------------------------------------ built-in
@pytest.mark.parametrize("backbone", list(SIZES))
def test_mlp_head_on_every_backbone(backbone):
    config = HeadConfig(
        type="mlp", hidden=[32, 16], activation="gelu", norm="layernorm", dropout=0.1
    )
    built = build_model(backbone=backbone, num_classes=4, head=config)
    head = built.model.get_submodule(built.head_names[0])
    assert [type(m) for m in head] == [
        nn.Linear,
        nn.LayerNorm,
        nn.GELU,
        nn.Dropout,
        nn.Linear,
        nn.LayerNorm,
        nn.GELU,
        nn.Dropout,
        nn.Linear,
    ]
    assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (
        built.in_features,
        32,
        4,
    )
    size = SIZES[backbone]
    assert built.model(torch.randn(2, 3, size, size)).shape == (2, 4)
    names = [
        n for n, _ in built.model.named_parameters() if n.startswith(built.head_names[0] + ".")
    ]
    assert f"{built.head_names[0]}.0.weight" in names  # head parameters sit under the old name


def test_mlp_with_batchnorm_and_default_sizes():
    built = build_model(
        backbone="test_resnet", num_classes=3, head=HeadConfig(type="mlp", norm="batchnorm")
    )
    assert [type(m) for m in built.model.fc] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert built.model.fc[0].out_features == 512


@pytest.mark.parametrize(
    "backbone, pool, features",
    [
        ("test_resnet", "avg", 96),
        ("test_resnet", "max", 96),
        ("test_resnet", "avgmax", 96),
        ("test_resnet", "catavgmax", 192),
        ("test_efficientnet", "max", 256),
        ("test_convnext", "max", 64),
        ("test_vit", "avg", 64),
        ("test_vit", "token", 64),
    ],
)
def test_pooling_where_the_backbone_allows_it(backbone, pool, features):
    built = build_model(backbone=backbone, num_classes=3, head=HeadConfig(pool=pool))
    assert built.in_features == features
    size = SIZES[backbone]
    assert built.model(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_max_pooling_changes_the_features():
    torch.manual_seed(0)
    avg = build_model(backbone="test_resnet", num_classes=3).model.eval()
    torch.manual_seed(0)
    mx = build_model(backbone="test_resnet", num_classes=3, head=HeadConfig(pool="max")).model
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = avg.forward_features(images)
        assert torch.equal(mx.eval().forward_head(features, pre_logits=True), features.amax((2, 3)))


@pytest.mark.parametrize(
    "backbone, pool", [("test_resnet", "token"), ("torchvision:resnet18", "max")]
)
def test_pooling_the_backbone_cannot_do_is_an_error(backbone, pool):
    with pytest.raises(UserError, match="model.head.pool"):
        build_model(backbone=backbone, num_classes=3, head=HeadConfig(pool=pool))


# ------------------------------------------------------------------------------ initialisation
def test_initialisation_of_new_layers():
    def head(init: str) -> nn.Module:
        return build_model(
            backbone="test_vit",
            num_classes=10,
            head=HeadConfig(type="mlp", hidden=[256], init=init),
        ).model.head

    zeros = head("zeros")
    assert all(torch.count_nonzero(p) == 0 for p in zeros.parameters())
    trunc = head("trunc_normal")
    assert trunc[0].weight.std().item() == pytest.approx(0.0176, rel=0.1)  # cut at 2 std
    assert trunc[0].weight.abs().max() <= 0.04 and torch.count_nonzero(trunc[0].bias) == 0
    xavier = head("xavier")[0].weight
    assert xavier.abs().max() <= (6 / (64 + 256)) ** 0.5
    kaiming = head("kaiming_normal")  # fan_in: std sqrt(2 / 64), sqrt(2 / 256) for the last
    assert kaiming[0].weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.1)
    assert kaiming[-1].weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.2)
    uniform = head("kaiming_uniform")[0].weight  # fan_in: bound sqrt(6 / 64)
    assert uniform.abs().max() <= (6 / 64) ** 0.5


# -------------------------------------------------------------------------------- custom heads
def test_registered_head_gets_in_features_num_classes_and_args():
    seen = {}

    @finetune.register_head("probe")
    class Probe(nn.Module):
        def __init__(self, in_features: int, num_classes: int, width: int = 4) -> None:
            super().__init__()
            seen.update(in_features=in_features, num_classes=num_classes, width=width)
            self.body = nn.Sequential(nn.Linear(in_features, width), nn.Linear(width, num_classes))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.body(features)

    assert "probe" in finetune.list_heads()
    built = build_model(
        backbone="test_resnet",
        num_classes=5,
        head=HeadConfig(type="probe", args={"width": 7}, init="zeros"),
    )
    assert seen == {"in_features": 96, "num_classes": 5, "width": 7}
    assert isinstance(built.model.fc, Probe)
    assert torch.count_nonzero(built.model.fc.body[0].weight) == 0  # initialised by us
    with pytest.raises(UserError, match="the probe head rejected its arguments"):
        build_model(
            backbone="test_resnet", num_classes=5, head=HeadConfig(type="probe", args={"depth": 2})
        )


def test_head_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_heads.py").write_text(
        textwrap.dedent("""
        from torch import nn

        class Twice(nn.Module):
            def __init__(self, in_features, num_classes, scale=2.0):
                super().__init__()
                self.fc = nn.Linear(in_features, num_classes)
                self.scale = scale

            def forward(self, features):
                return self.scale * self.fc(features)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    built = build_model(
        backbone="test_resnet",
        num_classes=3,
        head=HeadConfig(type="my_heads:Twice", args={"scale": 3.0}),
    )
    assert type(built.model.fc).__name__ == "Twice" and built.model.fc.scale == 3.0
    with pytest.raises(UserError, match="has no head named 'Thrice'"):
        build_model(backbone="test_resnet", num_classes=3, head=HeadConfig(type="my_heads:Thrice"))
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        build_model(
            backbone="test_resnet", num_classes=3, head=HeadConfig(type="no_such_module:Head")
        )


def test_unknown_head_type_lists_the_registered_ones():
    with pytest.raises(UserError) as caught:
        build_model(backbone="test_resnet", num_classes=3, head=HeadConfig(type="mpl"))
    message = str(caught.value)
    assert "unknown head 'mpl'" in message and "did you mean 'mlp'" in message
    # Other tests in the same process may have registered heads of their own (the README's
    # "cosine"): the list holds at least the built-in ones, sorted.
    listed = message.split("registered heads: ", 1)[1].split(" (", 1)[0].split(", ")
    assert {"linear", "mlp"} <= set(listed) and listed == sorted(listed)


@pytest.mark.parametrize(
    "head, expected",
    [
        ({"type": "linear", "hidden": [64]}, "hidden: options of the mlp head"),
        ({"type": "cosine", "dropout": 0.2}, "takes its options under args"),
        ({"type": "mlp", "pool": "mean"}, "model.head.pool"),
    ],
)
def test_head_options_are_checked_in_the_recipe(head, expected):
    with pytest.raises(UserError) as caught:
        Recipe.from_dict(tiny_recipe(model={"backbone": "test_resnet", "head": head}))
    assert expected in str(caught.value)


def test_head_config_round_trips_through_the_resolved_recipe(tmp_path):
    for head in (
        {"type": "mlp", "hidden": [64], "norm": "batchnorm"},
        {"type": "cosine", "args": {"scale": 8.0}},
        {"type": "linear", "pool": "max"},
    ):
        recipe = Recipe.from_dict(tiny_recipe(model={"backbone": "test_resnet", "head": head}))
        (tmp_path / "r.yaml").write_text(recipe.to_yaml())
        assert Recipe.load(tmp_path / "r.yaml") == recipe


# --------------------------------------------------------------------------- the README example
README_EXAMPLE = '''\
import torch
import torch.nn.functional as F
from torch import nn

import finetune


@finetune.register_head("cosine")
class CosineHead(nn.Module):
    """Logits are scaled cosine similarities between the features and one vector per class."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * 0.01)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features) @ F.normalize(self.weight).T


recipe = finetune.Recipe.load("recipes/digits-scratch.yaml", overrides={
    "model.head": {"type": "cosine", "args": {"scale": 10.0}},
    "train.epochs": 2,
})
result = finetune.run(recipe)        # the shared loop; the head trains like any other
print(result.summary["best"])
'''


def test_readme_custom_head_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    assert f"```python\n{README_EXAMPLE}```" in readme  # the README shows exactly this code
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(README_EXAMPLE, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.summary["status"] == "completed" and result.summary["epochs"] == 2
    trained = finetune.load_trained(result.run_dir)  # rebuilt with the registered head
    assert type(trained.model.fc).__name__ == "CosineHead"
    assert trained.model.fc.scale == 10.0
