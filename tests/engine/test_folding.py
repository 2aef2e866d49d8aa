"""Batch-norm folding (004 eqs. 20-21) equals the unfolded layer in eval mode."""

import pytest
import torch
from torch import nn

from qviz.engine import fold_batchnorm


def _trained_bn(bn, features, shape):
    bn.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        bn(torch.randn(shape, generator=g) * 3 + 1)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(features, generator=g))
    return bn.eval()


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_then_batchnorm_equals_the_folded_linear(with_bias):
    lin = nn.Linear(6, 5, bias=with_bias)
    bn = _trained_bn(nn.BatchNorm1d(5), 5, (32, 5))
    w, b = fold_batchnorm(lin.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                          bias=lin.bias if with_bias else None)
    x = torch.randn(20, 6)
    assert torch.allclose(bn(lin(x)), x @ w.T + b, atol=1e-5)


def test_conv_then_batchnorm_equals_the_folded_conv():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    bn = _trained_bn(nn.BatchNorm2d(4), 4, (8, 4, 5, 5))
    w, b = fold_batchnorm(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    x = torch.randn(2, 3, 7, 7)
    assert torch.allclose(bn(conv(x)), nn.functional.conv2d(x, w, b), atol=1e-5)


def test_folding_checks_its_arguments():
    w = torch.randn(5, 6)
    ones, zeros = torch.ones(5), torch.zeros(5)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\)"):
        fold_batchnorm(w, torch.ones(4), zeros, zeros, ones)
    with pytest.raises(ValueError, match="var must be >= 0"):
        fold_batchnorm(w, ones, zeros, zeros, -ones)
    with pytest.raises(ValueError, match="eps > 0"):
        fold_batchnorm(w, ones, zeros, zeros, zeros, eps=0.0)


def test_folding_a_model_in_training_mode_warns_that_its_batch_statistics_are_gone():
    import warnings

    from qviz.engine import quantize_model

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="training mode"):
        quantize_model(model, fold_batchnorm=True, example=x)
    assert model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model.eval(), fold_batchnorm=True, example=x)
