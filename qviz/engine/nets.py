"""The networks of the papers, as plain PyTorch models quantized through `quantize_model`.

- `FCDNN`: the fully connected "width-depth" networks of 002 §3 on the 2-D semicircles.
- `MLP`: LeNet-300-100-shaped fully connected networks (001's LeNet300) for the 8x8 digits.
- `SmallResNet` with the basic, pre-activation and depthwise residual blocks of 002 Fig. 4.

Each network is float and declares where 002 quantizes its activations (`ActivationPoint`s: after every
hidden ReLU, QA, and on residual sums, QRA). The constructors' `w_spec` / `a_spec` arguments are a
shorthand for `quantize_model` applied in place, so a network built quantized and a float network
quantized later are the same model.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from qviz import _checks
from qviz.engine.layers import BN_FOLDS, ActivationPoint, LinearBN, check_spec
from qviz.engine.quantizers import QuantSpec

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
    Activation points: `acts.i` after hidden layer i's ReLU (QA), `shortcuts.i` on the residual sum (QRA,
    002 Fig. 4; quantized only when asked). batchnorm puts a batch norm after each hidden linear layer,
    folded for quantization as `bn_fold` says (see LinearBN). Inputs are multiplied by `input_scale`.

    w_spec / a_spec quantize the weights of every layer and the activation after every hidden ReLU (None:
    float); quantize_shortcut also quantizes the residual sums with shortcut_spec (default a_spec).
    overrides maps a layer index (negative counts from the end) to {"w_spec": ..., "a_spec": ...}, e.g.
    {0: {"w_spec": None}, -1: {"w_spec": None}} keeps the first and last layers in float (000 §4.2).
    With a_spec = bnn_act the quantizer is the nonlinearity (sign replaces ReLU, as in BNN). These
    arguments apply `quantize_model`'s configuration in place (`config()` returns them).
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
        self.bn_fold = _checks.choice("bn_fold", bn_fold, BN_FOLDS)
        self.w_spec, self.a_spec = check_spec("w_spec", w_spec), check_spec("a_spec", a_spec)
        self.shortcut_spec = check_spec("shortcut_spec", shortcut_spec) or self.a_spec
        self.overrides = self._check_overrides(overrides)
        self.stochastic = _checks.boolean("stochastic", stochastic)
        self.input_scale = _checks.real("input_scale", input_scale, 0.0, lo_open=True)
        sizes = [_checks.integer("in_features", in_features, 1)] + [self.width] * (self.depth - 1)
        sizes.append(_checks.integer("classes", classes, 2))
        params = sum((a + 1) * b for a, b in itertools.pairwise(sizes))
        if params > MAX_PARAMETERS:
            raise ValueError(f"width={self.width}, depth={self.depth} make {params:,} parameters; allowed: at most "
                             f"{MAX_PARAMETERS:,} (this network is for the 2-D toy problems of 002 §3)")
        hidden = range(self.depth - 1)
        self.layers = nn.ModuleList(
            LinearBN(sizes[i], sizes[i + 1], fold=bn_fold) if batchnorm and i < self.depth - 1
            else nn.Linear(sizes[i], sizes[i + 1]) for i in range(self.depth))
        self.acts = nn.ModuleList(ActivationPoint() for _ in hidden)
        self.shortcuts = nn.ModuleList(ActivationPoint(by_default=False) for _ in hidden)
        if any(s is not None for s in (self.w_spec, self.a_spec)) or self.quantize_shortcut or self.overrides:
            from qviz.engine.quantize import quantize_in_place

            quantize_in_place(self, self.w_spec, self.a_spec, self.quantization_overrides(), stochastic=stochastic)

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
            checked[i] = {k: check_spec(f"overrides[{index}][{k!r}]", v) for k, v in entry.items()}
        return checked

    def quantization_overrides(self) -> dict:
        """This network's settings as quantize_model overrides (by module name)."""
        return fcdnn_overrides(self.depth, self.residual, self.quantize_shortcut, self.shortcut_spec, self.overrides)

    def specs_of(self, i: int) -> tuple[QuantSpec | None, QuantSpec | None]:
        """The (weight, activation) specs layer i uses after overrides."""
        entry = self.overrides.get(i % self.depth, {})
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
            a = self.acts[i].after_relu(layer(h))
            h = self.shortcuts[i](0.5 * (a + h)) if self.residual and i > 0 else a
            states.append(h)
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = self.hidden_states(x)
        return self.layers[-1](states[-1])

    def linear_weights(self) -> list[torch.Tensor]:
        """The float (shadow) weight matrices [out, in] of every layer, in order."""
        from qviz.engine.quantize import float_weight

        return [layer.weight if isinstance(layer, LinearBN) else float_weight(layer) for layer in self.layers]

    def calibrate(self, X: torch.Tensor, batch: int = 4096) -> FCDNN:
        """Set every activation range from data without training (post-training quantization, 004 §3.1.2):
        a moving average of the batches' ranges, as training would have found."""
        from qviz.engine.quantize import calibrate

        calibrate(self, [X[start:start + batch] for start in range(0, len(X), batch)], method="moving_average")
        return self


def fcdnn_overrides(depth: int, residual: bool, quantize_shortcut: bool, shortcut_spec: QuantSpec | None,
                    overrides: dict[int, dict]) -> dict:
    """FCDNN's settings (quantized shortcuts, overrides by layer index) as quantize_model overrides by name."""
    out: dict = {}
    if quantize_shortcut and residual:  # the residual sums start at the second hidden layer
        out.update({f"shortcuts.{i}": {"activations": shortcut_spec} for i in range(1, depth - 1)})
    for i, entry in overrides.items():
        if "w_spec" in entry:
            out[f"layers.{i}"] = {"weights": entry["w_spec"]}
        if "a_spec" in entry and i < depth - 1:
            out[f"acts.{i}"] = {"activations": entry["a_spec"]}
    return out


