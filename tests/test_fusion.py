"""BatchNorm folding into a Linear layer, checked directly on a two-layer model (the timm models
and the export command are covered in test_export.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.fusion import fuse_bn, fuse_bn_with_report


def linear_bn(*, bias: bool, affine: bool, seed: int = 0) -> nn.Sequential:
    """Linear(6 -> 4) then BatchNorm1d(4) whose running statistics and affine terms are far from
    the identity, so that a missing or wrong fold changes the outputs."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 4, bias=bias), nn.BatchNorm1d(4, affine=affine, eps=1e-3))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.5, 9.0]))
        if affine:
            bn.weight.copy_(torch.tensor([2.0, -0.5, 1.5, 0.1]))
            bn.bias.copy_(torch.tensor([0.3, -0.7, 1.0, 2.0]))
    return model


@pytest.mark.parametrize("bias, affine", [(True, True), (False, True), (True, False)])
def test_linear_batchnorm1d_fold_keeps_the_eval_outputs(bias, affine):
    model = linear_bn(bias=bias, affine=affine).eval()
    inputs = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(inputs)
        by_hand = (model[0](inputs) - model[1].running_mean) / torch.sqrt(
            model[1].running_var + model[1].eps
        )
        if affine:
            by_hand = by_hand * model[1].weight + model[1].bias
    torch.testing.assert_close(expected, by_hand)  # the reference really is the BN's eval maths

    fused, report = fuse_bn_with_report(model, example_input=inputs)
    assert report.folded == [{"bn": "1", "into": "0"}] and report.remaining == []
    assert not any(isinstance(m, _BatchNorm) for m in fused.modules())
    assert isinstance(fused[0], nn.Linear) and isinstance(fused[1], nn.Identity)
    assert fused[0].bias is not None  # the BN's shift needs a bias, even where there was none
    with torch.no_grad():
        torch.testing.assert_close(fused(inputs), expected, rtol=1e-5, atol=1e-5)
    # The original is left as it was: a copy was fused.
    assert isinstance(model[1], nn.BatchNorm1d) and (model[0].bias is None) == (not bias)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), expected, rtol=0, atol=0)


def test_linear_fold_uses_running_statistics_not_the_batchs():
    """A model handed over in train mode is fused for inference: the fold uses the running
    statistics (what eval mode computes), never the example batch's own."""
    model = linear_bn(bias=True, affine=True).train()
    inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(2)) * 5 + 3
    fused = fuse_bn(model, example_input=inputs)
    assert not fused.training
    with torch.no_grad():
        expected = model.eval()(inputs)
        torch.testing.assert_close(fused(inputs), expected, rtol=1e-5, atol=1e-5)
    assert model[1].num_batches_tracked.item() == 0  # the tracing forward did not update stats


def test_inplace_fold_changes_the_model_itself():
    model = linear_bn(bias=True, affine=True).eval()
    inputs = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(inputs)
    fused = fuse_bn(model, inplace=True, example_input=inputs)
    assert fused is model and isinstance(model[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), expected, rtol=1e-5, atol=1e-5)
