"""Fold BatchNorm into the conv, transposed conv or linear layer that feeds it, for inference.

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = (x - mean) / sqrt(var + eps)
* gamma + beta``. When ``x`` is the output of a layer that is linear in its weight and bias,
scaling the layer's output channels and shifting its bias gives the same ``y``; the BatchNorm
then becomes ``nn.Identity`` (timm's ``BatchNormAct2d`` becomes its activation).

How pairs are found: ``fuse_bn`` runs the model once, in eval mode and without gradients, on an
example batch, rather than tracing a graph, so models that ``torch.fx`` cannot trace
(data-dependent control flow) fuse too. Hooks on every module record which layer produced each
tensor and which module (BatchNorm or other) took it as input, and a ``TorchFunctionMode``
records every other use of it: a residual sum, an in-place op, a concatenation, being returned.
Calls that only read metadata (``shape``, ``dtype``, ...) do not count as uses.

Why folding a pair is safe: a BatchNorm is folded into a layer only when all of these held in
that pass, and otherwise stays, with the reason in the ``FuseReport``:

- it is a plain ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` or ``BatchNormAct2d`` with running
  statistics (with batch statistics it is not a fixed affine map);
- every input it took is the output of one and the same conv, transposed conv or linear layer
  whose ``forward`` is the stock one (a custom or parametrised forward, such as weight
  standardisation, would not pass a scaled weight through as a scaled output);
- that output went to this BatchNorm and nowhere else, and that layer's every output went to
  this BatchNorm: anything else reading it would see the folded values;
- neither module is registered under two names (replacing one path would not replace the other);
- the BatchNorm normalises the layer's output-feature axis (its features are the layer's output
  channels, on a batched output).

Tensors are matched by ``id``; every recorded tensor is kept alive for the whole pass, so an id
is never reused. The pairs are those of the path the example input takes through data-dependent
branches. A BatchNorm left in place costs speed only: the fused model's outputs equal the
eval-mode original's up to float rounding either way.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Subclasses whose forward is still linear in weight and bias (so a folded weight stays exact).
_LINEAR_SUBCLASSES = {"timm.layers.conv2d_same.Conv2dSame"}
_BATCHNORM_ACT = "timm.layers.norm_act.BatchNormAct2d"  # BN, then drop (eval: no-op), then act
# Tensor functions that read metadata only: they do not make a conv output "used elsewhere".
_METADATA_FUNCTIONS = frozenset(
    {
        "shape",
        "ndim",
        "dtype",
        "device",
        "size",
        "dim",
        "numel",
        "is_contiguous",
        "__len__",
        "layout",
        "requires_grad",
        "stride",
        "is_floating_point",
    }
)


@dataclass
class FuseReport:
    """What ``fuse_bn`` did, by module name.

    ``folded``: ``{"bn", "into"}`` pairs; ``remaining``: ``{"bn", "reason"}`` for each BatchNorm
    left in place. Parameter counts exclude buffers (running statistics).
    """

    folded: list[dict[str, str]] = field(default_factory=list)
    remaining: list[dict[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0


def fuse_bn(
    model: nn.Module, *, inplace: bool = False, example_input: torch.Tensor | None = None
) -> nn.Module:
    """An eval-mode model with every foldable BatchNorm folded; see ``fuse_bn_with_report``.

    Example::

        fused = fuse_bn(model, example_input=torch.randn(2, 3, 224, 224))
    """
    return fuse_bn_with_report(model, inplace=inplace, example_input=example_input)[0]


def unfused_report(model: nn.Module) -> FuseReport:
    """The report of an export without fusion: every BatchNorm remains, none folded."""
    count = _count_parameters(model)
    remaining = [
        {"bn": name, "reason": "fuse_bn is off"}
        for name, module in model.named_modules()
        if _is_batchnorm_like(module)
    ]
    return FuseReport(remaining=remaining, params_before=count, params_after=count)


def fuse_bn_with_report(
    model: nn.Module, *, inplace: bool = False, example_input: torch.Tensor | None = None
) -> tuple[nn.Module, FuseReport]:
    """Fold BatchNorm into the conv, transposed conv or linear layer that feeds it.

    The folded layer gets the BatchNorm's scale and shift in its weight and bias; the BatchNorm
    becomes ``nn.Identity`` (timm's ``BatchNormAct2d`` becomes its activation). The result is for
    inference: its outputs equal the eval-mode original's up to float rounding.

    Args:
        model: any module; it is copied first unless ``inplace``.
        inplace: fold into ``model`` itself (it is put in eval mode).
        example_input: the batch for the forward pass that finds the pairs; by default two random
            images of the model's ``pretrained_cfg`` input size (224 px without one). The pairs
            are those of the path this input takes through data-dependent branches.

    Returns:
        The fused model and a ``FuseReport`` naming every BatchNorm folded or left in place.
    """
    fused = (model if inplace else copy.deepcopy(model)).eval()
    report = FuseReport(params_before=_count_parameters(fused))
    batchnorms = {name: m for name, m in fused.named_modules() if _is_batchnorm_like(m)}
    if batchnorms:
        trace = _trace(fused, set(batchnorms), _example_input(fused, example_input))
        modules, aliased = dict(fused.named_modules()), _aliased_names(fused)
        for name, bn in batchnorms.items():
            layer, reason = _pair_for(name, bn, trace, modules, aliased)
            if layer is None:
                report.remaining.append({"bn": name, "reason": reason})
                continue
            fused.set_submodule(layer, _fold(modules[layer], bn))
            fused.set_submodule(name, _replacement(bn))
            report.folded.append({"bn": name, "into": layer})
    report.params_after = _count_parameters(fused)
    return fused, report


def restructure(model: nn.Module, folded: list[dict[str, str]]) -> nn.Module:
    """Give an unfused ``model`` the structure of its fused version, to load fused weights into.

    Each layer named in ``folded`` gets a bias, each BatchNorm becomes what ``fuse_bn`` made it.
    """
    for pair in folded:
        layer = model.get_submodule(pair["into"])
        if layer.bias is None:
            out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype))
        model.set_submodule(pair["bn"], _replacement(model.get_submodule(pair["bn"])))
    return model


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _is_batchnorm_like(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) or "BatchNorm" in type(module).__name__


def _layer_kind(module: nn.Module) -> str | None:
    """``conv``, ``transpose`` or ``linear`` for a layer a BatchNorm can fold into, else None.

    Subclasses that change ``forward`` (weight standardisation, parametrisations) are refused:
    folding a scale into their weight would not scale their output.
    """
    if torch.nn.utils.parametrize.is_parametrized(module):
        return None
    for kind, bases in (("conv", _CONVS), ("transpose", _TRANSPOSED), ("linear", (nn.Linear,))):
        for base in bases:
            if isinstance(module, base) and (
                type(module).forward is base.forward or _qualname(module) in _LINEAR_SUBCLASSES
            ):
                return kind
    return None


def _replacement(bn: nn.Module) -> nn.Module:
    return bn.act if _qualname(bn) == _BATCHNORM_ACT else nn.Identity()


def _fold(layer: nn.Module, bn: nn.Module) -> nn.Module:
    kind = _layer_kind(layer)
    if kind != "linear":
        return fuse_conv_bn_eval(layer, bn, transpose=kind == "transpose")
    fused = copy.deepcopy(layer)  # fuse_linear_bn_eval needs an affine BN; the maths does not
    ones, zeros = torch.ones_like(bn.running_var), torch.zeros_like(bn.running_mean)
    fused.weight, fused.bias = fuse_linear_bn_weights(
        layer.weight,
        layer.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight if bn.weight is not None else ones,
        bn.bias if bn.bias is not None else zeros,
    )
    return fused


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _aliased_names(model: nn.Module) -> set[str]:
    """Names of modules registered under more than one name (replacing one path would not do)."""
    names = list(model.named_modules(remove_duplicate=False))
    counts = Counter(id(m) for _, m in names)
    return {name for name, m in names if counts[id(m)] > 1}


def _example_input(model: nn.Module, given: torch.Tensor | None) -> torch.Tensor:
    if given is not None:
        return given
    param = next(model.parameters(), None)
    size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    batch = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    return batch.to(param) if param is not None else batch


class _Trace:
    """What one forward pass showed: which layer produced a tensor, and who used it."""

    def __init__(self, batchnorms: set[str]) -> None:
        self.batchnorms = batchnorms
        self.produced: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (layer, tensor)
        self.layer_outputs: dict[str, list[int]] = defaultdict(list)
        self.bn_inputs: dict[str, list[int]] = defaultdict(list)
        self.module_inputs: list[tuple[str, int]] = []  # (module, id of a produced tensor)
        self.used_elsewhere: set[int] = set()
        self.stack: list[tuple[str, int | None]] = []  # modules running now, id of their input
        self.alive: list[torch.Tensor] = []  # keeps every recorded id unique during the pass

    def enter(self, name: str, args: tuple, kwargs: dict) -> None:
        tensors = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        key = id(tensors[0]) if tensors else None
        self.stack.append((name, key))
        if key in self.produced:
            self.module_inputs.append((name, key))
        if name in self.batchnorms and tensors:
            self.bn_inputs[name].append(key)
            self.alive.append(tensors[0])

    def leave(self, name: str, output: Any, is_layer: bool) -> None:
        self.stack.pop()
        if is_layer and isinstance(output, torch.Tensor):
            self.produced[id(output)] = (name, output)
            self.layer_outputs[name].append(id(output))

    def use(self, tensor: torch.Tensor) -> None:
        """A torch function took ``tensor``: fine inside the BatchNorm that took it as input."""
        key = id(tensor)
        if key in self.produced and not any(
            name in self.batchnorms and input_key == key for name, input_key in self.stack
        ):
            self.used_elsewhere.add(key)

    def exclusive(self, key: int, bn: str, consumers: Counter) -> bool:
        """Whether tensor ``key`` went to BatchNorm ``bn`` (via its parents) and nowhere else."""
        passed_down = all(
            name in ("", bn) or bn.startswith(name + ".")
            for name, k in self.module_inputs
            if k == key
        )
        return key not in self.used_elsewhere and consumers[key] == 1 and passed_down


class _UseRecorder(TorchFunctionMode):
    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property such as Tensor.shape: its descriptor has the name
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name not in _METADATA_FUNCTIONS:
            for value in pytree.tree_leaves((args, kwargs)):
                if isinstance(value, torch.Tensor):
                    self.trace.use(value)
        return func(*args, **kwargs)


def _trace(model: nn.Module, batchnorms: set[str], example: torch.Tensor) -> _Trace:
    """Run ``model`` once on ``example`` with every module hooked and every torch call recorded."""
    trace = _Trace(batchnorms)
    handles = []
    for name, module in model.named_modules():
        is_layer = _layer_kind(module) is not None
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, name=name: trace.enter(name, args, kwargs),
                with_kwargs=True,
            )
        )
        handles.append(
            module.register_forward_hook(  # always: keeps the stack right
                lambda _m, _args, output, name=name, is_layer=is_layer: trace.leave(
                    name, output, is_layer
                ),
                always_call=True,
            )
        )
    try:
        with torch.no_grad(), _UseRecorder(trace):
            output = model(example)
    finally:
        for handle in handles:
            handle.remove()
    trace.used_elsewhere.update(id(v) for v in pytree.tree_leaves(output))  # returned as is
    return trace


def _pair_for(
    name: str, bn: nn.Module, trace: _Trace, modules: dict[str, nn.Module], aliased: set[str]
) -> tuple[str | None, str]:
    """(the layer to fold BatchNorm ``name`` into, or None and the reason it stays)."""
    if type(bn) not in _PLAIN_BATCHNORMS and _qualname(bn) != _BATCHNORM_ACT:
        return None, f"unsupported type {type(bn).__name__}"
    if bn.running_mean is None or bn.running_var is None:
        return None, "normalises with batch statistics (track_running_stats=False)"
    inputs = trace.bn_inputs.get(name)
    if not inputs:
        return None, "not run by the sample input"
    layers = {trace.produced[key][0] if key in trace.produced else None for key in inputs}
    if None in layers or len(layers) > 1:
        return None, "its input is not the output of one conv or linear layer"
    (layer,) = layers
    consumers = Counter(key for keys in trace.bn_inputs.values() for key in keys)
    if not all(trace.exclusive(key, name, consumers) for key in inputs):
        return None, f"the output of {layer} is also used elsewhere"
    if sorted(trace.layer_outputs[layer]) != sorted(inputs):
        return None, f"{layer} also feeds other layers"
    if name in aliased or layer in aliased:
        return None, "a module registered under several names"
    if not _fits(modules[layer], bn, trace.produced[inputs[0]][1]):
        return None, f"the BatchNorm's features are not {layer}'s output channels"
    return layer, ""


def _fits(layer: nn.Module, bn: nn.Module, output: torch.Tensor) -> bool:
    """Whether the BatchNorm normalises ``layer``'s output-feature axis (a batched output)."""
    if _layer_kind(layer) == "linear":  # BatchNorm1d on (N, C, L) would normalise L, not C
        return output.dim() == 2 and layer.out_features == bn.num_features
    return output.dim() == layer.weight.dim() and layer.out_channels == bn.num_features
