"""Hostile inputs to every public function of qviz.packed: a clear error naming the argument, or a right answer.

Calls that reach compiled code run in the guard's child process (a crash there is counted, not fatal);
arguments are described here and built there (packed_cases.py), so strides, Fortran order and read-only
flags survive. Every input is tallied by hostile.expect_clear_error / expect_answer.
"""

from __future__ import annotations

import math

import hostile
import numpy as np
import packed_cases as pc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from qviz import _timing, packed

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
seeds = st.integers(0, 2**32 - 1)


def _codes(seed: int, n: int, k: int, bits: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**bits, (n, k), dtype=np.uint8)


def _is_c_contiguous_after(a: np.ndarray, how: str) -> bool:
    t = pc._transform(a, how)
    return isinstance(t, np.ndarray) and t.flags.c_contiguous


# --------------------------------------------------------------------------------------------------
# Matrices with one field tampered with

MATRIX_CHANGES = ["ok", "ok", "prepared", "readonly", "np_ints", "list_shape", "sums", "bits_bool", "bits_float",
                  "bits_other", "shape_bad", "shape_mismatch", "words_dtype", "noncontig", "fortran", "ndim", "list",
                  "tensor", "empty", "padding", "big_endian", "panels_padding", "panels_dtype", "panels_shape"]


@st.composite
def matrices(draw, arg: str, bits: int, n: int, k: int, codes: np.ndarray, prepared_ok: bool = True):
    """(description, problem): problem is None for a valid matrix (unusual ones included), else the text
    the error must contain (the argument and its field)."""
    change = draw(st.sampled_from(MATRIX_CHANGES))
    p = packed.pack(codes, bits)
    words, shape, b, sums, how = p.words, (n, k), bits, None, ""
    problem = None
    if change == "prepared" or change.startswith("panels"):
        panels = np.array(packed.prepare(p).panels)
        if change == "panels_padding":
            used = k * bits % 32
            if not used:
                return pc.desc("matrix", "prepared", b, shape, panels), None if prepared_ok else f"{arg} must be"
            panels[draw(st.integers(0, panels.shape[0] - 1)), -1, draw(st.integers(0, 15))] |= np.uint32(1 << 31)
            problem = f"{arg}.panels"
        elif change == "panels_dtype":
            panels, problem = panels.astype(np.int64), f"{arg}.panels"
        elif change == "panels_shape":
            panels, problem = panels[:, :-1] if panels.shape[1] > 1 else panels[:0], f"{arg}.panels"
            panels = np.ascontiguousarray(panels)
        return pc.desc("matrix", "prepared", b, shape, panels), (problem if prepared_ok else f"{arg} must be")
    if change == "readonly":
        how = "readonly"
    elif change == "np_ints":
        b, shape = np.int64(bits), (np.int64(n), np.int32(k))
    elif change == "list_shape":
        shape = [n, k]
    elif change == "sums":
        sums = draw(st.sampled_from([np.zeros(max(1, n - 1), np.int64), np.full(n, -7, np.int64),
                                     np.ones(n + 3, np.float32), "garbage"]))
    elif change == "bits_bool":
        b, problem = True, f"{arg}.bits"
    elif change == "bits_float":
        b, problem = float(bits), f"{arg}.bits"
    elif change == "bits_other":
        b, problem = draw(st.sampled_from([0, 3, 5, 16, -1, 64, None, "1", [1]])), f"{arg}.bits"
    elif change == "shape_bad":
        shape = draw(st.sampled_from([(n,), (n, k, 1), "ab", None, (0, k), (n, -1), (True, k), (float(n), k),
                                      (n, 2**62), (2**62, k), (n, "k")]))
        problem = f"{arg}.shape"
    elif change == "shape_mismatch":
        shape, problem = (n + draw(st.integers(1, 3)), k), f"{arg}.words"
    elif change == "words_dtype":
        words = draw(st.sampled_from([words.view(np.int64), words.astype(np.float64), words.view(np.uint32),
                                      words.astype(np.uint8)]))
        problem = f"{arg}.words"
    elif change in ("noncontig", "fortran"):
        how = change
        problem = None if _is_c_contiguous_after(words, how) else f"{arg}.words"
    elif change == "ndim":
        how, problem = draw(st.sampled_from(["1d", "3d"])), f"{arg}.words"
    elif change in ("list", "tensor", "big_endian"):
        how, problem = change, f"{arg}.words"
    elif change == "empty":
        words, problem = np.empty((0, words.shape[1]), np.uint64), f"{arg}.words"
    elif change == "padding":
        used = k * bits % 64
        if used:
            words = words.copy()
            words[draw(st.integers(0, n - 1)), -1] |= np.uint64(1 << 63)
            problem = f"{arg}.words"
    return pc.desc("matrix", "packed", b, shape, words, sums, transform=how), problem


def _ref(fn: str, ca: np.ndarray, cw: np.ndarray | None, bits: int):
    a = ca.astype(np.int64)
    if fn == "binary_matmul":
        return a.shape[1] - 2 * (ca[:, None, :] != cw[None, :, :]).sum(-1)
    if fn == "hybrid_matmul":
        return a @ (1 - 2 * cw.astype(np.int64)).T
    if fn == "lowbit_matmul":
        return a @ cw.astype(np.int64).T
    if fn == "unpack":
        return ca
    if fn == "popcounts":
        return np.unpackbits(ca[..., None], axis=-1).sum(axis=(1, 2))
    raise AssertionError(fn)


@settings(max_examples=800, **SETTINGS)
@given(fn=st.sampled_from(["binary_matmul", "hybrid_matmul", "lowbit_matmul"]), which=st.sampled_from("aw"),
       m=st.integers(1, 9), n=st.integers(1, 40), k=st.integers(1, 300), bits=st.sampled_from([1, 2, 4, 8]),
       seed=seeds, data=st.data())
