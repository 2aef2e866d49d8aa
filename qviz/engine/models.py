"""Models and the operations on them that quantization needs.

Batch-norm folding (004 eqs. 20-21) as a pure function on tensors; quantized linear layers with float
shadow weights (002 eqs. 2-4) and batch-norm folding for QAT (004 eqs. 22-31); activation quantizers
with moving-average ranges (004 §2.5); the fully connected networks of 002 §3 (FCDNN).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from qviz import _checks
from qviz.engine.observers import MovingAverageMinMaxObserver
from qviz.engine.quantizers import QuantSpec, fake_quantize


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


# --------------------------------------------------------------------------------------------------
# Quantized layers


def _check_spec(name: str, spec) -> QuantSpec | None:
    if spec is not None and not isinstance(spec, QuantSpec):
        raise TypeError(f"{name} must be a QuantSpec or None (float), got {type(spec).__name__}")
    return spec


# Where training swaps a deterministic weight quantizer for its stochastic twin (004 §2.3, §4).
STOCHASTIC_TWIN = {"affine": "stochastic", "binary": "binary_stochastic"}


def _training_spec(spec: QuantSpec | None, stochastic: bool) -> QuantSpec | None:
    if spec is None or not stochastic:
        return spec
    if spec.scheme not in STOCHASTIC_TWIN:
        raise ValueError(f"stochastic training is available for weight schemes {sorted(STOCHASTIC_TWIN)}, "
                         f"got scheme={spec.scheme!r}")
    return spec.replace(scheme=STOCHASTIC_TWIN[spec.scheme])


class WeightQuantizer(nn.Module):
    """Fake-quantizes a layer's float shadow weights on every forward (002 eqs. 2-4, 004 eq. 17).

    Holds the learnable α of the `ceil` scheme (starting at max|w| unless the spec gives one). With
    `stochastic=True` training uses the scheme's stochastic twin (affine -> stochastic, binary ->
    binary_stochastic) and evaluation the deterministic scheme, as 004 §4 compares.
    """

    def __init__(self, spec: QuantSpec | None, stochastic: bool = False):
        super().__init__()
        self.spec = _check_spec("w_spec", spec)
        self.train_spec = _training_spec(spec, stochastic)
        learns_alpha = spec is not None and spec.scheme == "ceil"
        # 001 leaves α's start open; α = max|w| of the first weights seen keeps the quantized layer at the
        # float layer's scale (α = 1 would blow small weights up twentyfold). -1 marks "not yet set".
        self.alpha = nn.Parameter(torch.tensor(spec.alpha or -1.0)) if learns_alpha else None
        self._cached: tuple | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.spec is None:
            return w
        if self.alpha is not None and float(self.alpha.detach()) <= 0:
            with torch.no_grad():
                self.alpha.fill_(float(w.detach().abs().max()) or 1.0)
        if self.training or torch.is_grad_enabled() or not isinstance(w, nn.Parameter):
            return fake_quantize(w, self.train_spec if self.training else self.spec, alpha=self.alpha)
        # Inference quantizes the same weights for every batch: do it once until they change (folded
        # weights are computed afresh each time and are not cached).
        key = (id(w), w._version, None if self.alpha is None else float(self.alpha.detach()))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, fake_quantize(w, self.spec, alpha=self.alpha))
        return self._cached[1]


# Schemes whose range an activation quantizer fixes from its moving-average observer (004 §2.5);
# the others either have a fixed range (dorefa_act, bnn_act), learn it (pact) or are defined on the
# tensor at hand (ceil_act's max, ternary's Δ, ...).
_OBSERVED = {"affine", "symmetric", "stochastic", "relu"}


class ActivationQuantizer(nn.Module):
    """Fake-quantizes activations with a range from a moving average of batch min/max (004 §2.5).

    Training batches update the range, evaluation uses it as it stands (so a decision map is a pure
    function of the input). PACT learns its clip α, initialised (and set by calibration) to the clip
    with the least squared quantization error on the data seen (`mse_clip`).
    """

    def __init__(self, spec: QuantSpec | None, momentum: float = 0.1):
        super().__init__()
        self.spec = _check_spec("a_spec", spec)
        self.observer = MovingAverageMinMaxObserver(momentum)
        self.calibrating = False
        self.alpha = nn.Parameter(torch.tensor(-1.0)) if spec is not None and spec.scheme == "pact" else None

    def reset_range(self) -> None:
        self.observer.min_val, self.observer.max_val = torch.tensor([]), torch.tensor([])

    def _fixed(self, x: torch.Tensor) -> QuantSpec:
        spec = self.spec
        if spec.scheme not in _OBSERVED or spec.clip is not None:
            return spec
        if self.training or self.calibrating or not self.observer.initialized:
            self.observer(x.detach())
        lo, hi = float(self.observer.min_val.min()), float(self.observer.max_val.max())
        if spec.scheme == "relu":
            return spec.replace(clip=max(hi, 1e-8))
        if spec.scheme == "symmetric":
            return spec.replace(clip=max(abs(lo), abs(hi), 1e-8))
        return spec.replace(clip=(lo, hi) if lo < hi else (lo - 1e-8, hi + 1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None:
            return x
        if self.alpha is not None:
            if self.calibrating or float(self.alpha.detach()) <= 0:
                with torch.no_grad():
                    self.alpha.fill_(mse_clip(x.detach(), self.spec))
            return fake_quantize(x, self.spec, alpha=self.alpha)
        return fake_quantize(x, self._fixed(x))


def mse_clip(x: torch.Tensor, spec: QuantSpec, candidates: int = 24) -> float:
    """The clip α in [q50, max] of the positive values of x that minimises the mean squared quantization
    error of `spec` with clip α: where PACT starts (and what calibration sets) before α learns.

    At 2 bits the largest activation is a poor clip: most values fall into the first step. A learned α
    moves only as fast as its learning rate, so a good start saves most of the retraining.
    """
    positive = x[x > 0].reshape(-1)
    if positive.numel() == 0:
        return 1e-3
    sample = positive[torch.randperm(positive.numel(), generator=torch.Generator().manual_seed(0))[:65536]]
    quantiles = torch.quantile(sample, torch.linspace(0.5, 1.0, candidates))
    best, best_err = float(quantiles[-1]), float("inf")
    for alpha in quantiles.tolist():
        if alpha <= 0:
            continue
        err = float(((fake_quantize(sample, spec, alpha=torch.tensor(alpha)) - sample) ** 2).mean())
        if err < best_err:
            best, best_err = alpha, err
    return max(best, 1e-3)


class QuantLinear(nn.Linear):
    """nn.Linear whose weights pass through a WeightQuantizer."""

    def __init__(self, in_features: int, out_features: int, w_spec: QuantSpec | None = None, *,
                 bias: bool = True, stochastic: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.wq = WeightQuantizer(w_spec, stochastic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wq(self.weight), self.bias)


BN_FOLDS = ("none", "naive", "corrected")


class QuantLinearBN(nn.Module):
    """Linear + batch norm whose weights are quantized after folding (004 §3.2.2, eqs. 18-31).

    fold="none": the float BN runs after a linear layer with quantized W (no folding; what inference
    cannot do). fold="naive": training quantizes γW/σ_B with the batch's σ_B and adds β - γμ_B/σ_B
    (Fig. 8), so the quantized weights jitter from batch to batch. fold="corrected": training quantizes
    w_corrected = γW/σ with the long-term σ (eqs. 22-23) and rescales the output by c = σ_B/σ
    (eqs. 24-27) until `freeze()`, after which the long-term statistics are frozen and used throughout
    (eqs. 28-31). Evaluation always runs the inference graph: Q(γW/σ) x + β - γμ/σ (eqs. 20-21).
    """

    def __init__(self, in_features: int, out_features: int, w_spec: QuantSpec | None = None, *,
                 fold: str = "corrected", stochastic: bool = False, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        _checks.choice("fold", fold, BN_FOLDS)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bn = nn.BatchNorm1d(out_features, eps=eps, momentum=momentum)
        self.wq = WeightQuantizer(w_spec, stochastic)
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


# --------------------------------------------------------------------------------------------------
# The fully connected networks of 002 §3


# Fixed preprocessing inside every FCDNN: the rings are 0.1 apart inside [-1, 1.1]²; a ReLU network learns
# structure that fine several times faster when its inputs are spread by 4 (measured: 128-4 reaches 96%
# correct answers in 1,500 steps at scale 4, 85% at scale 1). The input itself is never quantized.
INPUT_SCALE = 4.0
MAX_PARAMETERS = 200_000_000  # 800 MB of float32 weights: allocating more would freeze a laptop or Binder


class FCDNN(nn.Module):
    """Fully connected ReLU network "width-depth" of 002 §3.2: `depth` linear layers, `width` units each.

    2 -> width -> ... -> width -> 2 logits, so depth counts every linear layer (002 App. A: 200-4 has
    81K parameters, 128-6 66K). residual: each hidden layer's output is added to the previous hidden
    state and the sum halved, h <- 0.5 (act(W h + b) + h) (002 §3.2), from the second hidden layer on.
    w_spec / a_spec quantize the weights of every layer and the activation after every hidden ReLU
    (None: float); quantize_shortcut also quantizes the residual sum (002 Fig. 4 "QRA") with
    shortcut_spec (default a_spec). batchnorm puts a batch norm after each hidden linear layer, folded
    for quantization as `bn_fold` says (see QuantLinearBN). overrides maps a layer index (negative
    counts from the end) to {"w_spec": ..., "a_spec": ...}, e.g. {0: {"w_spec": None}, -1: {"w_spec":
    None}} keeps the first and last layers in float (000 §4.2). With a_spec = bnn_act the quantizer is the
    nonlinearity (sign replaces ReLU, as in BNN). Inputs are multiplied by `input_scale` first.
    """

    def __init__(self, width: int = 128, depth: int = 4, residual: bool = False, w_spec: QuantSpec | None = None,
                 a_spec: QuantSpec | None = None, batchnorm: bool = False, *, quantize_shortcut: bool = False,
                 shortcut_spec: QuantSpec | None = None, overrides: dict | None = None, bn_fold: str = "corrected",
                 stochastic: bool = False, in_features: int = 2, classes: int = 2, input_scale: float = INPUT_SCALE):
        super().__init__()
        self.width = _checks.integer("width", width, 1, 65536)
        self.depth = _checks.integer("depth", depth, 2, 256)
        self.residual = _checks.boolean("residual", residual)
        self.batchnorm = _checks.boolean("batchnorm", batchnorm)
        self.quantize_shortcut = _checks.boolean("quantize_shortcut", quantize_shortcut)
        _checks.choice("bn_fold", bn_fold, BN_FOLDS)
        self.w_spec, self.a_spec = _check_spec("w_spec", w_spec), _check_spec("a_spec", a_spec)
        self.shortcut_spec = _check_spec("shortcut_spec", shortcut_spec) or self.a_spec
        self.overrides = self._check_overrides(overrides)
        self.stochastic = _checks.boolean("stochastic", stochastic)
        self.bn_fold = bn_fold
        self.input_scale = _checks.real("input_scale", input_scale, 0.0, lo_open=True)
        sizes = [_checks.integer("in_features", in_features, 1)] + [self.width] * (self.depth - 1)
        sizes.append(_checks.integer("classes", classes, 2))
        params = sum((a + 1) * b for a, b in itertools.pairwise(sizes))
        if params > MAX_PARAMETERS:
            raise ValueError(f"width={self.width}, depth={self.depth} make {params:,} parameters; allowed: at most "
                             f"{MAX_PARAMETERS:,} (this network is for the 2-D toy problems of 002 §3)")
        layers, acts, shortcuts = [], [], []
        for i in range(self.depth):
            w_i, a_i = self.specs_of(i)
            hidden = i < self.depth - 1
            if hidden and batchnorm:
                layers.append(QuantLinearBN(sizes[i], sizes[i + 1], w_i, fold=bn_fold, stochastic=stochastic))
            else:
                layers.append(QuantLinear(sizes[i], sizes[i + 1], w_i, stochastic=stochastic))
            if hidden:
                acts.append(ActivationQuantizer(a_i))
                shortcut = residual and quantize_shortcut and i > 0
                shortcuts.append(ActivationQuantizer(self.shortcut_spec if shortcut else None))
        self.layers, self.acts, self.shortcuts = nn.ModuleList(layers), nn.ModuleList(acts), nn.ModuleList(shortcuts)

    def _check_overrides(self, overrides) -> dict[int, dict]:
        if overrides is None:
            return {}
        if not isinstance(overrides, dict):
            raise TypeError(f"overrides must be a dict of layer index -> {{'w_spec': ..., 'a_spec': ...}}, "
                            f"got {type(overrides).__name__}")
        checked = {}
        for index, entry in overrides.items():
            i = _checks.integer("overrides key", index, -self.depth, self.depth - 1) % self.depth
            if not isinstance(entry, dict) or not set(entry) <= {"w_spec", "a_spec"}:
                raise ValueError(f"overrides[{index}] must be a dict with keys among 'w_spec', 'a_spec', got {entry!r}")
            checked[i] = {k: _check_spec(f"overrides[{index}][{k!r}]", v) for k, v in entry.items()}
        return checked

    def specs_of(self, i: int) -> tuple[QuantSpec | None, QuantSpec | None]:
        """The (weight, activation) specs layer i uses after overrides."""
        entry = self.overrides.get(i, {})
        return entry.get("w_spec", self.w_spec), entry.get("a_spec", self.a_spec)

    def config(self) -> dict:
        """The constructor arguments, to build a twin of this network."""
        return {"width": self.width, "depth": self.depth, "residual": self.residual, "w_spec": self.w_spec,
                "a_spec": self.a_spec, "batchnorm": self.batchnorm, "quantize_shortcut": self.quantize_shortcut,
                "shortcut_spec": self.shortcut_spec, "overrides": self.overrides, "bn_fold": self.bn_fold,
                "stochastic": self.stochastic, "input_scale": self.input_scale}

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every hidden state h_1 .. h_{depth-1} (after activation quantization and any residual sum)."""
        states, h = [], x * self.input_scale
        for i, layer in enumerate(self.layers[:-1]):
            act = self.acts[i]
            z = layer(h)
            a = act(z if act.spec is not None and act.spec.scheme == "bnn_act" else F.relu(z))
            h = self.shortcuts[i](0.5 * (a + h)) if self.residual and i > 0 else a
            states.append(h)
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = self.hidden_states(x)
        return self.layers[-1](states[-1])

    def linear_weights(self) -> list[torch.Tensor]:
        """The float (shadow) weight matrices [out, in] of every layer, in order."""
        return [layer.weight for layer in self.layers]

    def calibrate(self, X: torch.Tensor, batch: int = 4096) -> FCDNN:
        """Set every activation range from data without training (post-training quantization, 004 §3.1.2)."""
        quantizers = [*self.acts, *self.shortcuts]
        was_training = self.training
        self.eval()
        for q in quantizers:
            q.reset_range()
            q.calibrating = True
        try:
            with torch.no_grad():
                for start in range(0, len(X), batch):
                    self(X[start:start + batch])
        finally:
            for q in quantizers:
                q.calibrating = False
            self.train(was_training)
        return self


