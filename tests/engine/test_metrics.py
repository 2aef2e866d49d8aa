"""SQNR, error, weight power (004 Appendix A), compression rate (003 eq. 2-17), levels used."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qviz.engine import (
    QuantSpec,
    compression_ratio,
    fake_quantize,
    levels_used,
    quantization_error,
    sqnr_db,
    weight_power,
)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 8), cols=st.integers(1, 8), bits=st.integers(2, 8))
def test_sqnr_is_the_appendix_a_formula_per_tensor_and_per_slice(seed, rows, cols, bits):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q = fake_quantize(w, QuantSpec("affine", bits=bits))
    wn, qn = w.double().numpy(), q.double().numpy()
    noise = ((wn - qn) ** 2).sum()
    expected = math.inf if noise == 0 else 10 * math.log10((wn**2).sum() / noise)
    assert sqnr_db(w, q) == pytest.approx(expected)
    per_row = sqnr_db(w, q, axis=0)
    assert per_row.shape == (rows,)
    for r in range(rows):
        n = ((wn[r] - qn[r]) ** 2).sum()
        assert per_row[r] == pytest.approx(math.inf if n == 0 else 10 * math.log10((wn[r] ** 2).sum() / n))


def test_sqnr_grows_about_6_db_per_bit():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    s4 = sqnr_db(w, fake_quantize(w, QuantSpec("symmetric", bits=4)))
    s8 = sqnr_db(w, fake_quantize(w, QuantSpec("symmetric", bits=8)))
    assert 20 < s8 - s4 < 28  # ≈ 6.02 dB per bit


def test_per_channel_beats_per_layer_when_channel_scales_differ():
    """004 §2.6 / Appendix A: per-channel SQNR is higher when kernels have different ranges."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * torch.logspace(-2, 0, 32).reshape(-1, 1)
    layer = sqnr_db(w, fake_quantize(w, QuantSpec("symmetric", bits=4)), axis=0)
    channel = sqnr_db(w, fake_quantize(w, QuantSpec("symmetric", bits=4, granularity="channel")), axis=0)
    assert np.median(channel) > np.median(layer) + 10


def test_sqnr_edge_cases():
    assert sqnr_db(np.ones(3), np.ones(3)) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf


def _exact_sqnr(w: np.ndarray, q: np.ndarray) -> float:
    w, q = w.astype(np.float64).ravel(), q.astype(np.float64).ravel()
    return 10 * math.log10(float((w * w).sum()) / float(((w - q) ** 2).sum()))


def test_sqnr_streams_arrays_beyond_the_memory_limit_in_any_layout(monkeypatch):
    """A model's outputs can run to gigabytes (a language model's logits): the SQNR of arrays that sit in
    memory is read in steps, not refused; only views that repeat values (stride 0) are held to the limit."""
    import qviz._timing

    monkeypatch.setattr(qviz._timing, "memory_limit", lambda: 1 << 20)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2**12, 2**12 + 3), dtype=np.float32)  # 16.8 M values: past the size checks begin
    q = w + np.float32(1e-3) * rng.standard_normal(w.shape, dtype=np.float32)
    want = _exact_sqnr(w, q)
    assert abs(sqnr_db(w, q) - want) < 1e-9 * abs(want)
    assert abs(sqnr_db(torch.from_numpy(w).T, torch.from_numpy(q).T) - want) < 1e-9 * abs(want)
    assert abs(sqnr_db(w[:, ::2], q[:, ::2]) - _exact_sqnr(w[:, ::2], q[:, ::2])) < 1e-9 * abs(want)
    with pytest.raises(ValueError, match=r"w holds .* beyond the memory limit"):
        sqnr_db(np.broadcast_to(np.float32(1), (2**13, 2**12)), np.broadcast_to(np.float32(1), (2**13, 2**12)))


@pytest.mark.parametrize("dtypes", [(np.int64, np.float16), (np.int8, np.int32), (np.float64, np.uint64)])
def test_sqnr_of_mixed_dtypes_and_shapes(dtypes):
    rng = np.random.default_rng(1)
    w = rng.integers(-100, 100, (3, 5, 7)).astype(dtypes[0])
    q = (w + rng.integers(-2, 3, w.shape)).clip(0 if dtypes[1] == np.uint64 else -128).astype(dtypes[1])
    assert abs(sqnr_db(w, q) - _exact_sqnr(w, q)) < 1e-9 * abs(_exact_sqnr(w, q))
    assert sqnr_db(np.float32(2.0), np.float32(2.0)) == math.inf


def test_quantization_error_and_weight_power():
    x = np.array([1.0, -2.0, 0.5])
    assert np.array_equal(quantization_error(x, np.array([1.0, -2.0, 0.0])), [0.0, 0.0, 0.5])
    p = weight_power(torch.randn(1000))
    assert p.mean() == pytest.approx(1.0)
    assert np.array_equal(weight_power(np.zeros(4)), np.zeros(4))


def test_compression_ratio_worked_example_of_fig_2_6():
    assert compression_ratio(27, 32, 4) == pytest.approx(4.747, abs=1e-3)  # "4.74" in 003 §2.1.2.1


@pytest.mark.parametrize(("kernel", "binary", "ternary"), [(3, 27.87, 12.34), (4, 29.54, 13.71), (5, 30.38, 14.46)])
def test_compression_ratio_reproduces_003_tables_5_1_to_5_6(kernel, binary, ternary):
    n = 3 * 8 * kernel * kernel  # 3 input channels, 8 output channels
    assert compression_ratio(n, 32, 2, codebook_bits=16) == pytest.approx(binary, abs=0.005)
    assert compression_ratio(n, 32, 4, codebook_bits=32) == pytest.approx(ternary, abs=0.005)
    assert compression_ratio(n, 32, 3, codebook_bits=32) < compression_ratio(n, 32, 2, codebook_bits=32)


def test_compression_tends_to_b_over_log2_k():
    assert compression_ratio(10**9, 32, 2) == pytest.approx(32, rel=1e-6)
    assert compression_ratio(10**9, 32, 16) == pytest.approx(8, rel=1e-6)


def test_levels_used():
    q = np.array([[0.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert levels_used(q) == 3
    assert list(levels_used(q, axis=0)) == [2, 1]
    w = torch.randn(64, 64)
    assert levels_used(fake_quantize(w, QuantSpec("affine", bits=3))) <= 8
