"""Fake quantizers for every scheme qviz explores, each with its straight-through estimator (STE).

`fake_quantize(x, spec)` returns a tensor of x's shape whose values lie on the scheme's level set; its
backward pass is the scheme's STE (or the one `spec.ste` names). Statistics a scheme estimates from the
data (ranges, mean |w|, thresholds) are computed from `x` and treated as constants in the backward
pass, as the observers of 004 §2.5 do.

Papers are cited by number (000 = Liu, 001 = Ivan, 002 = Boo et al., 003 = Kütükcü, 004 = Krishnamoorthi);
docs/references.md gives authors, titles, years and arXiv identifiers.

STEs (the `ste` field), all masks on the quantizer's input x:

- ``identity``  dq/dx = 1 everywhere (003 eq. 2-18)
- ``clipped``   dq/dx = 1 inside the quantizer's range, 0 outside (004 eqs. 14-15)
- ``saturated`` dq/dx = 1{|x| <= 1} (000 §2.4.1, 003 eq. 3-4, the hard-tanh STE of BNN)

Where a scheme scales its input before rounding (``ceil``: w / max|w|, ``dorefa``: tanh), the STE
replaces the derivative of the rounding step only and the chain rule keeps the scaling's derivative.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from qviz import _checks
from qviz.engine import fused
from qviz.engine.observers import GRANULARITIES, SCALE_FLOOR, minmax, quant_params, reduce_dims

STES = ("identity", "clipped", "saturated")

# While a model is exported to ONNX: "prepare" (a plain forward pass in which every quantizer computes its
# QuantizeLinear/DequantizeLinear parameters from the weights and calibrated ranges), then "trace" (the
# exporter's pass, where quantizers emit PyTorch's own fake-quantize ops with those numbers as constants).
EXPORTING = contextvars.ContextVar("qviz_exporting", default=None)
DELTA_RULES = ("twn", "exact")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What to quantize with: a scheme name, its bit width and its parameters.

    scheme       one of `SCHEMES` (see the table in DESIGN.md and `describe_schemes()`)
    bits         bit width; each scheme has its allowed range (`SCHEMES[name].bits`)
    granularity  "tensor" (one set of statistics, "per-layer") or "channel" (one per slice along axis)
    axis         the channel axis for granularity="channel"
    narrow       uniform schemes: drop one code (004 eqs. 10-11)
    ste          None for the scheme's own STE, or one of `STES`
    signed       symmetric: signed (eq. 8) or unsigned (eq. 9) codes; a scalar `clip` means (-c, c)
                 when signed and (0, c) when not
    clip         a fixed range instead of one estimated from the data: a scalar c or, for the
                 uniform schemes, a pair (lo, hi). relu/pact/ceil_act: the upper clip; ceil: max|w|
    alpha        ceil: the trainable scale α (default 1); pact: the initial clip α
    delta_rule   ternary: "twn" (Δ = 0.7 E|w|) or "exact" (the search of 003 eq. 3-14)
    """

    scheme: str = "affine"
    bits: int = 8
    granularity: str = "tensor"
    axis: int = 0
    narrow: bool = False
    ste: str | None = None
    signed: bool = True
    clip: float | tuple[float, float] | None = None
    alpha: float | None = None
    delta_rule: str = "twn"

    def __post_init__(self):
        _checks.choice("scheme", self.scheme, SCHEMES)
        scheme = SCHEMES[self.scheme]
        lo, hi = scheme.bits_for(self)
        # stored as plain Python values: numpy integers and bools are welcome, and equal specs hash equal
        object.__setattr__(self, "bits", _checks.integer("bits", self.bits, lo, hi))
        _checks.choice("granularity", self.granularity, GRANULARITIES)
        object.__setattr__(self, "axis", _checks.integer("axis", self.axis))
        object.__setattr__(self, "narrow", _checks.boolean("narrow", self.narrow))
        object.__setattr__(self, "signed", _checks.boolean("signed", self.signed))
        if self.ste is not None:
            _checks.choice("ste", self.ste, STES)
        _checks.choice("delta_rule", self.delta_rule, DELTA_RULES)
        if self.narrow and not scheme.takes_narrow:
            raise ValueError(f"narrow=True is not used by scheme {self.scheme!r}; "
                             f"schemes that take narrow: {_names_with('takes_narrow')}")
        if self.clip is not None:
            self._check_clip(scheme)
        if self.alpha is not None:
            if not scheme.takes_alpha:
                raise ValueError(f"alpha is not used by scheme {self.scheme!r}; "
                                 f"schemes that take alpha: {_names_with('takes_alpha')}")
            object.__setattr__(self, "alpha", _checks.real("alpha", self.alpha, 0.0, lo_open=True))

    def _check_clip(self, scheme: Scheme) -> None:
        if not scheme.takes_clip:
            raise ValueError(f"clip is not used by scheme {self.scheme!r}; "
                             f"schemes that take clip: {_names_with('takes_clip')}")
        if isinstance(self.clip, tuple | list):
            if not scheme.takes_clip_pair:
                raise ValueError(f"clip for scheme {self.scheme!r} must be one positive number, "
                                 f"got {self.clip!r}")
            if len(self.clip) != 2:
                raise ValueError(f"clip must be a number or a pair (lo, hi), got {self.clip!r}")
            lo = _checks.real("clip[0]", self.clip[0])
            hi = _checks.real("clip[1]", self.clip[1])
            if not lo < hi:
                raise ValueError(f"clip=({lo:g}, {hi:g}) is empty; allowed: lo < hi")
            object.__setattr__(self, "clip", (lo, hi))
        else:
            object.__setattr__(self, "clip", _checks.real("clip", self.clip, 0.0, lo_open=True))

    def replace(self, **changes) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def max_levels(self) -> int:
        """The most distinct output values this spec can produce per tensor or channel."""
        return SCHEMES[self.scheme].max_levels(self)


# --------------------------------------------------------------------------------------------------
# The autograd functions behind every scheme


def _grad_only(t: torch.Tensor) -> torch.Tensor:
    """Zero in value, the identity for gradients: q.detach() + _grad_only(x) * g has q's values and
    passes grad * g to x."""
    return t - t.detach()


