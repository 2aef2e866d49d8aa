"""The Cython kernels through their Python face: exact against numpy/torch, on every code path, never crashing."""

import itertools
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qviz._packed as compiled
from qviz import _dispatch, packed

PATHS = packed.available_paths()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=PATHS)
def path(request):
    before = packed.kernel_path()
    packed.set_kernel_path(request.param)
    yield request.param
    packed.set_kernel_path(before)


def test_the_kernels_are_the_compiled_extension():
    assert compiled.__file__.endswith((".so", ".pyd"))
    assert packed.kernel_path() == PATHS[-1]  # the fastest supported path passed its self-check


def test_every_x86_64_build_has_the_portable_and_popcnt_paths():
    assert PATHS[0] == "portable"
    if os.uname().machine == "x86_64":
        assert "popcnt" in PATHS


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or os.uname().machine != "x86_64",
                    reason="the CPU's flags are read from Linux's /proc/cpuinfo on x86-64")
def test_each_vector_path_is_offered_exactly_when_the_cpu_has_its_instructions():
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split())
    avx2 = {"avx2", "fma", "popcnt"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512_vpopcntdq"} <= flags
    want = {"avx2": avx2, "avx2vnni": avx2 and "avx_vnni" in flags, "avx512": avx512,
            "avx512vnni": avx512 and "avx512_vnni" in flags}
    assert {name: name in PATHS for name in want} == want


def test_every_path_this_cpu_has_passes_the_self_check_that_chooses_the_path_at_import():
    # import tries the fastest path first: one that failed would quietly leave a slower one in use
    failed = [name for name in PATHS if name != "portable" and not _dispatch._self_check(_dispatch.PATHS.index(name))]
    assert failed == []


def _codes(rng, shape, bits):
    return rng.integers(0, 2**bits, size=shape, dtype=np.uint8)


# M, K, N: beyond the 6-row tiles, the 16-row panels and 4-panel blocks, and several words of K
shapes = st.tuples(st.integers(1, 14), st.integers(1, 700), st.integers(1, 70))
seeds = st.integers(0, 2**32 - 1)


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 5), k=st.integers(1, 300), seed=seeds)
def test_pack_unpack_round_trip_and_exact_word_count(bits, n, k, seed):
    codes = _codes(np.random.default_rng(seed), (n, k), bits)
    p = packed.pack(codes, bits)
    assert p.words.shape == (n, -(-k * bits // 64))
    assert p.nbytes == n * -(-k * bits // 64) * 8
    assert np.array_equal(packed.unpack(p), codes)
    used = k * bits - (p.words.shape[1] - 1) * 64
    if used < 64:  # the padding bits are zero
        assert (p.words[:, -1] >> np.uint64(used) == 0).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, seed=seeds)
def test_binary_matmul_is_the_sum_of_sign_products(path, shape, seed):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    a[0, 0] = 0.0  # zero is +1
    sa, sw = np.where(a < 0, -1, 1), np.where(w < 0, -1, 1)
    pa, pw = packed.pack_signs(a), packed.pack_signs(w)
    assert np.array_equal(packed.unpack(pa), (a < 0).astype(np.uint8))
    out = packed.binary_matmul(pa, pw)
    assert out.dtype == np.int32
    assert np.array_equal(out, sa @ sw.T)
    assert np.array_equal(packed.binary_matmul(pa, packed.prepare(pw)), out)  # panels laid out once


def test_binary_matmul_with_xnor_scaling_equals_the_engine_xnor_scheme():
    from qviz.engine import QuantSpec, fake_quantize

    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 130), dtype=np.float32)
    w = rng.standard_normal((9, 130), dtype=np.float32)
    xq = fake_quantize(torch.from_numpy(x), QuantSpec("xnor", bits=1, granularity="channel", axis=0))
    wq = fake_quantize(torch.from_numpy(w), QuantSpec("xnor", bits=1, granularity="channel", axis=0))
    out = packed.binary_matmul(packed.pack_signs(x), packed.pack_signs(w),
                               scale_a=np.abs(x).mean(1), scale_w=np.abs(w).mean(1))
    np.testing.assert_allclose(out, (xq @ wq.T).numpy(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="scale_w must hold 1 or 9 values"):
        packed.binary_matmul(packed.pack_signs(x), packed.pack_signs(w), scale_w=np.ones(3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, seed=seeds)
def test_hybrid_matmul_is_zero_one_activations_times_sign_weights(path, shape, seed):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    a01 = rng.integers(0, 2, (m, k)).astype(np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    expected = a01.astype(np.int64) @ np.where(w < 0, -1, 1).T
    pa = packed.pack_uniform(a01, 1, 1.0)
    assert np.array_equal(packed.hybrid_matmul(pa, packed.pack_signs(w)), expected)
    plain = packed.pack(a01.astype(np.uint8), 1)  # without code sums: popcounts are taken
    assert np.array_equal(packed.hybrid_matmul(plain, packed.prepare(packed.pack_signs(w))), expected)


def _affine_codes(x: np.ndarray, bits: int, scale: float, zero: int) -> np.ndarray:
    inv = np.float32(1) / np.float32(scale)
    return np.clip(np.round(x * inv) + zero, 0, 2**bits - 1).astype(np.int64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, seed=seeds, bits=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_float_activations_are_packed_inside_the_matmuls(path, shape, seed, bits, data):
    m, k, n = shape
    m = data.draw(st.sampled_from([m, m + 7, m + 20]))  # several row tiles: the fused path packs per tile
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    x.reshape(-1)[rng.integers(0, x.size, 3)] = [0.0, -0.0, 0.5]  # zeros and a tie of the 1-bit threshold
    wf = rng.standard_normal((n, k), dtype=np.float32)
    w = packed.prepare(packed.pack_signs(wf))
    signs = np.where(x < 0, -1, 1) @ np.where(wf < 0, -1, 1).T
    assert np.array_equal(packed.binary_matmul(x, w), signs)
    scale, zero = float(rng.uniform(0.2, 1.5)), int(rng.integers(0, 2))
    ones = _affine_codes(x, 1, scale, zero)
    assert np.array_equal(packed.hybrid_matmul(x, w, scale=scale, zero_point=zero),
                          ones @ np.where(wf < 0, -1, 1).T)
    codes = rng.integers(0, 2**bits, (n, k), dtype=np.uint8)
    wc = packed.prepare(packed.pack(codes, bits))
    zero = int(rng.integers(0, 2**bits))
    want = _affine_codes(x, bits, scale, zero) @ codes.astype(np.int64).T
    assert np.array_equal(packed.lowbit_matmul(x, wc, scale=scale, zero_point=zero), want)


def test_float_activations_with_weights_beyond_l2(path):
    """Weights past the fused kernel's L2 budget are packed first and run in panel-block order: same answers."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 4100), dtype=np.float32)
    wf = rng.standard_normal((4100, 4100), dtype=np.float32)
    w = packed.prepare(packed.pack_signs(wf))
    assert w.nbytes > 512 * 1024
    signs = np.where(x < 0, -1, 1) @ np.where(wf < 0, -1, 1).T
    ones = _affine_codes(x, 1, 1.0, 0) @ np.where(wf < 0, -1, 1).T
    # 257 panels in 65 blocks, enough work for several threads: tasks of several blocks, the last with fewer
    for threads in (1, 2, 3):
        out = np.full(signs.shape, -(2**31), np.int32)  # a column no task wrote keeps this
        assert np.array_equal(packed.binary_matmul(x, w, threads=threads, out=out), signs)
        assert np.array_equal(packed.binary_matmul(packed.pack_signs(x), w, threads=threads), signs)
        assert np.array_equal(packed.hybrid_matmul(x, w, threads=threads), ones)
        assert np.array_equal(packed.hybrid_matmul(packed.pack_uniform(x, 1, 1.0), w, threads=threads), ones)
    x[3, 7] = np.nan
    with pytest.raises(ValueError, match="a contains NaN"):
        packed.binary_matmul(x, w)


def test_codebook_matmul_over_many_panel_blocks_on_several_threads(path):
    """Few rows against weights of many panel blocks (the in-place codebook kernel, tasks of several
    blocks each, a last task with fewer): every output column is computed once and right."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 1100), dtype=np.float32)
    codes = rng.integers(0, 16, (1300, 1100), dtype=np.uint8)
    cb = rng.standard_normal(16).astype(np.float32)
    w = packed.prepare(packed.pack(codes, 4))
    want = x.astype(np.float64) @ cb[codes].T.astype(np.float64)
    for threads in (1, 2, 3):
        out = np.full(want.shape, np.nan, np.float32)  # a column no task wrote stays NaN
        np.testing.assert_allclose(packed.lut_matmul(x, w, cb, threads=threads, out=out), want, rtol=1e-4, atol=1e-3)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, bits=st.sampled_from([1, 2, 4, 8]), seed=seeds)
def test_lowbit_matmul_is_the_integer_dot_product_of_codes(path, shape, bits, seed):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    ca, cw = _codes(rng, (m, k), bits), _codes(rng, (n, k), bits)
    out = packed.lowbit_matmul(packed.pack(ca, bits), packed.pack(cw, bits))
    assert np.array_equal(out, ca.astype(np.int64) @ cw.T.astype(np.int64))
    assert np.array_equal(packed.lowbit_matmul(packed.pack(ca, bits), packed.prepare(packed.pack(cw, bits))), out)



@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("m", "k", "n"),
                         [(50, 300, 70), (48, 2050, 1030), (43, 16, 17), (64, 1024, 520), (50, 20, 30),
                          (160, 2048, 1040)])
def test_lowbit_matmul_with_many_row_tiles_is_exact(path, bits, m, k, n):
    # from 8 row tiles on, the VNNI paths split each block of weights into byte fields once and read the
    # split copy (per block from packed rows or large weights, all weights at once when floats are
    # packed inside the call), and AVX-512 quantizes float rows straight into split bytes (tile by tile,
    # or all rows on the team before a large matmul): partial blocks, panels and words
    rng = np.random.default_rng(m + k + n + bits)
    ca, cw = _codes(rng, (m, k), bits), _codes(rng, (n, k), bits)
    w = packed.prepare(packed.pack(cw, bits))
    want = ca.astype(np.float64) @ cw.T.astype(np.float64)  # exact: every sum stays far below 2^53
    assert np.array_equal(packed.lowbit_matmul(packed.pack(ca, bits), w), want)
    x = ca.astype(np.float32) - 2 ** (bits - 1)  # floats whose codes under (scale 1, zero point 2^(b-1)) are ca
    assert np.array_equal(packed.lowbit_matmul(x, w, scale=1.0, zero_point=2 ** (bits - 1)), want)

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, bits=st.sampled_from([1, 2, 4, 8]), seed=seeds, per_channel=st.booleans())
def test_lut_matmul_equals_x_times_the_decoded_weights(path, shape, bits, seed, per_channel):
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    codes = _codes(rng, (n, k), bits)
    cb = rng.standard_normal((n, 2**bits) if per_channel else 2**bits).astype(np.float32)
    decoded = np.take_along_axis(cb, codes.astype(np.int64), 1) if per_channel else cb[codes]
    out = packed.lut_matmul(x, packed.pack(codes, bits), cb)
    assert out.dtype == np.float32 and out.shape == (m, n)
    np.testing.assert_allclose(out, x.astype(np.float64) @ decoded.T.astype(np.float64), rtol=1e-4, atol=1e-4)
    prepared = packed.lut_matmul(x, packed.prepare(packed.pack(codes, bits)), cb)
    np.testing.assert_allclose(prepared, out, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 900), n=st.integers(1, 140), bits=st.sampled_from([1, 2, 4]), seed=seeds)
