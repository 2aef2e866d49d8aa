"""The rest of qviz.engine's public functions on hostile input: metrics, observers, data, folding, networks.

Every call either raises a ValueError/TypeError naming the argument or returns an answer the test checks
(against numpy, or against a property the answer must have: finite, the right shape, the right count).
"""

from __future__ import annotations

import math

import hostile
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from qviz.engine import (
    FCDNN,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QuantSpec,
    accuracy,
    clr_factor,
    code_range,
    compression_ratio,
    correct_labels,
    decision_map,
    evaluation_grid,
    fake_quantize,
    fold_batchnorm,
    histogram,
    levels_used,
    lipschitz_penalty,
    minmax,
    predict_proba,
    quant_params,
    quantization_error,
    quantize_gradient,
    roughness,
    semicircles,
    sqnr_db,
    weight_pairs,
    weight_power,
    weight_report,
)

F64 = np.finfo(np.float64)
finite64 = st.floats(-F64.max, F64.max, allow_nan=False, allow_infinity=False)
arrays = hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=6), elements=finite64)


def _sqnr_reference(w, q):
    """10 log10(Σw²/Σ(w-q)²) with exact big-float arithmetic (Python integers of the scaled values)."""
    from fractions import Fraction

    signal = sum(Fraction(float(v)) ** 2 for v in w.ravel())
    noise = sum((Fraction(float(a)) - Fraction(float(b))) ** 2 for a, b in zip(w.ravel(), q.ravel(), strict=True))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    ratio = signal / noise
    return 10 * (math.log10(ratio.numerator) - math.log10(ratio.denominator))


@settings(max_examples=300, deadline=None)
@given(w=arrays, data=st.data())
def test_sqnr_of_any_finite_arrays_matches_exact_arithmetic(w, data):
    q = data.draw(hnp.arrays(np.float64, w.shape, elements=finite64))
    out = hostile.run(sqnr_db, w, q)
    want = _sqnr_reference(w, q)

    def right(v):
        if math.isinf(want):
            return v == want
        return math.isfinite(v) and abs(v - want) <= 1e-9 * max(1.0, abs(want)) + 1e-9

    hostile.expect_answer(out, right, f"sqnr of {w.shape}")


@settings(max_examples=200, deadline=None)
@given(w=arrays)
def test_weight_power_of_any_finite_array_is_finite_with_mean_one(w):
    out = hostile.run(weight_power, w)
    hostile.expect_answer(out, lambda p: bool(np.isfinite(p).all()) and (np.all(p == 0) or abs(p.mean() - 1) < 1e-9),
                          "weight power")


_NEAR_TOP = np.nextafter(F64.max, 0)


@settings(max_examples=200, deadline=None)
@given(v=arrays, bins=st.integers(1, 60))
@example(v=np.array([_NEAR_TOP, np.nextafter(_NEAR_TOP, 0)]), bins=4)  # edges a unit apart came out of order
def test_histograms_of_any_finite_array_count_every_value_once(v, bins):
    out = hostile.run(histogram, v, bins)

    def right(pair):
        edges, counts = pair
        return (len(edges) == bins + 1 and bool(np.isfinite(edges).all()) and bool(np.all(np.diff(edges) >= 0))
                and int(counts.sum()) == v.size)

    hostile.expect_answer(out, right, "histogram")