def test_matmuls_with_a_tampered_matrix(guard, fn, which, m, n, k, bits, seed, data):
    if fn != "lowbit_matmul":
        bits = 1
    ca, cw = _codes(seed, m, k, bits), _codes(seed + 1, n, k, bits)
    a = pc.desc("matrix", "packed", bits, (m, k), packed.pack(ca, bits).words)
    w = pc.desc("matrix", "packed", bits, (n, k), packed.pack(cw, bits).words)
    if which == "a":
        a, problem = data.draw(matrices("a", bits, m, k, ca, prepared_ok=False))
    else:
        w, problem = data.draw(matrices("w", bits, n, k, cw))
    out = guard.call("packed_cases:call", fn, a, w)
    if problem is None:
        want = _ref(fn, ca, cw, bits)
        hostile.expect_answer(out, lambda v: v.dtype == np.int32 and np.array_equal(v, want), f"{fn} {which}")
    else:
        hostile.expect_clear_error(out, problem)


@settings(max_examples=500, **SETTINGS)
@given(fn=st.sampled_from(["unpack", "popcounts", "prepare", "lut_matmul", "lut_conv2d"]), n=st.integers(1, 40),
       k=st.integers(1, 200), bits=st.sampled_from([1, 2, 4, 8]), seed=seeds, data=st.data())
def test_single_matrix_functions_with_a_tampered_matrix(guard, fn, n, k, bits, seed, data):
    codes = _codes(seed, n, k, bits)
    arg = {"unpack": "packed", "popcounts": "packed"}.get(fn, "w")
    d, problem = data.draw(matrices(arg, bits, n, k, codes, prepared_ok=fn != "prepare"))
    cb = np.random.default_rng(seed).standard_normal(2**bits).astype(np.float32)
    if fn == "lut_matmul":
        x = np.random.default_rng(seed).standard_normal((3, k), dtype=np.float32)
        out = guard.call("packed_cases:call", fn, x, d, cb)
        want = x.astype(np.float64) @ cb[codes].T.astype(np.float64)
        check = lambda v: np.allclose(v, want, rtol=1e-4, atol=1e-4)  # noqa: E731
    elif fn == "lut_conv2d":
        x = np.random.default_rng(seed).standard_normal((1, k, 2, 3), dtype=np.float32)  # 1x1 kernel: K = C
        out = guard.call("packed_cases:call", fn, x, d, cb, (1, 1))
        want = np.einsum("bchw,oc->bohw", x.astype(np.float64), cb[codes].astype(np.float64))
        check = lambda v: np.allclose(v, want, rtol=1e-4, atol=1e-4)  # noqa: E731
    elif fn == "prepare":
        out = guard.call("packed_cases:call", fn, d)
        check = lambda v: isinstance(v, packed.PreparedMatrix) and np.array_equal(packed.unpack(v), codes)  # noqa: E731
    else:
        out = guard.call("packed_cases:call", fn, d)
        want = _ref(fn, codes, None, bits)
        check = lambda v: np.array_equal(v, want)  # noqa: E731
    if problem is None:
        hostile.expect_answer(out, check, f"{fn}")
    else:
        hostile.expect_clear_error(out, problem)


# --------------------------------------------------------------------------------------------------
# Float inputs: dtypes, dimensions, strides, NaN / Inf / denormals / huge values, tensors and lists

SPECIAL = st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -1e-40, 3e38, -3e38, 1e300, 65504.0])


@st.composite
def float_inputs(draw, ndim: int):
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float32, np.float64, np.float16, np.int32, np.uint8,
                                  np.bool_]))
    nd = draw(st.sampled_from([ndim, ndim, ndim, 0, 1, 3]))
    shape = draw(hnp.array_shapes(min_dims=nd, max_dims=nd, min_side=0 if draw(st.booleans()) else 1, max_side=6))
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.random.default_rng(draw(seeds)).standard_normal(shape).astype(dtype) if nd else np.asarray(1.0, dtype)
        if draw(st.booleans()) and a.size and np.issubdtype(dtype, np.floating):
            a = a.copy()
            a.reshape(-1)[draw(st.integers(0, a.size - 1))] = dtype(draw(SPECIAL))
    how = draw(st.sampled_from(["", "", "", "noncontig", "fortran", "readonly", "tensor", "list"]))
    return a, how


def _answer_unless_overflow(out, want: np.ndarray, what: str) -> None:
    """Results beyond float32 (finite inputs near its limit) must be refused, not returned as inf."""
    if np.abs(want).max(initial=0) > 3.0e38:  # near float32's limit either outcome is fair
        hostile.expect_error_or_answer(out, ("overflow",), lambda v: np.isfinite(v).all(), what)
    else:
        hostile.expect_answer(out, lambda v: np.allclose(v, want, rtol=1e-4, atol=1e-3 * (1 + np.abs(want))), what)


def _valid_floats(a: np.ndarray, how: str, ndim: int) -> bool:
    return (a.dtype == np.float32 and a.ndim == ndim and a.size > 0 and how not in ("tensor", "list")
            and _is_c_contiguous_after(a, how))


@settings(max_examples=800, **SETTINGS)
@given(fn=st.sampled_from(["pack_signs", "pack_uniform", "lut_matmul", "lut_conv2d", "binary_matmul", "hybrid_matmul",
                           "lowbit_matmul"]), data=st.data())
