"""Range estimation (004 §2.5), per tensor and per channel, and scale / zero-point as a pure function."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qviz.engine import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QuantSpec,
    code_range,
    fake_quantize,
    minmax,
    quant_params,
)
from qviz.engine.observers import SCALE_FLOOR


def test_code_ranges_follow_eqs_2_8_to_11():
    assert code_range(8) == (0, 255)
    assert code_range(8, symmetric=True) == (-128, 127)
    assert code_range(8, symmetric=True, narrow=True) == (-127, 127)
    assert code_range(8, symmetric=True, signed=False) == (0, 255)
    assert code_range(8, symmetric=True, signed=False, narrow=True) == (0, 254)


@settings(max_examples=100, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 1000), data=st.data())
def test_per_channel_minmax_along_any_axis(shape, seed, data):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    lo, hi = minmax(x, "channel", axis)
    moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    assert torch.equal(lo.reshape(-1), moved.min(1).values)
    assert torch.equal(hi.reshape(-1), moved.max(1).values)
    assert (lo.expand_as(x) <= x).all()  # shaped to broadcast


def test_affine_range_is_relaxed_to_include_zero():
    p = quant_params(2.1, 3.5, 8)  # the example of 004 §2.1
    assert int(p.zero_point) == 0
    assert float(p.scale) == pytest.approx(3.5 / 255)


def test_zero_is_exact_for_affine():
    x = torch.tensor([-0.37, 0.0, 1.91, 0.2])
    q = fake_quantize(x, QuantSpec("affine", bits=3))
    assert q[1] == 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_tensor_gives_the_documented_finite_parameters(symmetric):
    p = quant_params(torch.tensor(0.0), torch.tensor(0.0), 4, symmetric=symmetric)
    assert float(p.scale) == SCALE_FLOOR
    assert int(p.zero_point) == (0 if symmetric else p.qmin)
    q = fake_quantize(torch.zeros(5), QuantSpec("symmetric" if symmetric else "affine", bits=4))
    assert torch.equal(q, torch.zeros(5))


@pytest.mark.parametrize("scheme", ["affine", "symmetric", "stochastic", "xnor", "ternary", "dorefa", "ceil",
                                    "relu", "pact", "ceil_act"])
@pytest.mark.parametrize("value", [0.0, 0.8, -1.3])
def test_constant_tensors_give_finite_outputs(scheme, value):
    bits = 2 if scheme in ("symmetric", "ternary") else (1 if scheme == "xnor" else 3)
    x = torch.full((4, 3), value, requires_grad=True)
    q = fake_quantize(x, QuantSpec(scheme, bits=bits, granularity="channel", axis=1),
                      generator=torch.Generator().manual_seed(0))
    q.sum().backward()
    assert torch.isfinite(q).all() and torch.isfinite(x.grad).all()


def test_constant_nonzero_lands_on_a_level_for_affine():
    q = fake_quantize(torch.full((5,), 0.8), QuantSpec("affine", bits=4))
    assert torch.allclose(q, torch.full((5,), 0.8))


def test_minmax_observer_keeps_the_running_extremes():
    obs = MinMaxObserver()
    obs(torch.tensor([0.5, 1.0]))
    obs(torch.tensor([-2.0, 0.3]))
    assert obs.min_val.item() == -2.0 and obs.max_val.item() == 1.0


def test_moving_average_observer_follows_eq_of_004_2_5():
    obs = MovingAverageMinMaxObserver(momentum=0.1)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-3.0, 2.0]))
    assert obs.min_val.item() == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert obs.max_val.item() == pytest.approx(0.9 * 1 + 0.1 * 2)
    p = obs.qparams(8)
    assert p.qmin == 0 and p.qmax == 255


def test_per_channel_observer_and_its_qparams():
    obs = MinMaxObserver("channel", axis=0)
    w = torch.tensor([[1.0, -1.0], [4.0, 0.0]])
    obs(w)
    p = obs.qparams(8, symmetric=True)
    assert torch.allclose(p.scale.reshape(-1), torch.tensor([1 / 127, 4 / 127]))


def test_observer_without_data():
    with pytest.raises(ValueError, match="seen no data"):
        MinMaxObserver().qparams(8)
    with pytest.raises(ValueError, match="momentum=0"):
        MovingAverageMinMaxObserver(momentum=0.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]))
def test_the_partial_sort_quantiles_equal_torch_quantile(n, seed, dtype):
    from qviz.engine.layers import _positive, _quantiles

    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[::7] = 0.0  # ties and zeros
    q = torch.linspace(0.5, 1.0, 24)
    assert torch.equal(_quantiles(x, q), torch.quantile(x, q.to(dtype)))
    assert torch.equal(_positive(x.reshape(-1, 1)), x[x > 0])


def test_mse_clip_is_the_candidate_with_the_least_error():
    from qviz.engine import QuantSpec, fake_quantize
    from qviz.engine.layers import mse_clip

    x = torch.relu(torch.randn(300, 40, generator=torch.Generator().manual_seed(3))) ** 2
    spec = QuantSpec("pact", bits=2)
    positive = x[x > 0]
    errors = {float(a): float(((fake_quantize(positive, spec, alpha=a) - positive) ** 2).mean())
              for a in torch.quantile(positive, torch.linspace(0.5, 1.0, 24))}
    assert mse_clip(x, spec) == pytest.approx(min(errors, key=errors.get))
    assert mse_clip(torch.full((5,), -1.0), spec) == 1e-3  # nothing positive: the smallest clip
    with pytest.raises(ValueError, match="NaN or Inf"):
        mse_clip(torch.tensor([1.0, float("inf")]), spec)
