"""Quantizers as modules, and the quantized layers of the paper networks.

- `WeightQuantizer` fake-quantizes a layer's float shadow weights on every use (002 eqs. 2-4, 004 eq. 17).
  `quantize_model` installs it as a parametrization of the layer's weight, so the layer keeps its class
  and attributes, and every reader of `layer.weight` (PyTorch's fused attention fast paths included) sees
  the quantized weights.
- `ActivationQuantizer` fake-quantizes activations with a range from a moving average of batch minima and
  maxima (004 §2.5), set by calibration or learned (PACT's clip, 002 §2.2).
- `ActivationPoint` is where a network declares that its activations are quantized (the paper networks of
  nets.py do, at the places 002 quantizes); `quantize_model` fills the points a network declares.
- `LinearBN` is a linear layer with batch norm whose weights are quantized after folding (004 §3.2.2).
- `fold_batchnorm` folds a batch norm into the layer before it (004 eqs. 20-21).

Every fact about a scheme (does it learn α, is its range observed, is it a nonlinearity, its stochastic
twin) comes from the scheme registry in quantizers.py; nothing here branches on a scheme's name.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qviz import _checks
from qviz.engine.observers import MovingAverageMinMaxObserver, minmax, range_dtype
from qviz.engine.quantizers import EXPORTING, SCHEMES, QuantSpec, export_quantize, fake_quantize, qdq_constants


def fold_batchnorm(weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                   var: torch.Tensor, eps: float = 1e-5,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a batch norm into the layer before it (004 eqs. 20-21).

    W_inf = γ W / σ and b_inf = β - γ μ / σ with σ = sqrt(var + eps), one value per output channel
    (dim 0 of `weight`: [out, in] for a linear layer, [out, in, kh, kw] for a convolution). A layer bias
    b folds in as β + γ (b - μ) / σ. Returns (W_inf, b_inf); the inputs are not changed.
    """
    weight = _checks.float_tensor("weight", weight)
    if weight.dim() < 1:
        raise ValueError("weight must have at least 1 dim (dim 0 = output channels)")
    out = weight.shape[0]
    named = {"gamma": gamma, "beta": beta, "mean": mean, "var": var}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        _checks.float_tensor(name, t)
        if t.shape != (out,):
            raise ValueError(f"{name} must have shape ({out},) to match weight's {out} output channels, "
                             f"got {tuple(t.shape)}")
    _checks.real("eps", eps, 0.0)
    if bool((var < 0).any()):
        raise ValueError("var must be >= 0 (it is a variance)")
    sigma = torch.sqrt(var + eps)
    if bool((sigma == 0).any()):
        raise ValueError("var + eps is 0 for some channel; give eps > 0")
    gain = gamma / sigma
    shift = (bias if bias is not None else torch.zeros_like(mean)) - mean
    w_fold = weight * gain.reshape(-1, *([1] * (weight.dim() - 1)))
    b_fold = beta + gain * shift
    if not (bool(torch.isfinite(w_fold.detach()).all()) and bool(torch.isfinite(b_fold.detach()).all())):
        raise ValueError(f"the folded weights or bias overflow {weight.dtype} (gamma / sqrt(var + eps) times "
                         "weight is too large); check gamma, var and eps")
    return w_fold, b_fold


def check_spec(name: str, spec) -> QuantSpec | None:
    if spec is not None and not isinstance(spec, QuantSpec):
        raise TypeError(f"{name} must be a QuantSpec or None (float), got {type(spec).__name__}")
    return spec


def training_spec(spec: QuantSpec | None, stochastic: bool) -> QuantSpec | None:
    """The spec training uses: the scheme's stochastic twin when asked (004 §2.3, §4)."""
    if spec is None or not stochastic:
        return spec
    twin = SCHEMES[spec.scheme].stochastic_twin
    if twin is None:
        with_twin = sorted(n for n, s in SCHEMES.items() if s.stochastic_twin)
        raise ValueError(f"stochastic=True needs a weight scheme with a stochastic twin; allowed schemes: {with_twin}, "
                         f"got scheme={spec.scheme!r}")
    return spec.replace(scheme=twin)


