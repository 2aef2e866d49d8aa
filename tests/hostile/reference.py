"""An independent float64 numpy implementation of every deterministic scheme, per tensor and per channel.

It shares no code with qviz.engine and follows the papers' equations as DESIGN.md's scheme table names
them. `expected(x, spec)` returns the reference output and a mask of the entries where a rounding tie (or a
comparison with a threshold) is too close to call in float32 arithmetic: there the engine may land on
either neighbouring level, and `close_enough` accepts both.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).tiny)  # the engine's smallest scale (float32's smallest normal number)
TIE = 1e-4  # relative distance to a rounding tie below which float32 and float64 may disagree


def _groups(x: np.ndarray, spec) -> tuple[np.ndarray, callable]:
    """x as rows [groups, n] (one row per tensor or per channel) and a function that puts rows back."""
    if spec.granularity == "tensor" or x.ndim == 0:
        return x.reshape(1, -1), lambda r: r.reshape(x.shape)
    axis = spec.axis % x.ndim
    moved = np.moveaxis(x, axis, 0)
    shape = moved.shape
    return moved.reshape(shape[0], -1), lambda r: np.moveaxis(r.reshape(shape), 0, axis)


def _near_tie(v: np.ndarray) -> np.ndarray:
    frac = v - np.floor(v)
    return np.abs(frac - 0.5) < TIE * np.maximum(1.0, np.abs(v))


def _near_integer(v: np.ndarray) -> np.ndarray:
    return np.abs(v - np.round(v)) < TIE * np.maximum(1.0, np.abs(v))


def _code_range(spec) -> tuple[int, int]:
    if spec.scheme == "symmetric" and spec.signed:
        half = 2 ** (spec.bits - 1)
        return (-half + 1 if spec.narrow else -half), half - 1
    return 0, (2**spec.bits - 2 if spec.narrow else 2**spec.bits - 1)


def _uniform(rows, spec):
    qmin, qmax = _code_range(spec)
    if spec.clip is None:
        lo, hi = rows.min(axis=1, keepdims=True), rows.max(axis=1, keepdims=True)
    elif isinstance(spec.clip, tuple):
        lo, hi = np.full((len(rows), 1), spec.clip[0]), np.full((len(rows), 1), spec.clip[1])
    else:
        lo = np.full((len(rows), 1), -spec.clip if spec.signed else 0.0)
        hi = np.full((len(rows), 1), spec.clip)
    if spec.scheme == "symmetric":
        top = np.maximum(np.abs(lo), np.abs(hi)) if spec.signed else np.maximum(hi, 0.0)
        scale = np.maximum(top / qmax, EPS32)
        zero = np.zeros_like(scale)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        with np.errstate(over="ignore"):  # a scale beyond float64's range is taken as its largest value
            scale = np.clip(hi / (qmax - qmin) - lo / (qmax - qmin), EPS32, np.finfo(np.float64).max)
        zero = np.clip(qmin - np.round(lo / scale), qmin, qmax)
    v = rows / scale
    q = (np.clip(np.round(v) + zero, qmin, qmax) - zero) * scale
    return q, _near_tie(v)


def _sign(rows):
    return np.where(rows >= 0, 1.0, -1.0)


def _mean_abs(rows):
    top = np.abs(rows).max(axis=1, keepdims=True)
    safe = np.where(top > 0, top, 1.0)
    return (np.abs(rows) / safe).mean(axis=1, keepdims=True) * top


def _ternary(rows, spec):
    a = np.abs(rows)
    if spec.delta_rule == "twn":
        delta = 0.7 * _mean_abs(rows)
    else:
        delta = np.array([[_exact_delta(r)] for r in a])
    kept = a > delta
    top = np.where(a.max(axis=1, keepdims=True) > 0, a.max(axis=1, keepdims=True), 1.0)
    count = kept.sum(axis=1, keepdims=True)
    alpha = np.where(count > 0, (np.where(kept, a / top, 0.0)).sum(axis=1, keepdims=True) / np.maximum(count, 1) * top,
                     0.0)
    q = np.where(rows > delta, alpha, np.where(rows < -delta, -alpha, 0.0))
    ambiguous = np.abs(a - delta) <= TIE * np.maximum(delta, 1e-300)
    return q, ambiguous | (np.abs(a - delta) == 0)


def _exact_delta(a):
    s = np.sort(a)[::-1]
    best, best_delta = -1.0, 0.0
    for j in range(1, len(s) + 1):
        below = s[j] if j < len(s) else 0.0
        if s[j - 1] <= below:
            continue
        value = (s[:j] / s[0]).sum() ** 2 / j if s[0] > 0 else 0.0
        if value > best:
            best, best_delta = value, s[j - 1] / 2 + below / 2
    return best_delta


def _dorefa(rows, spec):
    if spec.bits == 1:
        return _sign(rows) * _mean_abs(rows), np.zeros(rows.shape, bool)
    n = 2**spec.bits - 1
    m = np.maximum(np.tanh(np.abs(rows).max(axis=1, keepdims=True)), EPS32)
    v = (np.tanh(rows) / (2 * m) + 0.5) * n
    return 2 * np.round(v) / n - 1, _near_tie(v)


def _ceil(rows, spec):
    half = 2 ** (spec.bits - 1)
    m = np.full((len(rows), 1), spec.clip) if spec.clip is not None else np.abs(rows).max(axis=1, keepdims=True)
    m = np.maximum(m, EPS32)
    alpha = abs(spec.alpha) if spec.alpha is not None else 1.0
    v = np.clip(rows / m, -1, 1) * half
    k = np.where(v >= 0, np.maximum(np.ceil(v), 1), np.floor(v))
    return alpha * k / half, _near_integer(v)


def _relu(rows, spec):
    n = 2**spec.bits - 1
    if spec.scheme == "pact" and spec.alpha is not None:
        beta = np.full((len(rows), 1), spec.alpha)
    elif spec.clip is not None:
        beta = np.full((len(rows), 1), spec.clip)
    else:
        beta = np.maximum(rows.max(axis=1, keepdims=True), 0.0)
    step = np.maximum(beta / n, EPS32)
    v = np.minimum(np.maximum(rows, 0.0), beta) / step
    return np.floor(v + 0.5) * step, _near_tie(v)


def _dorefa_act(rows, spec):
    n = 2**spec.bits - 1
    v = np.clip(rows, 0, 1) * n
    return np.round(v) / n, _near_tie(v)


def _ceil_act(rows, spec):
    n = 2**spec.bits - 1
    c = spec.clip if spec.clip is not None else float(n)
    xc = np.minimum(np.maximum(rows, 0.0), c)
    step = np.maximum(xc.max(axis=1, keepdims=True) / n, EPS32)
    v = xc / step
    return np.minimum(np.ceil(v), n) * step, _near_integer(v)


def expected(x: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray]:
    """(reference output, ambiguous mask) for a deterministic scheme; x is float64."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # huge / tiny inputs on purpose
        return _expected(x, spec)