def _run(fn: type[torch.autograd.Function], *args):
    """fn.apply(*args); while a torch.func transform runs (grad, vmap: per-sample gradients as Opacus
    computes them), fn.by_ops(*args): the same values and gradients from differentiable ops, which the
    transforms batch and differentiate. fn's own form keeps state in ctx outside setup_context (PACT's
    fused kernel reads storage, which the transforms' wrapped tensors lack), which they refuse."""
    return fn.by_ops(*args) if _checks.transforming() else fn.apply(*args)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized values q (computed without autograd). Backward: grad * mask.

    `mask` is the scheme's STE evaluated on the input; None means the identity STE.
    """

    @staticmethod
    def by_ops(x, q, mask):
        g = _grad_only(x)
        return q.detach() + (g if mask is None else g * mask)

    @staticmethod
    def forward(ctx, x, q, mask):
        ctx.save_for_backward(mask)
        ctx.identity = mask is None
        return q

    @staticmethod
    def backward(ctx, grad):
        if ctx.identity:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


class _PACT(torch.autograd.Function):
    """PACT (002 §2.2): q = round_half_up(clamp(x, 0, α) / Δ) Δ with Δ = α / (2^k - 1).

    Backward (PACT's STE): dq/dx = 1{0 <= x <= α} (the clipped STE; `ste` may swap it for identity or
    saturated), dq/dα = 1{x >= α}. Written as few full-tensor passes as possible: it runs on every
    activation of every training step.
    """

    @staticmethod
    def by_ops(x, alpha, levels, ste):
        bound = alpha.detach().clamp(min=SCALE_FLOOR)
        step = bound / levels
        q = (torch.minimum(x.detach().clamp(min=0), bound) / step + 0.5).floor() * step
        q = q.clamp(max=torch.finfo(x.dtype).max)
        inside = {"clipped": (x.detach() >= 0) & (x.detach() <= bound), "saturated": x.detach().abs() <= 1}.get(ste)
        g = _grad_only(x)
        return q + (g if inside is None else g * inside) + _grad_only(alpha) * (x.detach() >= bound)

    @staticmethod
    def forward(ctx, x, alpha, levels, ste):
        a = max(float(alpha.detach().max()), SCALE_FLOOR) if alpha.numel() == 1 else None
        ctx.alpha_shape = alpha.shape
        ctx.fused = a is not None and a <= torch.finfo(torch.float32).max / 2 and fused.usable(x)
        if ctx.fused:
            q, state = fused.clip_round(x, a, a / levels, ste)
            ctx.save_for_backward(state)
            return q
        bound = a if a is not None else alpha.detach().clamp(min=SCALE_FLOOR)
        clipped = x.clamp(0.0, a) if a is not None else torch.minimum(x.clamp(min=0), bound)
        if ste == "clipped":
            inside = clipped == x  # exactly where 0 <= x <= α
        elif ste == "saturated":
            inside = x.abs() <= 1
        else:
            inside = None
        above = x >= bound
        step = bound / levels
        q = clipped.div_(step).add_(0.5).floor_().mul_(step)
        if a is not None and a > torch.finfo(x.dtype).max / 2:  # the top level may round past the largest float
            q.clamp_(max=torch.finfo(x.dtype).max)
        ctx.save_for_backward(above, inside)
        return q

    @staticmethod
    def backward(ctx, grad):
        if ctx.fused:
            (state,) = ctx.saved_tensors
            grad_x, above_sum = fused.masked_backward(grad, state)
            grad_alpha = torch.full(ctx.alpha_shape, above_sum) if ctx.needs_input_grad[1] else None
            return grad_x, grad_alpha, None, None
        above, inside = ctx.saved_tensors
        grad_x = grad if inside is None else grad * inside
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = torch.where(above, grad, 0.0).sum_to_size(ctx.alpha_shape)
        return grad_x, grad_alpha, None, None


# --------------------------------------------------------------------------------------------------
# Schemes


class Scheme:
    """One quantization scheme: its forward rule, its statistics, its level set and its STE, and every fact
    about it that layers, models and explorers act on (they never branch on a scheme's name).

    Subclasses set the class attributes and implement `stats`, `quantize`, `span`, `levels` and
    `thresholds`; `apply` wires the forward values to the STE. `register_scheme` adds one.
    """

    name = ""
    source = ""  # the paper and equation, resolved by the references table (docs/references.md)
    summary = ""
    label = ""  # how menus name it; the name itself when empty
    bits: tuple[int, int] = (1, 16)  # the bit widths it allows (symmetric signed: from 2, see bits_for)
    default_ste = "clipped"
    kind = "weights"  # "weights" or "activations": what the papers quantize with it
    stochastic = False  # draws random numbers: two calls on one tensor may differ
    stochastic_twin: str | None = None  # the scheme QAT may train with instead (004 §2.3, §4)
    observed = False  # as an activation quantizer its range comes from a moving-average observer (004 §2.5)
    nonlinearity = False  # replaces the ReLU before it (BNN's sign activation, 003 eq. 3-5)
    clips_at_zero = False  # with a learnable α its forward is clip(x, 0, α): a ReLU before it changes nothing
    onnx = False  # QuantizeLinear/DequantizeLinear can express it exactly (uniform codes, up to 8 bits)
    takes_clip = False
    takes_clip_pair = False
    takes_alpha = False  # takes α, as a number (spec.alpha) or a learnable tensor (fake_quantize's alpha)
    takes_narrow = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)

        def owner(name):
            return next(c for c in cls.__mro__ if name in c.__dict__)

        # a subclass that changes `quantize` but not `fused` must not inherit its parent's fused path
        cls.fuses = issubclass(owner("fused"), owner("quantize"))

    @property
    def menu_label(self) -> str:
        return self.label or self.name

    def bits_for(self, spec: QuantSpec) -> tuple[int, int]:
        return self.bits

    def max_levels(self, spec: QuantSpec) -> int:
        return 2**spec.bits

    # Statistics, shaped to broadcast against x. `alpha` is a tensor override (learnable parameter).
    def stats(self, x: torch.Tensor, spec: QuantSpec, alpha: torch.Tensor | None) -> dict:
        _checks.finite_values("x", x)
        return {}

    def apply_stats(self, x: torch.Tensor, spec: QuantSpec, alpha: torch.Tensor | None) -> dict:
        """The statistics `apply` needs (all of `stats` unless a scheme's apply does without some)."""
        return self.stats(x, spec, alpha)

    def quantize(self, x: torch.Tensor, spec: QuantSpec, st: dict, generator) -> torch.Tensor:
        raise NotImplementedError

    def span(self, spec: QuantSpec, st: dict) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The input range of the `clipped` STE."""
        raise NotImplementedError

    def clipped_mask(self, x: torch.Tensor, spec: QuantSpec, st: dict) -> torch.Tensor:
        lo, hi = self.span(spec, st)
        return (x >= lo) & (x <= hi)

    def levels(self, spec: QuantSpec, st: dict) -> torch.Tensor:
        """Output levels, shape [*stat_shape, L] (sorted along the last dim)."""
        raise NotImplementedError

    def thresholds(self, spec: QuantSpec, st: dict) -> torch.Tensor:
        """Decision thresholds between consecutive levels, shape [*stat_shape, L - 1]."""
        raise NotImplementedError

    def expected(self, x: torch.Tensor, spec: QuantSpec, st: dict) -> torch.Tensor:
        """E[q(x)]: q itself for a deterministic scheme."""
        return self.quantize(x, spec, st, None)

    def qdq_params(self, x: torch.Tensor, spec: QuantSpec, alpha: torch.Tensor | None):
        """(scale, zero_point, qmin, qmax, axis or None) of the uniform code grid this scheme quantizes to,
        for schemes with onnx = True (what QuantizeLinear/DequantizeLinear need)."""
        raise NotImplementedError(f"scheme {self.name!r} has no uniform code grid to export")

    def ste_mask(self, x: torch.Tensor, spec: QuantSpec, st: dict) -> torch.Tensor | None:
        ste = spec.ste or self.default_ste
        if ste == "identity":
            return None
        mask = self.clipped_mask(x, spec, st) if ste == "clipped" else x.abs() <= 1
        return mask.to(x.dtype)

    def fused(self, x: torch.Tensor, spec: QuantSpec, st: dict, ste: str | None):
        """(q, state) from one fused pass (see fused.py), `state` holding the STE `ste` (None: no state),
        or None where this scheme or these statistics have no fused path."""
        return None

    def apply(self, x: torch.Tensor, spec: QuantSpec, st: dict, alpha, generator) -> torch.Tensor:
        ste = spec.ste or self.default_ste
        wanted = ste if x.requires_grad and ste != "identity" else None
        fast = self.fused(x.detach(), spec, st, wanted) if self.fuses and fused.usable(x) else None
        if fast is not None:
            q, state = fast
            if not x.requires_grad:
                return q
            return _run(_StraightThrough, x, q, None) if state is None else fused.StraightThrough.apply(x, q, state)
        q = self.quantize(x.detach(), spec, st, generator)
        if not x.requires_grad:
            return q
        return _run(_StraightThrough, x, q, self.ste_mask(x.detach(), spec, st))


def _reduce(x: torch.Tensor, spec: QuantSpec, fn) -> torch.Tensor:
    """fn over the dims a statistic covers, keepdim (all dims per tensor, all but axis per channel)."""
    if x.numel() == 0:
        raise ValueError(f"x is empty; scheme {spec.scheme!r} needs at least one value for its statistics")
    axis = _checks.axis_for("axis", spec.axis, x.dim()) if spec.granularity == "channel" else 0
    dims = reduce_dims(x, spec.granularity, axis)
    if dims:
        out = fn(x, dims)
    else:
        # every statistic covers one value (a 0-d tensor, or a 1-d tensor per channel): reduce over a unit
        # dim, so that mean |w| is |w| and not w (torch reduces over all dims when given none)
        out = fn(x.unsqueeze(-1), (x.dim(),)).squeeze(-1)
    _checks.finite_values("x", out)
    return out


def _mean(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """mean over dims (keepdim) that cannot overflow: a float32 sum of values near 3e38 would be inf.

    When the sum could overflow, each slice is summed in units of its own largest magnitude (a global
    unit would push small slices into subnormals and cost them precision).
    """
    top = float(t.detach().abs().amax()) if t.numel() else 0.0
    if top * t.numel() < torch.finfo(t.dtype).max / 2:
        return t.mean(dim=dims, keepdim=True)
    unit = t.detach().abs().amax(dim=dims, keepdim=True).clamp(min=torch.finfo(t.dtype).tiny)
    return (t / unit).mean(dim=dims, keepdim=True) * unit


def _finite_limit(bound: torch.Tensor | float, dtype: torch.dtype) -> float | None:
    """The largest finite value of `dtype` when a level could round past it (else None: no clamp needed).

    Levels are computed from a scale and codes; at the very top of a dtype's range the product can round
    one step beyond the largest finite number and turn a finite input into inf.
    """
    limit = torch.finfo(dtype).max
    if isinstance(bound, torch.Tensor) and _checks.vmapped(bound):  # no value to read: the clamp does no harm
        return limit
    return limit if float(torch.as_tensor(bound, dtype=torch.float64).abs().max()) >= limit / 2 else None


def _stat_shape(x: torch.Tensor, spec: QuantSpec) -> tuple[int, ...]:
    """The keepdim shape of a per-tensor or per-channel statistic of x."""
    if spec.granularity == "tensor":
        return (1,) * x.dim()
    axis = _checks.axis_for("axis", spec.axis, x.dim())
    return tuple(n if d == axis else 1 for d, n in enumerate(x.shape))


def _in_range_of(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A fixed clip or α as a tensor of the data's dtype, or float64 when the dtype cannot hold it (a clip of
    1e300 is finite and legal; its levels lie beyond float32, so the quantizer computes in float64)."""
    wide = abs(value) > torch.finfo(dtype).max
    return torch.tensor(value, dtype=torch.float64 if wide else dtype)


def _widened(x: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """x in the dtype of a statistic that needed more range than x's dtype has (see _in_range_of)."""
    return x.to(stat.dtype) if stat.dtype == torch.float64 and x.dtype != torch.float64 else x


def _span_levels(lo, hi, count: int) -> torch.Tensor:
    """`count` evenly spaced values from lo to hi along a new last dim."""
    t = torch.linspace(0, 1, count, dtype=torch.float32)
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    return lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * t


class _Uniform(Scheme):
    """Uniform quantizer with scale Δ and integer zero-point z (004 eqs. 1-3, 7-11).

    q = (clamp(round(x / Δ) + z, qmin, qmax) - z) Δ, rounding half to even and multiplying by 1/Δ
    exactly as torch.fake_quantize_per_tensor_affine does, so both agree bit for bit.
    STE (004 eqs. 14-15): gradient 1 where the unclamped code lies in [qmin, qmax] — PyTorch's mask.
    """

    takes_clip = True
    takes_clip_pair = True
    takes_narrow = True
    symmetric = False

    def bits_for(self, spec):
        return (2, 16) if self.symmetric and spec.signed else (1, 16)

    def max_levels(self, spec):
        return 2**spec.bits - (1 if spec.narrow else 0)

    def _range(self, x, spec):
        if spec.clip is None:
            return minmax(x, spec.granularity, spec.axis) if x.numel() else _empty_range(spec)
        _checks.finite_values("x", x)
        lo, hi = spec.clip if isinstance(spec.clip, tuple) else (-spec.clip if spec.signed else 0.0, spec.clip)
        return _in_range_of(lo, x.dtype), _in_range_of(hi, x.dtype)

    def stats(self, x, spec, alpha):
        lo, hi = self._range(x, spec)
        p = quant_params(lo, hi, spec.bits, symmetric=self.symmetric, signed=spec.signed, narrow=spec.narrow,
                         dtype=x.dtype)
        zero_point = p.zero_point.to(torch.float32)
        top_code = torch.maximum((p.qmin - zero_point).abs(), (p.qmax - zero_point).abs())
        return {"scale": p.scale, "zero_point": zero_point, "qmin": p.qmin, "qmax": p.qmax,
                "limit": _finite_limit(top_code.double() * p.scale.double(), x.dtype)}

    def _code(self, x, st):
        # a float32 tensor spanning beyond float32's range has a float64 scale (see quant_params); compute
        # in float64 then, since a 0-d float64 scale would not promote x and 1/scale would underflow
        return torch.round(x.to(st["scale"].dtype) * (1.0 / st["scale"])) + st["zero_point"]

    def _dequantize(self, code, st):
        return (code.clamp(st["qmin"], st["qmax"]) - st["zero_point"]) * st["scale"]

    def quantize(self, x, spec, st, generator):
        fast = self.fused(x, spec, st, None) if fused.usable(x) else None
        if fast is not None:
            return fast[0]
        return _within(self._dequantize(self._code(x, st), st), st).to(x.dtype)

    def fused(self, x, spec, st, ste):
        scale = st["scale"]
        if scale.numel() != 1 or scale.dtype != torch.float32 or st["limit"] is not None or ste == "saturated":
            return None
        return fused.uniform(x, float(1.0 / scale), float(st["zero_point"]), float(st["qmin"]), float(st["qmax"]),
                             float(scale), with_mask=ste == "clipped")

    def span(self, spec, st):
        return (_within((st["qmin"] - st["zero_point"]) * st["scale"], st),
                _within((st["qmax"] - st["zero_point"]) * st["scale"], st))

    def clipped_mask(self, x, spec, st):
        code = self._code(x, st)
        return (code >= st["qmin"]) & (code <= st["qmax"])

    def qdq_params(self, x, spec, alpha):
        st = self.stats(x, spec, alpha)
        axis = _checks.axis_for("axis", spec.axis, x.dim()) if spec.granularity == "channel" else None
        return st["scale"], st["zero_point"].round().to(torch.int64), st["qmin"], st["qmax"], axis

    def levels(self, spec, st):
        codes = torch.arange(st["qmin"], st["qmax"] + 1, dtype=torch.float32)
        return _within((codes - st["zero_point"].unsqueeze(-1)) * st["scale"].unsqueeze(-1), st)

    def thresholds(self, spec, st):
        codes = torch.arange(st["qmin"], st["qmax"], dtype=torch.float32) + 0.5
        return _within((codes - st["zero_point"].unsqueeze(-1)) * st["scale"].unsqueeze(-1), st)


def _within(t: torch.Tensor, st: dict) -> torch.Tensor:
    """t clamped to the finite range when the stats found that its top level could round past it."""
    limit = st.get("limit")
    return t if limit is None else t.clamp(-limit, limit)


def _empty_range(spec):
    raise ValueError(f"x is empty; scheme {spec.scheme!r} needs at least one value to estimate a range "
                     "(or give a fixed range with clip=...)")


class Affine(_Uniform):
    name, source = "affine", "004 eqs. 1-3"
    summary = "uniform affine, integer zero-point, range relaxed to include 0"
    stochastic_twin = "stochastic"
    observed = onnx = True


class Symmetric(_Uniform):
    name, source = "symmetric", "004 eqs. 7-11"
    summary = "zero-point 0, signed or unsigned; narrow=True drops the most negative level"
    observed = onnx = True
    symmetric = True


class Stochastic(_Uniform):
    """Affine with uniform noise before rounding (004 §2.3).

    We read the noise ε ~ U(-1/2, 1/2) of 004 §2.3 in units of the step Δ: x_int = round(x/Δ + ε) + z.
    That is the reading under which "in expectation the stochastic quantizer reduces to a pass-through
    of the floating point weights, with saturation" (004 §2.3) holds; noise of half a unit of x would
    swamp any step smaller than 1.
    """

    name, source = "stochastic", "004 §2.3"
    summary = "affine with uniform noise of up to half a step before rounding"
    stochastic = True
    observed = True

    def quantize(self, x, spec, st, generator):
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 0.5
        code = torch.round(x.to(st["scale"].dtype) * (1.0 / st["scale"]) + noise) + st["zero_point"]
        return _within(self._dequantize(code, st), st).to(x.dtype)

    def expected(self, x, spec, st):
        v = x.to(st["scale"].dtype) * (1.0 / st["scale"]) + st["zero_point"]
        low = torch.floor(v)
        p_up = v - low  # round(v + ε) = floor(v) + 1 with probability frac(v)
        clamp = lambda c: c.clamp(st["qmin"], st["qmax"])  # noqa: E731
        return _within(((1 - p_up) * clamp(low) + p_up * clamp(low + 1) - st["zero_point"]) * st["scale"], st)


class _Sign(Scheme):
    bits = (1, 1)
    default_ste = "saturated"

    def span(self, spec, st):
        return -1.0, 1.0

    def quantize(self, x, spec, st, generator):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    def levels(self, spec, st):
        return torch.tensor([-1.0, 1.0])

    def thresholds(self, spec, st):
        return torch.tensor([0.0])


class Binary(_Sign):
    """BinaryConnect (003 eq. 3-1): +1 if w >= 0 else -1.

    BinaryConnect clips the float weights to [-1, 1] after each update; as an STE that is the
    `saturated` mask 1{|w| <= 1} (003 eq. 3-4), the default here.
    """

    name, source = "binary", "003 eq. 3-1"
    summary = "BinaryConnect sign, weights clipped to [-1, 1]"
    label = "binary (sign)"
    stochastic_twin = "binary_stochastic"


class BinaryStochastic(_Sign):
    """Stochastic BinaryConnect (003 eqs. 3-2, 3-3): +1 with probability hard_sigmoid(w) = clip((w+1)/2, 0, 1)."""

    name, source = "binary_stochastic", "003 eqs. 3-2, 3-3"
    summary = "+1 with probability hard_sigmoid(w)"
    stochastic = True

    def quantize(self, x, spec, st, generator):
        p = ((x + 1) / 2).clamp(0, 1)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return torch.where(u < p, 1.0, -1.0).to(x.dtype)

    def expected(self, x, spec, st):
        return 2 * ((x + 1) / 2).clamp(0, 1) - 1


class BnnAct(_Sign):
    """BNN activation (003 eqs. 3-4, 3-5): sign(x) forward, the hard-tanh STE 1{|x| <= 1} backward."""

    name, source = "bnn_act", "003 eqs. 3-4, 3-5"
    summary = "sign with the htanh STE"
    label = "BNN sign"
    kind = "activations"
    nonlinearity = True


class Xnor(Scheme):
    """XNOR-Net / DoReFa binary weights (003 eq. 3-6): q = sign(w) E|w|, E per tensor or per channel."""

    name, source = "xnor", "003 eq. 3-6"
    summary = "sign(w) * mean |w|"
    label = "binary (xnor)"
    bits = (1, 1)
    default_ste = "saturated"

    def stats(self, x, spec, alpha):
        return {"alpha": _reduce(x.abs(), spec, _mean)}

    def quantize(self, x, spec, st, generator):
        return torch.where(x >= 0, st["alpha"], -st["alpha"]).to(x.dtype)

    def span(self, spec, st):
        return -1.0, 1.0

    def levels(self, spec, st):
        a = st["alpha"].unsqueeze(-1)
        return torch.cat([-a, a], dim=-1)

    def thresholds(self, spec, st):
        return torch.zeros_like(st["alpha"]).unsqueeze(-1)


class Ternary(Scheme):
    """Ternary weight networks (003 eqs. 3-10 ... 3-14): q ∈ {-α, 0, α}.

    q = α sign(w) where |w| > Δ, else 0; α = mean |w| over |w| > Δ (eq. 3-13). Δ = 0.7 E|w| (the TWN
    rule, delta_rule="twn") or the exact maximiser of (Σ_{|w|>Δ} |w|)² / |I_Δ| (eq. 3-14,
    delta_rule="exact"), found by sorting |w| and trying every achievable set I_Δ.
    """

    name, source = "ternary", "003 eqs. 3-10 ... 3-14"
    summary = "TWN: delta = 0.7 E|w|, alpha = mean |w| over |w| > delta"
    label = "ternary (TWN)"
    bits = (2, 2)
    default_ste = "identity"

    def max_levels(self, spec):
        return 3

    def stats(self, x, spec, alpha):
        if spec.granularity == "tensor" and spec.delta_rule == "twn" and fused.usable(x):
            return self._fused_stats(x)
        a = x.abs()
        if spec.delta_rule == "twn":
            delta = 0.7 * _reduce(a, spec, _mean)
        else:
            delta = _exact_ternary_delta(a, spec, _stat_shape(a, spec))
        kept = torch.where(a > delta, a, 0.0)
        count = _reduce(kept > 0, spec, lambda t, d: t.sum(dim=d, keepdim=True))
        # α = mean of the kept |w|, summed in units of max|w| so that no sum can overflow
        top = _reduce(a, spec, lambda t, d: t.amax(dim=d, keepdim=True)).clamp(min=torch.finfo(a.dtype).tiny)
        total = _reduce(kept / top, spec, lambda t, d: t.sum(dim=d, keepdim=True))
        alpha = torch.where(count > 0, total / count.clamp(min=1) * top, 0.0).to(x.dtype)
        return {"delta": delta, "alpha": alpha, "top": _reduce(a, spec, lambda t, d: t.amax(dim=d, keepdim=True))}

    @staticmethod
    def _fused_stats(x):
        total, top = fused.abs_stats(x)
        if not math.isfinite(total):
            _checks.finite_values("x", x)  # raises unless finite checks are off
        delta = np.float32(0.7) * np.float32(total / x.numel())
        kept, count = fused.kept(x, float(delta))
        alpha = kept / count if count else 0.0
        shape = (1,) * x.dim()
        return {"delta": torch.full(shape, float(delta)), "alpha": torch.full(shape, alpha),
                "top": torch.full(shape, top)}

    def fused(self, x, spec, st, ste):
        if st["delta"].numel() != 1 or st["delta"].dtype != torch.float32 or ste is not None:
            return None
        return fused.ternary(x, float(st["delta"]), float(st["alpha"])), None

    def quantize(self, x, spec, st, generator):
        fast = self.fused(x, spec, st, None) if fused.usable(x) else None
        if fast is not None:
            return fast[0]
        zero = torch.zeros((), dtype=x.dtype)
        return torch.where(x > st["delta"], st["alpha"], torch.where(x < -st["delta"], -st["alpha"], zero)).to(x.dtype)

    def span(self, spec, st):
        return -st["top"], st["top"]

    def levels(self, spec, st):
        a = st["alpha"].unsqueeze(-1)
        return torch.cat([-a, torch.zeros_like(a), a], dim=-1)

    def thresholds(self, spec, st):
        d = st["delta"].unsqueeze(-1)
        return torch.cat([-d, d], dim=-1)


def _exact_ternary_delta(a: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Δ* of 003 eq. 3-14 per tensor or channel: argmax over achievable sets I_Δ of (Σ|w|)² / |I_Δ|."""
    if spec.granularity == "channel":
        axis = _checks.axis_for("axis", spec.axis, a.dim())
        rows = a.movedim(axis, 0).reshape(a.shape[axis], -1)
    else:
        rows = a.reshape(1, -1)
    s, _ = rows.double().sort(dim=1, descending=True)
    # the objective's argmax does not change when a row is divided by its largest value, and then no
    # cumulative sum of float64 extremes can overflow
    unit = s[:, :1].clamp(min=torch.finfo(torch.float64).tiny)
    objective = (s / unit).cumsum(dim=1) ** 2 / torch.arange(1, s.shape[1] + 1, dtype=s.dtype)
    below = torch.cat([s[:, 1:], torch.zeros_like(s[:, :1])], dim=1)
    # I_Δ = the j largest values is achievable only where the j-th value is strictly above the next one.
    objective = torch.where(s > below, objective, torch.full_like(objective, -1.0))
    j = objective.argmax(dim=1, keepdim=True)
    delta = s.gather(1, j) / 2 + below.gather(1, j) / 2
    return delta.to(a.dtype).reshape(shape)


class Dorefa(Scheme):
    """DoReFa k-bit weights (003 eq. 3-8): q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1.

    For k = 1 DoReFa uses q = sign(w) E|w| (003 eq. 3-6). The STE (identity by default) replaces the
    derivative of quantize_k; the tanh normalisation keeps its own derivative (1 - tanh²(w)) / max|tanh|.
    """

    name, source = "dorefa", "003 eq. 3-8"
    summary = "DoReFa k-bit weights via tanh"
    label = "DoReFa"
    default_ste = "identity"

    def stats(self, x, spec, alpha):
        if spec.bits == 1:
            return {"alpha": _reduce(x.abs(), spec, _mean)}
        # max|tanh(w)| = tanh(max|w|); reducing |w| first also lets NaN/Inf reach the finite check
        top = _reduce(x.abs(), spec, lambda t, d: t.amax(dim=d, keepdim=True))
        return {"m": torch.tanh(top).clamp(min=SCALE_FLOOR)}

    def _normalise(self, x, st):
        return torch.tanh(x) / (2 * st["m"]) + 0.5

    def quantize(self, x, spec, st, generator):
        if spec.bits == 1:
            return torch.where(x >= 0, st["alpha"], -st["alpha"]).to(x.dtype)
        n = 2**spec.bits - 1
        return (2 * torch.round(self._normalise(x, st) * n) / n - 1).to(x.dtype)

    def apply(self, x, spec, st, alpha, generator):
        if spec.bits == 1 or not x.requires_grad:
            return super().apply(x, spec, st, alpha, generator)
        n = 2**spec.bits - 1
        u = self._normalise(x, st)
        qu = _run(_StraightThrough, u, torch.round(u.detach() * n) / n, self.ste_mask(x.detach(), spec, st))
        return 2 * qu - 1

    def span(self, spec, st):
        return -math.inf, math.inf

    def levels(self, spec, st):
        if spec.bits == 1:
            a = st["alpha"].unsqueeze(-1)
            return torch.cat([-a, a], dim=-1)
        shape = st["m"].shape
        return _span_levels(torch.full(shape, -1.0), torch.full(shape, 1.0), 2**spec.bits)

    def thresholds(self, spec, st):
        if spec.bits == 1:
            return torch.zeros_like(st["alpha"]).unsqueeze(-1)
        n = 2**spec.bits - 1
        u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        return torch.atanh((u - 0.5) * 2 * st["m"].unsqueeze(-1))


class Ceil(Scheme):
    """Q_b without a zero level, weights scaled by a trainable α (001 eqs. 3, 4).

    q = |α| Q_b(ŵ), ŵ = clamp(w / max|w|, -1, 1) and Q_b(u) = ceil(u 2^(b-1)) / 2^(b-1) for u > 0,
    floor(u 2^(b-1)) / 2^(b-1) for u < 0: levels ±|α| k / 2^(b-1), k = 1 .. 2^(b-1); Q_1 = sign.
    We read 001 eq. 4 as scaling w to [-1, 1] before Q_b and by |α| after it, so that the levels stay
    the 2^b of eq. 3 for any α. Eq. 3 maps exactly 0 to 0, which the paper dismisses as having
    probability 2^-32n; we lift 0 to the smallest positive level so that the scheme never outputs 0.
    max|w| comes from the data or from `clip`. Backward: dq/dw = STE mask * |α| / max|w| (identity STE
    on Q_b inside [-max|w|, max|w|]), dq/dα = sign(α) Q_b(ŵ).
    """

    name, source = "ceil", "001 eqs. 3, 4"
    summary = "Q_b without a zero level, weights scaled by a trainable alpha"
    label = "ceil (Q_b)"
    takes_clip = True
    takes_alpha = True

    def stats(self, x, spec, alpha):
        if spec.clip is not None:
            _checks.finite_values("x", x)
            m = _in_range_of(spec.clip, x.dtype)
        else:
            m = _reduce(x.abs(), spec, lambda t, d: t.amax(dim=d, keepdim=True))
        a = alpha if alpha is not None else _in_range_of(spec.alpha if spec.alpha is not None else 1.0, x.dtype)
        return {"m": m.clamp(min=SCALE_FLOOR), "alpha": a.detach()}

    @staticmethod
    def _q_b(u, bits):
        half = 2 ** (bits - 1)
        v = u.clamp(-1, 1) * half
        return torch.where(v >= 0, torch.ceil(v).clamp(min=1), torch.floor(v)) / half

    def quantize(self, x, spec, st, generator):
        # no cast back to x's dtype here: an α beyond float32 gives levels that fake_quantize clamps
        return st["alpha"].abs() * self._q_b(_widened(x, st["m"]) / st["m"], spec.bits)

    def apply(self, x, spec, st, alpha, generator):
        if alpha is None and not x.requires_grad:
            return self.quantize(x, spec, st, generator)
        qu = self._q_b(_widened(x.detach(), st["m"]) / st["m"], spec.bits)
        mask = self.ste_mask(x.detach(), spec, st)
        return _CeilSTE.apply(x, alpha if alpha is not None else st["alpha"], qu, st["m"], mask)

    def span(self, spec, st):
        return -st["m"], st["m"]

    def levels(self, spec, st):
        half = 2 ** (spec.bits - 1)
        k = torch.cat([torch.arange(-half, 0), torch.arange(1, half + 1)]).to(torch.float32) / half
        return st["alpha"].abs().unsqueeze(-1) * k * torch.ones_like(st["m"]).unsqueeze(-1)

    def thresholds(self, spec, st):
        half = 2 ** (spec.bits - 1)
        k = torch.arange(-half + 1, half, dtype=torch.float32) / half
        return st["m"].unsqueeze(-1) * k


class _CeilSTE(torch.autograd.Function):
    """q = |α| Q_b(x / m) with dq/dx = mask |α| / m and dq/dα = sign(α) Q_b(x / m) (001 eqs. 3, 4).

    One function rather than PyTorch's chain of ops so that the gradient |α| / m, which a large α over the
    range of a tiny tensor can push past float's largest value, is clamped to it instead of becoming inf.
    """

    generate_vmap_rule = True  # torch ops only: torch.func's transforms (grad, vmap) take it as it is

    @staticmethod
    def forward(x, alpha, qu, m, mask):
        return (alpha.abs() * qu).to(torch.promote_types(x.dtype, alpha.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, alpha, qu, m, mask = inputs
        ctx.save_for_backward(alpha, qu, m, mask)
        ctx.x_dtype = x.dtype

    @staticmethod
    def backward(ctx, grad):
        alpha, qu, m, mask = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            limit = torch.finfo(ctx.x_dtype).max
            # |α| / m in float64, clamped to the largest finite value; a product past it is inf, which the
            # second clamp turns back into that value (grad and gain are finite, so never NaN)
            gain = (alpha.detach().abs().double() / m.double()).clamp(max=limit).to(grad.dtype)
            grad_x = (grad * gain).clamp(-limit, limit).to(ctx.x_dtype)
            if mask is not None:
                grad_x = grad_x * mask
        if ctx.needs_input_grad[1]:
            grad_alpha = (grad * torch.sign(alpha) * qu).sum_to_size(alpha.shape).to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None


class Relu(Scheme):
    """Unsigned clip + round (002 eq. 1 with α = 0, β = Δ (2^n - 1)): q = Δ floor(clamp(x, 0, β)/Δ + 1/2).

    β is `clip`, or the data's maximum (per tensor or channel). STE: clipped, 1{0 <= x <= β}.
    """

    name, source = "relu", "002 eq. 1"
    summary = "unsigned clip to [0, delta (2^n - 1)]"
    label = "ReLU clip"
    kind = "activations"
    observed = onnx = True
    takes_clip = True

    def stats(self, x, spec, alpha):
        if spec.clip is not None:
            _checks.finite_values("x", x)
            beta = _in_range_of(spec.clip, x.dtype)
        else:
            beta = minmax(x, spec.granularity, spec.axis)[1].clamp(min=0)
        step = (beta / (2**spec.bits - 1)).clamp(min=SCALE_FLOOR)
        return {"beta": beta, "step": step, "limit": _finite_limit(step.double() * (2**spec.bits - 1), x.dtype)}

    def quantize(self, x, spec, st, generator):
        fast = self.fused(x, spec, st, None) if fused.usable(x) else None
        if fast is not None:
            return fast[0]
        clipped = torch.minimum(_widened(x, st["step"]).clamp(min=0), st["beta"])
        return _within(torch.floor(clipped / st["step"] + 0.5) * st["step"], st).to(x.dtype)

    def fused(self, x, spec, st, ste):
        step = st["step"]
        if step.numel() != 1 or step.dtype != torch.float32 or st["limit"] is not None:
            return None
        return fused.clip_round(x, float(st["beta"]), float(step), ste)

    def qdq_params(self, x, spec, alpha):
        # codes 0 .. 2^b - 1 of the step; QuantizeLinear rounds half to even where this rounds half up,
        # which differs only for inputs exactly halfway between two levels
        st = self.stats(x, spec, alpha)
        axis = _checks.axis_for("axis", spec.axis, x.dim()) if spec.granularity == "channel" else None
        return st["step"], torch.zeros_like(st["step"], dtype=torch.int64), 0, 2**spec.bits - 1, axis

    def span(self, spec, st):
        return 0.0, st["beta"]

    def levels(self, spec, st):
        return _within(st["step"].unsqueeze(-1) * torch.arange(2**spec.bits, dtype=torch.float32), st)

    def thresholds(self, spec, st):
        return _within(st["step"].unsqueeze(-1) * (torch.arange(2**spec.bits - 1, dtype=torch.float32) + 0.5), st)


class Pact(Relu):
    """PACT (002 §2.2): `relu` whose clip α is learnable, with PACT's gradient dq/dα = 1{x >= α}.

    α is the `alpha` tensor passed to fake_quantize (a learnable parameter), else spec.alpha, else
    spec.clip, else the data's maximum.
    """

    name, source = "pact", "002 §2.2 (PACT)"
    summary = "relu with a learnable clip alpha"
    label = "PACT"
    takes_alpha = True
    clips_at_zero = True  # PACT replaces the ReLU (002 §2.2)
    observed = False  # PACT learns its clip instead

    def stats(self, x, spec, alpha):
        if alpha is None and spec.alpha is None:
            return super().stats(x, spec, alpha)
        _checks.finite_values("x", x)
        beta = alpha.detach().to(x.dtype) if alpha is not None else _in_range_of(spec.alpha, x.dtype)
        beta = beta.clamp(min=SCALE_FLOOR)
        step = beta / (2**spec.bits - 1)
        return {"beta": beta, "step": step, "limit": _finite_limit(step.double() * (2**spec.bits - 1), x.dtype)}

    def apply_stats(self, x, spec, alpha):
        if alpha is None:
            return self.stats(x, spec, alpha)
        _checks.finite_values("x", x)
        return {}  # _PACT takes its clip from the tensor α itself

    def apply(self, x, spec, st, alpha, generator):
        if alpha is None:
            return super().apply(x, spec, st, alpha, generator)
        return _run(_PACT, x, alpha, float(2**spec.bits - 1), spec.ste or self.default_ste)


class DorefaAct(Scheme):
    """DoReFa activations (003 eq. 3-7): quantize_k on [0, 1], q = round((2^k - 1) clamp(x, 0, 1)) / (2^k - 1)."""

    name, source = "dorefa_act", "003 eq. 3-7"
    summary = "quantize_k on [0, 1]"
    label = "DoReFa"
    kind = "activations"
    onnx = True

    def quantize(self, x, spec, st, generator):
        n = 2**spec.bits - 1
        return (torch.round(x.clamp(0, 1) * n) / n).to(x.dtype)

    def qdq_params(self, x, spec, alpha):
        return torch.tensor(1.0 / (2**spec.bits - 1)), torch.tensor(0), 0, 2**spec.bits - 1, None

    def span(self, spec, st):
        return 0.0, 1.0

    def levels(self, spec, st):
        return torch.linspace(0, 1, 2**spec.bits)

    def thresholds(self, spec, st):
        n = 2**spec.bits - 1
        return (torch.arange(n, dtype=torch.float32) + 0.5) / n


class CeilAct(Scheme):
    """A_b (001 eq. 5): x̂ = clip(x, 0, c), q = (max x̂ / (2^b - 1)) ceil(x̂ (2^b - 1) / max x̂).

    c = 2^b - 1 as in the paper, or `clip`; max x̂ is taken over the tensor (or channel).
    """

    name, source = "ceil_act", "001 eq. 5"
    summary = "A_b: ceil activation quantizer"
    label = "ceil A_b"
    kind = "activations"
    takes_clip = True

    def stats(self, x, spec, alpha):
        _checks.finite_values("x", x)  # the clip below would hide an Inf
        c = _in_range_of(spec.clip if spec.clip is not None else float(2**spec.bits - 1), x.dtype)
        top = _reduce(torch.minimum(x.clamp(min=0), c), spec, lambda t, d: t.amax(dim=d, keepdim=True))
        step = (top / (2**spec.bits - 1)).clamp(min=SCALE_FLOOR)
        return {"c": c, "step": step, "limit": _finite_limit(step.double() * (2**spec.bits - 1), x.dtype)}

    def quantize(self, x, spec, st, generator):
        clipped = torch.minimum(x.clamp(min=0), st["c"])
        return _within(torch.ceil(clipped / st["step"]).clamp(max=2**spec.bits - 1) * st["step"], st).to(x.dtype)

    def span(self, spec, st):
        return 0.0, st["c"]

    def levels(self, spec, st):
        return _within(st["step"].unsqueeze(-1) * torch.arange(2**spec.bits, dtype=torch.float32), st)

    def thresholds(self, spec, st):
        return st["step"].unsqueeze(-1) * torch.arange(2**spec.bits - 1, dtype=torch.float32)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (Affine(), Symmetric(), Stochastic(), Binary(), BinaryStochastic(), Xnor(), Ternary(),
              Dorefa(), Ceil(), Relu(), Pact(), DorefaAct(), BnnAct(), CeilAct())
}


def register_scheme(scheme: Scheme) -> Scheme:
    """Add a scheme to the registry: fake_quantize, quantize_model and every explorer menu offer it from
    then on. `scheme` is an instance of a Scheme subclass with a new name (`unregister_scheme` removes it)."""
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be an instance of a qviz.engine.quantizers.Scheme subclass, got "
                        f"{type(scheme).__name__}")
    if not isinstance(scheme.name, str) or not scheme.name.isidentifier():
        raise ValueError(f"scheme.name must be a name like 'my_scheme', got {scheme.name!r}")
    if scheme.name in SCHEMES:
        raise ValueError(f"a scheme named {scheme.name!r} exists already; allowed: a new name")
    _checks.choice("scheme.kind", scheme.kind, ("weights", "activations"))
    lo, hi = scheme.bits
    _checks.integer("scheme.bits[0]", lo, 1, 16)
    _checks.integer("scheme.bits[1]", hi, lo, 16)
    if scheme.stochastic_twin is not None:
        _checks.choice("scheme.stochastic_twin", scheme.stochastic_twin, SCHEMES)
    for method in ("quantize", "span", "levels", "thresholds"):
        if getattr(type(scheme), method) is getattr(Scheme, method):
            raise TypeError(f"scheme {scheme.name!r} must implement {method}()")
    SCHEMES[scheme.name] = scheme
    return scheme


def unregister_scheme(name: str) -> None:
    """Remove a scheme added by register_scheme (the built-in schemes stay)."""
    _checks.choice("name", name, [n for n in SCHEMES if n not in _BUILT_IN])
    del SCHEMES[name]


_BUILT_IN = frozenset(SCHEMES)


def _names_with(flag: str) -> str:
    return ", ".join(repr(n) for n, s in SCHEMES.items() if getattr(s, flag))


def describe_schemes() -> list[dict]:
    """One row per scheme: name, label, what it does, the paper it follows, bits, default STE, kind, and the
    facts layers and explorers act on."""
    return [
        {"name": s.name, "label": s.menu_label, "summary": s.summary, "source": s.source, "bits": s.bits,
         "default_ste": s.default_ste, "kind": s.kind, "stochastic": s.stochastic,
         "stochastic_twin": s.stochastic_twin, "observed": s.observed, "nonlinearity": s.nonlinearity,
         "learns_alpha": s.takes_alpha, "onnx": s.onnx}
        for s in SCHEMES.values()
    ]


# --------------------------------------------------------------------------------------------------
# Public functions


def _check_spec(spec: object) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    return spec


def _check_alpha(alpha: object, spec: QuantSpec, x: torch.Tensor) -> torch.Tensor | None:
    """A learnable α: a finite float tensor that broadcasts to x; PACT's clip must be > 0, ceil's scale ≠ 0."""
    if alpha is None:
        return None
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"alpha must be a torch.Tensor (a learnable parameter) or None, got {type(alpha).__name__}")
    if not SCHEMES[spec.scheme].takes_alpha:
        raise ValueError(f"alpha is not used by scheme {spec.scheme!r}; "
                         f"schemes that take alpha: {_names_with('takes_alpha')}")
    _checks.float_tensor("alpha", alpha)
    if alpha.numel() == 1 and alpha.dim() <= x.dim():
        fits = True  # (torch.broadcast_shapes costs more than the quantizer on a small tensor)
    else:
        try:
            fits = torch.broadcast_shapes(alpha.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
    if alpha.numel() == 0 or not fits:
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}, which does not broadcast to x's shape "
                         f"{tuple(x.shape)}; allowed: one value, or one per channel shaped to broadcast against x")
    values = alpha.detach()
    if values.numel() == 1:
        values = float(values)  # (one number: Python compares it faster than a tensor op would)
        smallest = values
        finite, positive, nonzero = math.isfinite(values), values > 0, values != 0
    else:
        smallest = float(values.min())
        finite, positive, nonzero = bool(torch.isfinite(values).all()), smallest > 0, bool((values != 0).all())
    if not finite:
        raise ValueError("alpha contains NaN or Inf; allowed: finite values")
    if spec.scheme == "pact" and not positive:
        raise ValueError(f"alpha must be > 0 for scheme 'pact' (it is the clip), got min {smallest:g}")
    if spec.scheme == "ceil" and not nonzero:
        raise ValueError("alpha must be non-zero for scheme 'ceil' (the levels are ±|α| k / 2^(b-1))")
    return alpha


# Half-precision tensors are quantized in float32 and the result rounded back: their own arithmetic
# overflows at 65504 (a range of ±6e4 has a width that float16 cannot hold).
_HALF = (torch.float16, torch.bfloat16)


def _prepare(x: object, spec: object, alpha: object = None, for_apply: bool = False):
    spec, x = _check_spec(spec), _checks.float_tensor("x", x)
    if spec.granularity == "channel":
        _checks.axis_for("axis", spec.axis, x.dim())
    alpha = _check_alpha(alpha, spec, x)
    scheme = SCHEMES[spec.scheme]
    if x.dtype in _HALF:  # (the cast's backward brings float32 gradients back within x's range)
        x = _CastWithin.apply(x, torch.float32)
        alpha = None if alpha is None else _CastWithin.apply(alpha, torch.float32)
    stats = scheme.apply_stats if for_apply else scheme.stats
    return scheme, spec, x, alpha, stats(x.detach(), spec, alpha)


def _as_input_dtype(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q if q.dtype == dtype else _CastWithin.apply(q, dtype)


class _CastWithin(torch.autograd.Function):
    """A cast to a narrower float dtype that clamps to its finite range, in the forward pass for values
    and in the backward pass for gradients: a level just past float16's largest value, or DoReFa's
    gradient 1/max|w| for a tiny float16 tensor, would otherwise become inf."""

    generate_vmap_rule = True  # torch ops only: torch.func's transforms (grad, vmap) take it as it is

    @staticmethod
    def forward(t, dtype):
        return _narrowed(t, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad):
        return _narrowed(grad, ctx.dtype), None


def _narrowed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    if limit < torch.finfo(t.dtype).max:
        t = t.clamp(-limit, limit)
    return t.to(dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, *, alpha: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize and de-quantize `x` with `spec` ("simulated quantization", 004 eqs. 12-13).

    Returns a tensor of x's shape and dtype on the scheme's level set. Backward: the scheme's STE (see
    the module docstring and each scheme's docstring). `alpha` is a learnable tensor for the schemes
    that train one (`ceil`, `pact`); `generator` seeds the stochastic schemes.
    """
    dtype = x.dtype if isinstance(x, torch.Tensor) else None
    scheme, spec, x, alpha, st = _prepare(x, spec, alpha, for_apply=True)
    return _as_input_dtype(scheme.apply(x, spec, st, alpha, generator), dtype)


def qdq_constants(x: torch.Tensor, spec: QuantSpec, alpha: torch.Tensor | None = None) -> dict:
    """The QuantizeLinear/DequantizeLinear parameters of `spec` on `x` as plain Python values: scale and
    zero-point (one each, or one per channel), the scheme's own code range and the 8-bit container."""
    with torch.no_grad():
        scale, zero, qmin, qmax, axis = SCHEMES[spec.scheme].qdq_params(x.detach().float(), spec, alpha)
    scale, zero = scale.double().reshape(-1), zero.reshape(-1).to(torch.int64)
    return {"scale": scale.tolist(), "zero": zero.tolist(), "qmin": int(qmin), "qmax": int(qmax), "axis": axis,
            "lo": ((qmin - zero) * scale).tolist(), "hi": ((qmax - zero) * scale).tolist(),
            "container": (0, 255) if qmin >= 0 else (-128, 127)}


def export_quantize(x: torch.Tensor, qdq: dict, clip: bool = True) -> torch.Tensor:
    """fake_quantize for ONNX export: PyTorch's fake-quantize ops on 8-bit codes (what the exporter writes as
    QuantizeLinear/DequantizeLinear), after a clip to the scheme's own code range, so lower bit widths
    export exactly. `qdq` (from qdq_constants) holds Python numbers: the graph gets them as constants.
    Weights need no clip (their codes come from their own range), which leaves the plain Q(W) -> DQ
    pattern that runtimes turn into integer kernels."""
    if qdq["axis"] is None:
        x = x.clamp(qdq["lo"][0], qdq["hi"][0]) if clip else x
        return torch.fake_quantize_per_tensor_affine(x, qdq["scale"][0], qdq["zero"][0], *qdq["container"])
    shape = [1] * x.dim()
    shape[qdq["axis"]] = -1
    if clip:
        lo = torch.tensor(qdq["lo"], dtype=x.dtype).reshape(shape)
        hi = torch.tensor(qdq["hi"], dtype=x.dtype).reshape(shape)
        x = torch.maximum(torch.minimum(x, hi), lo)
    return torch.fake_quantize_per_channel_affine(x,
                                                  torch.tensor(qdq["scale"], dtype=torch.float32),
                                                  torch.tensor(qdq["zero"], dtype=torch.int32), qdq["axis"],
                                                  *qdq["container"])


def quantizer_levels(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The level set `fake_quantize(x, spec)` draws from: 1-D per tensor, [channels, L] per channel."""
    scheme, spec, x, _, st = _prepare(x, spec)
    return _per_channel_rows(scheme.levels(spec, st), spec, x)


def quantizer_thresholds(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Decision thresholds between consecutive levels, shaped like `quantizer_levels` minus one column."""
    scheme, spec, x, _, st = _prepare(x, spec)
    return _per_channel_rows(scheme.thresholds(spec, st), spec, x)


def _per_channel_rows(t: torch.Tensor, spec: QuantSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.granularity == "tensor" or t.dim() == 1:
        return t.reshape(-1)
    axis = _checks.axis_for("axis", spec.axis, x.dim())
    return t.reshape(x.shape[axis], t.shape[-1])


def transfer_curve(spec: QuantSpec, lo: float = -1.5, hi: float = 1.5, n: int = 1001, *,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """The data behind a staircase plot: q(x), its STE gradient, levels and thresholds on [lo, hi].

    The evenly spaced x grid is itself the tensor being quantized, so statistics a scheme estimates
    from data come from the grid (set `spec.clip` / `spec.alpha` to fix them). The curve is always
    per tensor. Returns numpy arrays:

    x, q (one sample for stochastic schemes, drawn with `seed`), expected (E[q]; equals q for a
    deterministic scheme), error (x - expected), grad (the STE dq/dx, by autograd), levels,
    thresholds, span (the clipped STE's input range, cut to [lo, hi]) and stochastic (a bool).
    """
    spec = _check_spec(spec)
    lo, hi = _checks.real("lo", lo), _checks.real("hi", hi)
    if not lo < hi:
        raise ValueError(f"lo={lo:g}, hi={hi:g}: allowed lo < hi")
    n = _checks.integer("n", n, 2, 1_000_000)
    spec = spec.replace(granularity="tensor")
    x = torch.linspace(lo, hi, n, dtype=torch.float32)
    scheme = SCHEMES[spec.scheme]
    st = scheme.stats(x, spec, None)
    generator = torch.Generator().manual_seed(int(seed))
    xg = x.clone().requires_grad_(True)
    q = scheme.apply(xg, spec, st, None, generator)
    (grad,) = torch.autograd.grad(q.sum(), xg)
    expected = scheme.expected(x, spec, st)
    span = [float(torch.as_tensor(v).clamp(lo, hi)) for v in scheme.span(spec, st)]
    return {
        "x": x.numpy(),
        "q": q.detach().numpy(),
        "expected": expected.numpy(),
        "error": (x - expected).numpy(),
        "grad": grad.numpy(),
        "levels": scheme.levels(spec, st).reshape(-1).numpy(),
        "thresholds": scheme.thresholds(spec, st).reshape(-1).numpy(),
        "span": np.array(span),
        "stochastic": np.bool_(scheme.stochastic),
    }


# --------------------------------------------------------------------------------------------------
# Gradient quantization (000 §2.3.3, DoReFa)


def quantize_gradient(g: torch.Tensor, bits: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """DoReFa's stochastic k-bit gradient quantizer (000 §2.3.3; the G of DoReFa, 003 §2.2.2.1 [16]).

    q = 2 m (quantize_k(g / (2m) + 1/2 + N) - 1/2), m = max|g|, N ~ U(-1/2, 1/2) / (2^k - 1).
    The noise makes q unbiased inside the range (E[q] = g), which is why DoReFa needs it. A zero
    gradient stays zero.
    """
    g = _checks.float_tensor("g", g)
    bits = _checks.integer("bits", bits, 1, 16)
    if g.numel() == 0:
        return g
    m = g.detach().abs().max()
    _checks.finite_values("g", m)
    if m == 0:
        return g
    n = 2**bits - 1
    work = torch.float32 if g.dtype in _HALF else g.dtype  # float16 cannot hold 2 m for m near its max
    noise = (torch.rand(g.shape, generator=generator, dtype=work, device=g.device) - 0.5) / n
    m = m.to(work)
    # g / m / 2 and m (2 u - 1) rather than g / (2 m) and 2 m (u - 1/2): 2 m overflows for m > max / 2
    u = (g.to(work) / m / 2 + 0.5 + noise).clamp(0, 1)
    return _narrowed(m * (2 * torch.round(u * n) / n - 1), g.dtype)


def quantize_gradients_of(module: torch.nn.Module, bits: int, *,
                          generator: torch.Generator | None = None) -> list:
    """Quantize every parameter gradient of `module` to `bits` as it is computed (a training option).

    Returns the hook handles; call `.remove()` on each to stop.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    bits = _checks.integer("bits", bits, 1, 16)
    return [p.register_hook(lambda g: quantize_gradient(g, bits, generator=generator))
            for p in module.parameters() if p.requires_grad]


def scheme_names(kind: str | None = None) -> Sequence[str]:
    """Scheme names, optionally only those the papers use for "weights" or "activations"."""
    if kind is not None:
        _checks.choice("kind", kind, ("weights", "activations"))
    return [n for n, s in SCHEMES.items() if kind is None or s.kind == kind]