# --------------------------------------------------------------------------------------------------
# Weights


def by_output_channel(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped transposed convolution's weights [in, out/groups, *k] as one row per output channel,
    [out, in/groups, *k]: output channel g * out/groups + j reads w[g * in/groups : (g+1) * in/groups, j]."""
    i, o = w.shape[:2]
    k = w.shape[2:]
    return w.reshape(groups, i // groups, o, *k).transpose(1, 2).reshape(groups * o, i // groups, *k)


def from_output_channels(v: torch.Tensor, groups: int, shape: torch.Size) -> torch.Tensor:
    """The inverse of by_output_channel: rows per output channel back to the layer's [in, out/groups, *k]."""
    i, o = shape[:2]
    return v.reshape(groups, o, i // groups, *shape[2:]).transpose(1, 2).reshape(shape)


def _version(t: torch.Tensor) -> int | None:
    """t's version counter; None for a tensor made under torch.inference_mode, which keeps none (and can be
    written only inside inference mode)."""
    return None if t.is_inference() else t._version


class _Quantizer(nn.Module):
    """What the weight and activation quantizers share: an error one raises ("x contains NaN or Inf")
    carries a note of where in the model it sits, as quantize_model names it (`where`): in a network of
    many layers, x alone does not say which."""

    where = ""  # "the weight of layer 'fc1'", "the input of layer 'fc1'"; empty outside quantize_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward(x)
        except (ValueError, TypeError) as err:
            if self.where:
                err.add_note(f"(raised by the quantizer of {self.where})")
            raise

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class WeightQuantizer(_Quantizer):
    """Fake-quantizes a layer's float shadow weights on every forward (002 eqs. 2-4, 004 eq. 17).

    Used as a parametrization (`forward(w)` returns the weights the layer computes with) or called by a
    layer that quantizes weights it computes itself (LinearBN's folded weights). Holds the learnable α of a
    scheme that takes one (ceil's scale), starting at max|w| unless the spec gives one: α = 1 would blow
    small weights up twentyfold. With `stochastic=True` training uses the scheme's stochastic twin
    (affine -> stochastic, binary -> binary_stochastic) and evaluation the scheme itself, as 004 §4
    compares. `configure` changes the spec in place (the ModelExplorer's bit dials do).

    `groups` > 1 marks the weights of a grouped transposed convolution, [in, out/groups, *k]: their
    axis 1 holds each slot once per group, so per channel along it means per output channel only after
    regrouping the weights one row per output channel (`by_output_channel`), which forward does.
    """

    def __init__(self, spec: QuantSpec | None = None, stochastic: bool = False):
        super().__init__()
        self.stochastic = _checks.boolean("stochastic", stochastic)
        self.alpha: nn.Parameter | None = None
        self._cached: tuple | None = None
        self.bypass = False  # float weights for a while (calibration observes the float network)
        self.groups = 1
        self.configure(spec)

    def configure(self, spec: QuantSpec | None) -> None:
        spec = check_spec("spec", spec)
        self.train_spec = training_spec(spec, self.stochastic)
        self.spec = spec
        learns = spec is not None and SCHEMES[spec.scheme].takes_alpha
        if learns and self.alpha is None:
            # -1 marks "not yet set": the first weights seen set α (see forward)
            self.alpha = nn.Parameter(torch.tensor(spec.alpha or -1.0))
        elif not learns:
            self.alpha = None
        self._cached = None

    def extra_repr(self) -> str:
        return "float" if self.spec is None else f"{self.spec.scheme}, {self.spec.bits} bits, {self.spec.granularity}"

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda(): the cached weights (and the alias that pins the old storage) are stale
        self._cached = None
        return super()._apply(fn, *args, **kwargs)

    def _regroups(self, w: torch.Tensor) -> bool:
        return self.groups > 1 and self.spec.granularity == "channel" and w.dim() >= 2 and \
            self.spec.axis in (1, 1 - w.dim())

    def _forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.spec is None or self.bypass or w.numel() == 0:  # a layer of 0 features has nothing to quantize
            return w
        if self._regroups(w):
            rows = by_output_channel(w, self.groups)
            return from_output_channels(self._quantized(rows, w, self.spec.replace(axis=0),
                                                        self.train_spec.replace(axis=0)), self.groups, w.shape)
        return self._quantized(w, w, self.spec, self.train_spec)

    def _quantized(self, x: torch.Tensor, w: torch.Tensor, spec: QuantSpec, train_spec: QuantSpec) -> torch.Tensor:
        """x (the weights w, or w regrouped) quantized with spec; the inference cache keys on w itself."""
        if EXPORTING.get():
            if EXPORTING.get() == "prepare":
                self._qdq = qdq_constants(x, spec, self.alpha)
            return export_quantize(x, self._qdq, clip=False)
        if self.alpha is not None and float(self.alpha.detach()) <= 0:
            with torch.no_grad():
                self.alpha.fill_(float(w.detach().abs().max()) or 1.0)
        if self.training or torch.is_grad_enabled() or not isinstance(w, nn.Parameter):
            return fake_quantize(x, train_spec if self.training else spec, alpha=self.alpha)
        # Inference quantizes the same weights for every batch: do it once until they (or the spec) change.
        # Computed weights (LinearBN's folded ones) are not parameters and are quantized afresh each time.
        # In-place writes bump _version; writes through w.data bump nothing: a new tensor (module.double(),
        # vector_to_parameters) shows in the pointer, dtype and layout, an in-place one (an EMA's
        # p.data.copy_) only in the values, hence their sum (one read of w, a fraction of quantizing it). The
        # cache holds an alias of w, so that its storage's address cannot be reused while cached. The layer's
        # weight attribute is then the cached tensor itself: a write into it (pruning done in place) bumps
        # that tensor's _version, and it is quantized afresh, as every other forward would (but for a cache
        # made under inference_mode, whose tensors keep no version).
        key = (id(w), w._version, w.data_ptr(), w.dtype, w.device, w.shape, w.stride(),
               float(w.detach().sum(dtype=torch.float64)), self.spec, self.groups,
               None if self.alpha is None else float(self.alpha.detach()))
        if self._cached is None or self._cached[0] != key or _version(self._cached[1]) != self._cached[3]:
            q = fake_quantize(x, spec, alpha=self.alpha)
            self._cached = (key, q, w.detach(), _version(q))
        return self._cached[1]


# --------------------------------------------------------------------------------------------------
# Activations


CALIBRATIONS = ("moving_average", "minmax", "mse", "percentile")
# The percentile and MSE calibrations keep a uniform sample of each batch's activations per quantizer, at
# most SAMPLE_PER_BATCH values a batch and SAMPLE_MOST in all (4 MiB; torch.quantile takes at most 2^24).
SAMPLE_PER_BATCH = 1 << 16
SAMPLE_MOST = 1 << 20

# The forwards of quantized models in progress, innermost last, per thread: a pre-hook and a hook on each
# model quantize_model returns push and pop them (`begin_forward`, `end_forward`), so that an activation
# quantizer called several times in one forward (a shared layer: ALBERT's, a module applied twice) takes
# one moving-average step for it, with the range of all its inputs. Each call its own step let the first
# call set the range and clipped wider later ones: ALBERT at W8A8 calibrated to 21 dB, not 39.
_FORWARDS = threading.local()
_NEXT_FORWARD = iter(range(1, 2**62))


# Bookkeeping outside the computation: torch.compile runs these as they are (tracing `next` on the counter
# made Dynamo expand its range of 2^62 numbers and never finish compiling).
@torch.compiler.disable
def begin_forward(module: nn.Module, args) -> None:
    stack = getattr(_FORWARDS, "stack", None)
    if stack is None:
        stack = _FORWARDS.stack = []
    stack.append(next(_NEXT_FORWARD))


@torch.compiler.disable
def end_forward(module: nn.Module, args, output) -> None:
    stack = getattr(_FORWARDS, "stack", None)
    if stack:
        stack.pop()


def current_forward() -> int | None:
    """The innermost forward of a quantized model in progress on this thread, or None."""
    stack = getattr(_FORWARDS, "stack", None)
    return stack[-1] if stack else None


def _takes_a_range(scheme) -> bool:
    """Whether an activation quantizer of this scheme quantizes with one range: observed, a clip or α."""
    return scheme.observed or scheme.takes_clip or scheme.takes_alpha


def check_activation_spec(name: str, spec: QuantSpec | None) -> QuantSpec | None:
    """check_spec, and per channel only for schemes that take no range: an activation quantizer keeps one
    range per input (its observer's, a clip or α), so such a spec would run per tensor under its name."""
    spec = check_spec(name, spec)
    if spec is not None and spec.granularity == "channel" and _takes_a_range(SCHEMES[spec.scheme]):
        rangeless = ", ".join(repr(n) for n, s in SCHEMES.items() if not _takes_a_range(s))
        raise ValueError(f"{name} asks for {spec.scheme!r} activations per channel, but an activation quantizer "
                         "gives each input one range (observed in calibration, or a clip), per tensor as 004 "
                         "recommends and integer kernels take; allowed: granularity='tensor', or per channel "
                         f"a scheme that takes no range ({rangeless})")
    return spec


class ActivationQuantizer(_Quantizer):
    """Fake-quantizes activations with a range from a moving average of batch min/max (004 §2.5).

    Training batches update the range; evaluation uses it as it stands (so a decision map is a pure
    function of the input). Before any batch was seen, the first one sets the range. Calibration
    (`calibrate`) sets it from data by one of CALIBRATIONS. Schemes that take α learn it (PACT's clip,
    002 §2.2), starting at the clip with the least squared error on the data seen (`mse_clip`).
    Schemes whose range is not observed (DoReFa's [0, 1], BNN's sign, A_b's own max) quantize as they are.
    """

    # class defaults as well: a quantizer unpickled from before these existed reads them
    empty_only: bool | None = None
    stood_in = False

    def __init__(self, spec: QuantSpec | None = None, momentum: float = 0.1):
        super().__init__()
        self.observer = MovingAverageMinMaxObserver(momentum)
        self._step: tuple | None = None  # (forward, range before it, range of its inputs so far)
        self.calibrating: str | None = None
        self.alpha: nn.Parameter | None = None
        self._sample: list[torch.Tensor] = []
        self._kept, self._stride = 0, 1
        self.empty_only: bool | None = None  # since calibration began: not called, only empty inputs, values
        # the last time its layer ran, its input was another quantizer's (self-attention's key and value are
        # the query): that one quantized it, so this one needs no range of its own
        self.stood_in = False
        self.configure(spec)

    def configure(self, spec: QuantSpec | None) -> None:
        spec = check_activation_spec("spec", spec)
        learns = spec is not None and SCHEMES[spec.scheme].takes_alpha
        if learns and (self.alpha is None or self.spec is None or self.spec.scheme != spec.scheme):
            self.alpha = nn.Parameter(torch.tensor(-1.0))  # set from the data by the first batch
        elif not learns:
            self.alpha = None
        self.spec = spec

    @property
    def nonlinearity(self) -> bool:
        """Does this quantizer replace the ReLU before it (BNN's sign)?"""
        return self.spec is not None and SCHEMES[self.spec.scheme].nonlinearity

    @property
    def clips_at_zero(self) -> bool:
        """Does this quantizer's forward pass include a ReLU (PACT's clip(x, 0, α), 002 §2.2), so that a ReLU
        before it would be done twice? Not while calibration passes float activations through."""
        return (self.spec is not None and SCHEMES[self.spec.scheme].clips_at_zero
                and self.calibrating in (None, "moving_average") and not EXPORTING.get())

    @property
    def calibrated(self) -> bool:
        """Has this quantizer a range (or none to set: a float point, a fixed-range scheme)?"""
        if self.spec is None:
            return True
        if self.alpha is not None:
            return float(self.alpha) > 0
        return not SCHEMES[self.spec.scheme].observed or self.spec.clip is not None or self.observer.initialized

    def extra_repr(self) -> str:
        return "float" if self.spec is None else f"{self.spec.scheme}, {self.spec.bits} bits"

    def reset_range(self) -> None:
        self.observer.min_val, self.observer.max_val = torch.tensor([]), torch.tensor([])
        self._step = None

    def range(self) -> tuple[float, float] | None:
        """The clip range in use (None before any data was seen or for schemes that observe nothing)."""
        if self.alpha is not None and float(self.alpha) > 0:
            return 0.0, float(self.alpha)
        if not self.observer.initialized:
            return None
        return float(self.observer.min_val.min()), float(self.observer.max_val.max())

    def _fixed(self, x: torch.Tensor) -> QuantSpec:
        spec = self.spec
        if not SCHEMES[spec.scheme].observed or spec.clip is not None:
            return spec
        if _checks.vmapped(x):  # one sample of torch.func.vmap's batch (per-sample gradients): read the range
            if not self.observer.initialized:
                raise ValueError("this activation quantizer has no range yet, and inside torch.func.vmap it cannot "
                                 "observe one (each call sees one sample); allowed: calibrate or train the model "
                                 "outside vmap first")
        elif self.training or self.calibrating == "moving_average" or not self.observer.initialized:
            self._observe(x.detach())
        lo, hi = float(self.observer.min_val.min()), float(self.observer.max_val.max())
        return spec_with_range(spec, lo, hi)

    # bookkeeping of the forward in progress: traced, torch.compile would guard on the forward's number and
    # compile again every training step
    @torch.compiler.disable
    def _observe(self, x: torch.Tensor) -> None:
        """One moving-average step per forward of the model (see begin_forward); outside one, per call. None
        inside a backward pass: that is activation checkpointing (torch.utils.checkpoint) running a region
        again, which then quantizes with the range as it stands. That is the range its first run used when
        one forward precedes each backward and the quantizer runs once per forward (not two forwards
        summed into one loss, nor a layer shared within one forward: their runs again read the last range)."""
        if torch._C._current_graph_task_id() != -1:
            return
        forward, obs = current_forward(), self.observer
        lo, hi = (t.reshape(-1) for t in minmax(x))  # checks x: a dense float tensor, finite, not empty
        if forward is None or self._step is None or self._step[0] != forward:
            before = (obs.min_val, obs.max_val)
        else:  # called again in the same forward: redo its step from where it started, with every input so far
            before, (lo0, hi0) = self._step[1], self._step[2]
            lo, hi = torch.minimum(lo0, lo), torch.maximum(hi0, hi)
        obs.min_val, obs.max_val = before
        obs._update(lo, hi)
        self._step = (forward, before, (lo, hi)) if forward is not None else None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None:
            return x
        if EXPORTING.get():
            if EXPORTING.get() == "prepare":
                spec = self.spec if self.alpha is not None else self._fixed(x)
                self._qdq = qdq_constants(x, spec, self.alpha)
            return export_quantize(x, self._qdq)
        self.stood_in = False
        if x.numel() == 0:  # an expert given no tokens, a head given no boxes: nothing to quantize or observe
            self.empty_only = self.empty_only is not False
            return x
        self.empty_only = False
        if self.calibrating not in (None, "moving_average"):
            self._collect(x.detach())
            return x  # the range is set at the end of calibration; until then the layer sees float inputs
        if self.alpha is not None:
            if self.calibrating or float(self.alpha.detach()) <= 0:
                with torch.no_grad():
                    self.alpha.fill_(mse_clip(x.detach(), self.spec))
            return fake_quantize(x, self.spec, alpha=self.alpha)
        return fake_quantize(x, self._fixed(x))

    # ------------------------------------------------------------------ calibration (see quantize.calibrate)

    def start_calibration(self, method: str) -> None:
        _checks.choice("method", method, CALIBRATIONS)
        self.calibrating = method
        self._sample, self._kept, self._stride = [], 0, 1
        self.empty_only = None
        if method in ("moving_average", "minmax"):
            self.reset_range()

    def _collect(self, x: torch.Tensor) -> None:
        if self.calibrating == "minmax" and SCHEMES[self.spec.scheme].observed and self.alpha is None:
            lo, hi = (v.reshape(1).to(range_dtype(x)) for v in (x.amin(), x.amax()))
            obs = self.observer
            if obs.initialized:
                lo, hi = torch.minimum(obs.min_val.reshape(1), lo), torch.maximum(obs.max_val.reshape(1), hi)
            obs.min_val, obs.max_val = lo, hi
            return
        flat = x.reshape(-1)
        # a uniform sample of each batch: min(its size, SAMPLE_PER_BATCH) / stride values, so that every
        # batch counts alike, those seen before the last halving too; a copy either way, as the model may
        # change its activations in place after this layer
        if flat.numel() > SAMPLE_PER_BATCH:
            pick = torch.randint(flat.numel(), (max(1, SAMPLE_PER_BATCH // self._stride),),
                                 generator=torch.Generator().manual_seed(len(self._sample)))
            flat = flat[pick]
        else:
            flat = flat[:: self._stride].clone()
        flat = flat.to(range_dtype(flat))
        self._sample.append(flat)
        self._kept += flat.numel()
        if self._kept > SAMPLE_MOST:  # many batches: every batch's share halves, so memory stays bounded
            self._sample = [v[::2].clone() for v in self._sample]  # copies: a view would keep every value
            self._kept, self._stride = sum(v.numel() for v in self._sample), 2 * self._stride

    def finish_calibration(self, percentile: float = 99.99) -> None:
        method, self.calibrating = self.calibrating, None
        sample = torch.cat(self._sample) if self._sample else None
        self._sample = []
        if sample is None or sample.numel() == 0:
            return
        if self.alpha is not None:  # a learned clip starts where the squared error is least
            with torch.no_grad():
                self.alpha.fill_(mse_clip(sample, self.spec))
            return
        if not SCHEMES[self.spec.scheme].observed:
            return
        if method == "percentile":
            q = torch.quantile(sample, torch.tensor([1 - percentile / 100, percentile / 100], dtype=sample.dtype))
            lo, hi = float(q[0]), float(q[1])
        else:
            lo, hi = mse_range(sample, self.spec)
        self.observer.min_val = torch.tensor([lo], dtype=sample.dtype)  # float32, or float64 for float64 data
        self.observer.max_val = torch.tensor([max(hi, lo)], dtype=sample.dtype)


def spec_with_range(spec: QuantSpec, lo: float, hi: float) -> QuantSpec:
    """spec with a fixed clip from an observed range: (lo, hi) for affine ranges, the larger magnitude for
    signed symmetric ones, the top for one-sided ones (relu, unsigned)."""
    scheme = SCHEMES[spec.scheme]
    if not scheme.takes_clip_pair:
        return spec.replace(clip=max(hi, 1e-8))
    if getattr(scheme, "symmetric", False):
        return spec.replace(clip=max(abs(lo), abs(hi), 1e-8) if spec.signed else max(hi, 1e-8))
    return spec.replace(clip=(lo, hi) if lo < hi else (lo - 1e-8, hi + 1e-8))


def _subsample(values: torch.Tensor, most: int) -> torch.Tensor:
    """At most `most` of the values, drawn with a fixed seed (O(most): a permutation of a million
    activations would cost more than the calibration it serves)."""
    if values.numel() <= most:
        return values
    return values[torch.randint(values.numel(), (most,), generator=torch.Generator().manual_seed(0))]


def _positive(x: torch.Tensor) -> torch.Tensor:
    """The positive values of x, flattened, in order: numpy's boolean indexing where it applies (half the
    time of PyTorch's on a million CPU activations, and single-threaded: calibration runs per change)."""
    x = x.detach()
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        values = x.reshape(-1).numpy()
        return torch.from_numpy(values[values > 0])
    return x[x > 0].reshape(-1)


def _quantiles(sample: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.quantile(sample, q) (linear interpolation), the same values, from a partial sort: only the
    order statistics the quantiles read are placed (a third of the time of a full sort of 65,536)."""
    if sample.dtype not in (torch.float32, torch.float64) or sample.device.type != "cpu":
        return torch.quantile(sample, q)
    pos = q.to(sample.dtype) * (sample.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    kth = np.unique(np.concatenate([lo.numpy(), hi.numpy()]))
    ordered = torch.from_numpy(np.partition(sample.numpy(), kth))
    return torch.lerp(ordered[lo], ordered[hi], pos - lo)


def mse_clip(x: torch.Tensor, spec: QuantSpec, candidates: int = 24) -> float:
    """The clip α in [q50, max] of the positive values of x that minimises the mean squared quantization
    error of `spec` with clip α: where PACT starts (and what calibration sets) before α learns.

    At 2 bits the largest activation is a poor clip: most values fall into the first step. A learned α
    moves only as fast as its learning rate, so a good start saves most of the retraining.
    """
    positive = _positive(x)
    if positive.numel() == 0:
        return 1e-3
    sample = _subsample(positive, 65536)
    quantiles = _quantiles(sample, torch.linspace(0.5, 1.0, candidates))
    best, best_err = float(quantiles[-1]), float("inf")
    if not math.isfinite(best):
        raise ValueError("x contains NaN or Inf; only finite values can be quantized")
    with _checks.no_finite_checks():  # the sample is finite (its largest value is): no check per candidate
        for alpha in quantiles.tolist():
            if alpha <= 0:
                continue
            err = float(((fake_quantize(sample, spec, alpha=torch.tensor(alpha)) - sample) ** 2).mean())
            if err < best_err:
                best, best_err = alpha, err
    return max(best, 1e-3)


def mse_range(sample: torch.Tensor, spec: QuantSpec, candidates: int = 16) -> tuple[float, float]:
    """The range [q(p), q(1 - p)] of the sample, p in [0, 0.01], whose clip gives the least mean squared
    quantization error (a calibration that ignores rare outliers when that helps)."""
    values, _ = sample.reshape(-1).sort()
    n = values.numel()
    probe = _subsample(values, 16384)  # the error's sample
    best, best_err = (float(values[0]), float(values[-1])), float("inf")
    for p in torch.linspace(0.0, 0.01, candidates).tolist():
        lo, hi = float(values[int(p * (n - 1))]), float(values[int((1 - p) * (n - 1))])  # quantiles of a sorted set
        if not hi > lo:
            continue
        err = float(((fake_quantize(probe, spec_with_range(spec, lo, hi)) - probe) ** 2).mean())
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


class ActivationPoint(nn.Module):
    """A place where a network's activations may be quantized. Float (the identity) until quantize_model
    configures it; the paper networks put one after each hidden ReLU (QA) and on each residual sum (QRA,
    002 Fig. 4). A model-wide activation setting reaches the points with `by_default=True`; the others
    (002's quantized shortcuts) only by an override that names them.

    `after_relu(z)` is ReLU then the quantizer, or the quantizer alone when its scheme is a nonlinearity
    (BNN's sign replaces the ReLU, 003 eq. 3-5) or clips at zero itself (PACT replaces the ReLU, 002 §2.2:
    the same values, one pass fewer).
    """

    def __init__(self, by_default: bool = True):
        super().__init__()
        self.by_default = _checks.boolean("by_default", by_default)
        self.quantizer = ActivationQuantizer(None)

    def configure(self, spec: QuantSpec | None) -> None:
        self.quantizer.configure(spec)

    @property
    def spec(self) -> QuantSpec | None:
        return self.quantizer.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x)

    def after_relu(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantizer(z if self.quantizer.nonlinearity or self.quantizer.clips_at_zero else F.relu(z))


# --------------------------------------------------------------------------------------------------
# Linear + batch norm, folded for quantization-aware training


BN_FOLDS = ("none", "naive", "corrected")


class LinearBN(nn.Module):
    """Linear + batch norm whose weights are quantized after folding (004 §3.2.2, eqs. 18-31).

    fold="none": the float BN runs after a linear layer with quantized W (no folding; what inference
    cannot do). fold="naive": training quantizes γW/σ_B with the batch's σ_B and adds β - γμ_B/σ_B
    (Fig. 8), so the quantized weights jitter from batch to batch. fold="corrected": training quantizes
    w_corrected = γW/σ with the long-term σ (eqs. 22-23) and rescales the output by c = σ_B/σ
    (eqs. 24-27) until `freeze()`, after which the long-term statistics are frozen and used throughout
    (eqs. 28-31). Evaluation always runs the inference graph: Q(γW/σ) x + β - γμ/σ (eqs. 20-21).
    The weight quantizer `wq` is float until quantize_model configures it.
    """

    def __init__(self, in_features: int, out_features: int, *, fold: str = "corrected", eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        _checks.choice("fold", fold, BN_FOLDS)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bn = nn.BatchNorm1d(out_features, eps=eps, momentum=momentum)
        self.wq = WeightQuantizer(None)
        self.fold = fold
        self.register_buffer("frozen", torch.tensor(False))

    def freeze(self) -> None:
        """Stop updating the moving mean/variance and use them in training too (004 eqs. 28-31)."""
        self.frozen.fill_(True)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float weights and bias of the inference graph (004 eqs. 20-21)."""
        bn = self.bn
        return fold_batchnorm(self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if self.fold == "none":
            return bn(F.linear(x, self.wq(self.weight)))
        if not self.training:
            w, b = self.folded()
            return F.linear(x, self.wq(w), b)
        y_float = F.linear(x, self.weight)  # the batch statistics of the unquantized layer (Fig. 9)
        mean_b, var_b = y_float.mean(0), y_float.var(0, unbiased=False)
        if not bool(self.frozen):
            with torch.no_grad():
                n = y_float.shape[0]
                bn.running_mean.lerp_(mean_b, bn.momentum)
                bn.running_var.lerp_(var_b * n / max(n - 1, 1), bn.momentum)
        sigma_b = torch.sqrt(var_b + bn.eps)
        sigma = torch.sqrt(bn.running_var + bn.eps)
        gamma, beta = bn.weight, bn.bias
        if self.fold == "naive":  # Fig. 8: fold with the batch statistics
            return F.linear(x, self.wq(self.weight * (gamma / sigma_b)[:, None]), beta - gamma * mean_b / sigma_b)
        y = F.linear(x, self.wq(self.weight * (gamma / sigma)[:, None]))  # eqs. 22-24
        if bool(self.frozen):
            return y + beta - gamma * bn.running_mean / sigma  # eqs. 28-31
        return y * (sigma / sigma_b) + beta - gamma * mean_b / sigma_b  # eqs. 25-27