def test_float_arrays(guard, fn, data):
    ndim = 4 if fn == "lut_conv2d" else 2
    a, how = data.draw(float_inputs(ndim))
    d = pc.desc("array", a, transform=how)
    valid = _valid_floats(a, how, ndim)
    if fn in ("binary_matmul", "hybrid_matmul", "lowbit_matmul"):  # float activations packed inside the kernel
        k = a.shape[1] if a.ndim == 2 and a.shape[1] else 3
        cw = _codes(11, 7, k, 2 if fn == "lowbit_matmul" else 1)
        w = packed.prepare(packed.pack(cw, 2 if fn == "lowbit_matmul" else 1))
        kwargs = {"scale": 0.5, "zero_point": 1} if fn == "lowbit_matmul" else {}
        out = guard.call("packed_cases:call", fn, d, w, **kwargs)
        if not (valid and not np.isnan(a).any()):
            hostile.expect_clear_error(out, "a ", "a.", "a must")
            return
        with np.errstate(over="ignore", invalid="ignore"):
            if fn == "binary_matmul":
                want = np.where(a < 0, -1, 1) @ (1 - 2 * cw.astype(np.int64)).T
            elif fn == "hybrid_matmul":
                want = np.clip(np.round(a), 0, 1).astype(np.int64) @ (1 - 2 * cw.astype(np.int64)).T
            else:
                want = np.clip(np.round(a * np.float32(2.0)) + 1, 0, 3).astype(np.int64) @ cw.astype(np.int64).T
        hostile.expect_answer(out, lambda v: v.dtype == np.int32 and np.array_equal(v, want), fn)
        return
    if fn == "pack_signs":
        out = guard.call("packed_cases:call", fn, d)
        if valid and not np.isnan(a).any():
            hostile.expect_answer(out, lambda v: np.array_equal(packed.unpack(v), (a < 0).astype(np.uint8)), fn)
        else:
            hostile.expect_clear_error(out, "x ")
        return
    if fn == "pack_uniform":
        out = guard.call("packed_cases:call", fn, d, 2, 0.5, 1)
        if valid and not np.isnan(a).any():
            with np.errstate(over="ignore", invalid="ignore"):
                want = np.clip(np.round(a * np.float32(2.0)) + 1, 0, 3).astype(np.uint8)
            hostile.expect_answer(out, lambda v: np.array_equal(packed.unpack(v), want), fn)
        else:
            hostile.expect_clear_error(out, "x ")
        return
    k = a.shape[1] if a.ndim >= 2 and a.shape[1] else 1
    codes = _codes(7, 5, k, 2)
    cb = np.array([-1.5, -0.5, 0.5, 1.5], np.float32)
    w = packed.pack(codes, 2)
    w = packed.prepare(w) if data.draw(st.booleans()) else w  # prepared: lut_conv2d's compiled fast path
    if fn == "lut_matmul":
        out = guard.call("packed_cases:call", fn, d, w, cb)
        if valid and np.isfinite(a).all():
            want = a.astype(np.float64) @ cb[codes].T.astype(np.float64)
            _answer_unless_overflow(out, want, fn)
        else:
            hostile.expect_clear_error(out, "x ")
        return
    out = guard.call("packed_cases:call", fn, d, w, cb, (1, 1))
    if valid and np.isfinite(a).all():
        want = np.einsum("bchw,oc->bohw", a.astype(np.float64), cb[codes].astype(np.float64))
        _answer_unless_overflow(out, want, fn)
    else:
        hostile.expect_clear_error(out, "x ", "w has K")


# --------------------------------------------------------------------------------------------------
# Scalars: threads, bits, scale, zero points, paths


THREADS = [0, -1, True, False, 1.5, 2**40, "2", None, 1, 2, 7, np.int64(2), np.uint8(1)]


@settings(max_examples=120, **SETTINGS)
@given(fn=st.sampled_from(["binary_matmul", "hybrid_matmul", "lowbit_matmul", "lut_matmul", "lut_conv2d",
                           "pack_uniform"]), threads=st.sampled_from(THREADS), seed=seeds)
def test_thread_counts(guard, fn, threads, seed):
    ca, cw = _codes(seed, 3, 70, 1), _codes(seed + 1, 17, 70, 1)
    a, w = packed.pack(ca, 1), packed.pack(cw, 1)
    x = np.random.default_rng(seed).standard_normal((3, 70), dtype=np.float32)
    cb = np.array([1.0, -1.0], np.float32)
    args = {"binary_matmul": (a, w), "hybrid_matmul": (a, w), "lowbit_matmul": (a, w), "lut_matmul": (x, w, cb),
            "lut_conv2d": (x.reshape(1, 70, 1, 3)[:, :, :, :1].copy(), w, cb, (1, 1)),
            "pack_uniform": (x, 2, 0.5)}[fn]
    out = guard.call("packed_cases:call", fn, *args, threads=threads)
    ok = threads is None or (isinstance(threads, int | np.integer) and not isinstance(threads, bool)
                             and 1 <= threads <= 1024)
    if not ok:
        hostile.expect_clear_error(out, "threads")
        return
    if fn in ("binary_matmul", "hybrid_matmul", "lowbit_matmul"):
        want = _ref(fn, ca, cw, 1)
        hostile.expect_answer(out, lambda v: np.array_equal(v, want), f"{fn} threads={threads!r}")
    else:
        hostile.expect_answer(out, lambda v: v is not None, f"{fn} threads={threads!r}")


@settings(max_examples=150, **SETTINGS)
@given(bits=st.sampled_from([1, 2, 4, 8, 0, 3, True, 2.0, None, "4", np.int8(4)]),
       scale=st.sampled_from([0.5, 1e-30, 1e-45, 0.0, -1.0, np.nan, np.inf, 1e39, np.float32(2), True, "1", None]),
       zero=st.sampled_from([0, 1, 3, 255, 256, -1, 1.5, True, np.int16(2), None]))
def test_pack_uniform_scalars(guard, bits, scale, zero):
    x = np.linspace(-3, 3, 40, dtype=np.float32).reshape(2, 20)
    out = guard.call("packed_cases:call", "pack_uniform", x, bits, scale, zero)
    bits_ok = isinstance(bits, int | np.integer) and not isinstance(bits, bool) and bits in (1, 2, 4, 8)
    with np.errstate(all="ignore"):
        scale_ok = (isinstance(scale, float | int | np.floating) and not isinstance(scale, bool)
                    and math.isfinite(scale) and scale > 0 and np.isfinite(np.float32(1) / np.float32(scale))
                    and np.float32(1) / np.float32(scale) != 0)
    zero_ok = (isinstance(zero, int | np.integer) and not isinstance(zero, bool) and bits_ok
               and 0 <= zero <= 2**int(bits) - 1)
    if not bits_ok:
        hostile.expect_clear_error(out, "bits")
    elif not (scale_ok and zero_ok):
        hostile.expect_clear_error(out, "scale", "zero_point")
    else:
        with np.errstate(all="ignore"):
            inv = np.float32(1) / np.float32(scale)
            want = np.clip(np.round(x * inv) + zero, 0, 2**int(bits) - 1).astype(np.uint8)
        hostile.expect_answer(out, lambda v: np.array_equal(packed.unpack(v), want), f"pack_uniform {bits} {scale}")


