"""finetune: fine-tune pretrained PyTorch image models from a YAML recipe, or from Python.

The names below load on first use, so that importing the package (and ``finetune --help``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "finetune.recipe",
    "UserError": "finetune.errors",
    "build_model": "finetune.model",
    "load_partial": "finetune.weights",
    "LoadReport": "finetune.weights",
    "freeze": "finetune.freezing",
    "param_groups": "finetune.optim",
    "build_optimizer": "finetune.optim",
    "create_optimizer": "finetune.optim",
    "build_scheduler": "finetune.schedule",
    "register_head": "finetune.heads",
    "list_heads": "finetune.heads",
    "Runtime": "finetune.runtime",
    "fit": "finetune.loop",
    "FitOptions": "finetune.loop",
    "evaluate": "finetune.loop",
    "run": "finetune.training",
    "load_trained": "finetune.inference",
    "predict_images": "finetune.inference",
    "fuse_bn": "finetune.fusion",
    "export_run": "finetune.export",
    "lr_range_test": "finetune.lr_find",
    "preview_lrs": "finetune.lr_preview",
    "lr_scale_factor": "finetune.optim",
    "build_datasets": "finetune.data",
    "image_statistics": "finetune.stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
