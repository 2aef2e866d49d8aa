"""Every scheme against a slow reference written from its paper's equations, plus the properties all share.

References are plain numpy, element by element where the paper is element by element, so that they
share no code with qviz.engine.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qviz.engine import (
    SCHEMES,
    QuantSpec,
    fake_quantize,
    quantizer_levels,
    quantizer_thresholds,
    transfer_curve,
)

ALL = list(SCHEMES)
DETERMINISTIC = [n for n in ALL if not SCHEMES[n].stochastic]


def _weights(seed=0, shape=(16, 24), scale=0.3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _bits_for(name, requested):
    lo, hi = SCHEMES[name].bits
    if name == "symmetric":
        lo = 2
    return min(max(requested, lo), hi)


# ---------------------------------------------------------------- references from the papers


def ref_sign(w):  # 003 eq. 3-1: +1 if w >= 0 else -1
    return np.where(w >= 0, 1.0, -1.0)


def ref_xnor(w):  # 003 eq. 3-6
    return ref_sign(w) * np.abs(w).mean()


def ref_ternary(w, delta):  # 003 eqs. 3-10, 3-13
    above = np.abs(w) > delta
    alpha = np.abs(w[above]).mean() if above.any() else 0.0
    return np.where(w > delta, alpha, np.where(w < -delta, -alpha, 0.0))


def ref_ternary_exact(w):  # 003 eq. 3-14 by brute force over every candidate threshold
    a = np.abs(w).ravel()
    best, best_delta = -1.0, 0.0
    for delta in np.concatenate([[0.0], a]):
        sel = a[a > delta]
        if sel.size == 0:
            continue
        value = sel.sum() ** 2 / sel.size
        if value > best + 1e-12 * max(1.0, best):
            best, best_delta = value, delta
    return ref_ternary(w, best_delta), best


def ref_dorefa(w, k):  # 003 eq. 3-8 (and 3-6 for k = 1)
    if k == 1:
        return ref_xnor(w)
    t = np.tanh(w)
    u = t / (2 * np.abs(t).max()) + 0.5
    n = 2**k - 1
    return 2 * (np.round(u * n) / n) - 1


def ref_q_b(x, b):  # 001 eq. 3, literally
    s = 2 ** (b - 1)
    return np.maximum(0, np.ceil(x * s) / s) + np.maximum(0, -np.floor(x * s) / s) * np.sign(x)


def ref_relu(x, beta, n):  # 002 eq. 1 with alpha = 0, beta = Δ (2^n - 1)
    step = beta / (2**n - 1)
    return step * np.floor(np.clip(x, 0, beta) / step + 0.5)


def ref_dorefa_act(x, k):  # 003 eq. 3-7
    n = 2**k - 1
    return np.round(np.clip(x, 0, 1) * n) / n


def ref_ceil_act(x, b, c=None):  # 001 eq. 5
    c = 2**b - 1 if c is None else c
    xh = np.clip(x, 0, c)
    m = xh.max()
    if m == 0:
        return np.zeros_like(x)
    # the 1e-9 keeps float64 rounding from lifting x̂ = max x̂ (exactly the top level) one step higher
    return np.maximum(0, m / (2**b - 1) * np.ceil(xh * (2**b - 1) / m - 1e-9))


# ---------------------------------------------------------------- each scheme equals its reference


def test_binary_one_bit_equals_sign():
    w = _weights()
    w[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    q = fake_quantize(w, QuantSpec("binary", bits=1))
    assert np.array_equal(q.numpy(), ref_sign(w.numpy()))


def test_bnn_act_is_sign_with_htanh_ste():
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    q = fake_quantize(x, QuantSpec("bnn_act", bits=1))
    q.sum().backward()
    assert np.array_equal(q.detach().numpy(), ref_sign(x.detach().numpy()))
    assert np.array_equal(x.grad.numpy(), (np.abs(x.detach().numpy()) <= 1).astype(np.float32))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_xnor_is_sign_times_mean_abs(granularity):
    w = _weights(1)
    q = fake_quantize(w, QuantSpec("xnor", bits=1, granularity=granularity, axis=0)).numpy()
    if granularity == "tensor":
        assert np.allclose(q, ref_xnor(w.numpy()), rtol=1e-6)
    else:
        assert np.allclose(q, np.stack([ref_xnor(r) for r in w.numpy()]), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 300))
def test_ternary_twn_matches_eqs_3_10_and_3_13(seed, n):
    w = _weights(seed, (n,))
    q = fake_quantize(w, QuantSpec("ternary", bits=2)).numpy()
    wn = w.numpy().astype(np.float64)
    ref = ref_ternary(wn, 0.7 * np.abs(wn).mean())
    assert np.allclose(q, ref, rtol=1e-5, atol=1e-7)
    nonzero = np.unique(np.abs(q[q != 0]))
    assert nonzero.size <= 1  # levels are {-α, 0, α}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 120))
def test_ternary_exact_delta_reaches_the_optimum_of_eq_3_14(seed, n):
    w = _weights(seed, (n,))
    q = fake_quantize(w, QuantSpec("ternary", bits=2, delta_rule="exact")).numpy().astype(np.float64)
    ref, best = ref_ternary_exact(w.numpy().astype(np.float64))
    chosen = np.abs(w.numpy()[q != 0]).astype(np.float64)
    achieved = chosen.sum() ** 2 / chosen.size
    assert achieved == pytest.approx(best, rel=1e-9)
    assert np.allclose(q, ref, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_dorefa_weights_match_eq_3_8(bits):
    w = _weights(2)
    q = fake_quantize(w, QuantSpec("dorefa", bits=bits)).numpy()
    assert np.allclose(q, ref_dorefa(w.numpy().astype(np.float64), bits), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_ceil_matches_eq_3_never_outputs_zero(bits):
    w = _weights(3)
    w[0, 0] = 0.0  # the one input eq. 3 sends to 0; qviz lifts it to the smallest positive level
    alpha = 0.7
    q = fake_quantize(w, QuantSpec("ceil", bits=bits, alpha=alpha)).numpy()
    wn = w.numpy().astype(np.float64)
    ref = alpha * ref_q_b(wn / np.abs(wn).max(), bits)
    nonzero = wn != 0
    assert np.allclose(q[nonzero], ref[nonzero], atol=1e-6)
    assert (q != 0).all()
    assert q[0, 0] == pytest.approx(alpha / 2 ** (bits - 1))
    if bits == 1:
        assert np.array_equal(np.sign(q), ref_sign(wn))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_relu_matches_eq_1(bits):
    x = _weights(4, scale=2.0)
    q = fake_quantize(x, QuantSpec("relu", bits=bits, clip=1.5)).numpy()
    assert np.allclose(q, ref_relu(x.numpy().astype(np.float64), 1.5, bits), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_dorefa_act_has_exactly_2k_levels_in_unit_interval(bits):
    x = torch.linspace(-0.5, 1.5, 4001)
    q = fake_quantize(x, QuantSpec("dorefa_act", bits=bits)).numpy()
    assert np.allclose(q, ref_dorefa_act(x.numpy().astype(np.float64), bits), atol=1e-7)
    assert np.unique(q).size == 2**bits
    assert q.min() == 0 and q.max() == 1


@pytest.mark.parametrize(("bits", "clip"), [(1, None), (2, None), (4, None), (2, 0.8)])
def test_ceil_act_matches_eq_5(bits, clip):
    x = _weights(5, scale=3.0)
    q = fake_quantize(x, QuantSpec("ceil_act", bits=bits, clip=clip)).numpy()
    assert np.allclose(q, ref_ceil_act(x.numpy().astype(np.float64), bits, clip), atol=1e-5)


def test_pact_forward_and_both_gradients():
    x = (torch.linspace(-1, 3, 401) + 0.0013).requires_grad_(True)  # the offset keeps x off exact ties
    alpha = torch.tensor(2.0, requires_grad=True)
    q = fake_quantize(x, QuantSpec("pact", bits=3), alpha=alpha)
    upstream = torch.rand(401, generator=torch.Generator().manual_seed(0))
    q.backward(upstream)
    xn = x.detach().numpy().astype(np.float64)
    assert np.allclose(q.detach().numpy(), ref_relu(xn, 2.0, 3), atol=1e-6)
    # PACT: dq/dx = 1{0 <= x <= α}, dq/dα = 1{x >= α}
    assert np.allclose(x.grad.numpy(), upstream.numpy() * ((xn >= 0) & (xn <= 2.0)))
    assert alpha.grad.item() == pytest.approx(float((upstream.numpy() * (xn >= 2.0)).sum()), rel=1e-5)


def test_pact_alpha_learns_per_channel():
    x = torch.rand(8, 4) * 3
    alpha = torch.full((1, 4), 1.0, requires_grad=True)
    fake_quantize(x, QuantSpec("pact", bits=2), alpha=alpha).sum().backward()
    assert alpha.grad.shape == (1, 4)
    assert torch.equal(alpha.grad, (x >= 1.0).float().sum(0, keepdim=True))


def test_ceil_alpha_is_trainable_with_gradient_sign_alpha_times_qb():
    w = _weights(6)
    alpha = torch.tensor(-0.5, requires_grad=True)
    w_in = w.clone().requires_grad_(True)
    q = fake_quantize(w_in, QuantSpec("ceil", bits=3), alpha=alpha)
    q.sum().backward()
    qb = ref_q_b(w.numpy().astype(np.float64) / np.abs(w.numpy()).max(), 3)
    assert np.allclose(q.detach().numpy(), 0.5 * qb, atol=1e-6)
    assert alpha.grad.item() == pytest.approx(-qb.sum(), rel=1e-5)
    # dq/dw = |α| / max|w| inside the range (identity STE on Q_b)
    assert torch.allclose(w_in.grad, torch.full_like(w, 0.5 / w.abs().max().item()))


def test_stochastic_affine_is_unbiased_inside_the_range_and_on_the_levels():
    x = torch.linspace(-0.8, 0.8, 161).repeat(4000, 1)  # inside the levels (-6/7 .. 8/7 here)
    spec = QuantSpec("stochastic", bits=3, clip=(-1.0, 1.0))
    q = fake_quantize(x, spec, generator=torch.Generator().manual_seed(0))
    levels = quantizer_levels(x, spec)
    assert torch.isin(q, levels).all()
    mean = q.mean(0)
    assert torch.allclose(mean, x[0], atol=0.02)  # E[q] = x (004 §2.3)
    deterministic = fake_quantize(x[0], spec.replace(scheme="affine"))
    assert not torch.allclose(mean, deterministic, atol=0.02)


def test_binary_stochastic_takes_plus_one_with_hard_sigmoid_probability():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).repeat(20000, 1)
    q = fake_quantize(x, QuantSpec("binary_stochastic", bits=1), generator=torch.Generator().manual_seed(1))
    p_plus = (q == 1).float().mean(0).numpy()
    hard_sigmoid = np.clip((x[0].numpy() + 1) / 2, 0, 1)  # 003 eq. 3-3
    assert np.allclose(p_plus, hard_sigmoid, atol=0.015)
    assert set(np.unique(q.numpy())) <= {-1.0, 1.0}


# ---------------------------------------------------------------- properties every scheme shares


def _spec(name, bits, granularity="tensor", **kw):
    return QuantSpec(name, bits=_bits_for(name, bits), granularity=granularity, **kw)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_outputs_lie_on_the_level_set_and_never_exceed_the_bit_budget(name, bits, granularity):
    w = _weights(7, (12, 40), scale=0.8) + 0.1
    spec = _spec(name, bits, granularity, axis=1)
    q = fake_quantize(w, spec, generator=torch.Generator().manual_seed(0))
    levels = quantizer_levels(w, spec)
    assert levels.shape[-1] <= spec.max_levels <= 2**spec.bits
    rows_of_levels = levels.reshape(-1, levels.shape[-1])
    assert quantizer_thresholds(w, spec).numel() == rows_of_levels.numel() - rows_of_levels.shape[0]
    if granularity == "tensor":
        assert torch.isclose(q.reshape(-1, 1), levels.reshape(1, -1), rtol=1e-5, atol=1e-7).any(1).all()
        assert torch.unique(q).numel() <= spec.max_levels
    else:
        rows = levels if levels.dim() == 2 else levels.expand(w.shape[1], -1)
        for c in range(w.shape[1]):
            col = q[:, c]
            assert torch.isclose(col.reshape(-1, 1), rows[c].reshape(1, -1), rtol=1e-5, atol=1e-7).any(1).all()
            assert torch.unique(col).numel() <= spec.max_levels


def _documented_ste(name, spec, x):
    """dq/dx as each scheme's docstring states it, computed without qviz."""
    xn = x.numpy().astype(np.float64)
    ste = spec.ste or SCHEMES[name].default_ste
    saturated = (np.abs(xn) <= 1).astype(float)
    if name in ("affine", "symmetric", "stochastic"):
        lo, hi = xn.min(), xn.max()
        if name in ("affine", "stochastic"):
            lo, hi = min(lo, 0), max(hi, 0)
            qmin, qmax = 0, 2**spec.bits - 1
            scale = np.float32((hi - lo) / (qmax - qmin))
            zp = qmin - np.round(lo / scale)
        else:
            qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
            scale = np.float32(max(abs(lo), abs(hi)) / qmax)
            zp = 0
        code = np.round(xn * np.float32(1 / scale)) + zp
        clipped = ((code >= qmin) & (code <= qmax)).astype(float)
        return {"identity": np.ones_like(xn), "clipped": clipped, "saturated": saturated}[ste]
    if name in ("binary", "binary_stochastic", "bnn_act", "xnor"):
        clipped = saturated  # their range is [-1, 1]
    elif name in ("relu", "pact"):
        clipped = ((xn >= 0) & (xn <= xn.max())).astype(float)
    elif name == "dorefa_act":
        clipped = ((xn >= 0) & (xn <= 1)).astype(float)
    elif name == "ceil_act":
        clipped = ((xn >= 0) & (xn <= 2**spec.bits - 1)).astype(float)
    else:  # ternary, ceil, dorefa: every input lies inside their range
        clipped = np.ones_like(xn)
    mask = {"identity": np.ones_like(xn), "clipped": clipped, "saturated": saturated}[ste]
    if name == "ceil":
        return mask / np.abs(xn).max()  # |α| / max|w| with α = 1
    if name == "dorefa" and spec.bits > 1:
        t = np.tanh(xn)
        return mask * (1 - t * t) / np.abs(t).max()
    return mask


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("ste", [None, "identity", "clipped", "saturated"])
def test_gradients_equal_the_documented_ste(name, ste):
    x = torch.linspace(-2.5, 2.5, 1001)
    spec = _spec(name, 2, ste=ste)
    xg = x.clone().requires_grad_(True)
    fake_quantize(xg, spec, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert np.allclose(xg.grad.numpy(), _documented_ste(name, spec, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_transfer_curve_matches_fake_quantize(name, bits):
    spec = _spec(name, bits)
    curve = transfer_curve(spec, lo=-2.0, hi=2.0, n=801, seed=3)
    x = torch.linspace(-2.0, 2.0, 801)
    q = fake_quantize(x, spec, generator=torch.Generator().manual_seed(3)).numpy()
    assert np.array_equal(curve["x"], x.numpy())
    assert np.array_equal(curve["q"], q)
    xg = x.clone().requires_grad_(True)
    fake_quantize(xg, spec, generator=torch.Generator().manual_seed(3)).sum().backward()
    assert np.array_equal(curve["grad"], xg.grad.numpy())
    assert np.allclose(curve["error"], curve["x"] - curve["expected"])
    assert np.isclose(curve["q"][:, None], curve["levels"][None, :], atol=1e-6).any(1).all()
    assert len(curve["thresholds"]) == len(curve["levels"]) - 1
    assert np.all(np.diff(curve["levels"]) >= 0) and np.all(np.diff(curve["thresholds"]) >= 0)
    if not SCHEMES[name].stochastic:
        assert np.array_equal(curve["expected"], curve["q"])


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_thresholds_are_where_the_staircase_jumps(name, bits):
    curve = transfer_curve(_spec(name, bits), lo=-2.0, hi=2.0, n=40001)
    x, q = curve["x"], curve["q"]
    t = curve["thresholds"]
    jumps = np.nonzero(np.diff(q) != 0)[0]
    # a threshold exactly at an end of the grid may or may not show as a jump (a rounding tie)
    assert ((t > x[0]) & (t < x[-1])).sum() <= len(jumps) <= ((t >= x[0]) & (t <= x[-1])).sum()
    mids = (x[jumps] + x[jumps + 1]) / 2
    assert (np.abs(mids[:, None] - t[None, :]).min(1) <= x[1] - x[0]).all()


def test_gradient_flows_to_shadow_weights_through_every_weight_scheme():
    for name in ALL:
        w = _weights(8).requires_grad_(True)
        q = fake_quantize(w, _spec(name, 2), generator=torch.Generator().manual_seed(0))
        (q * torch.randn_like(q)).sum().backward()
        assert w.grad is not None and torch.isfinite(w.grad).all(), name


@pytest.mark.parametrize("name", ALL)
def test_outputs_keep_shape_and_dtype(name):
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 5, 2, dtype=dtype)
        q = fake_quantize(x, _spec(name, 2))
        assert q.shape == x.shape and q.dtype == dtype


def test_symmetric_narrow_drops_the_most_negative_level():
    x = torch.linspace(-1, 1, 101)
    full = quantizer_levels(x, QuantSpec("symmetric", bits=3))
    narrow = quantizer_levels(x, QuantSpec("symmetric", bits=3, narrow=True))
    assert full.numel() == 8 and narrow.numel() == 7
    assert torch.allclose(narrow, full[1:])
    assert narrow.min() == -narrow.max()


def test_symmetric_unsigned_uses_codes_from_zero():
    x = torch.linspace(0, 2, 101)
    levels = quantizer_levels(x, QuantSpec("symmetric", bits=2, signed=False))
    assert torch.allclose(levels, torch.tensor([0.0, 2 / 3, 4 / 3, 2.0]))


def test_compression_worked_example_via_levels():
    """A 4-level quantizer on 27 weights uses 2 index bits: the 003 Fig. 2.6 setting."""
    w = _weights(9, (27,))
    q = fake_quantize(w, QuantSpec("affine", bits=2))
    assert torch.unique(q).numel() <= 4
    assert math.ceil(math.log2(4)) == 2