@settings(max_examples=150, **SETTINGS)
@given(fn=st.sampled_from(["hybrid_matmul", "lowbit_matmul"]), bits=st.sampled_from([1, 2, 4, 8]),
       scale=st.sampled_from([0.5, 1e-30, 1e-45, 0.0, -1.0, np.nan, np.inf, 1e39, np.float32(2), True, "1", None]),
       zero=st.sampled_from([0, 1, 3, 255, 256, -1, 1.5, True, np.int16(2), None]))
def test_quantizer_of_float_activations(guard, fn, bits, scale, zero):
    """hybrid_matmul / lowbit_matmul with float activations: scale and zero_point as pack_uniform takes them."""
    bits = 1 if fn == "hybrid_matmul" else bits
    x = np.linspace(-3, 3, 40, dtype=np.float32).reshape(2, 20)
    cw = _codes(3, 5, 20, bits)
    w = packed.prepare(packed.pack(cw, bits))
    out = guard.call("packed_cases:call", fn, x, w, scale=scale, zero_point=zero)
    with np.errstate(all="ignore"):
        scale_ok = (isinstance(scale, float | int | np.floating) and not isinstance(scale, bool)
                    and math.isfinite(scale) and scale > 0 and np.isfinite(np.float32(1) / np.float32(scale))
                    and np.float32(1) / np.float32(scale) != 0)
    zero_ok = isinstance(zero, int | np.integer) and not isinstance(zero, bool) and 0 <= zero <= 2**bits - 1
    if scale is None and fn == "lowbit_matmul":
        hostile.expect_clear_error(out, "scale")
        return
    if not (scale_ok and zero_ok):
        hostile.expect_clear_error(out, "scale", "zero_point")
        return
    with np.errstate(all="ignore"):
        codes = np.clip(np.round(x * (np.float32(1) / np.float32(scale))) + zero, 0, 2**bits - 1).astype(np.int64)
    want = codes @ ((1 - 2 * cw.astype(np.int64)) if fn == "hybrid_matmul" else cw.astype(np.int64)).T
    hostile.expect_answer(out, lambda v: np.array_equal(v, want), f"{fn} scale={scale} zero_point={zero}")


@pytest.mark.parametrize("name", ["portable", "avx512", "avx2", "avx2vnni", "quantum", "", None, 3, True, ["avx2"]])
def test_set_kernel_path(name):
    before = packed.kernel_path()
    out = hostile.run(packed.set_kernel_path, name)
    try:
        if name in packed.available_paths():
            hostile.expect_answer(out, lambda v: packed.kernel_path() == name, f"set_kernel_path({name!r})")
        else:
            hostile.expect_clear_error(out, "name")
    finally:
        packed.set_kernel_path(before)


# --------------------------------------------------------------------------------------------------
# K at the int32 limits: checked arithmetically (1 x K zero codes, built in the child)