@pytest.mark.parametrize(("fn", "args", "names"), [
    (sqnr_db, ([1.0, 2.0], np.ones(2)), ["w", "torch.Tensor or numpy.ndarray"]),
    (sqnr_db, (np.ones(2), "x"), ["w_q"]),
    (sqnr_db, (np.ones(3, bool), np.ones(3, bool)), ["w", "real numbers"]),
    (sqnr_db, (np.ones(3, complex), np.ones(3)), ["w", "real numbers"]),
    (sqnr_db, (np.array([1, "a"], dtype=object), np.ones(2)), ["w"]),
    (sqnr_db, (np.ones(3), np.ones(4)), ["w and w_q", "same shape"]),
    (sqnr_db, (np.array([1.0, np.nan]), np.ones(2)), ["w", "NaN"]),
    (sqnr_db, (np.ones(2), np.array([np.inf, 1.0])), ["w_q", "NaN or Inf"]),
    (sqnr_db, (np.ones(0), np.ones(0)), ["w", "empty"]),
    (sqnr_db, (torch.ones(2, 2).to_sparse(), torch.ones(2, 2)), ["w", "dense"]),
    (weight_power, (np.ones(0),), ["w", "empty"]),
    (weight_power, ("w",), ["w"]),
    (histogram, (np.ones(3), 0), ["bins"]),
    (histogram, (np.ones(3), 2.5), ["bins"]),
    (histogram, (np.ones(3), 5, float("nan")), ["lo"]),
    (histogram, (np.ones(3), 5, "a"), ["lo"]),
    (histogram, (np.ones(3), 5, 0.0, float("inf")), ["hi"]),
    (histogram, (np.ones(3), 5, 2.0, 1.0), ["lo", "hi"]),
    (histogram, (np.ones(0),), ["values", "empty"]),
    (levels_used, (np.ones((2, 3)), 5), ["axis"]),
    (levels_used, (np.ones((2, 3)), 1.5), ["axis"]),
    (quantization_error, (np.ones(3), np.ones(4)), ["same shape"]),
    (compression_ratio, (0,), ["n"]),
    (compression_ratio, (27, 0), ["b"]),
    (compression_ratio, (27, 32, 1), ["k"]),
    (compression_ratio, (27, 32, 4, -1), ["codebook_bits"]),
    (compression_ratio, (27.5,), ["n"]),
    (compression_ratio, (True,), ["n"]),
    (weight_report, (torch.ones(3), QuantSpec("affine", 2)), ["weight", "2 dims"]),
    (weight_report, (torch.ones(3, 3), "affine"), ["spec"]),
    (weight_report, (torch.ones(0, 3), QuantSpec("affine", 2)), ["x", "empty"]),
    (quant_params, ("a", 1.0, 4), ["xmin"]),
    (quant_params, (0.0, True, 4), ["xmax"]),
    (quant_params, (0.0, 1.0, 0), ["bits"]),
    (quant_params, (0.0, 1.0, 33), ["bits"]),
    (quant_params, (1.0, 0.0, 4), ["range", "reversed"]),
    (quant_params, (float("nan"), 1.0, 4), ["range", "NaN"]),
    (quant_params, (0.0, 1.0, 1, {"symmetric": True}), ["bits=1"]),
    (minmax, (torch.ones(2, 3), "channel", 7), ["axis"]),
    (minmax, (torch.ones(2, 3), "row"), ["granularity"]),
    (minmax, (torch.empty(0, 3),), ["x", "empty"]),
    (minmax, (np.ones(3),), ["x", "torch.from_numpy"]),
    (MovingAverageMinMaxObserver, (0,), ["momentum"]),
    (MovingAverageMinMaxObserver, (1.5,), ["momentum"]),
    (MinMaxObserver, ("rows",), ["granularity"]),
    (semicircles, (-1,), ["seed"]),
    (semicircles, (0.5,), ["seed"]),
    (semicircles, (0, {"r": 0.0}), ["r"]),
    (semicircles, (0, {"r": 1e308}), ["r"]),
    (semicircles, (0, {"noise": float("nan")}), ["noise"]),
    (semicircles, (0, {"noise": 1e30}), ["noise"]),
    (semicircles, (0, {"rings": 0}), ["rings"]),
    (semicircles, (0, {"points": 100_000, "subsamples": 1000}), ["samples", "subsamples"]),
    (correct_labels, ([[1.0, 2.0]],), ["P"]),
    (correct_labels, (torch.ones(3, 2, dtype=torch.int64),), ["P", "floating-point"]),
    (correct_labels, (torch.ones(3, 3),), ["P", "[n, 2]"]),
    (correct_labels, (torch.tensor([[np.nan, 1.0]]),), ["P", "NaN"]),
    (evaluation_grid, (1,), ["resolution"]),
    (evaluation_grid, (5000,), ["resolution"]),
    (evaluation_grid, (10, 1.0, 0.0), ["lo", "hi"]),
    (evaluation_grid, (10, float("-inf")), ["lo"]),
    (quantize_gradient, (torch.ones(3), 0), ["bits"]),
    (quantize_gradient, (torch.tensor([np.inf]), 4), ["g", "NaN or Inf"]),
    (quantize_gradient, (np.ones(3), 4), ["g"]),
    (fold_batchnorm, (torch.ones(2, 3), torch.ones(3), torch.ones(2), torch.ones(2), torch.ones(2)), ["gamma", "(2,)"]),
    (fold_batchnorm, (torch.ones(2, 3), torch.ones(2), torch.ones(2), torch.ones(2), -torch.ones(2)), ["var"]),
    (fold_batchnorm, (torch.ones(2, 3), torch.ones(2), torch.ones(2), torch.ones(2), torch.zeros(2), 0.0),
     ["eps"]),
    (fold_batchnorm, (torch.full((2, 3), 3e38), torch.full((2,), 3e38), torch.ones(2), torch.ones(2),
                      torch.zeros(2)), ["gamma", "overflow"]),
    (fold_batchnorm, (torch.ones(()), torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1)), ["weight"]),
    (FCDNN, (0,), ["width"]),
    (FCDNN, (8, 1), ["depth"]),
    (FCDNN, (65536, 256), ["width", "parameters"]),
    (FCDNN, (8, 3, "yes"), ["residual"]),
    (FCDNN, (8, 3, False, "affine"), ["w_spec"]),
    (FCDNN, (8, 3, {"overrides": {5: {"w_spec": None}}}), ["overrides"]),
    (FCDNN, (8, 3, {"overrides": {0: {"weights": None}}}), ["overrides"]),
    (FCDNN, (8, 3, {"bn_fold": "half"}), ["bn_fold"]),
    (FCDNN, (8, 3, {"input_scale": 0.0}), ["input_scale"]),
    (accuracy, (nn.Linear(2, 2), torch.randn(10, 2), torch.zeros(10, 1, dtype=torch.long)), ["y"]),
    (accuracy, (nn.Linear(2, 2), torch.randn(10, 2), torch.zeros(1, dtype=torch.long)), ["y"]),
    (accuracy, (nn.Linear(2, 2), torch.randn(10, 2), torch.zeros(10)), ["y"]),
    (accuracy, ("model", torch.randn(10, 2), torch.zeros(10, dtype=torch.long)), ["model"]),
    (fake_quantize, (torch.ones(1).expand(10**6, 10**6), QuantSpec("affine", 4)), ["x", "memory limit"]),
    (sqnr_db, (np.broadcast_to(1.0, (10**6, 10**6)), np.broadcast_to(1.0, (10**6, 10**6))), ["w", "memory limit"]),
    (histogram, (np.ones(3), 5, 0, 10**400), ["hi"]),
    (QuantSpec, ("affine", 4, {"clip": 10**400}), ["clip"]),
    (decision_map, (nn.Linear(2, 2), 10**400, 1.0, 8), ["lo"]),
    (decision_map, (nn.Linear(2, 2), "a", 1.0, 8), ["lo"]),
    (predict_proba, (nn.Linear(2, 2), torch.randn(4, 2), 0), ["batch"]),
    (predict_proba, (nn.Linear(2, 2), torch.zeros(0, 2)), ["X"]),
    (predict_proba, ("model", torch.randn(4, 2)), ["model"]),
    (code_range, (0,), ["bits"]),
    (code_range, (2.5,), ["bits"]),
    (code_range, (True,), ["bits"]),
    (code_range, (10**12,), ["bits"]),
    (code_range, (4, {"symmetric": "yes"}), ["symmetric"]),
    (quant_params, (0.0, 1.0, 4, {"symmetric": "yes"}), ["symmetric"]),
    (roughness, (np.zeros(5),), ["predicted"]),
    (roughness, (np.zeros((1, 1)),), ["predicted"]),
    (roughness, (torch.zeros(3, 3, device="meta"),), ["predicted", "meta"]),
    (quant_params, (torch.zeros(2, device="meta"), 1.0, 4), ["xmin", "meta"]),
    (quant_params, (0.0, torch.ones(2, device="meta"), 4), ["xmax", "meta"]),
    (lipschitz_penalty, (nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2, device="meta")),), ["1", "meta"]),
    (lipschitz_penalty, ("model",), ["model"]),
    (clr_factor, ("a", 8), ["step"]),
    (clr_factor, (1.5, 8), ["step"]),
    (weight_pairs, ("m",), ["model"]),
    (weight_report, ("abc", QuantSpec("affine", 2)), ["weight"]),
    (weight_report, (np.array([[1 + 5j, 2j]]), QuantSpec("affine", 2)), ["weight"]),
    (weight_report, (torch.tensor([[1e300, 1.0]], dtype=torch.float64), QuantSpec("affine", 2)), ["weight"]),
    (weight_report, (torch.ones(2, 2), QuantSpec("affine", 2), {"folded": "x"}), ["folded"]),
])
def test_bad_arguments_to_the_engine_are_refused_by_name(fn, args, names):
    kwargs = {}
    if args and isinstance(args[-1], dict):  # the table's last positional entry may hold keyword arguments
        args, kwargs = args[:-1], args[-1]
    out = hostile.run(fn, *args, **kwargs)
    hostile.expect_clear_error(out, *names)
    assert all(n in out.message for n in names), out.message