class MLP(nn.Module):
    """Fully connected ReLU network with any layer sizes, e.g. LeNet-300-100 (64 -> 300 -> 100 -> 10
    on the 8x8 digits, the LeNet300 of 001). Activation points after every hidden ReLU."""

    def __init__(self, sizes: tuple[int, ...] = (64, 300, 100, 10), w_spec: QuantSpec | None = None,
                 a_spec: QuantSpec | None = None):
        super().__init__()
        if not isinstance(sizes, tuple | list) or len(sizes) < 2:
            raise ValueError(f"sizes must list at least an input and an output size, got {sizes!r}")
        self.sizes = tuple(_checks.integer("sizes[i]", s, 1) for s in sizes)
        self.w_spec, self.a_spec = check_spec("w_spec", w_spec), check_spec("a_spec", a_spec)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(self.sizes))
        self.acts = nn.ModuleList(ActivationPoint() for _ in self.sizes[1:-1])
        if w_spec is not None or a_spec is not None:
            from qviz.engine.quantize import quantize_in_place

            quantize_in_place(self, w_spec, a_spec)

    def config(self) -> dict:
        return {"sizes": self.sizes, "w_spec": self.w_spec, "a_spec": self.a_spec}

    def quantization_overrides(self) -> dict:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        for layer, act in zip(self.layers[:-1], self.acts, strict=True):
            h = act.after_relu(layer(h))
        return self.layers[-1](h)


BLOCKS = ("basic", "preact", "depthwise")


class ResidualBlock(nn.Module):
    """The three residual blocks of 002 Fig. 4, with activation points after every ReLU (QA) and on the
    residual addition (QRA).

    basic:     x -> conv-bn-relu-QA -> conv-bn, + x -> relu -> QRA
    preact:    x -> bn-relu-QA -> conv -> bn-relu-QA -> conv, + x -> QRA
    depthwise: x -> 1x1 expand-bn-relu-QA -> 3x3 depthwise-bn-relu-QA -> 1x1 project-bn, + x -> QRA
    """

    def __init__(self, kind: str, channels: int, expand: int = 4):
        super().__init__()
        self.kind = _checks.choice("kind", kind, BLOCKS)
        c = channels

        def conv(cin, cout, k, groups=1):
            return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)

        if kind == "basic":
            self.body = nn.ModuleList([conv(c, c, 3), nn.BatchNorm2d(c), conv(c, c, 3), nn.BatchNorm2d(c)])
        elif kind == "preact":
            self.body = nn.ModuleList([nn.BatchNorm2d(c), conv(c, c, 3), nn.BatchNorm2d(c), conv(c, c, 3)])
        else:
            e = c * expand
            self.body = nn.ModuleList([conv(c, e, 1), nn.BatchNorm2d(e), conv(e, e, 3, groups=e), nn.BatchNorm2d(e),
                                       conv(e, c, 1), nn.BatchNorm2d(c)])
        self.qa = nn.ModuleList([ActivationPoint(), ActivationPoint()])
        self.qra = ActivationPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, qa = self.body, self.qa
        if self.kind == "basic":
            h = b[3](b[2](qa[0].after_relu(b[1](b[0](x)))))
            return self.qra.after_relu(h + x)
        if self.kind == "preact":
            h = b[1](qa[0].after_relu(b[0](x)))
            h = b[3](qa[1].after_relu(b[2](h)))
            return self.qra(h + x)
        h = qa[0].after_relu(b[1](b[0](x)))
        h = qa[1].after_relu(b[3](b[2](h)))
        return self.qra(b[5](b[4](h)) + x)


class SmallResNet(nn.Module):
    """A small residual CNN for 8x8 images: stem conv, `blocks` residual blocks of one kind, global
    average pooling and a linear classifier (the block-type comparison of 002 Fig. 8, in miniature).
    The stem's and the classifier's weights stay float (000 §4.2; `quantization_overrides`)."""

    def __init__(self, block: str = "basic", blocks: int = 2, channels: int = 16, w_spec: QuantSpec | None = None,
                 a_spec: QuantSpec | None = None, classes: int = 10):
        super().__init__()
        self.block = _checks.choice("block", block, BLOCKS)
        self.blocks = _checks.integer("blocks", blocks, 1, 64)
        self.channels = _checks.integer("channels", channels, 1, 1024)
        self.w_spec, self.a_spec = check_spec("w_spec", w_spec), check_spec("a_spec", a_spec)
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.stem_q = ActivationPoint()
        self.body = nn.Sequential(*(ResidualBlock(block, channels) for _ in range(blocks)))
        self.head = nn.Linear(channels, _checks.integer("classes", classes, 2))
        if w_spec is not None or a_spec is not None:
            from qviz.engine.quantize import quantize_in_place

            quantize_in_place(self, w_spec, a_spec, self.quantization_overrides())

    def config(self) -> dict:
        return {"block": self.block, "blocks": self.blocks, "channels": self.channels, "w_spec": self.w_spec,
                "a_spec": self.a_spec}

    def quantization_overrides(self) -> dict:
        """The first and last layers keep float weights (000 §4.2)."""
        return {"stem": {"weights": None}, "head": {"weights": None}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_q.after_relu(self.stem_bn(self.stem(x.reshape(x.shape[0], 1, 8, 8))))
        return self.head(self.body(h).mean(dim=(2, 3)))