# The answer side is run where it stays small: a 1 x K weight matrix in panels takes 16 rows' room, so
# binary at K = 2^31 - 1 would need 4 GiB of panels (the error side allocates only the zero words, 256 MiB
# of untouched calloc pages, and must raise before anything else).
@pytest.mark.slow
@pytest.mark.parametrize(("fn", "bits", "k", "fits"), [
    ("binary_matmul", 1, 2**31, False), ("hybrid_matmul", 1, 2**31 + 64, False),
    ("lowbit_matmul", 2, (2**31 - 1) // 9 + 1, False),
    ("lowbit_matmul", 4, (2**31 - 1) // 225, True), ("lowbit_matmul", 4, (2**31 - 1) // 225 + 1, False),
    ("lowbit_matmul", 8, (2**31 - 1) // 65025, True), ("lowbit_matmul", 8, (2**31 - 1) // 65025 + 1, False),
])
def test_k_at_the_int32_limit(guard, fn, bits, k, fits):
    out = guard.call("packed_cases:zeros_call", fn, bits, k, prepared_w=fits)
    if fits:  # all codes zero: sum of sign products is K (binary), hybrid and low-bit give 0
        want = k if fn == "binary_matmul" else 0
        hostile.expect_answer(out, lambda v: v.shape == (1, 1) and int(v[0, 0]) == want, f"{fn} K={k}")
    else:
        hostile.expect_clear_error(out, f"K={k}")


# --------------------------------------------------------------------------------------------------
# Codebooks, convolution geometry, dequantization


CODEBOOKS = ["ok", "per_channel", "tensor", "float64", "int", "nan", "inf", "huge", "bool", "short", "long", "rows",
             "3d", "0d", "list", "none", "complex"]


@settings(max_examples=200, **SETTINGS)
@given(fn=st.sampled_from(["lut_matmul", "lut_conv2d"]), bits=st.sampled_from([1, 2, 4, 8]),
       change=st.sampled_from(CODEBOOKS), n=st.integers(1, 20), seed=seeds)
def test_codebooks(guard, fn, bits, change, n, seed):
    rng = np.random.default_rng(seed)
    k = 12
    codes = _codes(seed, n, k, bits)
    e = 2**bits
    cb = rng.standard_normal(e).astype(np.float32)
    table = np.broadcast_to(cb, (n, e))
    valid = True
    if change == "ok":
        pass
    elif change == "per_channel":
        cb = rng.standard_normal((n, e)).astype(np.float32)
        table = cb
    elif change == "tensor":
        cb = pc.desc("array", cb, transform="tensor")
    elif change == "float64":
        cb = cb.astype(np.float64)
    elif change == "int":
        cb = rng.integers(-3, 3, e)
        table = np.broadcast_to(cb.astype(np.float32), (n, e))
    else:
        valid = False
        bad = {"nan": np.where(np.arange(e) == 0, np.nan, cb), "inf": np.full(e, np.inf),
               "huge": np.full(e, 1e300), "bool": np.ones(e, bool), "short": cb[:-1], "long": np.ones(e + 1),
               "rows": np.ones((n + 1, e)), "3d": np.ones((1, n, e)), "0d": np.asarray(1.0), "list": [1.0] * e,
               "none": None, "complex": np.ones(e, complex)}
        cb = bad[change]
    x = rng.standard_normal((2, k), dtype=np.float32)
    w = packed.pack(codes, bits)
    w = packed.prepare(w) if seed % 2 else w  # prepared: lut_conv2d's compiled fast path
    if fn == "lut_matmul":
        out = guard.call("packed_cases:call", fn, x, w, cb)
        want = x.astype(np.float64) @ np.take_along_axis(table, codes.astype(np.int64), 1).T.astype(np.float64)
    else:
        out = guard.call("packed_cases:call", fn, x.reshape(2, k, 1, 1), w, cb, (1, 1))
        want = (x.astype(np.float64) @ np.take_along_axis(table, codes.astype(np.int64), 1).T).reshape(2, n, 1, 1)
    if valid:
        hostile.expect_answer(out, lambda v: np.allclose(v, want, rtol=1e-4, atol=1e-4), f"{fn} codebook {change}")
    else:
        hostile.expect_clear_error(out, "codebook")


@settings(max_examples=200, **SETTINGS)
@given(size=st.tuples(st.integers(1, 6), st.integers(1, 6)), kernel=st.one_of(
    st.tuples(st.integers(-1, 8), st.integers(-1, 8)),
    st.sampled_from([(3,), (1, 1, 1), 3, "33", None, (1.0, 1), (True, 1), (np.int64(2), np.int8(2))])),
    padding=st.sampled_from([0, 1, 2, 3, -1, 1.0, True, None, np.int64(1)]), c=st.integers(1, 3), seed=seeds)
def test_conv_geometry(guard, size, kernel, padding, c, seed):
    rng = np.random.default_rng(seed)
    h, wd = size
    x = rng.standard_normal((1, c, h, wd), dtype=np.float32)
    pair = isinstance(kernel, tuple) and len(kernel) == 2
    ints = pair and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in kernel)
    kh, kw = (int(kernel[0]), int(kernel[1])) if ints else (1, 1)
    k = c * max(kh, 1) * max(kw, 1)
    codes = _codes(seed, 3, k, 2)
    cb = np.array([-1.0, -0.25, 0.25, 1.0], np.float32)
    w = packed.pack(codes, 2)
    w = packed.prepare(w) if seed % 2 else w  # prepared: lut_conv2d's compiled fast path
    out = guard.call("packed_cases:call", "lut_conv2d", x, w, cb, kernel, padding=padding)
    if not ints or not (1 <= kh <= 64 and 1 <= kw <= 64):
        hostile.expect_clear_error(out, "kernel")
        return
    pad_ok = isinstance(padding, int | np.integer) and not isinstance(padding, bool) and 0 <= padding <= max(kh, kw) - 1
    if not pad_ok:
        hostile.expect_clear_error(out, "padding")
        return
    if h + 2 * padding - kh + 1 < 1 or wd + 2 * padding - kw + 1 < 1:
        hostile.expect_clear_error(out, "kernel")
        return
    weight = torch.from_numpy(cb[codes].reshape(3, c, kh, kw))
    want = torch.nn.functional.conv2d(torch.from_numpy(x), weight, padding=int(padding)).numpy()
    hostile.expect_answer(out, lambda v: np.allclose(v, want, rtol=1e-4, atol=1e-4), f"conv {size} {kernel} {padding}")


DEQUANT = ["ok", "w_packed", "sums_short", "sums_long", "sums_float", "sums_negative", "sums_huge", "sums_tensor",
           "dot_shape", "dot_float", "dot_1d", "scale_nan", "scale_zero", "zero_a_range", "zero_a_float",
           "scale_w_len", "scale_w_nan", "scale_w_negative", "zero_w_nan", "zero_w_len", "a_sums_wrong", "a_noncontig"]


@settings(max_examples=200, **SETTINGS)
@given(change=st.sampled_from(DEQUANT), m=st.integers(1, 5), n=st.integers(1, 12), k=st.integers(1, 90),
       bits=st.sampled_from([2, 4]), seed=seeds)
def test_dequantize_arguments(guard, change, m, n, k, bits, seed):
    rng = np.random.default_rng(seed)
    ca, cw = _codes(seed, m, k, bits), _codes(seed + 1, n, k, bits)
    a, w = packed.pack(ca, bits), packed.pack(cw, bits)
    dot = (ca.astype(np.int64) @ cw.T.astype(np.int64)).astype(np.int32)
    sums = cw.sum(1, dtype=np.int64)
    kw = {"scale_a": 0.3, "zero_a": 1, "scale_w": rng.uniform(0.1, 1, n), "zero_w": rng.integers(0, 2**bits, n)}
    a_arg, dot_arg, sums_arg, problem = a, dot, sums, None
    edits = {
        "w_packed": lambda: ("w_sums", w), "sums_short": lambda: ("w_sums", sums[:-1] if n > 1 else sums[:0]),
        "sums_long": lambda: ("w_sums", np.append(sums, 1)), "sums_float": lambda: ("w_sums", sums.astype(float)),
        "sums_negative": lambda: ("w_sums", sums - 10**6), "sums_huge": lambda: ("w_sums", sums + 10**12),
        "sums_tensor": lambda: ("w_sums", pc.desc("array", sums, transform="tensor")),
        "dot_shape": lambda: ("dot", np.zeros((m + 1, n), np.int32)), "dot_float": lambda: ("dot", dot.astype(float)),
        "dot_1d": lambda: ("dot", dot.reshape(-1)), "scale_nan": lambda: ("scale_a", np.nan),
        "scale_zero": lambda: ("scale_a", 0.0), "zero_a_range": lambda: ("zero_a", 2**bits),
        "zero_a_float": lambda: ("zero_a", 1.0), "scale_w_len": lambda: ("scale_w", np.ones(n + 1)),
        "scale_w_nan": lambda: ("scale_w", np.full(n, np.nan)), "scale_w_negative": lambda: ("scale_w", -np.ones(n)),
        "zero_w_nan": lambda: ("zero_w", np.full(n, np.nan)), "zero_w_len": lambda: ("zero_w", np.ones(n + 2)),
        "a_sums_wrong": lambda: ("a", packed.PackedMatrix(bits, (m, k), a.words, np.full(m, 3, np.int64))),
        "a_noncontig": lambda: ("a", pc.desc("matrix", "packed", bits, (m, k), a.words, None, transform="noncontig")),
    }
    valid_changes = {"ok", "w_packed", "sums_tensor", "a_sums_wrong"}
    if change in edits:
        field, value = edits[change]()
        if change == "sums_short" and n == 1:
            value = np.zeros(0, np.int64)
        if field == "w_sums":
            sums_arg = value
        elif field == "dot":
            dot_arg = value
        elif field == "a":
            a_arg = value
        else:
            kw[field] = value
        problem = None if change in valid_changes else {"w_sums": "w_code_sums", "a": "a.words"}.get(field, field)
        if change == "a_noncontig" and _is_c_contiguous_after(a.words, "noncontig"):
            problem = None
    out = guard.call("packed_cases:call", "dequantize_matmul", dot_arg, a_arg, sums_arg, **kw)
    if problem is None:
        xa = (ca.astype(np.float64) - kw["zero_a"]) * kw["scale_a"]
        xw = (cw.astype(np.float64) - kw["zero_w"].reshape(-1, 1)) * kw["scale_w"].reshape(-1, 1)
        want = xa @ xw.T
        hostile.expect_answer(out, lambda v: np.allclose(v, want, rtol=1e-5, atol=1e-4), f"dequantize {change}")
    else:
        hostile.expect_clear_error(out, problem)


# --------------------------------------------------------------------------------------------------
# Readouts and harness: sizes that would allocate too much, odd scalars, modules


@settings(max_examples=150, **SETTINGS)
@given(out_f=st.sampled_from([8, 1, 0, -3, 2**50, True, 8.0, "8", None, np.int64(4)]),
       in_f=st.sampled_from([3, 1, 0, None, 2**45, 3.5, np.uint16(3)]),
       kernel=st.sampled_from([(3, 3), (1, 1), (0, 3), (3,), 3, None, (2.0, 2), (2**30, 1), [5, 5]]),
       bits=st.sampled_from([1, 2, 4, 8, 3, True, 2.0]), cbits=st.sampled_from([32, 16, 0, 64, -1, 65, 1.5]),
       per_channel=st.sampled_from([False, True, 0, None]))
def test_memory_report_arguments(out_f, in_f, kernel, bits, cbits, per_channel):
    out = hostile.run(packed.memory_report, out_f, in_f, kernel, bits, cbits, per_channel)

    def is_int(v, lo, hi):
        return isinstance(v, int | np.integer) and not isinstance(v, bool) and lo <= v <= hi

    checks = [("bits", is_int(bits, 1, 8) and bits in (1, 2, 4, 8)), ("codebook_bits", is_int(cbits, 0, 64)),
              ("per_channel", isinstance(per_channel, bool)), ("out_features", is_int(out_f, 1, 2**40)),
              ("in_features", is_int(in_f, 1, 2**40)),
              ("kernel", isinstance(kernel, tuple | list) and len(kernel) == 2
               and all(is_int(v, 1, 2**20) for v in kernel))]
    failed = [name for name, ok in checks if not ok]
    if failed:
        hostile.expect_clear_error(out, failed[0])
    else:
        n = int(out_f) * int(in_f) * int(kernel[0]) * int(kernel[1])
        row_words = -(-(n // int(out_f)) * int(bits) // 64)
        hostile.expect_answer(out, lambda r: r["weights"] == n and r["float32_bytes"] == 4 * n
                              and r["packed_bytes"] == out_f * row_words * 8, "memory_report")


def test_memory_report_of_modules():
    hostile.expect_clear_error(hostile.run(packed.memory_report, torch.nn.ReLU()), "module")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, groups=1), torch.nn.Linear(5, 2))
    hostile.expect_answer(hostile.run(packed.memory_report, net, bits=2), lambda r: len(r["layers"]) == 2, "module")


@settings(max_examples=80, **SETTINGS)
@given(kind=st.sampled_from(["binary", "hybrid", "lowbit", "lut", "fp32", None]),
       m=st.sampled_from([1, 2, 0, -1, 2**21, True, 1.5]), k=st.sampled_from([64, 100, 0, 2**20, 65536]),
       n=st.sampled_from([16, 33, 2**20, 65536]), bits=st.sampled_from([1, 2, 4, 8, 3]),
       budget=st.sampled_from([0.001, 0.0, -1.0, np.nan, 61.0]), cold=st.sampled_from([False, False, True, 1]))
def test_measure_latency_arguments(guard, kind, m, k, n, bits, budget, cold):
    out = guard.call("packed_cases:call", "measure_latency", kind, m, k, n, bits=bits, budget_s=budget, threads=1,
                     cold=cold)

    def is_int(v, lo, hi):
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    allowed = {"binary": (1,), "hybrid": (1,), "lowbit": (1, 2, 4), "lut": (1, 2, 4, 8)}
    if kind not in allowed:
        return hostile.expect_clear_error(out, "kind")
    for name, v in (("m", m), ("k", k), ("n", n)):
        if not is_int(v, 1, 1 << 20):
            return hostile.expect_clear_error(out, name)
    if not (isinstance(budget, float) and 0 < budget <= 60):
        return hostile.expect_clear_error(out, "budget_s")
    if not isinstance(cold, bool):
        return hostile.expect_clear_error(out, "cold")
    if bits not in allowed[kind]:
        return hostile.expect_clear_error(out, "bits")
    w_bytes = -(-n // 16) * 16 * -(-k * bits // 32) * 4
    if 4 * n * k + 4 * m * k * 3 + 2 * w_bytes > _timing.memory_limit():
        return hostile.expect_clear_error(out, "limit")
    hostile.expect_error_or_answer(out, ("limit",), lambda r: r["qviz_s"] > 0 and r["torch_s"] > 0,
                                   f"measure_latency {kind} {m}x{k}x{n}")


@settings(max_examples=60, **SETTINGS)
@given(batch=st.sampled_from([1, 2, 0, 5000, True]), channels=st.sampled_from([3, 1, 60000, -2]),
       size=st.sampled_from([16, 3, 1, 200, 0]), kernel=st.sampled_from([3, 1, 5, 17, 0, 65, 2.0]),
       padding=st.sampled_from([0, 1, 2, -1, 16]))
def test_measure_conv_latency_arguments(guard, batch, channels, size, kernel, padding):
    out = guard.call("packed_cases:call", "measure_conv_latency", batch, channels, size, 4, kernel, padding=padding,
                     budget_s=0.001, threads=1)

    def is_int(v, lo, hi):
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    for name, v in (("batch", batch), ("in_channels", channels), ("size", size)):
        if not is_int(v, 1, 4096):
            return hostile.expect_clear_error(out, name)
    if not is_int(kernel, 1, min(size, 64)):
        return hostile.expect_clear_error(out, "kernel")
    if not is_int(padding, 0, kernel - 1):
        return hostile.expect_clear_error(out, "padding")
    hostile.expect_error_or_answer(out, ("limit",), lambda r: r["qviz_s"] > 0, "measure_conv_latency")


@pytest.mark.parametrize(("batch", "channels", "size"), [(4096, 4096, 64), (4096, 3, 4096), (1, 4096, 4096)])
def test_measure_conv_latency_refuses_buffers_beyond_the_memory_limit(guard, batch, channels, size):
    out = guard.call("packed_cases:call", "measure_conv_latency", batch, channels, size, 8, 3, budget_s=0.001)
    hostile.expect_clear_error(out, "limit")


@settings(max_examples=60, **SETTINGS)
@given(fn=st.sampled_from(["roof", "popcount_ceiling", "read_bandwidth"]),
       kind=st.sampled_from(["pop", "dot", "fma", "flops", None]),
       path=st.sampled_from([None, "portable", "avx2", "avx2vnni", "avx512vnni", "quantum", 3]),
       threads=st.sampled_from([1, 2, 0, True, None]), seconds=st.sampled_from([0.002, 0.0, np.nan, -1.0, 100.0]),
       nbytes=st.sampled_from([1 << 16, 100, 2**40, -5, 1.5]))
def test_roofs_and_bandwidth_arguments(guard, fn, kind, path, threads, seconds, nbytes):
    if fn == "roof":
        out = guard.call("packed_cases:call", fn, kind, path=path, threads=threads, seconds=seconds)
    elif fn == "popcount_ceiling":
        out = guard.call("packed_cases:call", fn, path=path, threads=threads, seconds=seconds)
    else:
        out = guard.call("packed_cases:call", fn, nbytes, threads=threads, seconds=seconds)
    threads_ok = threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1)
    seconds_ok = isinstance(seconds, float) and 0 < seconds <= 60
    if fn == "roof" and kind not in ("pop", "dot", "fma"):
        return hostile.expect_clear_error(out, "kind")
    if fn == "read_bandwidth":
        if not (isinstance(nbytes, int) and 4096 <= nbytes <= 1 << 40):
            return hostile.expect_clear_error(out, "nbytes")
        if not threads_ok:
            return hostile.expect_clear_error(out, "threads")
        if not seconds_ok:
            return hostile.expect_clear_error(out, "seconds")
        hostile.expect_error_or_answer(out, ("limit",), lambda v: v > 0, "read_bandwidth")
        return
    if path is not None and path not in packed.available_paths():
        return hostile.expect_clear_error(out, "path")
    if not threads_ok:
        return hostile.expect_clear_error(out, "threads")
    if not seconds_ok:
        return hostile.expect_clear_error(out, "seconds")
    hostile.expect_answer(out, lambda v: v > 0, f"{fn} {kind} {path}")


@settings(max_examples=120, **SETTINGS)
@given(scale=st.sampled_from([0.5, [0.5, 0.25], np.array([1.0, 2.0, 3.0]), 0.0, -1.0, np.nan, np.inf, 1e38, True,
                              "1", None, [[1.0]], [], np.array([1 + 1j]), torch.tensor([0.5, 1.0])]),
       zero=st.sampled_from([0, 1, [0, 1], np.array([0, 1, 2]), np.nan, "0", None, [[0]], 1.5]),
       bits=st.sampled_from([1, 2, 4, 8, 3, True, 2.0, None]))
def test_codebook_from_affine_arguments(scale, zero, bits):
    out = hostile.run(packed.codebook_from_affine, scale, zero, bits)
    if not (isinstance(bits, int) and not isinstance(bits, bool) and bits in (1, 2, 4, 8)):
        return hostile.expect_clear_error(out, "bits")
    try:
        s = np.asarray(scale.numpy() if isinstance(scale, torch.Tensor) else scale)
        z = np.asarray(zero)
        numeric = (not isinstance(scale, bool) and s.dtype.kind in "iuf" and z.dtype.kind in "iuf")
    except (ValueError, TypeError):
        numeric = False
    if not numeric:
        return hostile.expect_clear_error(out, "scale", "zero_point")
    shapes_ok = s.ndim <= 1 and z.ndim <= 1 and s.size and z.size and not (s.ndim == z.ndim == 1 and s.size != z.size)
    if not shapes_ok:
        return hostile.expect_clear_error(out, "scale", "zero_point")
    with np.errstate(all="ignore"):
        table = (np.arange(2**bits) - z.reshape(-1, 1).astype(float)) * s.reshape(-1, 1).astype(float)
        values_ok = (np.isfinite(s).all() and (s > 0).all() and np.isfinite(z).all()
                     and np.isfinite(table.astype(np.float32)).all())
    if not values_ok:
        return hostile.expect_clear_error(out, "scale", "zero_point")
    want = table.astype(np.float32).reshape(-1) if s.ndim == 0 and z.ndim == 0 else table.astype(np.float32)
    hostile.expect_answer(out, lambda v: np.array_equal(v, np.broadcast_to(want, v.shape)) and v.shape == want.shape,
                          "codebook_from_affine")


@pytest.mark.parametrize("call", ["available_paths", "kernel_path", "openmp_enabled", "pool_enabled",
                                  "available_threadings", "threading"])
def test_path_queries(call):
    hostile.expect_answer(hostile.run(getattr(packed, call)), lambda v: v is not None, call)


@pytest.mark.parametrize("name", [None, 1, True, "OPENMP", "openmp ", b"pool", ["pool"], np.str_("fibers")])
def test_set_threading_refuses_anything_but_its_names(name):
    before = packed.threading()
    hostile.expect_clear_error(hostile.run(packed.set_threading, name), "name")
    assert packed.threading() == before


@pytest.mark.parametrize(("k", "bits"), [(1, 1), (64, 1), (65, 2), (0, 1), (-1, 2), (2**40, 8), (np.uint16(3), 1),
                                         (np.uint8(200), np.uint8(8)), (1.5, 1), ("3", 1), (None, 2), (-64, 1),
                                         (10, 3), (10, 0), (10, -5)])
def test_words_per_row(k, bits):
    out = hostile.run(packed.words_per_row, k, bits)
    if all(isinstance(v, int | np.integer) for v in (k, bits)) and 0 <= int(k) <= 2**40 and int(bits) in (1, 2, 4, 8):
        hostile.expect_answer(out, lambda v: v == -(-int(k) * int(bits) // 64), "words_per_row")
    else:
        hostile.expect_clear_error(out, "k ", "k=", "bits ", "bits=")


# --------------------------------------------------------------------------------------------------
# out=: the caller's result array (every matmul and the convolution)

OUT_CHANGES = ["none", "ok", "ok", "dtype_f64", "dtype_i64", "dtype_other", "shape_t", "shape_more", "shape_flat",
               "noncontig", "fortran", "readonly", "tensor", "list", "big_endian", "alias_a", "alias_w", "alias_x",
               "alias_codebook"]


@settings(max_examples=300, **SETTINGS)
@given(fn=st.sampled_from(pc.OUT_FNS), change=st.sampled_from(OUT_CHANGES), m=st.integers(1, 9),
       n=st.integers(1, 40), k=st.integers(1, 200), bits=st.sampled_from([1, 2, 4]), seed=seeds)
def test_out_argument(guard, fn, change, m, n, k, bits, seed):
    lut = fn in ("lut_matmul", "lut_conv2d")
    if change in (("alias_a",) if lut else ("alias_x", "alias_codebook")):
        change = "alias_w"  # every fn has weights; a and x / codebook only one kind each
    _, shape, dtype, ref = pc.out_problem(fn, m, n, k, bits, seed)
    out = guard.call("packed_cases:out_call", fn, change, m, n, k, bits, seed)

    def right(v, given: bool | None = None) -> bool:
        result, is_out = v
        same = np.array_equal(result, ref) if dtype == np.int32 else np.allclose(result, ref, rtol=1e-4, atol=1e-4)
        return result.dtype == dtype and same and (given is None or is_out == given)

    size = int(np.prod(shape))
    if change in ("none", "ok"):
        hostile.expect_answer(out, lambda v: right(v, change == "ok"), f"{fn} out={change}")
    elif change == "noncontig" and size == 1:  # a single element is contiguous
        hostile.expect_answer(out, right, f"{fn} out={change}")
    elif change == "shape_t" and shape[::-1] == shape:  # a square result transposed is the same shape
        hostile.expect_answer(out, right, f"{fn} out={change}")
    elif change == "fortran" and sum(d > 1 for d in shape) <= 1:  # a vector is C- and F-contiguous at once
        hostile.expect_answer(out, right, f"{fn} out={change}")
    else:  # a wrong dtype, shape or layout, not an array, or a view of an input's memory
        hostile.expect_clear_error(out, "out")


@pytest.mark.parametrize(("case", "names"), [("lying_words", ("a.words",)), ("lying_out", ("out",)),
                                             ("lying_rows", ("packed.words",)), ("huge_result", ("result", "out="))])
def test_arrays_that_lie_about_their_shape_and_results_beyond_memory_are_refused(guard, case, names):
    """The checks look at the buffer the kernels get (an ndarray subclass's shape property is not it), and a
    result beyond qviz._timing.memory_limit() is refused before it is allocated."""
    hostile.expect_clear_error(guard.call(f"packed_cases:{case}"), *names)


def _dequantize_case(**change):
    a = packed.pack(np.array([[1, 2, 3, 0]], np.uint8), 2)
    w = packed.prepare(packed.pack(np.array([[3, 1, 0, 2], [1, 1, 1, 1]], np.uint8), 2))
    args = {"dot": packed.lowbit_matmul(a, w), "scale_a": 0.1, "zero_a": 1, "scale_w": 0.2, "zero_w": 2, **change}
    return hostile.run(lambda: packed.dequantize_matmul(args.pop("dot"), a, w, **args))


@pytest.mark.parametrize(("change", "names"), [
    ({"scale_a": 1e300, "scale_w": 1e10}, ("scale_a",)), ({"dot": np.array([[2**62, 0]], np.int64)}, ("dot",)),
    ({"dot": np.array([[-1, 0]], np.int32)}, ("dot",)), ({"zero_w": [0, 99]}, ("zero_w",)),
    ({"zero_w": 0.5}, ("zero_w",)), ({"scale_w": torch.tensor([0.2, 0.3], dtype=torch.bfloat16)}, None),
    ({"scale_w": torch.empty(2, device="meta")}, ("scale_w",)),
])
def test_dequantize_matmul_refuses_what_no_affine_matmul_can_produce(change, names):
    out = _dequantize_case(**change)
    if names is None:  # a bfloat16 tensor is a fine array of scales
        hostile.expect_answer(out, lambda v: v.shape == (1, 2) and np.isfinite(v).all(), "bfloat16 scale_w")
    else:
        hostile.expect_clear_error(out, *names)


@pytest.mark.parametrize("module", [nn.Linear(0, 4), nn.Sequential(nn.Linear(4, 0)), nn.LazyLinear(4)])
def test_memory_report_names_layers_without_weights(module):
    hostile.expect_clear_error(hostile.run(packed.memory_report, module, codebook_bits=0), "module's layer")


def test_a_float_where_a_bit_width_is_expected_is_refused():
    hostile.expect_clear_error(hostile.run(packed.measure_conv_latency, bits=4.0), "bits")
