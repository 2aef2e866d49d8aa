"""Range estimation and quantizer parameters (004 §2.5, §2.6; docs/references.md).

Weights use the actual minimum and maximum; activations the moving average of the per-batch minimum and
maximum (004 §2.5). Both work per tensor ("per-layer") or per slice along any axis ("per-channel",
004 §2.6). `quant_params` turns a range into scale and zero-point as a pure function (004 eqs. 1-3 for
the affine quantizer, eqs. 7-11 for the symmetric one).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from qviz import _checks

GRANULARITIES = ("tensor", "channel")

# The smallest scale we ever return. A range of width zero (an all-zero tensor) would otherwise give a
# zero scale and a division by zero; with this floor every output is finite and the tensor maps to 0.
# It is float32's smallest normal number, not its eps as in PyTorch's observers: an untrained network's
# activations can be 1e-26 in size, and an eps floor (1.2e-7) would quantize all of them to zero.
SCALE_FLOOR = float(torch.finfo(torch.float32).tiny)


class QuantParams(NamedTuple):
    """Scale Δ, integer zero-point z and the code range [qmin, qmax] of a uniform quantizer.

    `scale` and `zero_point` are tensors shaped to broadcast against the tensor they were computed
    from (one value per tensor, or one per channel with singleton dims elsewhere).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


def code_range(bits: int, *, symmetric: bool = False, signed: bool = True,
               narrow: bool = False) -> tuple[int, int]:
    """The integer codes a `bits`-bit quantizer may produce.

    affine (004 eq. 2): 0 .. 2^b - 1; symmetric signed (eq. 8): -2^(b-1) .. 2^(b-1) - 1; symmetric
    unsigned (eq. 9): 0 .. 2^b - 1. `narrow` drops one code: the most negative one when signed (eq. 10),
    the top one otherwise (eq. 11).
    """
    bits = _checks.integer("bits", bits, 1, 32)
    symmetric, signed, narrow = (_checks.boolean(n, v) for n, v in
                                 (("symmetric", symmetric), ("signed", signed), ("narrow", narrow)))
    if symmetric and signed:
        half = 2 ** (bits - 1)
        return (-half + 1 if narrow else -half), half - 1
    return 0, (2**bits - 2 if narrow else 2**bits - 1)


def reduce_dims(x: torch.Tensor, granularity: str, axis: int) -> tuple[int, ...]:
    """The dims a statistic is reduced over: all of them per tensor, all but `axis` per channel."""
    if granularity == "tensor":
        return tuple(range(x.dim()))
    return tuple(d for d in range(x.dim()) if d != axis)


def minmax(x: torch.Tensor, granularity: str = "tensor", axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of `x`, per tensor or per slice along `axis`, shaped to broadcast against x.

    Raises ValueError for an empty tensor (there is no range to estimate) or one holding NaN/Inf.
    """
    x = _checks.float_tensor("x", x)
    _checks.choice("granularity", granularity, GRANULARITIES)
    if x.numel() == 0:
        raise ValueError("x is empty; at least one value is needed to estimate a range")
    axis = _checks.axis_for("axis", axis, x.dim()) if granularity == "channel" else 0
    dims = reduce_dims(x, granularity, axis)
    x = x.detach()
    lo, hi = (x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)) if dims else (x, x)
    _checks.finite_values("x", lo, hi)  # min/max propagate NaN and Inf, so this checks all of x
    return lo, hi


def range_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a range of these tensors is kept in: float32, or float64 where one of them is (a range kept
    in bfloat16 or float16 would round every later step to 8 or 11 bits)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def quant_params(xmin: torch.Tensor | float, xmax: torch.Tensor | float, bits: int, *,
                 symmetric: bool = False, signed: bool = True, narrow: bool = False,
                 dtype: torch.dtype | None = None) -> QuantParams:
    """Scale and zero-point for the range [xmin, xmax] (a pure function; tensors broadcast).

    Affine (004 eqs. 1-3): the range is first relaxed to include 0 so that 0 is exact, then
    Δ = (xmax - xmin) / (qmax - qmin) and z = qmin - round(xmin / Δ), clamped to the codes.
    Symmetric (004 eqs. 7-11, 002 eq. 1): z = 0 and Δ = max|x| / qmax, so the largest magnitude lands
    exactly on the top code (signed: β = -α = Δ (2^(n-1) - 1) as in 002 eq. 1); unsigned:
    Δ = max(xmax, 0) / qmax.

    Degenerate ranges give a finite, documented result: a range of width zero (all zeros) gets the
    scale `SCALE_FLOOR` (float32's smallest normal number) and zero-point qmin (affine) or 0 (symmetric), so the tensor
    quantizes to exact zeros. A constant non-zero tensor is not degenerate for affine (the range is
    relaxed to include 0) and lands on a level exactly.

    The scale is float32 unless `dtype` (the dtype of the data to quantize; default: float64 if the range
    is) asks for float64, whose ranges can exceed float32's.
    """
    bits = _checks.integer("bits", bits, 1, 32)
    if symmetric and signed and bits < 2:
        raise ValueError("bits=1 is out of range for a signed symmetric quantizer; allowed: 2..32")
    qmin, qmax = code_range(bits, symmetric=symmetric, signed=signed, narrow=narrow)
    if narrow and qmax - qmin < 1:
        raise ValueError(f"bits={bits} with narrow=True leaves a single level; allowed: bits >= 2")
    # float64 throughout: a float32 range as wide as [-2e38, 2e38] overflows (hi - lo) and would make a
    # finite tensor quantize to NaN; dividing before subtracting keeps even float64's extremes finite.
    xmin, xmax = _range_end("xmin", xmin), _range_end("xmax", xmax)
    # float64 data gets a float64 scale (its range can exceed float32's); everything else float32
    if dtype is None:
        dtype = torch.float64 if torch.float64 in (xmin.dtype, xmax.dtype) else torch.float32
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xmin, xmax = xmin.to(torch.float64), xmax.to(torch.float64)
    _checks.finite_values("range", xmin, xmax)
    if bool((xmin > xmax).any()):
        raise ValueError("range is reversed: xmin must be <= xmax")
    if symmetric:
        top = torch.maximum(xmin.abs(), xmax.abs()) if signed else xmax.clamp(min=0)
        scale = _scale_as(top / qmax, scale_dtype)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
        return QuantParams(scale, zero_point, qmin, qmax)
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    scale = _scale_as(hi / (qmax - qmin) - lo / (qmax - qmin), scale_dtype)
    zero_point = (qmin - torch.round(lo / scale.double())).clamp(qmin, qmax).to(torch.int64)
    return QuantParams(scale, zero_point, qmin, qmax)


def _range_end(name: str, value: object) -> torch.Tensor:
    """A range end: a real number, or a real tensor / array (one value per channel)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | torch.Tensor | np.ndarray | list | tuple):
        raise TypeError(f"{name} must be a real number or a tensor of them, got {type(value).__name__}")
    try:
        t = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must hold real numbers, got {value!r:.80}") from err
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype.is_signed or
                                                       t.dtype == torch.uint8):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.layout != torch.strided or t.device.type == "meta":
        raise TypeError(f"{name} must be a dense tensor with values, got layout {t.layout} on {t.device}")
    return t