def quantized_copy(model: FCDNN, w_spec: QuantSpec | None, a_spec: QuantSpec | None, **changes) -> FCDNN:
    """An FCDNN like `model` with other quantizers, starting from model's float weights (shadow weights)."""
    if not isinstance(model, FCDNN):
        raise TypeError(f"model must be an FCDNN, got {type(model).__name__}")
    return _twin(model, w_spec=w_spec, a_spec=a_spec, shortcut_spec=None, **changes)


def _twin(model: nn.Module, **changes) -> nn.Module:
    """type(model) built from model.config() with `changes`, holding model's float weights and batch-norm
    statistics but none of its quantizers' state (ranges, α): the new quantizers start afresh."""
    twin = type(model)(**{**model.config(), **changes})
    quantizers = tuple(f"{name}." for name, m in model.named_modules()
                       if isinstance(m, WeightQuantizer | ActivationQuantizer))
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(quantizers)}, strict=False)
    return twin


@dataclasses.dataclass
class WeightLayer:
    """A layer with a weight matrix or kernel, and its batch norm if one follows it."""

    name: str
    module: nn.Module
    bn: nn.Module | None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.detach()

    def folded_weight(self) -> torch.Tensor | None:
        """γ W / σ with the batch norm's running statistics (004 eq. 20), or None without a batch norm."""
        if self.bn is None:
            return None
        bn = self.bn
        return fold_batchnorm(self.weight, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var,
                              bn.eps)[0]


