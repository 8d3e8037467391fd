"""Backbone + new head: any timm model by name, torchvision's with a ``torchvision:`` prefix.

The model keeps the backbone's own parameter names (``layer3.0.conv1.weight``, ``fc.weight``) so
that freeze patterns, parameter-group rules and checkpoints from elsewhere read the same as in
timm or torchvision. Only the classifier module is swapped for the head the recipe asks for.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import nn

from finetune.config.model import HeadConfig, LoadConfig
from finetune.errors import UserError
from finetune.heads import build_head, head_options
from finetune.recipe import as_section
from finetune.run_folder import weights_file
from finetune.weights import LoadReport, load_partial

TORCHVISION_PREFIX = "torchvision:"


@dataclass
class BuiltModel:
    """The model, where its head sits (``fc``, ``head.fc``...), and how its weights were loaded."""

    model: nn.Module
    head_name: str
    load_report: LoadReport | None
    in_features: int = 0  # pooled features the head receives


def pretrained_config(backbone: str) -> dict[str, Any]:
    """The mean/std the backbone was pretrained with (timm's config; ImageNet for torchvision)."""
    if backbone.startswith(TORCHVISION_PREFIX):
        return {}
    import timm

    cfg = timm.get_pretrained_cfg(backbone)
    return cfg.to_dict() if cfg is not None else {}


def check_backbone_name(backbone: str) -> None:
    """Fail with close names suggested when neither timm nor torchvision knows ``backbone``."""
    if backbone.startswith(TORCHVISION_PREFIX):
        import torchvision

        known = torchvision.models.list_models()
        name = backbone.removeprefix(TORCHVISION_PREFIX)
    else:
        import timm

        source, name = timm.models.parse_model_name(backbone)
        if source is not None:
            return  # hf-hub: or local-dir: names are resolved (and checked) when created
        _, tag = timm.models.split_model_name_tag(name)
        known = timm.list_pretrained() if tag else timm.list_models()  # resnet50.a1_in1k
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise UserError(f"model.backbone: unknown model {backbone!r}{hint}")


def build_model(
    *,
    backbone: str,
    num_classes: int,
    pretrained: bool | str | Path = False,
    head: HeadConfig | Mapping[str, Any] | None = None,
    load: LoadConfig | Mapping[str, Any] | None = None,
) -> BuiltModel:
    """Create ``backbone``, replace its classifier by ``head`` and load ``pretrained`` weights.

    Args:
        backbone: a timm model name, or ``torchvision:<name>``.
        num_classes: outputs of the new head.
        pretrained: ``True`` for the published weights (downloaded once, then cached), ``False``
            for random init, or a path to a weights file or run folder, loaded with ``load`` rules.
        head: the new classifier (the ``model.head`` keys, as ``HeadConfig`` or a plain
            mapping such as ``{"type": "mlp", "hidden": [256]}``); a linear layer by default.
        load: partial-loading rules for a weights file (the ``model.load`` keys, as
            ``LoadConfig`` or a mapping such as ``{"exclude": ["fc.*"]}``).
    """
    head = as_section(HeadConfig, head, "model.head")
    load = as_section(LoadConfig, load, "model.load")
    check_backbone_name(backbone)
    if backbone.startswith(TORCHVISION_PREFIX):
        if head.pool is not None:
            raise UserError(
                "model.head.pool: pooling can be changed on timm backbones only; "
                f"{backbone} keeps its own"
            )
        model = _torchvision_model(backbone.removeprefix(TORCHVISION_PREFIX), pretrained is True)
    else:
        model = _timm_model(backbone, pretrained is True)
        _reset_timm_classifier(model, backbone, num_classes, head.pool)
    head_name = _classifier_name(model)
    in_features = model.get_submodule(head_name).in_features
    new_head = build_head(
        head.type,
        in_features=in_features,
        num_classes=num_classes,
        init=head.init,
        **head_options(head),
    )
    model.set_submodule(head_name, new_head)
    report = None
    if isinstance(pretrained, (str, Path)):
        report = load_partial(
            model, weights_file(pretrained), **load.model_dump(), new_head=[f"{head_name}.*"]
        )
    return BuiltModel(model, head_name, report, in_features)


def _reset_timm_classifier(
    model: nn.Module, backbone: str, num_classes: int, pool: str | None
) -> None:
    """timm's own classifier reset: sets ``num_classes`` and, when asked, the pooling."""
    # Forked so that the throwaway linear layer draws no random numbers: the new head gets the
    # same initial weights as when timm's classifier is replaced without a reset.
    with torch.random.fork_rng(devices=[]):
        if pool is None:
            model.reset_classifier(num_classes)
            return
        try:
            model.reset_classifier(num_classes, global_pool=pool)
        except (AssertionError, ValueError) as error:  # timm asserts on an unknown pool type
            raise UserError(
                f"model.head.pool: {backbone} cannot pool with {pool!r} ({error})"
            ) from None


def _timm_model(name: str, pretrained: bool) -> nn.Module:
    import timm

    if pretrained:
        _use_cache_only_when_offline()
    try:
        return timm.create_model(name, pretrained=pretrained)
    except (OSError, RuntimeError) as error:  # hub errors derive from OSError
        if not pretrained:
            raise
        raise _offline_error(name, error) from None


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
    except (URLError, OSError) as error:
        raise _offline_error(f"{TORCHVISION_PREFIX}{name}", error) from None


def _use_cache_only_when_offline() -> None:
    """Without a network, make the hub read its cache instead of retrying for a minute."""
    import huggingface_hub.constants

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def _offline_error(name: str, error: Exception) -> UserError:
    return UserError(
        f"model.pretrained: could not get the pretrained weights of {name} (no network, and not "
        f"in the local cache: {type(error).__name__}). Download the weights on a machine with "
        "internet access (e.g. the model's .safetensors file from its Hugging Face page), copy it "
        "here and set `model.pretrained: path/to/model.safetensors` in the recipe."
    )


def _classifier_name(model: nn.Module) -> str:
    """The dotted name of the final classifier layer of a timm or torchvision model."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, (list, tuple)):  # a few timm models have two heads (distilled)
        classifier = classifier[0]
    if isinstance(classifier, nn.Linear):
        name = next((n for n, m in model.named_modules() if m is classifier), None)
        if name:
            return name
    linear_layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear_layers:
        raise UserError("model.backbone: found no linear classifier layer to replace")
    return linear_layers[-1]