def _scale_as(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale in `dtype`, at least SCALE_FLOOR. A float32 tensor spanning more than float32's largest
    value (1-bit codes over [-3e38, 3e38]) needs a scale float32 cannot hold: that one stays float64."""
    if dtype == torch.float32 and bool((scale > torch.finfo(torch.float32).max).any()):
        dtype = torch.float64
    return scale.clamp(SCALE_FLOOR, torch.finfo(dtype).max).to(dtype)


class MinMaxObserver(nn.Module):
    """Running minimum and maximum of everything seen: the weight observer of 004 §2.5.

    Per tensor, or per channel along `axis`. Call it on a tensor (it returns the tensor unchanged) and
    read `.min_val` / `.max_val`, or `.qparams(bits, ...)`.
    """

    def __init__(self, granularity: str = "tensor", axis: int = 0):
        super().__init__()
        _checks.choice("granularity", granularity, GRANULARITIES)
        self.granularity = granularity
        self.axis = _checks.integer("axis", axis)
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.min_val.numel() == 0:
            dtype = range_dtype(lo)
            self.min_val, self.max_val = lo.to(dtype, copy=True), hi.to(dtype, copy=True)
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The range has no size until data was seen, so a checkpoint of a calibrated model would not load
        # into a fresh quantized copy ("size mismatch"): the buffers take the checkpoint's shapes first.
        for name in ("min_val", "max_val"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = minmax(x, self.granularity, self.axis)
        if self.min_val.numel() and self.granularity == "channel" and lo.numel() != self.min_val.numel():
            raise ValueError(f"x has {lo.numel()} channels along axis {self.axis}, but this observer has seen "
                             f"{self.min_val.numel()}; allowed: tensors with {self.min_val.numel()} channels "
                             "(or reset the observer)")
        if self.min_val.numel() and lo.dim() != self.min_val.dim():
            lo, hi = lo.reshape(self.min_val.shape), hi.reshape(self.max_val.shape)
        self._update(lo, hi)
        return x

    @property
    def initialized(self) -> bool:
        return self.min_val.numel() > 0

    def qparams(self, bits: int, *, symmetric: bool = False, signed: bool = True,
                narrow: bool = False) -> QuantParams:
        if not self.initialized:
            raise ValueError("the observer has seen no data yet; call it on a tensor first")
        return quant_params(self.min_val, self.max_val, bits, symmetric=symmetric, signed=signed,
                            narrow=narrow)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch minimum and maximum: the activation observer of 004 §2.5.

    range <- (1 - momentum) * range + momentum * batch range; the first batch sets the range.
    """

    def __init__(self, momentum: float = 0.01, granularity: str = "tensor", axis: int = 0):
        super().__init__(granularity, axis)
        self.momentum = _checks.real("momentum", momentum, 0.0, 1.0, lo_open=True)

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.min_val.numel() == 0:  # the first batch sets the range, as MinMaxObserver's does
            super()._update(lo, hi)
        else:  # lerp takes one dtype: a float32 range meets bf16 activations under autocast
            dtype = range_dtype(self.min_val, lo)
            self.min_val = torch.lerp(self.min_val.to(dtype), lo.to(dtype), self.momentum)
            self.max_val = torch.lerp(self.max_val.to(dtype), hi.to(dtype), self.momentum)
