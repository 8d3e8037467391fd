"""Freezing parameters by pattern and keeping BatchNorm statistics frozen.

A frozen parameter has ``requires_grad=False``: it never gets a gradient and never reaches the
optimizer. A "frozen" BatchNorm layer also stays in eval mode, so its running statistics do not
drift, however often the training loop calls ``model.train()``.
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.errors import UserError


@dataclass
class FreezeReport:
    frozen: list[str]
    trainable: list[str]
    frozen_batchnorms: list[str]


def freeze(model: nn.Module, *, patterns: Iterable[str] = (), batchnorm: str = "train"
           ) -> FreezeReport:
    """Freeze the parameters whose names match any glob in ``patterns``.

    Args:
        patterns: globs over ``named_parameters()`` names, e.g. ``["conv1.*", "layer1.*"]``. A
            pattern that matches no parameter is an error, so a typo never freezes nothing.
        batchnorm: ``"frozen"`` keeps every BatchNorm layer in eval mode (running statistics
            fixed) across ``model.train()`` calls; ``"train"`` leaves them alone.
    """
    patterns = list(patterns)
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UserError("freeze.patterns: these patterns match no parameter of the model "
                        f"(names look like {names[0]!r}, {names[-1]!r})", unmatched)
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
    frozen_bns = freeze_batchnorm_statistics(model) if batchnorm == "frozen" else []
    return FreezeReport(
        frozen=[n for n, p in model.named_parameters() if not p.requires_grad],
        trainable=[n for n, p in model.named_parameters() if p.requires_grad],
        frozen_batchnorms=frozen_bns,
    )


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_batchnorm_statistics(model: nn.Module) -> list[str]:
    """Put every BatchNorm in eval mode and keep it there when ``model.train()`` is called."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            module.train = types.MethodType(_stay_in_eval, module)
            module.eval()
            names.append(name)
    return names
