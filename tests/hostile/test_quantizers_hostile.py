"""Every scheme on hostile tensors: any dtype, shape, stride and value a user can hand in.

Each input either gets a ValueError/TypeError naming the argument, or an answer that is finite, has x's shape
and dtype, and agrees with the independent float64 reference of reference.py (exactly, up to the dtype's
rounding, except where a rounding tie is too close to call in float32).
"""

from __future__ import annotations

import math
import os

import hostile
import numpy as np
import pytest
import reference
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qviz.engine import SCHEMES, QuantSpec, fake_quantize, quantizer_levels, quantizer_thresholds, transfer_curve

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DETERMINISTIC = [n for n, s in SCHEMES.items() if not s.stochastic]
# QVIZ_HOSTILE_EXAMPLES=20000 for a deep run; the suite's default keeps it to seconds
EXAMPLES = int(os.environ.get("QVIZ_HOSTILE_EXAMPLES", "400"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------ inputs


def _values(draw, dtype: torch.dtype, n: int) -> np.ndarray:
    """n finite values of one hostile kind, all representable in dtype."""
    fi = torch.finfo(dtype)
    kind = draw(st.sampled_from(["normal", "huge", "tiny", "constant", "zeros", "anything", "one_outlier"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    signs = rng.choice([-1.0, 1.0], n)
    if kind == "normal":
        v = rng.standard_normal(n) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
    elif kind == "huge":
        v = signs * fi.max * rng.uniform(0.125, 1.0, n)
    elif kind == "tiny":
        v = signs * fi.tiny * rng.uniform(1e-3, 10.0, n)
    elif kind == "constant":
        v = np.full(n, draw(st.sampled_from([1.0, -3.5, fi.max, -fi.max, fi.tiny, 1e-30])))
    elif kind == "zeros":
        v = np.zeros(n)
    elif kind == "one_outlier":
        v = rng.standard_normal(n) * 0.1
        v[rng.integers(0, n)] = signs[0] * fi.max / 2
    else:
        v = np.array([draw(st.floats(-fi.max, fi.max, allow_nan=False, allow_infinity=False)) for _ in range(n)])
    v = np.clip(v, -fi.max, fi.max)
    return v


@st.composite
def hostile_tensors(draw, min_dims: int = 0, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(min_dims, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    n = math.prod(shape)
    base = torch.tensor(_values(draw, dtype, n), dtype=torch.float64).to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    if layout == "transposed" and ndim >= 2:
        return base.reshape(shape[::-1]).permute(*reversed(range(ndim)))
    if layout == "strided" and ndim >= 1:
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = base.reshape(shape)
        return wide[..., ::2]
    if layout == "expanded" and ndim >= 1:
        return base.reshape(shape)[:1].expand(*shape)  # stride 0 along dim 0: every row the same
    return base.reshape(shape)


@st.composite
def specs(draw, x: torch.Tensor, schemes=DETERMINISTIC):
    name = draw(st.sampled_from(schemes))
    s = SCHEMES[name]
    signed = draw(st.booleans()) if name == "symmetric" else True
    lo, hi = s.bits
    if name == "symmetric" and signed:
        lo = 2
    kw = {"bits": draw(st.integers(lo, hi)), "signed": signed}
    if x.dim() >= 1 and draw(st.booleans()):
        kw.update(granularity="channel", axis=draw(st.integers(-x.dim(), x.dim() - 1)))
    if s.takes_narrow and kw["bits"] >= 2 and draw(st.booleans()):
        kw["narrow"] = True
    if s.takes_clip and draw(st.integers(0, 3)) == 0:
        c = draw(st.sampled_from([0.5, 3.0, 1e30, 1e300]))
        kw["clip"] = (-c, c / 2) if s.takes_clip_pair and draw(st.booleans()) else c
    if s.takes_alpha and draw(st.integers(0, 2)) == 0:
        kw["alpha"] = draw(st.sampled_from([0.25, 2.0, 1e30]))
    if name == "ternary" and x.numel() <= 40:
        kw["delta_rule"] = draw(st.sampled_from(["twn", "exact"]))
    return QuantSpec(name, **kw)


# ------------------------------------------------------------------------------------------------ checks


def _compare_with_reference(x: torch.Tensor, spec: QuantSpec, q: torch.Tensor) -> bool:
    want, ambiguous = reference.expected(x.double().numpy(), spec)
    limit = torch.finfo(x.dtype).max
    want = np.asarray(np.clip(want, -limit, limit))
    if x.dtype in (torch.float16, torch.bfloat16):  # the engine rounds its float32 result to x's dtype
        want = torch.from_numpy(want).to(x.dtype).double().numpy()
    if spec.scheme in ("affine",):
        ambiguous = ambiguous | _zero_point_tie(x, spec)
    got = q.double().numpy()
    step = reference.largest_step(np.concatenate([want.ravel(), got.ravel()]))
    eps = float(torch.finfo(x.dtype).eps) if x.dtype != torch.float64 else float(torch.finfo(torch.float32).eps)
    magnitude = reference.group_magnitude(want, spec)
    ok = reference.close_enough(got, want, ambiguous, eps, step, magnitude)
    return bool(ok.all())


def _zero_point_tie(x, spec) -> np.ndarray:
    """Affine: when lo / Δ sits on a rounding tie the zero-point may go either way and shift every level."""
    rows, back = reference._groups(x.double().numpy(), spec)
    lo, hi = np.minimum(rows.min(1, keepdims=True), 0), np.maximum(rows.max(1, keepdims=True), 0)
    if spec.clip is not None:
        c = spec.clip if isinstance(spec.clip, tuple) else (-spec.clip, spec.clip)
        lo, hi = np.full_like(lo, min(c[0], 0.0)), np.full_like(hi, max(c[1], 0.0))
    qmin, qmax = reference._code_range(spec)
    scale = np.maximum(hi / (qmax - qmin) - lo / (qmax - qmin), reference.EPS32)
    tie = reference._near_tie(lo / scale)
    return back(np.broadcast_to(tie, rows.shape).copy())


def _answer_ok(x: torch.Tensor, spec: QuantSpec, q: torch.Tensor) -> bool:
    return (q.shape == x.shape and q.dtype == x.dtype and bool(torch.isfinite(q).all())
            and _compare_with_reference(x, spec, q))


# ------------------------------------------------------------------------------------------------ tests


@SETTINGS
@given(data=st.data())
def test_every_deterministic_scheme_on_hostile_tensors_matches_the_reference(data):
    x = data.draw(hostile_tensors())
    spec = data.draw(specs(x))
    out = hostile.run(fake_quantize, x, spec)
    hostile.expect_answer(out, lambda q: _answer_ok(x, spec, q), f"{spec} on {x.dtype} {tuple(x.shape)}")


@settings(max_examples=max(150, EXAMPLES // 3), deadline=None)
@given(data=st.data())
def test_gradients_through_hostile_tensors_are_finite_and_shaped_like_x(data):
    x = data.draw(hostile_tensors()).clone().requires_grad_(True)
    spec = data.draw(specs(x, list(SCHEMES)))

    def backward():
        q = fake_quantize(x, spec, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad(q.sum(), x, allow_unused=True)
        return grad

    out = hostile.run(backward)
    hostile.expect_answer(out, lambda g: g is None or (g.shape == x.shape and bool(torch.isfinite(g).all())),
                          f"gradient of {spec}")


@settings(max_examples=max(150, EXAMPLES // 3), deadline=None)
@given(data=st.data())
def test_stochastic_schemes_land_on_a_neighbouring_level(data):
    x = data.draw(hostile_tensors(dtypes=[torch.float32, torch.float64]))
    name = data.draw(st.sampled_from(["stochastic", "binary_stochastic"]))
    bits = data.draw(st.integers(1, 8)) if name == "stochastic" else 1
    spec = QuantSpec(name, bits=bits)
    out = hostile.run(fake_quantize, x, spec, generator=torch.Generator().manual_seed(1))

    def right(q):
        if q.shape != x.shape or not bool(torch.isfinite(q).all()):
            return False
        if name == "binary_stochastic":
            v = x.double()
            return bool(((q == 1) | (q == -1)).all() and (q[v >= 1] == 1).all() and (q[v <= -1] == -1).all())
        nearest, _ = reference.expected(x.double().numpy(), spec.replace(scheme="affine"))
        nearest = np.clip(nearest, -torch.finfo(x.dtype).max, torch.finfo(x.dtype).max)
        levels = quantizer_levels(x, spec.replace(scheme="affine")).double().numpy()
        step = reference.largest_step(levels) if levels.size > 1 else 0.0
        return bool(np.all(np.abs(q.double().numpy() - nearest) <= step * (1 + 1e-3) + 1e-6 * np.abs(nearest)))

    hostile.expect_answer(out, right, f"{spec}")


@settings(max_examples=max(150, EXAMPLES // 3), deadline=None)
@given(data=st.data())
def test_levels_and_thresholds_of_hostile_tensors_are_finite_and_sorted(data):
    x = data.draw(hostile_tensors())
    spec = data.draw(specs(x))

    def both():
        return quantizer_levels(x, spec), quantizer_thresholds(x, spec)

    def right(pair):
        levels, thresholds = pair
        finite = bool(torch.isfinite(levels).all() and torch.isfinite(thresholds).all())
        rows = levels.reshape(-1, levels.shape[-1])
        return finite and bool((rows[:, 1:] >= rows[:, :-1]).all()) and thresholds.shape[-1] == levels.shape[-1] - 1

    hostile.expect_answer(hostile.run(both), right, f"levels of {spec}")


@pytest.mark.parametrize("name", ["xnor", "dorefa"])
def test_a_1d_tensor_per_channel_keeps_its_signs(name):
    """Each channel of a 1-D tensor holds one value: its α is |w|, so the sign must survive (issue 10)."""
    x = torch.tensor([-1.0, 0.5, -0.25, 2.0])
    out = hostile.run(fake_quantize, x, QuantSpec(name, 1, granularity="channel", axis=0))
    hostile.expect_answer(out, lambda q: torch.equal(q, x), f"{name} per channel on 1-D")


@pytest.mark.parametrize(("x", "spec"), [
    (torch.tensor([-2e38, 0, 2e38]), QuantSpec("affine", 4)),
    (torch.tensor([-6e4, 0, 6e4], dtype=torch.float16), QuantSpec("affine", 2)),
    (torch.tensor([-3.4e38, 3.4e38]), QuantSpec("stochastic", 3)),
    (torch.tensor([-1.7e308, 1.7e308], dtype=torch.float64), QuantSpec("xnor", 1)),
    (torch.tensor([3.4e38, 3.3e38, 1.0]), QuantSpec("ternary", 2)),
    (torch.tensor([3.4e38, 1.0]), QuantSpec("relu", 2)),
    (torch.tensor([-1.0, 2.0]), QuantSpec("affine", 8, clip=1e300)),
])
def test_finite_input_never_gives_non_finite_output(x, spec):
    out = hostile.run(fake_quantize, x, spec, generator=torch.Generator().manual_seed(0))
    hostile.expect_answer(out, lambda q: bool(torch.isfinite(q).all()) and q.dtype == x.dtype, f"{spec}")


# ------------------------------------------------------------------------------------------------ bad arguments

X = torch.randn(3, 4)


@pytest.mark.parametrize(("scheme", "alpha", "names"), [
    ("pact", torch.tensor(float("nan")), ["alpha"]),
    ("pact", torch.tensor(float("inf")), ["alpha"]),
    ("pact", torch.tensor(-1.0), ["alpha", "> 0"]),
    ("pact", torch.tensor(0.0), ["alpha"]),
    ("pact", torch.ones(5), ["alpha", "(5,)"]),
    ("pact", torch.ones(2, 3, 4), ["alpha"]),
    ("pact", torch.ones(0), ["alpha"]),
    ("pact", torch.tensor([1, 2]), ["alpha"]),
    ("pact", 1.0, ["alpha", "Tensor"]),
    ("pact", np.float32(1.0), ["alpha"]),
    ("pact", torch.ones(3, 4).to_sparse(), ["alpha"]),
    ("ceil", torch.tensor(0.0), ["alpha"]),
    ("ceil", torch.tensor([float("nan")]), ["alpha"]),
    ("ceil", torch.ones(4, 3), ["alpha"]),
    ("affine", torch.tensor(1.0), ["alpha", "'pact'"]),
])
def test_bad_learnable_alpha_is_refused_by_name(scheme, alpha, names):
    bits = 2
    out = hostile.run(fake_quantize, X, QuantSpec(scheme, bits), alpha=alpha)
    hostile.expect_clear_error(out, "alpha")
    assert all(n in out.message for n in names), out.message


def test_valid_learnable_alpha_of_any_float_dtype_keeps_x_dtype():
    for alpha in (torch.tensor(1.5, dtype=torch.float64), torch.full((1, 4), 0.5), torch.tensor([2.0])):
        out = hostile.run(fake_quantize, X, QuantSpec("pact", 2), alpha=alpha)
        hostile.expect_answer(out, lambda q: q.dtype == X.dtype and q.shape == X.shape and bool(q.isfinite().all()),
                              f"alpha {alpha}")


@pytest.mark.parametrize(("x", "names"), [
    (np.ones((2, 2), np.float32), ["x", "torch.from_numpy"]),
    ([1.0, 2.0], ["x", "torch.Tensor"]),
    (torch.ones(2, 2, dtype=torch.int64), ["x", "floating-point"]),
    (torch.ones(2, 2, dtype=torch.bool), ["x", "floating-point"]),
    (torch.ones(2, 2, dtype=torch.complex64), ["x", "floating-point"]),
    (torch.ones(2, 2).to_sparse(), ["x", "dense"]),
    (torch.empty(2, 2, device="meta"), ["x", "meta"]),
    (torch.tensor([1.0, float("nan")]), ["x", "NaN"]),
    (torch.tensor([1.0, float("inf")]), ["x", "Inf"]),
    (torch.tensor([[-float("inf")]], dtype=torch.float16), ["x", "Inf"]),
    (torch.empty(0, 3), ["x", "empty"]),
])
@pytest.mark.parametrize("scheme", ["affine", "xnor", "ternary", "pact", "ceil_act"])
def test_bad_tensors_are_refused_by_name(x, names, scheme):
    bits = max(SCHEMES[scheme].bits[0], 2 if scheme == "ternary" else 1)
    out = hostile.run(fake_quantize, x, QuantSpec(scheme, bits))
    hostile.expect_clear_error(out, "x")
    assert all(n in out.message for n in names), out.message


@pytest.mark.parametrize(("spec", "name"), [
    (QuantSpec("affine", 4, granularity="channel", axis=2), "axis"),
    (QuantSpec("affine", 4, granularity="channel", axis=-3), "axis"),
    ("affine", "spec"),
    (None, "spec"),
])
def test_bad_spec_or_axis_is_refused_by_name(spec, name):
    hostile.expect_clear_error(hostile.run(fake_quantize, X, spec), name)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"bits": np.int64(40)}, "bits"), ({"bits": 4.0}, "bits"), ({"bits": "4"}, "bits"), ({"bits": None}, "bits"),
    ({"axis": np.float64(1)}, "axis"), ({"axis": "0"}, "axis"), ({"signed": 1}, "signed"),
    ({"narrow": None}, "narrow"), ({"clip": "1"}, "clip"), ({"clip": (1.0,)}, "clip"),
    ({"clip": (0.0, float("inf"))}, "clip"), ({"clip": (np.nan, 1.0)}, "clip"), ({"clip": 0}, "clip"),
    ({"clip": torch.tensor(1.0)}, "clip"), ({"scheme": "AFFINE"}, "scheme"), ({"scheme": None}, "scheme"),
    ({"granularity": "channels"}, "granularity"), ({"ste": ""}, "ste"), ({"delta_rule": 1}, "delta_rule"),
])
def test_bad_spec_fields_are_refused_by_name(kwargs, name):
    hostile.expect_clear_error(hostile.run(QuantSpec, **kwargs), name)


def test_numpy_scalars_are_accepted_and_stored_as_python_values():
    out = hostile.run(QuantSpec, "symmetric", bits=np.int64(4), axis=np.int32(1), narrow=np.True_,
                      granularity="channel")

    def right(spec):
        plain = type(spec.bits) is int and type(spec.axis) is int and type(spec.narrow) is bool
        return plain and spec == QuantSpec("symmetric", 4, axis=1, narrow=True, granularity="channel")

    hostile.expect_answer(out, right, "numpy scalars in QuantSpec")


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"lo": float("nan")}, "lo"), ({"hi": float("inf")}, "hi"), ({"lo": 1.0, "hi": 1.0}, "lo"),
    ({"n": 1}, "n"), ({"n": 10**7}, "n"), ({"n": 2.5}, "n"), ({"n": True}, "n"), ({"lo": "a"}, "lo"),
    ({"spec": "affine"}, "spec"),
])
def test_bad_transfer_curve_arguments_are_refused_by_name(kwargs, name):
    args = {"spec": QuantSpec("affine", 2), **kwargs}
    hostile.expect_clear_error(hostile.run(transfer_curve, **args), name)


@settings(max_examples=max(80, EXAMPLES // 5), deadline=None)
@given(name=st.sampled_from(list(SCHEMES)), lo=st.floats(-3e38, 3e38), width=st.floats(1e-30, 3e38),
       n=st.integers(2, 3000))
def test_transfer_curves_over_any_finite_interval_are_finite(name, lo, width, n):
    hi = lo + width
    assume(hi > lo and math.isfinite(hi) and abs(hi) < 3.4e38)
    spec = QuantSpec(name, bits=2 if name in ("symmetric", "ternary") else SCHEMES[name].bits[0])
    out = hostile.run(transfer_curve, spec, lo, hi, n)
    hostile.expect_answer(out, lambda c: all(np.isfinite(c[k]).all() for k in ("x", "q", "grad", "levels")),
                          f"transfer curve of {name} on [{lo:g}, {hi:g}]")
