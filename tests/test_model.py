"""Building models: timm and torchvision backbones, head replacement, offline pretrained weights."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from finetune.config.model import HeadConfig
from finetune.errors import UserError
from finetune.model import build_model, check_backbone_name
from tests.conftest import run_cli, tiny_recipe, write_recipe


def test_timm_backbone_gets_a_new_head():
    built = build_model(backbone="test_resnet", num_classes=7)
    assert built.head_names == ("fc",)
    assert isinstance(built.model.fc, nn.Linear) and built.model.fc.out_features == 7
    assert built.model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert built.load_report is None


def test_head_dropout_wraps_the_linear_layer():
    built = build_model(backbone="test_resnet", num_classes=4, head=HeadConfig(dropout=0.5))
    assert isinstance(built.model.fc[0], nn.Dropout) and built.model.fc[0].p == 0.5


@pytest.mark.parametrize(
    "backbone, head_name", [("test_vit", "head"), ("test_efficientnet", "classifier")]
)
def test_head_is_found_from_timm_config(backbone, head_name):
    built = build_model(backbone=backbone, num_classes=3)
    assert built.head_names == (head_name,)
    assert built.model.get_submodule(head_name).out_features == 3


@pytest.mark.parametrize("backbone", ["resnetv2_18", "dla46_c"])
def test_a_1x1_conv_classifier_is_replaced_by_a_head_on_flat_features(backbone):
    """ResNetV2 and DLA classify with a 1x1 convolution on (B, C, 1, 1): the new head (a
    linear layer, or any custom head) gets (B, C) features and the logits are the head's."""
    built = build_model(backbone=backbone, num_classes=4)
    model = built.model.eval()
    (name,) = built.head_names
    head = model.get_submodule(name)
    assert isinstance(head, nn.Linear) and head.in_features == built.in_features
    images = torch.randn(2, 3, 32, 32)
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    assert features.shape == (2, built.in_features)
    torch.testing.assert_close(model(images), head(features))


@pytest.mark.parametrize(
    "backbone, heads",
    [
        ("deit_tiny_distilled_patch16_224", ("head", "head_dist")),
        ("levit_128s", ("head", "head_dist")),
    ],
)
def test_a_distilled_models_two_heads_are_both_replaced(backbone, heads):
    """DeiT-distilled and LeViT average a class head and a distillation head: both become new
    heads (LeViT's BatchNorm + linear pair included), so no pretrained 1000-class logit leaks."""
    built = build_model(backbone=backbone, num_classes=3)
    assert built.head_names == heads
    model = built.model.eval()
    for name in heads:
        assert isinstance(model.get_submodule(name), nn.Linear)
    outputs = {}
    for name in heads:
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, args, out, name=name: outputs.update({name: out}))
    logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 3)
    torch.testing.assert_close(logits, (outputs["head"] + outputs["head_dist"]) / 2)


@pytest.mark.parametrize("pool, factor", [("avgmax", 1), ("catavgmax", 2)])
def test_head_pool_choices_size_the_new_head(pool, factor):
    built = build_model(backbone="test_resnet", num_classes=3, head={"pool": pool})
    assert built.model.fc.in_features == 96 * factor == built.in_features
    assert built.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_torchvision_backbone_with_prefix():
    built = build_model(backbone="torchvision:mobilenet_v3_small", num_classes=5)
    assert built.head_names == ("classifier.3",)
    assert built.model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_unknown_backbone_lists_close_names():
    with pytest.raises(UserError, match="resnet50"):
        check_backbone_name("resnet_50")
    with pytest.raises(UserError, match="resnet18"):
        check_backbone_name("torchvision:resnet_18")
    with pytest.raises(UserError, match="resnet10t.c3_in1k"):
        check_backbone_name("resnet10t.c3_in1kk")  # a pretrained tag that does not exist


def test_timm_pretrained_tags_and_hub_names_are_accepted():
    check_backbone_name("resnet10t.c3_in1k")
    check_backbone_name("hf-hub:timm/resnet10t.c3_in1k")  # checked when created
    built = build_model(backbone="resnet10t.c3_in1k", num_classes=4, pretrained=False)
    assert built.model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_weights_from_a_file_are_loaded_and_reported(tmp_path):
    from safetensors.torch import save_file

    source = build_model(backbone="test_resnet", num_classes=5).model
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    built = build_model(
        backbone="test_resnet", num_classes=3, pretrained=tmp_path / "w.safetensors"
    )
    report = built.load_report
    assert {m["key"] for m in report.mismatched} == {"fc.weight", "fc.bias"}
    assert report.missing == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(
        built.model.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"]
    )


def test_pretrained_true_offline_fails_fast_naming_the_local_file_option(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(UserError, match="model.pretrained: path/to/model.safetensors"):
        build_model(backbone="resnet10t", num_classes=3, pretrained=True)
    assert time.perf_counter() - start < 10


def test_pretrained_true_offline_exits_2_from_the_cli(tmp_path):
    path = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(model={"backbone": "resnet10t", "pretrained": True})
    )
    env_cache = tmp_path / "hf"
    result = run_cli(
        "run",
        str(path),
        "--set",
        f"output.dir={tmp_path / 'out'}",
        env={
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(env_cache),
            "TORCH_HOME": str(tmp_path / "torch"),
        },
    )
    assert result.returncode == 2, result.stderr
    assert "model.pretrained" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
