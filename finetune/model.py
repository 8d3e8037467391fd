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
    """The model, where its head sits (``fc``, ``head.fc``; two names for distilled models such
    as DeiT's ``head`` and ``head_dist``), and how its weights were loaded."""

    model: nn.Module
    head_names: tuple[str, ...]
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
    head_names = _classifier_names(model)
    in_features = _classifier_in_features(model.get_submodule(head_names[0]))
    for name in head_names:  # a distilled model's two heads are both replaced
        new_head = build_head(
            head.type,
            in_features=in_features,
            num_classes=num_classes,
            init=head.init,
            **head_options(head),
        )
        model.set_submodule(name, new_head)
    report = None
    if isinstance(pretrained, (str, Path)):
        report = load_partial(
            model,
            weights_file(pretrained),
            **load.model_dump(),
            new_head=[f"{name}.*" for name in head_names],
        )
    return BuiltModel(model, head_names, report, in_features)


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


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The dotted names of the classifier(s) the new head replaces.

    timm models name theirs (``get_classifier()``: one module, or a distilled model's pair); a
    1x1-convolution classifier (ResNetV2, DLA) is made to see pooled, flattened features like a
    linear one. torchvision models have no such seam: their last linear layer is the classifier.
    """
    if hasattr(model, "get_classifier") and hasattr(model, "reset_classifier"):
        classifier = model.get_classifier()
        classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
        names = tuple(n for c in classifiers for n, m in model.named_modules() if m is c)
        if len(names) == len(classifiers) and all(n for n in names):
            for name, module in zip(names, classifiers, strict=True):
                if isinstance(module, nn.Conv2d):
                    _flatten_before(model, name)
            return names
    linear_layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear_layers:
        raise UserError("model.backbone: found no classifier layer to replace")
    return (linear_layers[-1],)


def _flatten_before(model: nn.Module, name: str) -> None:
    """Make the pooling before a 1x1-conv classifier flatten, and the flatten after it a no-op.

    timm's conv classifiers sit between a ``global_pool`` that keeps ``(B, C, 1, 1)`` and a
    ``flatten``, both in the classifier's parent module; a head takes ``(B, C)``.
    """
    parent = model.get_submodule(name.rpartition(".")[0])
    pool = getattr(parent, "global_pool", None)
    if not isinstance(getattr(pool, "flatten", None), nn.Module) or not hasattr(parent, "flatten"):
        raise UserError(
            f"model.backbone: the 1x1-convolution classifier {name!r} has no pooling to flatten "
            "before it; this backbone cannot take a new head"
        )
    pool.flatten = nn.Flatten(1)
    parent.flatten = nn.Identity()


def _classifier_in_features(classifier: nn.Module) -> int:
    """Features the classifier takes: a linear or 1x1-conv layer's, or its first linear
    layer's (LeViT's BatchNorm + linear ``NormLinear``)."""
    if isinstance(classifier, nn.Conv2d):
        return classifier.in_channels
    linear = next((m for m in classifier.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise UserError(f"model.backbone: cannot tell what the classifier {classifier} takes")
    return linear.in_features
