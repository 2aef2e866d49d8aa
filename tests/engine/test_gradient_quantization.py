"""DoReFa's stochastic gradient quantizer (000 §2.3.3) and its use as a training hook."""

import torch
from torch import nn

from qviz.engine import quantize_gradient, quantize_gradients_of


def test_quantized_gradients_lie_on_2k_levels_and_are_unbiased():
    g = torch.randn(200, generator=torch.Generator().manual_seed(0)) * 1e-3
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([quantize_gradient(g, 2, generator=gen) for _ in range(3000)])
    m = g.abs().max()
    levels = 2 * m * (torch.arange(4) / 3 - 0.5)
    assert torch.isclose(samples.reshape(-1, 1), levels.reshape(1, -1), rtol=1e-4).any(1).all()
    assert torch.allclose(samples.mean(0), g, atol=float(m) * 0.05)


def test_zero_gradient_stays_zero():
    assert torch.equal(quantize_gradient(torch.zeros(5), 4), torch.zeros(5))


def test_hooks_quantize_parameter_gradients_during_backward():
    net = nn.Linear(8, 3)
    handles = quantize_gradients_of(net, 1, generator=torch.Generator().manual_seed(0))
    net(torch.randn(16, 8)).pow(2).sum().backward()
    for p in net.parameters():
        assert torch.unique(p.grad).numel() <= 2  # 1-bit gradients: ±max|g|
    for h in handles:
        h.remove()
    net.zero_grad()
    net(torch.randn(16, 8)).pow(2).sum().backward()
    assert torch.unique(net.weight.grad).numel() > 2
