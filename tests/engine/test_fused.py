"""The fused fake-quantize kernels agree with the PyTorch formulation of every scheme they serve, on every
code path this CPU has: values bit for bit, STE gradients bit for bit, sums (ternary's statistics, PACT's
dq/dα) to float32 rounding; and they refuse what they cannot take."""

from __future__ import annotations

import math

import pytest
import torch

from qviz import _checks
from qviz.engine import fused
from qviz.engine.quantizers import SCHEMES, QuantSpec, fake_quantize

PATHS = fused.available_paths()


@pytest.fixture(params=PATHS)
def path(request):
    before = fused.fused_path()
    fused.set_fused_path(request.param)
    yield request.param
    fused.set_fused_path(before)


def _inputs(seed: int, n: int = 4099) -> list[torch.Tensor]:
    """Odd lengths (vector tails), ties, zeros of both signs, tiny and large values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    ties = torch.arange(-20, 21, dtype=torch.float32) / 8  # k/8: exact halfway points of many steps
    special = torch.tensor([0.0, -0.0, 1e-38, -1e-38, 1e-45, 3.0, -3.0, 1.0, -1.0, 0.5, 1e6, -1e6])
    return [base, base * 100, base.abs(), torch.cat([ties, special, base[:37]]), base[:7], base[:1] + 1]


def _fq(x, spec, alpha=None, *, use_fused=True, grad=False):
    x = x.clone().requires_grad_(grad)
    a = None if alpha is None else alpha.clone().requires_grad_(grad)
    if use_fused:
        q = fake_quantize(x, spec, alpha=a)
    else:
        with fused.disabled():
            q = fake_quantize(x, spec, alpha=a)
    if not grad:
        return q, None, None
    weights = torch.linspace(-1, 2, q.numel()).reshape(q.shape)  # a gradient that is not all ones
    (q * weights).sum().backward()
    return q.detach(), x.grad, None if a is None else a.grad


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a.view(torch.int32), b.view(torch.int32)))


UNIFORM_SPECS = [
    QuantSpec("affine", bits=2), QuantSpec("affine", bits=8), QuantSpec("affine", bits=3, narrow=True),
    QuantSpec("symmetric", bits=4), QuantSpec("symmetric", bits=2, narrow=True),
    QuantSpec("symmetric", bits=5, signed=False), QuantSpec("affine", bits=4, clip=(-0.5, 1.5)),
    QuantSpec("symmetric", bits=3, clip=0.75), QuantSpec("affine", bits=4, ste="identity"),
    QuantSpec("affine", bits=16),
]
RELU_SPECS = [QuantSpec("relu", bits=2), QuantSpec("relu", bits=4, clip=1.3), QuantSpec("relu", bits=8),
              QuantSpec("relu", bits=3, ste="saturated"), QuantSpec("relu", bits=3, ste="identity"),
              QuantSpec("pact", bits=2, alpha=0.9), QuantSpec("pact", bits=4)]


@pytest.mark.parametrize("spec", UNIFORM_SPECS + RELU_SPECS, ids=lambda s: f"{s.scheme}{s.bits}-{s.ste}-{s.clip}")
def test_values_and_ste_gradients_match_the_pytorch_formulation_bit_for_bit(spec, path):
    for seed in range(3):
        for x in _inputs(seed):
            q, gx, _ = _fq(x, spec, grad=True)
            ref_q, ref_gx, _ = _fq(x, spec, use_fused=False, grad=True)
            assert _same_bits(q, ref_q), f"{spec} values differ on path {path}"
            assert _same_bits(gx, ref_gx), f"{spec} STE gradients differ on path {path}"


@pytest.mark.parametrize("bits,ste", [(2, None), (3, "saturated"), (4, "identity"), (8, None)])
def test_pact_with_a_learnable_clip_matches_both_gradients(bits, ste, path):
    spec = QuantSpec("pact", bits=bits, ste=ste)
    for seed in range(3):
        for x in _inputs(seed):
            for alpha in (torch.tensor(0.7), torch.tensor([[1.9]]), torch.tensor(1e-30)):
                q, gx, ga = _fq(x, spec, alpha.reshape(alpha.shape[: x.dim()]), grad=True)
                ref_q, ref_gx, ref_ga = _fq(x, spec, alpha.reshape(alpha.shape[: x.dim()]), use_fused=False, grad=True)
                assert _same_bits(q, ref_q)
                assert _same_bits(gx, ref_gx)
                # dq/dα: the fused kernel sums in double, PyTorch in float32
                assert ga.shape == ref_ga.shape
                assert torch.allclose(ga, ref_ga, rtol=1e-5, atol=1e-5 * float(ref_ga.abs().sum()) + 1e-30)


def test_pact_per_channel_clip_takes_the_pytorch_path_and_learns():
    x = torch.randn(64, 5).abs().requires_grad_(True)
    alpha = torch.full((1, 5), 0.5, requires_grad=True)
    fake_quantize(x, QuantSpec("pact", bits=2), alpha=alpha).sum().backward()
    assert alpha.grad.shape == (1, 5) and bool((alpha.grad > 0).all())


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_ternary_statistics_and_values_match(granularity, path):
    spec = QuantSpec("ternary", bits=2, granularity=granularity)
    scheme = SCHEMES["ternary"]
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        for w in (torch.randn(128, 128, generator=g) * 0.05, torch.randn(7, 3, 3, 3, generator=g), torch.randn(9)):
            st = scheme.stats(w, spec, None)
            with fused.disabled():
                ref = scheme.stats(w, spec, None)
            for key in ("delta", "alpha", "top"):
                assert st[key].shape == ref[key].shape and st[key].dtype == ref[key].dtype
                assert torch.allclose(st[key], ref[key], rtol=2e-6, atol=0), key
            q = fake_quantize(w, spec)
            with fused.disabled():
                ref_q = fake_quantize(w, spec)
            # a weight within float32 rounding of Δ may fall on either side; every other one agrees exactly
            near = ((w.abs() - ref["delta"]).abs() <= 1e-6 * ref["delta"])
            levels_match = torch.isclose(q, ref_q, rtol=2e-6, atol=0)
            assert bool((levels_match | near).all())


def test_ternary_gradient_is_the_identity_ste():
    w = torch.randn(32, 16, requires_grad=True)
    weights = torch.randn(32, 16)
    (fake_quantize(w, QuantSpec("ternary", bits=2)) * weights).sum().backward()
    assert torch.equal(w.grad, weights)


def test_sums_do_not_depend_on_the_code_path():
    x = torch.randn(10_007) * 3
    before = fused.fused_path()
    try:
        results = set()
        for p in PATHS:
            fused.set_fused_path(p)
            total, top = fused.abs_stats(x)
            kept, count = fused.kept(x, 1.5)
            _, state = fused.clip_round(x, 1.0, 0.25, "clipped")
            _, above = fused.masked_backward(torch.linspace(-1, 1, x.numel()), state)
            results.add((total, top, kept, count, above))
    finally:
        fused.set_fused_path(before)
    assert len(results) == 1
    (total, top, kept, count, above), = results
    assert math.isclose(total, float(x.double().abs().sum()), rel_tol=1e-12)
    assert top == float(x.abs().max())
    assert count == int((x.abs() > 1.5).sum())
    assert math.isclose(kept, float(x.double().abs()[x.abs() > 1.5].sum()), rel_tol=1e-12)


def test_nan_propagates_as_in_pytorch_when_finite_checks_are_off(path):
    x = torch.tensor([0.5, float("nan"), -1.0, 2.0, float("nan")])
    for spec in (QuantSpec("relu", bits=2, clip=1.0), QuantSpec("affine", bits=3, clip=(-1.0, 1.0))):
        with _checks.no_finite_checks():
            q, gx, _ = _fq(x, spec, grad=True)
            ref_q, ref_gx, _ = _fq(x, spec, use_fused=False, grad=True)
        assert torch.equal(q.isnan(), ref_q.isnan())
        assert torch.equal(torch.nan_to_num(q), torch.nan_to_num(ref_q))
        assert torch.equal(torch.nan_to_num(gx), torch.nan_to_num(ref_gx))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fake_quantize(x, QuantSpec("ternary", bits=2))


def test_tensors_that_cannot_take_a_fused_path_take_the_pytorch_one():
    spec = QuantSpec("affine", bits=4)
    x = torch.randn(40, 30)
    for other in (x.t(), x.double(), x.half(), x[:, ::2]):
        assert not fused.usable(other)
        q = fake_quantize(other, spec)
        with fused.disabled():
            assert torch.equal(q, fake_quantize(other, spec))
    assert fused.usable(x) and not fused.usable(torch.empty(0))
    with fused.disabled():
        assert not fused.usable(x)


def test_the_kernels_refuse_what_they_cannot_read():
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"x must be a contiguous torch\.float32"):
        fused.clip_round(x.double(), 1.0, 0.5)
    with pytest.raises(ValueError, match="x must be a contiguous"):
        fused.abs_stats(torch.randn(4, 4).t())
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        fused.kept(x.numpy(), 0.5)
    with pytest.raises(ValueError, match="state has 9 elements; expected 10"):
        fused.masked_backward(x, torch.zeros(9, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"state must be a contiguous torch\.uint8"):
        fused.masked_backward(x, torch.zeros(10))
    with pytest.raises(ValueError, match="ste="):
        fused.clip_round(x, 1.0, 0.5, "wide")
    with pytest.raises(ValueError, match="name="):
        fused.set_fused_path("sse9")
    from qviz import _fused

    missing = [i for i, name in enumerate(_fused.PATHS) if name not in PATHS] + [7]
    for bad in missing:
        with pytest.raises(ValueError, match="not supported on this CPU"):
            _fused.abs_stats(bad, x.data_ptr(), 10)


def test_empty_and_single_values():
    assert fused.abs_stats(torch.empty(0)) == (0.0, 0.0)
    q, state = fused.clip_round(torch.tensor([0.4]), 1.0, 0.5, "clipped")
    assert q.tolist() == [0.5] and state.tolist() == [fused.PASS]