def test_codebook_gemv_equals_the_decoded_product(path, k, n, bits, seed):
    """One activation row: 1- and 2-bit codes go through tables of partial sums on AVX-512, the rest decode."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, k), dtype=np.float32)
    codes = _codes(rng, (n, k), bits)
    cb = rng.standard_normal(2**bits).astype(np.float32)
    out = packed.lut_matmul(x, packed.prepare(packed.pack(codes, bits)), cb)
    np.testing.assert_allclose(out, x.astype(np.float64) @ cb[codes].T.astype(np.float64), rtol=1e-4, atol=1e-4)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 2), c=st.integers(1, 4), size=st.integers(3, 12), co=st.integers(1, 5),
       kernel=st.integers(1, 3), bits=st.sampled_from([1, 2, 4, 8]), seed=seeds, data=st.data())
def test_lut_conv2d_equals_torch_conv2d(path, batch, c, size, co, kernel, bits, seed, data):
    padding = data.draw(st.integers(0, kernel - 1))
    if data.draw(st.booleans()):  # rows of several vectors, channel blocks past 8 and 16, both kernel layouts
        size, co, kernel = data.draw(st.integers(12, 40)), data.draw(st.integers(1, 40)), data.draw(st.integers(1, 5))
        padding = data.draw(st.integers(0, kernel - 1))
    rng = np.random.default_rng(seed)
    width = data.draw(st.integers(max(kernel - 2 * padding, 1), size + 5))
    x = rng.standard_normal((batch, c, size, width), dtype=np.float32)
    codes = _codes(rng, (co, c * kernel * kernel), bits)
    cb = rng.standard_normal((co, 2**bits)).astype(np.float32)
    out = packed.lut_conv2d(x, packed.pack(codes, bits), cb, (kernel, kernel), padding=padding)
    weight = np.take_along_axis(cb, codes.astype(np.int64), 1).reshape(co, c, kernel, kernel)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), padding=padding).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, bits=st.sampled_from([1, 2, 4, 8]), seed=seeds, scale=st.floats(0.01, 2.0))
def test_pack_uniform_quantizes_like_the_affine_scheme(path, shape, bits, seed, scale):
    m, k, _ = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32) * 3
    zero = int(rng.integers(0, 2**bits))
    p = packed.pack_uniform(x, bits, scale, zero)
    inv = np.float32(1) / np.float32(scale)
    expected = np.clip(np.round(x * inv) + zero, 0, 2**bits - 1).astype(np.uint8)
    assert np.array_equal(packed.unpack(p), expected)
    assert np.array_equal(p.code_sums, expected.sum(axis=1))


def _around(values: np.ndarray, ulps: int) -> np.ndarray:
    """Every float32 within `ulps` steps of each value."""
    out = [values]
    up = down = values
    for _ in range(ulps):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        out += [up, down]
    return np.concatenate(out).astype(np.float32)


ODD_SCALES = [1.0, 0.1, 3.0, 2.0**-125, 2.0**124, 1 / 3, 1e-38, 1e38]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.one_of(st.floats(1e-30, 1e30), st.sampled_from(ODD_SCALES)), zero=st.integers(0, 1), seed=seeds)
def test_one_bit_codes_match_the_affine_scheme_at_the_rounding_boundary(path, scale, zero, seed):
    # 1-bit packers compare x with a threshold moved onto x instead of multiplying by 1/scale: the floats
    # next to scale * (+-0.5), where rounding decides the code, must come out as the multiply gives them
    # (1e38 and 1e-38 make 1/scale or the threshold subnormal: the packers multiply again there)
    inv = np.float32(1) / np.float32(scale)
    with np.errstate(over="ignore", under="ignore"):
        edges = np.array([0.5, -0.5], np.float32) / inv
        x = _around(np.concatenate([edges, np.array([0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, 3e38], np.float32)]), 6)
    x = np.random.default_rng(seed).permutation(x)[None, :].repeat(7, axis=0)  # 7 rows: one 6-row tile and one more
    with np.errstate(over="ignore", under="ignore"):
        expected = np.clip(np.round(x * inv) + zero, 0, 1).astype(np.uint8)
    a = packed.pack_uniform(x, 1, scale, zero)
    assert np.array_equal(packed.unpack(a), expected)
    w = packed.pack_signs(np.random.default_rng(seed + 1).standard_normal((20, x.shape[1]), dtype=np.float32))
    fused = packed.hybrid_matmul(x, packed.prepare(w), scale=scale, zero_point=zero)
    assert np.array_equal(fused, packed.hybrid_matmul(packed.pack(expected, 1), w))


def test_affine_lowbit_matmul_dequantizes_to_the_float_product_of_quantized_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 200), dtype=np.float32)
    w = rng.standard_normal((7, 200), dtype=np.float32)
    sa, za, sw, zw = 0.3, 2, 0.25, 1
    a = packed.pack_uniform(x, 2, sa, za)
    wq = packed.pack_uniform(w, 2, sw, zw)
    dot = packed.lowbit_matmul(a, wq)
    real = packed.dequantize_matmul(dot, a, wq.code_sums, scale_a=sa, zero_a=za, scale_w=sw, zero_w=zw)
    xa = (packed.unpack(a).astype(np.float64) - za) * sa
    wa = (packed.unpack(wq).astype(np.float64) - zw) * sw
    np.testing.assert_allclose(real, xa @ wa.T, rtol=1e-5, atol=1e-4)


def test_codebook_from_affine_covers_uniform_weights():
    cb = packed.codebook_from_affine(0.5, 2, 2)
    assert np.array_equal(cb, np.array([-1.0, -0.5, 0.0, 0.5], dtype=np.float32))
    per_channel = packed.codebook_from_affine(np.array([1.0, 2.0]), np.array([0, 1]), 1)
    assert per_channel.shape == (2, 2) and np.array_equal(per_channel[1], [-2.0, 0.0])


def test_pack_signs_refuses_nan_and_pack_uniform_too():
    x = np.zeros((2, 70), np.float32)
    x[1, 65] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        packed.pack_signs(x)
    with pytest.raises(ValueError, match="NaN"):
        packed.pack_uniform(x, 2, 1.0)



def test_nan_anywhere_in_a_row_is_refused_by_every_packer(path):
    # whole 64-float words find NaN with one unordered compare of two vectors, the byte dot products'
    # quantizer 16 floats at a time: every lane, and the partial last word, must still report it
    w = packed.prepare(packed.pack_signs(np.ones((5, 130), np.float32)))
    w2, w4 = (packed.prepare(packed.pack(np.ones((5, 130), np.uint8), bits)) for bits in (2, 4))
    calls = {"pack_signs": lambda x: packed.pack_signs(x),
             "pack_uniform 1-bit": lambda x: packed.pack_uniform(x, 1, 0.5),
             "binary_matmul": lambda x: packed.binary_matmul(x, w),
             "hybrid_matmul": lambda x: packed.hybrid_matmul(x, w),
             "lowbit_matmul 2-bit": lambda x: packed.lowbit_matmul(x, w2, scale=0.5, zero_point=1),
             "lowbit_matmul 4-bit": lambda x: packed.lowbit_matmul(x, w4, scale=0.5, zero_point=1)}
    for k in range(130):
        x = np.ones((3, 130), np.float32)
        x[2, k] = np.nan
        for name, call in calls.items():
            with pytest.raises(ValueError, match="NaN"):
                call(x)
                pytest.fail(f"{name} took NaN at column {k}")

# ---------------------------------------------------------------- readouts


@pytest.mark.parametrize(("kernel", "binary", "ternary"), [(3, 27.87, 12.34), (4, 29.54, 13.71), (5, 30.38, 14.46)])
def test_memory_report_reproduces_003_tables_5_1_to_5_6(kernel, binary, ternary):
    """3 input, 8 output channels; binary with a 2 x 16-bit codebook, ternary with 4 x 32-bit entries."""
    b = packed.memory_report(8, 3, kernel=(kernel, kernel), bits=1, codebook_bits=16)
    t = packed.memory_report(8, 3, kernel=(kernel, kernel), bits=2, codebook_bits=32)
    assert b["ratio_formula"] == pytest.approx(binary, abs=0.005)
    assert t["ratio_formula"] == pytest.approx(ternary, abs=0.005)
    assert b["ratio_dense"] == pytest.approx(binary, abs=0.05)  # codes back to back reach the formula
    n = 3 * 8 * kernel * kernel
    assert b["float32_bytes"] == 4 * n and b["codebook_bytes"] == 4 and t["codebook_bytes"] == 16
    assert b["packed_bytes"] == 8 * -(-3 * kernel * kernel // 64) * 8  # 8 rows of whole words
    assert b["ratio"] < b["ratio_formula"]  # word padding of tiny rows costs memory: shown, not hidden


def test_memory_report_matches_real_packed_buffers():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 4, 8):
        w = packed.pack(_codes(rng, (64, 300), bits), bits)
        report = packed.memory_report(64, 300, bits=bits)
        assert report["packed_bytes"] == w.nbytes


def test_memory_report_of_a_whole_module():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10))
    report = packed.memory_report(net, bits=2, per_channel=True)
    assert [layer["name"] for layer in report["layers"]] == ["0", "2"]
    assert report["weights"] == 8 * 27 + 10 * 8 * 14 * 14
    assert report["codebooks"] == 18
    assert report["float32_bytes"] == 4 * report["weights"]
    assert report["packed_bytes"] == sum(layer["packed_bytes"] for layer in report["layers"])
    stored = report["packed_bytes"] + report["codebook_bytes"]
    assert report["ratio"] == pytest.approx(report["float32_bytes"] / stored)


@pytest.mark.parametrize(("kind", "bits"), [("binary", 1), ("hybrid", 1), ("lowbit", 2), ("lowbit", 4), ("lut", 4)])
def test_measure_latency_reports_both_sides_within_the_budget(kind, bits):
    start = time.perf_counter()
    r = packed.measure_latency(kind, 4, 256, 64, bits=bits, budget_s=0.05, threads=1, with_int8=True)
    assert time.perf_counter() - start < 2.0
    assert r["qviz_s"] > 0 and r["torch_s"] > 0 and r["torch_int8_s"] > 0
    assert r["ratio"] == pytest.approx(r["torch_s"] / r["qviz_s"])
    assert 0 < r["ratio_low"] <= r["ratio_high"]
    assert r["runs"] >= 3 and r["threads"] == 1 and r["macs"] == 4 * 256 * 64
    assert (r["bit_ops_per_s"] is None) == (kind == "lut")
    # the CPU build of PyTorch pinned for qviz has an int8 GEMM on CPU: the reference is there
    assert r["int_mm_s"] > 0 and r["ratio_int_mm"] == pytest.approx(r["int_mm_s"] / r["qviz_s"])



def test_the_ratio_spread_is_the_middle_half_of_paired_rounds():
    from qviz import _timing

    steady = _timing._ratio_spread([2.0] * 8, [1.0] * 8)
    assert steady == pytest.approx((2.0, 2.0))
    # a stall in some qviz calls (10x) and in some torch calls (10x): the quartiles show both
    stalled = _timing._ratio_spread([2.0] * 6 + [20.0] * 3, [1.0] * 6 + [1.0] * 3)
    assert stalled[0] == pytest.approx(2.0) and stalled[1] > 10
    # drift that slows both sides of a round alike leaves the ratio alone
    drift = _timing._ratio_spread([2.0 * f for f in (1, 2, 3, 4, 5)], [1.0 * f for f in (1, 2, 3, 4, 5)])
    assert drift == pytest.approx((2.0, 2.0))
    assert _timing._ratio_spread([3.0, 1.0], [1.0, 1.0]) == (1.0, 3.0)  # too few rounds for quartiles

def test_the_int8_gemm_reference_multiplies_the_operands_it_times():
    from qviz import _timing

    rng = np.random.default_rng(3)
    run = _timing._int_mm(rng, 5, 96, 40)
    out = run()
    cells = {name: cell.cell_contents for name, cell in zip(run.__code__.co_freevars, run.__closure__, strict=True)}
    expected = cells["a"].to(torch.int64) @ cells["b"].to(torch.int64)
    assert out.shape == (5, 40) and torch.equal(out.to(torch.int64), expected)
    assert cells["b"].shape == (96, 40) and not cells["b"].is_contiguous()  # weights kept N x K, as a layer does


def test_threading_defaults_to_pytorchs_openmp_team_and_both_give_the_same_answers():
    """One OpenMP runtime in the process (PyTorch's libgomp, reused by qviz): regions run on its team."""
    from qviz import _dispatch

    default = "QVIZ_THREADING" not in os.environ
    if default and sys.platform.startswith("linux") and packed.openmp_enabled() and packed.pool_enabled():
        mine = compiled.openmp_library()
        assert mine in _dispatch.openmp_runtimes(), (mine, _dispatch.openmp_runtimes())
        assert Path(mine).parent == Path(torch.__file__).parent / "lib"  # the CPU wheel's libgomp.so.1 serves both
        assert _dispatch.shares_pytorchs_openmp() and packed.threading() == "openmp"
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 2048), dtype=np.float32)
    w = packed.prepare(packed.pack_signs(rng.standard_normal((1024, 2048), dtype=np.float32)))
    w2 = packed.prepare(packed.pack(rng.integers(0, 4, (1024, 2048), dtype=np.uint8), 2))
    cb = np.linspace(-1, 1, 4, dtype=np.float32)
    before = packed.threading()
    answers = {}
    try:
        for name in packed.available_threadings():
            packed.set_threading(name)
            assert packed.threading() == name
            answers[name] = (packed.binary_matmul(x, w, threads=2), packed.lowbit_matmul(x, w2, scale=0.1, threads=2),
                             packed.lut_matmul(x, w2, cb, threads=2))
    finally:
        packed.set_threading(before)
    want = (packed.binary_matmul(x, w, threads=1), packed.lowbit_matmul(x, w2, scale=0.1, threads=1),
            packed.lut_matmul(x, w2, cb, threads=1))
    for got in answers.values():
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"name.*allowed.*pool.*openmp"):
        packed.set_threading("threads")


