"""torch.func transforms over a quantized model: per-sample gradients (vmap over grad of functional_call), as
Opacus and differential-privacy training compute them, equal the gradients of one sample at a time."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from qviz import _checks
from qviz.engine.layers import ActivationQuantizer
from qviz.engine.quantize import calibrate, quantize_model
from qviz.engine.quantizers import QuantSpec

CASES = [
    (4, 4),
    (QuantSpec("dorefa", 3), QuantSpec("pact", 4)),
    (QuantSpec("ceil", 3), QuantSpec("ceil_act", 3)),
    (QuantSpec("ternary", 2), QuantSpec("dorefa_act", 2)),
    (QuantSpec("xnor", 1), QuantSpec("relu", 3)),
    (QuantSpec("symmetric", 4, "channel"), QuantSpec("affine", 8, ste="saturated")),
]


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def _per_sample_grads(qm, X, y):
    params = {k: v.detach() for k, v in qm.named_parameters()}
    buffers = dict(qm.named_buffers())

    def loss(p, b, x, t):
        out = functional_call(qm, (p, b), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out.float(), t.unsqueeze(0))

    batched = vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, X, y)
    one_by_one = [grad(loss)(params, buffers, X[i], y[i]) for i in range(len(X))]
    return params, batched, one_by_one


@pytest.mark.parametrize("weights, activations", CASES, ids=lambda c: getattr(c, "scheme", c))
def test_per_sample_gradients_equal_one_sample_at_a_time(weights, activations):
    qm = quantize_model(_model(), weights, activations)
    X, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    calibrate(qm, [X])
    qm.eval()
    params, batched, one_by_one = _per_sample_grads(qm, X[:6], y[:6])
    assert set(batched) == set(params)
    for name in params:
        assert batched[name].shape == (6, *params[name].shape)
        for i, g in enumerate(one_by_one):
            torch.testing.assert_close(batched[name][i], g[name], rtol=1e-5, atol=1e-6)
    # and the same as autograd's own backward of that one sample through the quantized model
    qm.zero_grad()
    nn.functional.cross_entropy(qm(X[:1]), y[:1]).backward()
    for name, p in qm.named_parameters():
        torch.testing.assert_close(batched[name][0], p.grad, rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_of_a_float16_model():
    qm = quantize_model(_model(torch.float16), 4, 4)
    X, y = torch.randn(32, 8, dtype=torch.float16), torch.randint(0, 4, (32,))
    calibrate(qm, [X])
    qm.eval()
    params, batched, one_by_one = _per_sample_grads(qm, X[:4], y[:4])
    for name in params:
        assert batched[name].dtype == torch.float16
        for i, g in enumerate(one_by_one):
            torch.testing.assert_close(batched[name][i], g[name])


def test_training_mode_reads_the_ranges_inside_vmap():
    """A range is a statistic of the batch, which vmap's per-sample calls do not see: in training mode they
    use the ranges as they stand (calibrated or trained outside vmap) and leave them as they are."""
    qm = quantize_model(_model(), 4, 4)
    X, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    calibrate(qm, [X])
    qm.train()
    steps = []
    observe = ActivationQuantizer._observe
    ActivationQuantizer._observe = lambda self, x: (steps.append(_checks.vmapped(x)), observe(self, x))[1]
    try:
        params, batched, _ = _per_sample_grads(qm, X[:4] * 100, y[:4])  # far outside the ranges
    finally:
        ActivationQuantizer._observe = observe
    assert steps and not any(steps)  # only the one-sample-at-a-time grads outside vmap took range steps
    qm.eval()
    _, in_eval, _ = _per_sample_grads(qm, X[:4] * 100, y[:4])
    for name in params:
        torch.testing.assert_close(batched[name], in_eval[name])


def test_vmap_before_any_range_says_what_to_do():
    qm = quantize_model(_model(), 4, 4)
    X, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    with pytest.raises(ValueError, match=r"inside torch.func.vmap.*calibrate or train the model outside vmap"):
        _per_sample_grads(qm, X, y)


def test_vmap_over_a_quantized_models_forward_with_gradients_on():
    """vmap of the model itself (no functional_call), grad mode on as by default: the weights are plain
    Parameters, yet the transform is running and the autograd Functions must take its form."""
    qm = quantize_model(_model(), QuantSpec("dorefa", 3), QuantSpec("pact", 4))
    X = torch.randn(16, 8)
    calibrate(qm, [X])
    qm.eval()
    per_sample = vmap(lambda x: qm(x.unsqueeze(0)).squeeze(0))(X)
    torch.testing.assert_close(per_sample, qm(X))


def test_transform_gradients_are_clamped_as_autograds_are():
    """DoReFa's gradient 1/max|w| of tiny float16 weights passes float16's largest value: the cast back
    clamps it (65504, not inf) under torch.func.grad as under .backward()."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4).half()
    with torch.no_grad():
        model.weight.mul_(1e-5)
    qm = quantize_model(model, QuantSpec("dorefa", 3), None)
    x = torch.randn(2, 8, dtype=torch.float16)
    params = {k: v.detach() for k, v in qm.named_parameters()}

    def loss(p):
        return functional_call(qm, p, (x,)).float().sum()

    by_transform = grad(loss)(params)
    qm.zero_grad()
    qm(x).float().sum().backward()
    for name, p in qm.named_parameters():
        assert torch.isfinite(p.grad).all() and torch.isfinite(by_transform[name]).all()
        torch.testing.assert_close(by_transform[name], p.grad)