def _expected(x, spec):
    rows, back = _groups(np.asarray(x, dtype=np.float64), spec)
    name = spec.scheme
    if name in ("affine", "symmetric"):
        q, amb = _uniform(rows, spec)
    elif name in ("binary", "bnn_act"):
        q, amb = _sign(rows), np.zeros(rows.shape, bool)
    elif name == "xnor":
        q, amb = _sign(rows) * _mean_abs(rows), np.zeros(rows.shape, bool)
    elif name == "ternary":
        q, amb = _ternary(rows, spec)
    elif name == "dorefa":
        q, amb = _dorefa(rows, spec)
    elif name == "ceil":
        q, amb = _ceil(rows, spec)
    elif name in ("relu", "pact"):
        q, amb = _relu(rows, spec)
    elif name == "dorefa_act":
        q, amb = _dorefa_act(rows, spec)
    elif name == "ceil_act":
        q, amb = _ceil_act(rows, spec)
    else:
        raise KeyError(name)
    return back(q), back(amb)


def group_magnitude(q: np.ndarray, spec) -> np.ndarray:
    """Per entry: the largest |q| of its tensor or channel (float arithmetic on levels like 2k/n - 1 loses
    digits to cancellation, so its error is relative to the group's magnitude, not the entry's)."""
    rows, back = _groups(np.abs(np.asarray(q, dtype=np.float64)), spec)
    return back(np.broadcast_to(rows.max(axis=1, keepdims=True), rows.shape).copy())


def close_enough(got: np.ndarray, want: np.ndarray, ambiguous: np.ndarray, dtype_eps: float,
                 step: float, magnitude: np.ndarray | float = 0.0) -> np.ndarray:
    """Per entry: equal up to the dtype's rounding, or (where a tie is too close to call) within one step."""
    scale = np.maximum(np.maximum(np.abs(want), np.abs(got)), magnitude)
    tol = 8 * dtype_eps * scale + 1e-300
    ok = np.abs(got - want) <= tol
    limit = np.finfo(np.float64).max
    with np.errstate(over="ignore", invalid="ignore"):
        near = np.abs(got - want) <= (1 + 1e-3) * step + tol
    return ok | (ambiguous & near) | (np.isinf(want) & (np.abs(got) >= limit))


def largest_step(q: np.ndarray) -> float:
    """The widest gap between distinct output values (how far a tie may move a value)."""
    values = np.unique(q)
    if values.size < 2:
        return 0.0
    with np.errstate(over="ignore"):
        gaps = np.diff(values)
    return float(np.nan_to_num(gaps.max(), posinf=math.inf))