def weight_layers(model: nn.Module) -> list[WeightLayer]:
    """Every Linear / Conv layer of `model` (QuantLinearBN included) with the batch norm that follows it.

    A batch norm follows a layer when it is the layer's own (QuantLinearBN) or the next module in
    registration order and has as many features as the layer has outputs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = [(n, m) for n, m in model.named_modules() if n]
    layers = []
    for i, (name, m) in enumerate(modules):
        if isinstance(m, QuantLinearBN):
            layers.append(WeightLayer(name, m, m.bn))
        elif isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) and not _inside_linear_bn(name, modules):
            follower = modules[i + 1][1] if i + 1 < len(modules) else None
            out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            is_bn = isinstance(follower, nn.modules.batchnorm._BatchNorm) and follower.num_features == out
            bn = follower if is_bn else None
            layers.append(WeightLayer(name, m, bn))
    return layers


def _inside_linear_bn(name: str, modules) -> bool:
    return any(isinstance(m, QuantLinearBN) and name.startswith(n + ".") for n, m in modules)


# --------------------------------------------------------------------------------------------------
# A real data set's models: LeNet-300-style MLP and small residual CNNs (for the sweeps)


class MLP(nn.Module):
    """Fully connected ReLU network with any layer sizes, e.g. LeNet-300-100 (64 -> 300 -> 100 -> 10
    on the 8x8 digits, the LeNet300 of 001). Weights and hidden activations quantized as in FCDNN."""

    def __init__(self, sizes: tuple[int, ...] = (64, 300, 100, 10), w_spec: QuantSpec | None = None,
                 a_spec: QuantSpec | None = None):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least an input and an output size, got {sizes!r}")
        self.sizes = tuple(_checks.integer("sizes[i]", s, 1) for s in sizes)
        self.w_spec, self.a_spec = _check_spec("w_spec", w_spec), _check_spec("a_spec", a_spec)
        self.layers = nn.ModuleList(QuantLinear(a, b, w_spec) for a, b in itertools.pairwise(sizes))
        self.acts = nn.ModuleList(ActivationQuantizer(a_spec) for _ in sizes[1:-1])

    def config(self) -> dict:
        return {"sizes": self.sizes, "w_spec": self.w_spec, "a_spec": self.a_spec}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        for layer, act in zip(self.layers[:-1], self.acts, strict=True):
            h = act(F.relu(layer(h)))
        return self.layers[-1](h)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weights pass through a WeightQuantizer (per output channel along axis 0)."""

    def __init__(self, *args, w_spec: QuantSpec | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.wq = WeightQuantizer(w_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.wq(self.weight), self.bias)


BLOCKS = ("basic", "preact", "depthwise")


class ResidualBlock(nn.Module):
    """The three residual blocks of 002 Fig. 4, with activation quantization (QA) after every ReLU and
    quantization of the residual addition (QRA).

    basic:     x -> conv-bn-relu-QA -> conv-bn, + x -> relu -> QRA
    preact:    x -> bn-relu-QA -> conv -> bn-relu-QA -> conv, + x -> QRA
    depthwise: x -> 1x1 expand-bn-relu-QA -> 3x3 depthwise-bn-relu-QA -> 1x1 project-bn, + x -> QRA
    """

    def __init__(self, kind: str, channels: int, w_spec: QuantSpec | None, a_spec: QuantSpec | None,
                 expand: int = 4):
        super().__init__()
        _checks.choice("kind", kind, BLOCKS)
        self.kind = kind
        c = channels

        def conv(cin, cout, k, groups=1):
            return QuantConv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False, w_spec=w_spec)

        if kind == "basic":
            self.body = nn.ModuleList([conv(c, c, 3), nn.BatchNorm2d(c), conv(c, c, 3), nn.BatchNorm2d(c)])
        elif kind == "preact":
            self.body = nn.ModuleList([nn.BatchNorm2d(c), conv(c, c, 3), nn.BatchNorm2d(c), conv(c, c, 3)])
        else:
            e = c * expand
            self.body = nn.ModuleList([conv(c, e, 1), nn.BatchNorm2d(e), conv(e, e, 3, groups=e), nn.BatchNorm2d(e),
                                       conv(e, c, 1), nn.BatchNorm2d(c)])
        self.qa = nn.ModuleList([ActivationQuantizer(a_spec), ActivationQuantizer(a_spec)])
        self.qra = ActivationQuantizer(a_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, qa = self.body, self.qa
        if self.kind == "basic":
            h = b[3](b[2](qa[0](F.relu(b[1](b[0](x))))))
            return self.qra(F.relu(h + x))
        if self.kind == "preact":
            h = b[1](qa[0](F.relu(b[0](x))))
            h = b[3](qa[1](F.relu(b[2](h))))
            return self.qra(h + x)
        h = qa[0](F.relu(b[1](b[0](x))))
        h = qa[1](F.relu(b[3](b[2](h))))
        return self.qra(b[5](b[4](h)) + x)


class SmallResNet(nn.Module):
    """A small residual CNN for 8x8 images: stem conv, `blocks` residual blocks of one kind, global
    average pooling and a linear classifier (the block-type comparison of 002 Fig. 8, in miniature)."""

    def __init__(self, block: str = "basic", blocks: int = 2, channels: int = 16, w_spec: QuantSpec | None = None,
                 a_spec: QuantSpec | None = None, classes: int = 10):
        super().__init__()
        _checks.choice("block", block, BLOCKS)
        self.block, self.blocks = block, _checks.integer("blocks", blocks, 1, 64)
        self.channels = _checks.integer("channels", channels, 1, 1024)
        self.w_spec, self.a_spec = _check_spec("w_spec", w_spec), _check_spec("a_spec", a_spec)
        self.stem = QuantConv2d(1, channels, 3, padding=1, bias=False, w_spec=None)  # first layer kept in float
        self.stem_bn = nn.BatchNorm2d(channels)
        self.stem_q = ActivationQuantizer(a_spec)
        self.body = nn.Sequential(*(ResidualBlock(block, channels, w_spec, a_spec) for _ in range(blocks)))
        self.head = QuantLinear(channels, classes, None)  # last layer kept in float (000 §4.2)

    def config(self) -> dict:
        return {"block": self.block, "blocks": self.blocks, "channels": self.channels, "w_spec": self.w_spec,
                "a_spec": self.a_spec}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_q(F.relu(self.stem_bn(self.stem(x.reshape(x.shape[0], 1, 8, 8)))))
        return self.head(self.body(h).mean(dim=(2, 3)))


def requantized(model: MLP | SmallResNet, w_spec: QuantSpec | None, a_spec: QuantSpec | None) -> nn.Module:
    """A twin of an MLP or SmallResNet with other quantizers, starting from its float weights."""
    return _twin(model, w_spec=w_spec, a_spec=a_spec)