@pytest.mark.parametrize(("fn", "args", "check"), [
    (sqnr_db, (np.float64(1.0), np.float64(0.5)), lambda v: abs(v - 6.0206) < 1e-3),
    (sqnr_db, (torch.ones(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16)), lambda v: v == 0.0),
    (sqnr_db, (np.ones((2, 3)), np.zeros((2, 3))), lambda v: v == 0.0),
    (sqnr_db, (np.ones((2, 3)), np.zeros((2, 3)), np.int64(0)), lambda v: np.array_equal(v, [0.0, 0.0])),
    (sqnr_db, (np.array([1e-300, 2e-300]), np.array([1e-300, 1e-300])), lambda v: abs(v - 6.9897) < 1e-3),
    (compression_ratio, (np.int64(27), np.int32(32), np.int64(4)), lambda v: abs(v - 4.747) < 1e-3),
    (histogram, (np.full(3, 1e20), 4), lambda p: int(p[1].sum()) == 3 and p[0][0] < 1e20 < p[0][-1]),
    (levels_used, (np.ones((2, 0)),), lambda v: v == 0),
    (quant_params, (-1.0, 1.0, np.int64(4)), lambda p: p.qmax == 15 and abs(float(p.scale) - 2 / 15) < 1e-7),
    (quant_params, (np.array([-1.0, -2.0]), [1.0, 2.0], 2), lambda p: p.scale.shape == (2,)),
    (quantize_gradient, (torch.tensor([3e38, -3e38, 1.0]), 4), lambda g: bool(g.isfinite().all())),
    (quantize_gradient, (torch.tensor([6e4, -6e4, 1.0], dtype=torch.float16), 4),
     lambda g: bool(g.isfinite().all()) and g.dtype == torch.float16),
    (semicircles, (np.int64(3),), lambda d: d[0].shape == (20000, 2)),
    (semicircles, (0,), lambda d: bool(torch.isfinite(d[0]).all())),
    (correct_labels, (np.array([[0.15, 0.05], [0.3, -0.05]], dtype=np.float32),), lambda y: y.tolist() == [1, 0]),
    (correct_labels, (torch.ones(0, 2),), lambda y: y.shape == (0,)),
    (correct_labels, (torch.tensor([[3e38, 3e38], [-3e38, -3e38]]),), lambda y: y.shape == (2,)),
    (evaluation_grid, (np.int64(3), -3e38, 3e38), lambda g: g.shape == (9, 2) and bool(g.isfinite().all())),
    (FCDNN, (np.int64(8), np.int64(3), np.True_), lambda m: m.width == 8 and m.residual is True),
])
def test_edge_inputs_get_right_answers(fn, args, check):
    hostile.expect_answer(hostile.run(fn, *args), check, f"{fn.__name__}{args!r:.80}")


def test_a_per_channel_observer_refuses_a_tensor_with_other_channels_and_keeps_its_range():
    obs = MinMaxObserver("channel", 1)
    obs(torch.tensor([[1.0, -2.0, 3.0]]))
    hostile.expect_clear_error(hostile.run(obs, torch.ones(2, 5)), "channels")
    obs(torch.full((4, 3), 10.0))
    hostile.expect_answer(hostile.run(lambda: obs.max_val.reshape(-1).tolist()), lambda v: v == [10.0, 10.0, 10.0],
                          "observer range after a refused tensor")


@pytest.mark.parametrize("method", ["moving_average", "minmax", "percentile", "mse"])
def test_calibration_refuses_an_empty_batch_by_every_method(method):
    from qviz.engine import calibrate, quantize_model

    qm = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 4, 4)
    hostile.expect_clear_error(hostile.run(calibrate, qm, torch.randn(0, 4), method=method), "x is empty")