def test_a_forked_child_runs_the_kernels_on_the_pool():
    """libgomp's team does not survive fork(): a child of a process that ran kernels on it uses the pool."""
    script = """
import os, sys
import numpy as np
from qviz import packed
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 2048), dtype=np.float32)
w = packed.prepare(packed.pack_signs(rng.standard_normal((1024, 2048), dtype=np.float32)))
want = packed.binary_matmul(x, w, threads=2)
parent = packed.threading()
pid = os.fork()
if pid == 0:
    ok = packed.threading() == "pool" and np.array_equal(packed.binary_matmul(x, w, threads=2), want)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print(parent, os.waitstatus_to_exitcode(status))
"""
    if not hasattr(os, "fork"):
        pytest.fail("this test needs os.fork (POSIX)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "0", done.stdout


def test_qviz_threading_forces_the_pool_and_refuses_unknown_values():
    env = {**os.environ, "QVIZ_THREADING": "pool"}
    code = "from qviz import packed; print(packed.threading())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.strip() == "pool", done.stderr
    env["QVIZ_THREADING"] = "fibers"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0 and "QVIZ_THREADING='fibers'; allowed: ('pool', 'openmp')" in done.stderr


def test_measure_latency_restores_torch_threads():
    before = torch.get_num_threads()
    packed.measure_latency("binary", 1, 128, 32, budget_s=0.01, threads=1)
    assert torch.get_num_threads() == before


def test_conv_latency_roofs_and_bandwidth():
    r = packed.measure_conv_latency(budget_s=0.05, threads=1)
    assert r["qviz_s"] > 0 and r["torch_s"] > 0
    assert packed.popcount_ceiling(threads=1, seconds=0.05) > 1e9  # any machine counts a Gbit/s
    for path in PATHS:
        for kind in ("pop", "dot", "fma"):
            assert packed.roof(kind, path=path, threads=1, seconds=0.01) > 1e8
    assert packed.read_bandwidth(1 << 20, threads=1, seconds=0.01) > 1e8


def test_cold_latency_cycles_weight_copies():
    r = packed.measure_latency("binary", 1, 512, 256, budget_s=0.02, threads=1, cold=True)
    assert r["cold"] and r["qviz_s"] > 0 and r["weight_bytes"] == 256 * 16 * 4


def test_cold_latency_leads_in_with_calls_on_other_weight_copies(monkeypatch):
    """cold=True: the lead-in of warm rows runs too, but every call (lead-in or timed) takes the next
    weight copy, so the timed call never meets weights the lead-in just read."""
    from qviz import _timing

    used = []
    real = packed.binary_matmul
    monkeypatch.setattr(packed, "binary_matmul", lambda x, w, **k: used.append(id(w)) or real(x, w, **k))
    monkeypatch.setattr(_timing, "SETTLE_S", 0.004)
    r = packed.measure_latency("binary", 1, 4096, 64, budget_s=0.05, threads=1, cold=True)
    assert r["cold"] and r["runs"] >= 3
    assert len(used) >= 3 * (r["runs"] + 1)  # a lead-in before every timed call
    assert all(a != b for a, b in itertools.pairwise(used))  # consecutive calls, consecutive copies
    assert len(set(used)) > 8  # 256 MiB of copies of a 32 KiB matrix: capped at 64 of them


def test_warm_latency_runs_the_call_for_the_settle_time_before_each_timed_one(monkeypatch):
    """warm=True: untimed identical calls for SETTLE_S lead into each timed call (the core as a run of
    qviz calls leaves it, not as torch's GEMM just before left it)."""
    from qviz import _timing

    calls = []
    real = packed.binary_matmul
    monkeypatch.setattr(packed, "binary_matmul", lambda *a, **k: calls.append(time.perf_counter()) or real(*a, **k))
    monkeypatch.setattr(_timing, "SETTLE_S", 0.004)
    r = packed.measure_latency("binary", 1, 256, 64, budget_s=0.02, threads=1, warm=True)
    assert r["warm"] and r["runs"] >= 3
    # per round: calls spread over at least SETTLE_S, then the timed one; so well over two calls a round
    assert len(calls) >= 3 * (r["runs"] + 1)
    settle = _timing._settle_with(lambda: calls.append(time.perf_counter()))
    calls.clear()
    start = time.perf_counter()
    settle()
    assert len(calls) >= 2 and time.perf_counter() - start >= 0.004  # repeated until SETTLE_S had passed


def test_measurements_refuse_buffers_beyond_the_memory_limit():
    from qviz import _timing

    limit = _timing.memory_limit()
    assert 0 < limit <= 2 * 2**30
    with pytest.raises(ValueError, match=r"measure_latency\(kind='lut', m=1, k=65536, n=65536.*limit is"):
        packed.measure_latency("lut", 1, 65536, 65536, bits=4)
    with pytest.raises(ValueError, match=r"measure_conv_latency.*limit"):
        packed.measure_conv_latency(batch=4096, in_channels=4096, size=64, out_channels=8, kernel=3)


def test_prepared_weights_hold_panels_and_report_their_bytes():
    rng = np.random.default_rng(5)
    for bits in (1, 2, 4, 8):
        codes = _codes(rng, (37, 333), bits)
        w = packed.pack(codes, bits)
        p = packed.prepare(w)
        assert p.panels.shape == (3, -(-333 * bits // 32), 16) and not p.panels.flags.writeable
        assert p.nbytes == packed.memory_report(37, 333, bits=bits)["prepared_bytes"]
        assert np.array_equal(packed.unpack(p), codes)
        w.words[0, 0] ^= np.uint64(1)  # a copy: the prepared panels do not change with the source
        assert np.array_equal(packed.unpack(p), codes)


def test_importing_the_engine_and_the_kernels_loads_no_ui():
    code = ("import sys, qviz.engine, qviz.packed; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'altair')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_kernel_path_can_be_forced_and_is_checked():
    env = {**os.environ, "QVIZ_KERNEL_PATH": "portable"}
    out = subprocess.run([sys.executable, "-c", "from qviz import packed; print(packed.kernel_path())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "portable"
    env["QVIZ_KERNEL_PATH"] = "quantum"
    bad = subprocess.run([sys.executable, "-c", "import qviz.packed"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "QVIZ_KERNEL_PATH='quantum'" in bad.stderr
    with pytest.raises(ValueError, match="name='quantum'"):
        packed.set_kernel_path("quantum")


def test_the_kernels_build_for_aarch64():
    """The C kernels (and the thread pool) compile for aarch64 (portable path only) with Debian's cross compiler."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    assert cc, "aarch64-linux-gnu-gcc is missing: ./dev setup installs gcc-aarch64-linux-gnu"
    source = '#define QVIZ_HAVE_OPENMP 1\n#include "_packed_kernels.h"\nint main(void) { return 0; }\n'
    result = subprocess.run([cc, "-O2", "-fopenmp", "-Wall", "-Werror", "-Wno-unused-function", "-x", "c", "-c",
                             "-o", os.devnull, "-I", str(ROOT / "qviz"), "-"], input=source, text=True,
                            capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX-VNNI path exists on x86-64 only")
def test_the_kernels_build_without_avx_vnni_as_compilers_before_gcc_11_do():
    """GCC 10 and Clang 11 lack AVX-VNNI's target name and intrinsics: the extension then builds every other
    path (QVIZ_NO_AVXVNNI stands in for such a compiler), and its path is never offered."""
    # every path's dot kernels and roofs referenced (never run: the CPU may lack them), so they are built
    source = ('#define QVIZ_HAVE_OPENMP 1\n#include "_packed_kernels.h"\n'
              "int main(int argc, char **argv) {\n  double macs; int mr, np; (void)argv;\n"
              "  if (argc > 5) for (int p = 0; p < QVIZ_N_PATHS; p++) {\n"
              "    qviz_roof(p, QVIZ_ROOF_DOT, 1, &macs); qviz_panel_for(p, QVIZ_P_DOT2, &mr, &np); }\n"
              "  return qviz_path_supported(QVIZ_AVX2VNNI);\n}\n")
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "probe")
        built = subprocess.run(["cc", "-O2", "-fopenmp", "-Wall", "-Werror", "-Wno-unused-function",
                                "-DQVIZ_NO_AVXVNNI", "-x", "c", "-o", binary, "-I", str(ROOT / "qviz"), "-", "-lm"],
                               input=source, text=True, capture_output=True)
        assert built.returncode == 0, built.stderr
        assert subprocess.run([binary]).returncode == 0  # avx2vnni not supported, whatever the CPU has
        code = subprocess.run(["objdump", "-d", binary], capture_output=True, text=True, check=True).stdout
        assert "{vex} vpdpbusd" not in code and "vpdpbusd" in code  # AVX-512 VNNI's kernels are built, AVX-VNNI's not


# ---------------------------------------------------------------- garbage in, clear errors out

arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint64, np.float32, np.float64, np.int32, np.int8, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    elements=None,
)


@st.composite
def garbage(draw):
    kind = draw(st.sampled_from(["array", "strided", "packed", "tampered", "int", "none", "list", "tensor"]))
    if kind == "array":
        return draw(arrays)
    if kind == "strided":
        a = draw(arrays)
        return a[..., ::2] if a.ndim else a
    if kind in ("packed", "tampered"):
        bits = draw(st.sampled_from([1, 2, 4, 8]))
        n, k = draw(st.integers(1, 4)), draw(st.integers(1, 130))
        p = packed.pack(np.zeros((n, k), np.uint8), bits)
        if kind == "tampered":
            words = draw(arrays)
            shape = (draw(st.integers(-2, 5)), draw(st.integers(-2, 200)))
            return packed.PackedMatrix(draw(st.integers(-1, 9)), shape, words)
        return p
    if kind == "int":
        return draw(st.integers(-5, 70))
    if kind == "list":
        return [[1, 2], [3, 4]]
    if kind == "tensor":
        return torch.zeros(2, 3)
    return None


FACE = {
    "pack": lambda a, b, c: packed.pack(a, b),
    "unpack": lambda a, b, c: packed.unpack(a),
    "pack_signs": lambda a, b, c: packed.pack_signs(a),
    "pack_uniform": lambda a, b, c: packed.pack_uniform(a, b, 0.5, c if isinstance(c, int) else 0),
    "binary_matmul": lambda a, b, c: packed.binary_matmul(a, b),
    "hybrid_matmul": lambda a, b, c: packed.hybrid_matmul(a, b),
    "lowbit_matmul": lambda a, b, c: packed.lowbit_matmul(a, b),
    "lut_matmul": lambda a, b, c: packed.lut_matmul(a, b, c),
    "lut_conv2d": lambda a, b, c: packed.lut_conv2d(a, b, c, (3, 3)),
    "memory_report": lambda a, b, c: packed.memory_report(a, b, bits=c if isinstance(c, int) else 1),
    "codebook_from_affine": lambda a, b, c: packed.codebook_from_affine(a, b, c),
    "measure_latency": lambda a, b, c: packed.measure_latency("binary", a, b, c, budget_s=0.001),
}


@settings(max_examples=1500, deadline=None)
@given(name=st.sampled_from(sorted(FACE)), a=garbage(), b=garbage(), c=garbage())
def test_garbage_to_the_python_face_raises_only_type_or_value_errors(name, a, b, c):
    try:
        FACE[name](a, b, c)
    except (TypeError, ValueError):
        pass


def test_error_messages_name_the_argument_and_allowed_values():
    ok = packed.pack(np.zeros((2, 10), np.uint8), 2)
    with pytest.raises(ValueError, match="bits=3"):
        packed.pack(np.zeros((2, 2), np.uint8), 3)
    with pytest.raises(ValueError, match=r"< 2\*\*bits = 4"):
        packed.pack(np.full((2, 2), 4, np.uint8), 2)
    with pytest.raises(TypeError, match="codes must have dtype uint8"):
        packed.pack(np.zeros((2, 2), np.int32), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        packed.pack(np.zeros((4, 4), np.uint8)[:, ::2], 2)
    with pytest.raises(ValueError, match="empty"):
        packed.pack(np.zeros((0, 4), np.uint8), 2)
    with pytest.raises(ValueError, match="must share K"):
        packed.lowbit_matmul(ok, packed.pack(np.zeros((2, 11), np.uint8), 2))
    with pytest.raises(ValueError, match=r"a.bits=2 and w.bits=4"):
        packed.lowbit_matmul(ok, packed.pack(np.zeros((2, 10), np.uint8), 4))
    with pytest.raises(ValueError, match=r"a.bits=2 is not allowed; allowed values: 1"):
        packed.binary_matmul(ok, ok)
    with pytest.raises(ValueError, match=r"codebook has shape \(3,\)"):
        packed.lut_matmul(np.zeros((1, 10), np.float32), ok, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"use \.numpy\(\)"):
        packed.lut_matmul(torch.zeros(1, 10), ok, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="could overflow int32"):
        big = packed.pack(np.zeros((1, 40000), np.uint8), 8)
        packed.lowbit_matmul(big, big)
    with pytest.raises(ValueError, match=r"packed.words has shape"):
        packed.unpack(packed.PackedMatrix(2, (2, 100), np.zeros((2, 3), np.uint64)))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codebook_gemm_decodes_panel_blocks_once_for_many_rows(path, bits):
    """From 8 rows (AVX2) or 48 (AVX-512) the codebook GEMM decodes each block of weights once."""
    rng = np.random.default_rng(bits)
    for m, k, n in ((8, 33, 17), (50, 300, 70), (97, 1000, 5)):
        x = rng.standard_normal((m, k), dtype=np.float32)
        codes = _codes(rng, (n, k), bits)
        cb = rng.standard_normal(2**bits).astype(np.float32)
        out = packed.lut_matmul(x, packed.prepare(packed.pack(codes, bits)), cb)
        np.testing.assert_allclose(out, x.astype(np.float64) @ cb[codes].T.astype(np.float64), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("m", "k", "n", "bits", "per_channel"),
                         [(200, 2500, 520, 4, False), (101, 2100, 70, 2, False), (3, 8200, 40, 8, False),
                          (7, 8200, 40, 4, True)])
def test_codebook_gemm_on_long_rows_and_several_threads(path, m, k, n, bits, per_channel):
    """Long rows on 1-3 threads: on the AVX2 and AVX-512 paths the decoded-block GEMM (many row tiles,
    partial panels, a row's last word partly filled), and past K = 8192 per-channel codebooks and 8-bit
    codes, whose decoded block would not fit, on the row kernels; the other paths' kernels on the same."""
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    codes = _codes(rng, (n, k), bits)
    cb = rng.standard_normal((n, 2**bits) if per_channel else 2**bits).astype(np.float32)
    decoded = np.take_along_axis(cb, codes.astype(np.int64), 1) if per_channel else cb[codes]
    want = x.astype(np.float64) @ decoded.T.astype(np.float64)
    w = packed.prepare(packed.pack(codes, bits))
    for threads in (1, 2, 3):
        out = np.full(want.shape, np.nan, np.float32)  # a column or row no task wrote stays NaN
        np.testing.assert_allclose(packed.lut_matmul(x, w, cb, threads=threads, out=out), want, rtol=1e-4, atol=2e-3)


# What one vector instruction of each roof loop counts, by path: (mnemonic, operations per instruction).
ROOF_INSTRUCTIONS = {
    "avx512vnni": {"pop": ("vpopcntd", 512), "dot": ("vpdpbusd", 64), "fma": ("vfmadd", 16)},
    "avx512": {"pop": ("vpopcntd", 512), "dot": ("vpmaddubsw", 64), "fma": ("vfmadd", 16)},
    "avx2vnni": {"pop": ("vpshufb", 128), "dot": ("vpdpbusd", 32), "fma": ("vfmadd", 8)},
    "avx2": {"pop": ("vpshufb", 128), "dot": ("vpmaddubsw", 32), "fma": ("vfmadd", 8)},
}
ROOF_FUNCTIONS = {"avx512vnni": "qviz_roof_vnni", "avx512": "qviz_roof_avx512", "avx2vnni": "qviz_roof_avx2vnni",
                  "avx2": "qviz_roof_avx2"}


def _loops_of(disassembly: str, function: str) -> list[list[str]]:
    """Mnemonics of every loop (a conditional jump backwards) in the functions whose name starts with `function`."""
    loops, body = [], None
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <([^>]+)>:$", line)
        if header:
            body = [] if header.group(1).split(".")[0] == function else None
            continue
        parts = re.match(r"\s*([0-9a-f]+):\s+(?:\{\w+\}\s+)?(\S+)\s*([0-9a-f]*)", line)  # {vex}: AVX-VNNI
        if body is None or not parts:
            continue
        address, mnemonic, target = int(parts.group(1), 16), parts.group(2), parts.group(3)
        body.append((address, mnemonic))
        if mnemonic.startswith("j") and mnemonic != "jmp" and target and int(target, 16) < address:
            loops.append([m for a, m in body if a >= int(target, 16)])
    return loops


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the vector roof loops exist on x86-64 only")
def test_each_roof_loop_runs_every_operation_it_counts():
    # The roof divides by the operations it claims per iteration; if the compiler merges accumulators that
    # start equal (it once kept one FMA chain of twelve), the roof is overstated and every "% roof" with it.
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", compiled.__file__], check=True,
                                 capture_output=True, text=True).stdout
    checked = 0
    for path, function in ROOF_FUNCTIONS.items():
        loops = _loops_of(disassembly, function)
        assert loops, f"no roof loop found for {function}"
        for kind, (mnemonic, per_instruction) in ROOF_INSTRUCTIONS[path].items():
            ops_per_iteration = compiled.roof(_dispatch.PATHS.index(path), compiled.ROOF_KINDS[kind], 1)[1] \
                if path in packed.available_paths() else None
            counts = [sum(m.startswith(mnemonic) for m in loop) for loop in loops]
            if ops_per_iteration is not None:
                assert ops_per_iteration / per_instruction in counts, (path, kind, counts)
            assert max(counts) >= 8, (path, kind, counts)
            checked += 1
    assert checked == 12


@pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are a Linux feature")
def test_large_prepared_weights_live_on_huge_pages_and_compute_the_same():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 4, (2048, 4096), dtype=np.uint8)  # 2 MiB of panels at 2 bits
    w = packed.pack(codes, 2)
    prepared = packed.prepare(w)
    assert prepared.panels.nbytes >= packed.HUGE_PAGE
    assert prepared.panels.ctypes.data % packed.HUGE_PAGE == 0 and not prepared.panels.flags.writeable
    fields = dict(line.split(":", 1) for line in _mapping_of(prepared.panels.ctypes.data).splitlines()[1:])
    assert fields["THPeligible"].strip() == "1"  # a private mapping the kernel may back with 2 MiB pages
    x = rng.standard_normal((3, 4096), dtype=np.float32)
    cb = np.linspace(-1, 1, 4, dtype=np.float32)
    np.testing.assert_array_equal(packed.lut_matmul(x, prepared, cb), packed.lut_matmul(x, w, cb))
    small = packed.prepare(packed.pack(codes[:16], 2))
    assert small.panels.nbytes < packed.HUGE_PAGE and small.panels.ctypes.data % 64 == 0
    del w, small
    copy = prepared.panels.copy()
    panels = prepared.panels
    del prepared
    np.testing.assert_array_equal(panels, copy)  # the array keeps its mapping alive


def _mapping_of(address: int) -> str:
    """The /proc/self/smaps entry of the mapping that holds `address`."""
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        lo, hi = (int(v, 16) for v in block.split()[0].split("-"))
        if lo <= address < hi:
            return block
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("words", [1, 63, 64, 65, 8192 + 7, 3 * 8192])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_bandwidth_probe_reads_every_word_on_every_pass(words, threads):
    buf = np.arange(1, words + 1, dtype=np.uint64)
    assert compiled.read_words(buf, threads, 3) == 3 * int(buf.sum())
    assert compiled.read_words(buf, threads) == int(buf.sum())


@pytest.mark.parametrize("rows", [2048, 40])  # 2 MiB of panels (huge pages) and a small layer
def test_pickled_and_copied_prepared_weights_stay_read_only_aligned_and_equal(rows):
    import copy
    import pickle

    rng = np.random.default_rng(9)
    codes = rng.integers(0, 4, (rows, 4096), dtype=np.uint8)
    prepared = packed.prepare(packed.pack(codes, 2))
    x = rng.standard_normal((2, 4096), dtype=np.float32)
    cb = np.linspace(-1, 1, 4, dtype=np.float32)
    for again in (pickle.loads(pickle.dumps(prepared)), copy.deepcopy(prepared), copy.copy(prepared)):
        assert isinstance(again, packed.PreparedMatrix) and again.panels is not prepared.panels
        assert not again.panels.flags.writeable  # numpy's own copy would be writeable
        assert again.panels.ctypes.data % 64 == 0  # and 16-byte aligned: every load split over two lines
        assert (again.panels.ctypes.data % packed.HUGE_PAGE == 0) == (again.nbytes >= packed.HUGE_PAGE)
        np.testing.assert_array_equal(again.panels, prepared.panels)
        np.testing.assert_array_equal(packed.lut_matmul(x, again, cb), packed.lut_matmul(x, prepared, cb))
    odd = packed.PreparedMatrix(2, (3, 8), [[1, 2]])  # not ours to lay out: it round-trips as it is
    assert pickle.loads(pickle.dumps(odd)).panels == [[1, 2]] and copy.deepcopy(odd).panels == [[1, 2]]
