"""How much a quantizer costs: SQNR, quantization error, weight power, compression, levels used.

SQNR and the weight power distribution follow 004 Appendix A; the compression rate is 003 eq. 2-17.
Functions accept torch tensors or numpy arrays and return numpy values (floats or arrays).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qviz import _checks


def _real_array(name: str, a: object) -> np.ndarray:
    """a as a numpy array of real numbers (torch tensors as numpy views where they can be), not copied."""
    a = _checks.numpy_of(name, a)
    if isinstance(a, np.generic):
        a = np.asarray(a)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(a).__name__}")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a


def _finite(name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf; only finite values are allowed")


def _array(name: str, a: object) -> np.ndarray:
    a = _real_array(name, a)
    _checks.fits_memory(name, a.size, 32)  # float64 copies of the inputs and their difference
    _finite(name, a)
    return a.astype(np.float64, copy=False)


def _pair(w: object, w_q: object) -> tuple[np.ndarray, np.ndarray]:
    w, w_q = _array("w", w), _array("w_q", w_q)
    if w.shape != w_q.shape:
        raise ValueError(f"w and w_q must have the same shape, got {w.shape} and {w_q.shape}")
    if w.size == 0:
        raise ValueError("w is empty; SQNR needs at least one value")
    return w, w_q


def _rows(a: np.ndarray, axis: int | None) -> np.ndarray:
    """a as rows: one row for the whole array, or one per slice along axis."""
    if axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def _power_db(rows: np.ndarray) -> np.ndarray:
    """10 log10 Σ v² per row, summed in units of the row's largest |v|: neither 1e200² overflows nor
    1e-200² vanishes. -inf for a row of zeros."""
    unit = np.abs(rows).max(axis=1)
    safe = np.where(unit > 0, unit, 1.0)
    total = ((rows / safe[:, None]) ** 2).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(unit > 0, 20 * np.log10(safe) + 10 * np.log10(total), -np.inf)


_STEP = 1 << 16  # values per step of a streamed SQNR: float64 copies of a step stay in the core's cache


def _steps(*arrays: np.ndarray):
    """The arrays' values in matching steps of _STEP, as float64 (numpy's buffered iterator: no copy of
    the whole, whatever the layout)."""
    it = np.nditer(arrays, flags=["external_loop", "buffered", "zerosize_ok"], op_dtypes=["float64"] * len(arrays),
                   casting="safe", buffersize=_STEP)
    with it:
        yield from it


def _repeats_values(a: np.ndarray) -> bool:
    """Whether a is a view that shows values more than once (a stride-0 broadcast): its values do not sit
    in memory of their own, however many there are."""
    if a.size <= 1:
        return False
    extent = a.itemsize + sum((n - 1) * abs(st) for n, st in zip(a.shape, a.strides, strict=True))
    return extent < a.nbytes


def _streamed_sqnr_db(w: np.ndarray, w_q: np.ndarray) -> float:
    """sqnr_db over the whole arrays, in steps: no float64 copy of the inputs, so outputs of any size a
    model can produce are measured (a language model's logits run to gigabytes). Three passes: the
    largest values, the largest error and the signal, the noise; each summed in units of its largest."""
    for name, a in (("w", w), ("w_q", w_q)):
        if _repeats_values(a):
            _checks.fits_memory(name, a.size, 32)
    big_w = big_q = 0.0
    for a, b in _steps(w, w_q):
        for name, v in (("w", a), ("w_q", b)):
            _finite(name, v)
        big_w, big_q = max(big_w, float(np.abs(a).max())), max(big_q, float(np.abs(b).max()))
    halved = max(big_w, big_q) >= np.finfo(np.float64).max / 2  # then (w - w_q) / 2: it cannot overflow

    def error(a, b):
        return a / 2 - b / 2 if halved else a - b

    big_e, signal = 0.0, 0.0
    for a, b in _steps(w, w_q):
        big_e = max(big_e, float(np.abs(error(a, b)).max()))
        if big_w > 0:
            signal += float(((a / big_w) ** 2).sum())
    if big_e == 0:
        return math.inf
    if big_w == 0:
        return -math.inf
    noise = sum(float(((error(a, b) / big_e) ** 2).sum()) for a, b in _steps(w, w_q))
    noise_db = 20 * math.log10(big_e) + 10 * math.log10(noise) + (20 * math.log10(2.0) if halved else 0.0)
    return 20 * math.log10(big_w) + 10 * math.log10(signal) - noise_db


def sqnr_db(w, w_q, axis: int | None = None):
    """Signal-to-quantization-noise ratio 10 log10(Σ w² / Σ (w - w_q)²) in dB (004 Appendix A).

    With `axis`, one value per slice along that axis (e.g. per output channel, "per kernel", as in
    004 Figs. 18-19), as a numpy array. A slice quantized without error has SQNR +inf; a slice with no
    signal but some error has -inf. Signal and noise are summed in decibels of their own largest value,
    so any finite float64 input gives the ratio to full precision. Without `axis` the arrays are read
    in steps, with no float64 copy of them: any size that sits in memory is measured.
    """
    if axis is None:
        w, w_q = _real_array("w", w), _real_array("w_q", w_q)
        if w.shape != w_q.shape:
            raise ValueError(f"w and w_q must have the same shape, got {w.shape} and {w_q.shape}")
        if w.size == 0:
            raise ValueError("w is empty; SQNR needs at least one value")
        return _streamed_sqnr_db(w, w_q)
    w, w_q = _pair(w, w_q)
    axis = _checks.axis_for("axis", axis, w.ndim)
    signal = _power_db(_rows(w, axis))
    if max(float(np.abs(w).max()), float(np.abs(w_q).max())) < np.finfo(np.float64).max / 2:
        noise = _power_db(_rows(w - w_q, axis))
    else:  # (w - w_q) / 2 cannot overflow where w - w_q can (1e308 - -1e308); 20 log10(2) puts the 2 back
        noise = _power_db(_rows(w / 2 - w_q / 2, axis)) + 20 * np.log10(2.0)
    with np.errstate(invalid="ignore"):
        out = np.where(noise == -np.inf, np.inf, signal - noise)
    return float(out[0]) if axis is None else out


def quantization_error(x, x_q) -> np.ndarray:
    """ε = x - Q(x), element by element (002 §2.2)."""
    x, x_q = _pair(x, x_q)
    return x - x_q


def weight_power(w) -> np.ndarray:
    """The weight power distribution W² / E[W²] of 004 Appendix A (its histogram shows outliers).

    An all-zero tensor has no power; its distribution is returned as zeros.
    """
    w = _array("w", w)
    if w.size == 0:
        raise ValueError("w is empty; the power distribution needs at least one value")
    unit = float(np.abs(w).max())
    power = (w / unit) ** 2 if unit > 0 else w * w  # a ratio of powers: units of max|w| cannot overflow
    mean = power.mean()
    return power / mean if mean > 0 else np.zeros_like(power)


def compression_ratio(n: int, b: int = 32, k: int = 2, codebook_bits: int | None = None) -> float:
    """Compression rate r = n b / (n ceil(log2 k) + k c) of 003 eq. 2-17.

    n weights of b bits each are replaced by indices into a codebook of k entries, each entry stored
    with c = codebook_bits bits (default b). The index width is ceil(log2 k): 3 levels (ternary) need
    2 bits, as 003 §2.1.2.1 says. 003's worked example: n=27, b=32, k=4 gives 4.747.
    """
    n = _checks.integer("n", n, 1)
    b = _checks.integer("b", b, 1, 64)
    k = _checks.integer("k", k, 2)
    c = b if codebook_bits is None else _checks.integer("codebook_bits", codebook_bits, 0, 64)
    return n * b / (n * math.ceil(math.log2(k)) + k * c)


def levels_used(q, axis: int | None = None):
    """How many distinct values `q` actually holds: an int, or one per slice along `axis`."""
    q = _array("q", q)
    if axis is None:
        return int(np.unique(q).size)
    axis = _checks.axis_for("axis", axis, q.ndim)
    rows = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1)
    return np.array([np.unique(r).size for r in rows])


def histogram(values, bins: int = 50, lo: float | None = None,
              hi: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(edges [bins + 1], counts [bins]) of the finite values, over [lo, hi] (default: their range)."""
    v = _array("values", values).reshape(-1)
    bins = _checks.integer("bins", bins, 1, 10_000)
    if v.size == 0:
        raise ValueError("values is empty; a histogram needs at least one value")
    given = lo is not None and hi is not None
    lo = float(v.min()) if lo is None else _checks.real("lo", lo)
    hi = float(v.max()) if hi is None else _checks.real("hi", hi)
    if given and not hi >= lo:
        raise ValueError(f"lo={lo:g}, hi={hi:g}: allowed lo <= hi")
    # one value, or a range too narrow for `bins` distinct edges (0 to 5e-324): bins around it (that stay
    # finite at float64's largest value)
    top = np.finfo(np.float64).max / 4
    narrow = max(abs(lo), abs(hi)) < top and not np.all(np.diff(np.linspace(lo, hi, bins + 1)) > 0)
    if not hi > lo or narrow:
        half, biggest = max(0.5, abs(lo) * 1e-6), np.finfo(np.float64).max
        lo, hi = max(lo - half, -biggest), min(hi + half, biggest)
    if max(abs(lo), abs(hi)) < top:
        counts, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
        return edges, counts
    # near float64's end hi - lo overflows (numpy refuses the range): bin in halves instead
    t = np.linspace(0.0, 1.0, bins + 1)
    # rounding can put neighbouring edges a unit apart the wrong way round when lo and hi are this close
    edges = np.maximum.accumulate(np.clip(lo * (1 - t) + hi * t, lo, hi))
    index = np.floor((np.clip(v, lo, hi) / 2 - lo / 2) / (hi / 2 - lo / 2) * bins).astype(np.int64)
    return edges, np.bincount(np.clip(index, 0, bins - 1), minlength=bins)


def weight_report(weight, spec, *, folded=None, bins: int = 60) -> dict:
    """Everything the weight explorer shows about one layer's weights under `spec` (004 §2.6, Appendix A).

    weight: [out, ...] (dim 0 = output kernels); folded: the batch-norm-folded weights (004 eqs.
    20-21) when the layer has a batch norm. Returns edges / counts of the weights; the levels (per
    channel: those of the kernel with the widest range, named by `levels_kernel`); the quantized weights
    as one count per level (per tensor) or as a histogram (per channel, where every kernel has its own
    levels); the overall SQNR; per-kernel SQNR histograms for per-layer and per-channel quantization with
    the same scheme; and the weight power histograms before and after folding.
    """
    from qviz.engine.quantizers import fake_quantize, quantizer_levels

    weight = np.asarray(weight) if isinstance(weight, list | tuple) else weight
    w = torch.from_numpy(_array("weight", weight)).float()  # real, finite, dense: checked as every metric checks
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds values beyond float32's range (about 3.4e38); allowed: float32-sized weights")
    if folded is not None:
        _array("folded", folded)
    if w.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [out, in, ...], got shape {tuple(w.shape)}")
    q = fake_quantize(w, spec)
    levels = quantizer_levels(w, spec)
    edges, counts = histogram(w, bins)
    if spec.granularity == "tensor":
        kernel = None
        level_values = np.unique(levels.numpy().round(9))
        quantized = {"values": level_values,
                     "counts": np.array([np.isclose(q.numpy(), v, rtol=0, atol=1e-7).sum() for v in level_values])}
    else:
        kernel = int(w.reshape(w.shape[0], -1).abs().amax(1).argmax())
        level_values = np.unique(levels[kernel].numpy().round(9))
        q_edges, q_counts = histogram(q, bins, float(edges[0]), float(edges[-1]))
        quantized = {"edges": q_edges, "counts": q_counts}
    per_layer = sqnr_db(w, fake_quantize(w, spec.replace(granularity="tensor")), axis=0)
    per_channel = sqnr_db(w, fake_quantize(w, spec.replace(granularity="channel", axis=0)), axis=0)
    finite = np.concatenate([per_layer[np.isfinite(per_layer)], per_channel[np.isfinite(per_channel)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    sqnr_edges, layer_counts = histogram(np.clip(per_layer, lo, hi), 24, lo, hi)
    _, channel_counts = histogram(np.clip(per_channel, lo, hi), 24, lo, hi)
    power_before = weight_power(w)
    power_after = weight_power(folded) if folded is not None else None
    top = float(max(power_before.max(), power_after.max() if power_after is not None else 0.0))
    power_edges, before_counts = histogram(power_before, 40, 0.0, top)
    after_counts = histogram(power_after, 40, 0.0, top)[1] if power_after is not None else None
    return {
        "edges": edges, "counts": counts, "levels": level_values, "levels_kernel": kernel, "quantized": quantized,
        "sqnr_db": sqnr_db(w, q), "sqnr_per_layer": per_layer, "sqnr_per_channel": per_channel,
        "sqnr_edges": sqnr_edges, "sqnr_layer_counts": layer_counts, "sqnr_channel_counts": channel_counts,
        "power_edges": power_edges, "power_before": before_counts, "power_after": after_counts,
        "levels_used": levels_used(q),
    }
