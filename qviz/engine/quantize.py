"""Quantize any PyTorch model: `quantize_model`, `calibrate`, `quantized_layers`, `dequantize_model`,
`export_onnx`.

    qm = quantize_model(model, weights=8, activations=8, overrides={"conv1": None, "layer4.*": 4})
    calibrate(qm, batches)          # activation ranges from data
    quantized_layers(qm)            # what was quantized, and how

What is quantized, and why:

- Weights of every Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Hugging Face Conv1D (GPT-2's linear layers,
  weights [in, out]) and the input projection of every MultiheadAttention (its output projection is a
  Linear, weights only): the matrices an integer kernel would hold. Per channel means per output
  channel for every one of them, grouped transposed convolutions included (their weight axis 1 holds
  each slot once per group; PyTorch's own per-channel observers refuse them).
  A `WeightQuantizer` becomes a parametrization of the weight (torch.nn.utils.parametrize), so each layer
  keeps its class and attributes (`conv.stride`, `linear.in_features`) and anything that reads
  `layer.weight` reads quantized weights, PyTorch's fused attention kernels included.
- Activations at the inputs of quantized layers: the tensors an integer kernel would read (the x of Wx),
  as 004's simulated quantization places them (§3, Fig. 7). What flows between layers (residual sums,
  norms, softmax, the network's output) stays float unless it is some layer's input. A network may
  instead declare where its activations are quantized with `ActivationPoint` modules (the paper networks
  of nets.py do, after ReLUs and on residual sums as 002 does); then those points are used.
- Modules that own parameters but are none of the above (LSTM, GRU, Embedding, custom ops) stay float;
  one warning names them. Normalisation layers stay float without a warning (folded or not, they are not
  matrix multiplications).
- Defaults follow 004: 8-bit symmetric per-channel weights (narrow range, 004 §3.1 and Table 2) and 8-bit
  affine per-tensor activations with calibrated ranges (§2.5). A bit width picks those schemes (1-bit
  weights: sign times mean |w| per channel, 003 eq. 3-6); a QuantSpec is used as given.
- The first layer is quantized like every other: 000 §4.2 reports that TensorFlow recommends keeping it
  float but does not do it for you; `overrides={"conv1": None}` does.

PyTorch's fused fast paths (TransformerEncoderLayer and MultiheadAttention in eval mode) would skip the
activation quantizers inside them, so a model with such quantizers runs with those fast paths off during
its own forward (torch.backends.mha); quantized weights reach them either way.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import fnmatch
import functools
import inspect
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from qviz import _checks
from qviz.engine._onnx_ops import exporter_fixes
from qviz.engine.layers import (
    CALIBRATIONS,
    ActivationPoint,
    ActivationQuantizer,
    LinearBN,
    WeightQuantizer,
    begin_forward,
    by_output_channel,
    check_activation_spec,
    end_forward,
    fold_batchnorm,
)
from qviz.engine.quantizers import SCHEMES, QuantSpec

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = (nn.Linear, *_CONVS, *TRANSPOSED_CONVS, nn.MultiheadAttention, LinearBN)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_OURS = (WeightQuantizer, ActivationQuantizer, ActivationPoint)
_FAST_PATHS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


def _weight_input_major() -> tuple[type, ...]:
    """Linear layers that store their weight [in, out] and compute x @ W + b: Hugging Face's Conv1D (GPT-2's
    attention and MLP). Looked up only once transformers is loaded, so qviz never imports it."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) and issubclass(conv1d, nn.Module) else ()


def is_layer(m: nn.Module) -> bool:
    """Whether quantize_model quantizes `m`'s weights (LAYER_TYPES, or a weight-[in, out] linear layer)."""
    return isinstance(m, LAYER_TYPES + _weight_input_major())


class UnquantizedModuleWarning(UserWarning):
    """quantize_model left modules with parameters float because it cannot quantize them."""


# --------------------------------------------------------------------------------------------------
# What a layer is


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer quantize_model quantizes, in registration (network) order."""
    return [(name, m) for name, m in model.named_modules()
            if is_layer(m) and not _inside_ours(name, model)]


def _inside_ours(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), _OURS) or parts[i - 1] == "parametrizations":
            return True
    return False


def weight_names(layer: nn.Module) -> list[str]:
    """The weight tensors of a layer that are quantized (MultiheadAttention: its input projection)."""
    if isinstance(layer, nn.MultiheadAttention):
        if _original(layer, "in_proj_weight") is not None:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return ["weight"]


def _original(layer: nn.Module, name: str) -> torch.Tensor | None:
    """The float tensor behind a (possibly parametrized) weight: what qviz's quantizer is handed, i.e. the
    stored tensor after any parametrization of the user's own (weight norm) that comes before it."""
    if not parametrize.is_parametrized(layer, name):
        return getattr(layer, name, None)
    chain = layer.parametrizations[name]
    if len(chain) == 1 and isinstance(chain[0], WeightQuantizer):
        return chain.original
    originals = [chain.original] if chain.is_tensor else [getattr(chain, f"original{i}") for i in range(chain.ntensors)]
    value = None
    for i, p in enumerate(chain):
        if isinstance(p, WeightQuantizer):
            break
        value = p(*originals) if i == 0 else p(value)
    return originals[0] if value is None else value


def _our_quantizer(layer: nn.Module, name: str) -> WeightQuantizer | None:
    if not parametrize.is_parametrized(layer, name):
        return None
    return next((p for p in layer.parametrizations[name] if isinstance(p, WeightQuantizer)), None)


def float_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's float (shadow) weight, whatever quantizes it (MultiheadAttention: q, k, v stacked; with
    kdim or vdim other than embed_dim the three have different widths and come as one row of all)."""
    return _joined([_original(layer, n) for n in weight_names(layer)])


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A layer's weight tensors as one: stacked along dim 0 when their other dims agree (q, k, v of equal
    widths), else flattened into one row."""
    if len(tensors) == 1:
        return tensors[0]
    if len({t.shape[1:] for t in tensors}) == 1:
        return torch.cat(tensors, 0)
    return torch.cat([t.reshape(-1) for t in tensors]).unsqueeze(0)


def takes_input_quantizer(layer: nn.Module) -> bool:
    """Whether a quantizer on the layer's input would ever run. MultiheadAttention's output projection
    (class NonDynamicallyQuantizableLinear, used for nothing else) is never called as a module: PyTorch's
    attention function reads its weight and bias, so a pre-hook never sees its input. Its weights are
    quantized; its input (the attention output) stays float."""
    return not isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear)


def channel_axis(layer: nn.Module) -> int:
    """The output-channel axis of a layer's weight: 1 for transposed convolutions ([in, out/groups, ...]) and
    for linear layers that store [in, out] (GPT-2's Conv1D). With groups, a transposed convolution's axis 1
    holds out/groups slots, each serving one output channel per group: per-channel quantization along it
    quantizes each output channel on its own all the same (`weight_groups`, `output_channel_rows`)."""
    return 1 if isinstance(layer, TRANSPOSED_CONVS + _weight_input_major()) else 0


def weight_groups(layer: nn.Module) -> int:
    """Groups of a transposed convolution (whose output channels share slots of weight axis 1), else 1."""
    return int(layer.groups) if isinstance(layer, TRANSPOSED_CONVS) else 1


def output_channel_rows(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """The layer's weights w as one row per output channel, [out_channels, everything else]."""
    if weight_groups(layer) > 1:
        return by_output_channel(w, weight_groups(layer)).reshape(layer.out_channels, -1)
    axis = channel_axis(layer)
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def default_weight_spec(bits: int, layer: nn.Module | None = None, *, stochastic: bool = False) -> QuantSpec:
    """004's recommendation for weights: symmetric, narrow range, per output channel; 1 bit: sign times
    the mean |w| of each channel (003 eq. 3-6). stochastic=True picks the schemes that have a stochastic
    twin for QAT (004 §4): affine per output channel, and binary at 1 bit."""
    bits = _checks.integer("weights", bits, 1, 16)
    axis = 0 if layer is None else channel_axis(layer)
    if stochastic:
        return QuantSpec("binary", 1) if bits == 1 else QuantSpec("affine", bits, granularity="channel", axis=axis)
    if bits == 1:
        return QuantSpec("xnor", 1, granularity="channel", axis=axis)
    return QuantSpec("symmetric", bits, granularity="channel", axis=axis, narrow=True)


def default_activation_spec(bits: int) -> QuantSpec:
    """004's recommendation for activations: affine per tensor, range from calibration (§2.5)."""
    return QuantSpec("affine", _checks.integer("activations", bits, 1, 16))


def _weight_spec(value, layer: nn.Module, name: str, stochastic: bool = False) -> QuantSpec | None:
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, bool) or (not isinstance(value, int | type(None)) and not hasattr(value, "__index__")):
        raise TypeError(f"{name} must be a bit width (int), a QuantSpec or None (float), got {type(value).__name__}")
    return default_weight_spec(_checks.integer(name, value, 1, 16), layer, stochastic=stochastic)


def _activation_spec(value, name: str) -> QuantSpec | None:
    if value is None or isinstance(value, QuantSpec):
        return check_activation_spec(name, value)
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be a bit width (int), a QuantSpec or None (float), got {type(value).__name__}")
    return default_activation_spec(_checks.integer(name, value, 1, 16))


# --------------------------------------------------------------------------------------------------
# Overrides


_UNSET = object()


def _check_overrides(overrides) -> list[tuple[str, object, object]]:
    """[(pattern, weights, activations)] with _UNSET where an entry leaves the model-wide setting."""
    if overrides is None:
        return []
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a dict of module-name pattern -> None | bits | QuantSpec | "
                        f"{{'weights': ..., 'activations': ...}}, got {type(overrides).__name__}")
    checked = []
    for pattern, value in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError(f"overrides keys must be module-name patterns (str), got {pattern!r}")
        where = f"overrides[{pattern!r}]"
        if value is None:
            checked.append((pattern, None, None))
        elif isinstance(value, dict):
            unknown = set(value) - {"weights", "activations"}
            if unknown:
                raise ValueError(f"{where} has keys {sorted(unknown)}; allowed: 'weights', 'activations'")
            for key in value:
                _check_setting(f"{where}[{key!r}]", value[key])
            checked.append((pattern, value.get("weights", _UNSET), value.get("activations", _UNSET)))
        else:
            _check_setting(where, value)
            checked.append((pattern, value, _UNSET))  # a bare bit width or spec sets the weights
    return checked


def _check_setting(name: str, value) -> None:
    if value is None or isinstance(value, QuantSpec):
        return
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be None, a bit width (int) or a QuantSpec, got {type(value).__name__}")
    _checks.integer(name, value, 1, 16)


@dataclasses.dataclass
class _Plan:
    weights: dict[str, QuantSpec | None]
    activations: dict[str, QuantSpec | None]  # layer names (inputs) or ActivationPoint names


def _plan(model: nn.Module, weights, activations, overrides,
          stochastic: bool = False) -> tuple[_Plan, list[tuple[str, nn.Module]], bool]:
    layers = quantizable_layers(model)
    points = [(n, m) for n, m in model.named_modules() if isinstance(m, ActivationPoint)]
    declared = bool(points)
    rules = _check_overrides(overrides)
    w = {name: _weight_spec(weights, layer, "weights", stochastic) for name, layer in layers}
    if declared:
        a = {name: (_activation_spec(activations, "activations") if p.by_default else None) for name, p in points}
    else:
        a = {name: _activation_spec(activations, "activations") if takes_input_quantizer(layer) else None
             for name, layer in layers}
    layer_of = dict(layers)
    for pattern, w_value, a_value in rules:
        hit_layers = [n for n in w if _matches(pattern, n)]
        hit_points = [n for n, _ in points if _matches(pattern, n)]
        if not hit_layers and not hit_points:
            names = [n for n, _ in layers] + [n for n, _ in points]
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ValueError(f"overrides pattern {pattern!r} matches no quantizable layer or activation point; "
                             f"allowed: fnmatch patterns of these names: {shown}")
        for n in hit_layers:
            if w_value is not _UNSET:
                w[n] = _weight_spec(w_value, layer_of[n], f"overrides[{pattern!r}]", stochastic)
            # a network that declares its activation points quantizes activations there; a pattern that
            # names layers and no point quantizes those layers' inputs (what ModelAnalysis measures)
            if a_value is not _UNSET and not (declared and hit_points):
                spec = _activation_spec(a_value, f"overrides[{pattern!r}]")
                a[n] = spec if takes_input_quantizer(layer_of[n]) else None
        for n in hit_points:
            if a_value is not _UNSET:
                a[n] = _activation_spec(a_value, f"overrides[{pattern!r}]")
    return _Plan(w, a), layers, declared


def _matches(pattern: str, name: str) -> bool:
    """fnmatch on a module name; a pattern also matches everything inside the module it names."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


# --------------------------------------------------------------------------------------------------
# Installing quantizers


def quantize_model(model: nn.Module, weights=8, activations=8, overrides: dict | None = None, *,
                   stochastic: bool = False, fold_batchnorm: bool = False,
                   example: torch.Tensor | tuple | None = None) -> nn.Module:
    """A fake-quantized copy of `model`; `model` itself is never changed.

    weights / activations: a bit width (004's defaults: symmetric per-channel weights, affine per-tensor
    activations), a QuantSpec, or None (float). overrides: {fnmatch pattern of a module name: None (keep
    that layer float) | bits or QuantSpec (its weights) | {"weights": ..., "activations": ...}}; later
    entries win; a pattern that matches nothing is an error. In a network that declares its activation
    points (ActivationPoint), activations are quantized at those points; an entry whose pattern names
    layers and no point sets those layers' inputs instead (ModelAnalysis's per-layer view). stochastic:
    QAT uses each weight scheme's stochastic twin (004 §4); bit widths then pick schemes that have one
    (affine per channel; binary at 1 bit). fold_batchnorm: fold every batch norm that directly follows a
    convolution or linear layer into it first (004 eqs. 20-21: the inference graph); `example` (an input
    for the model) is run once to see which batch norms take a layer's output as theirs.

    The copy trains like any model (QAT: float shadow weights, straight-through gradients, 002 eqs. 2-4);
    `calibrate` sets activation ranges without training; `dequantize_model` gives a float model back.
    A torch.compile'd model gives a quantized copy of the module it compiles, not compiled (`uncompiled`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("model is a TorchScript module (torch.jit.script / trace): its forward is compiled code "
                        "that quantizers cannot join; pass the Python nn.Module it was made from")
    model = uncompiled(model)
    _refuse_torch_quantization(model)
    _checks.boolean("fold_batchnorm", fold_batchnorm)
    try:
        with _hook_norm_weights_detached(model):
            qmodel = copy.deepcopy(model)
    except Exception as err:  # third-party models may hold things that cannot be copied
        raise TypeError(f"model cannot be copied ({type(err).__name__}: {err}); quantize_model never changes "
                        "the model it is given, so it needs a copy") from err
    if fold_batchnorm:
        if example is None:
            raise ValueError("fold_batchnorm=True needs example=<an input for the model> to find the batch "
                             "norms that follow a layer")
        folded = _fold_batchnorms(qmodel, example, stacklevel=3)
        if folded and model.training:
            warnings.warn(f"fold_batchnorm=True folded {len(folded)} batch norm(s) with their running statistics, "
                          "but the model is in training mode, where they normalise with each batch's own: the "
                          "quantized model's training-mode outputs differ from the model's (fold a trained model "
                          "in eval mode; for quantization-aware training keep the batch norms, or use LinearBN)",
                          UserWarning, stacklevel=2)
    quantize_in_place(qmodel, weights, activations, overrides, stochastic=stochastic)
    return qmodel


def _refuse_torch_quantization(model: nn.Module) -> None:
    """A model prepared by PyTorch's own quantization (torch.ao prepare / prepare_qat) fake-quantizes inside
    its layers: qviz's quantizers would quantize them a second time, and its fused observers have no ONNX
    form."""
    from torch.ao.quantization import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizeBase | ObserverBase)), None)
    if found is not None:
        raise TypeError(f"model holds PyTorch's own quantization modules ({found[0]!r}: {type(found[1]).__name__}, "
                        "from torch.ao.quantization prepare or prepare_qat), which would quantize its layers a "
                        "second time; allowed: the float model from before prepare")


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a torch.compile wrapper compiles (its layers then keep their own names, not
    `_orig_mod.*`). Quantizers read their ranges as Python numbers, a graph break in every compiled
    forward, and the ONNX exporter refuses compiled code: the quantized copy is plain; compile it again."""
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def is_lazy(layer: nn.Module) -> bool:
    """Whether a layer's weights are not made yet (a Lazy* layer before its first forward)."""
    return any(isinstance(getattr(layer, n, None), nn.parameter.UninitializedParameter) for n in weight_names(layer))


def quantize_in_place(model: nn.Module, weights=8, activations=8, overrides: dict | None = None, *,
                      stochastic: bool = False) -> nn.Module:
    """quantize_model without the copy: configures `model` itself (the paper networks' constructors use it;
    calling it again reconfigures the same quantizers)."""
    _checks.boolean("stochastic", stochastic)
    plan, layers, declared = _plan(model, weights, activations, overrides, stochastic)
    for name, layer in layers:
        if is_lazy(layer) and plan.weights[name] is not None:
            raise ValueError(f"layer {name or ROOT_LAYER!r} ({type(layer).__name__}) has lazy weights, not made "
                             "yet; allowed: a model run once on an example input first (that makes them), or "
                             f"overrides={{{name!r}: None}} to keep it float")
    for name, layer in layers:  # before any layer changes: a spec one layer cannot take leaves the model as it was
        _check_weight_axis(name, layer, plan.weights[name])
    for name, layer in layers:
        _quantize_weights(layer, plan.weights[name], stochastic)
        if not declared or name in plan.activations:
            _quantize_inputs(layer, plan.activations[name])
    if declared:
        for name, point in model.named_modules():
            if isinstance(point, ActivationPoint):
                point.configure(plan.activations[name])
    _warn_unquantized(model)
    _fast_paths_off_when_needed(model)
    _count_forwards(model)
    _name_quantizers(model)
    return model


def _name_quantizers(model: nn.Module) -> None:
    """Tell each quantizer what it quantizes, in words its errors can use (`_where`)."""
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer | WeightQuantizer):
            m.where = _where(name, m)


def _where(name: str, quantizer: nn.Module) -> str:
    """"the input of layer 'fc1'", "the in_proj_weight of layer 'attn'", "activation point 'block1.qa'"
    for the quantizer at module path `name`."""
    parts = name.split(".")
    if isinstance(quantizer, WeightQuantizer) and len(parts) >= 3 and parts[-3] == "parametrizations":
        what, layer = parts[-2], parts[:-3]
    elif parts[-1] in ("input_quantizer", "key_quantizer", "value_quantizer"):
        what, layer = parts[-1].removesuffix("_quantizer"), parts[:-1]
    elif parts[-1] == "wq":  # a layer that quantizes the weights it computes (LinearBN's folded ones)
        what, layer = "weight", parts[:-1]
    elif parts[-1] == "quantizer":  # an ActivationPoint's
        return f"activation point {'.'.join(parts[:-1])!r}"
    else:
        return f"module {name!r}"
    return f"the {what} of layer {'.'.join(layer) or ROOT_LAYER!r}"


def _count_forwards(model: nn.Module) -> None:
    """Mark the model's forwards (layers.begin_forward) for its activation quantizers, once however often
    the model is configured. Not without them: any hook turns PyTorch's fused encoder fast path off, which
    a weights-only model keeps."""
    if not any(isinstance(m, ActivationQuantizer) for m in model.modules()):
        return
    if not any(h is begin_forward for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(begin_forward)
        model.register_forward_hook(end_forward, always_call=True)


def configure_layer(layer: nn.Module, weights: QuantSpec | None, activations: QuantSpec | None, *,
                    stochastic: bool = False) -> None:
    """Set one quantizable layer's weight quantizer and input quantizers in place (what quantize_in_place
    does for every layer): the ModelExplorer changes one layer at a time this way."""
    _check_weight_axis(None, layer, weights)
    _quantize_weights(layer, weights, stochastic)
    _quantize_inputs(layer, activations)


def input_quantizers(layer: nn.Module) -> list[ActivationQuantizer]:
    """The quantizers of a layer's inputs (query, key, value for attention), if it has any."""
    names = ("input_quantizer", "key_quantizer", "value_quantizer")
    return [getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), ActivationQuantizer)]


def _hook_target(hook) -> str | None:
    """The weight a forward pre-hook of weight norm, spectral norm or pruning recomputes, else None."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if isinstance(hook, WeightNorm | SpectralNorm):
        return hook.name
    if isinstance(hook, BasePruningMethod):
        return hook._tensor_name
    return None


class PruningMask(nn.Module):
    """Pruning (torch.nn.utils.prune) as a parametrization: the weights times the fixed mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w  # weights set from outside (dequantize_model's bake) are stored as given, masked on use


@contextlib.contextmanager
def _hook_norm_weights_detached(model: nn.Module):
    """The hook forms of weight norm, spectral norm and pruning leave the weights of the last forward as
    a plain attribute, a non-leaf tensor after a forward with gradients, which deepcopy refuses. Their
    detached values stand in while the model is copied (every forward recomputes them); the originals go
    back."""
    saved = []
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            target = _hook_target(hook)
            t = getattr(m, target, None) if target else None
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.grad_fn is not None:
                saved.append((m, target, t))
                setattr(m, target, t.detach())
    try:
        yield
    finally:
        for m, name, t in saved:
            setattr(m, name, t)


def _hook_norm_as_parametrization(layer: nn.Module, name: str) -> None:
    """The hook forms of weight and spectral norm (torch.nn.utils.weight_norm / spectral_norm) and pruning
    (torch.nn.utils.prune) recompute `name` in a forward pre-hook, so it is no parameter a quantizer could
    parametrize. Pruning becomes a parametrization by its mask (PruningMask, the same weights). Weight
    norm becomes its parametrization form with the same g and v (the same weights, and QAT still trains g
    and v); spectral norm is folded into the weights it gives in eval mode (exact there; QAT then trains
    the weights without it, and a warning says so)."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for key, hook in list(layer._forward_pre_hooks.items()):
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            _pruning_as_parametrization(layer, name, key)
        elif isinstance(hook, WeightNorm) and hook.name == name:
            g, v = (getattr(layer, name + suffix).detach().clone() for suffix in ("_g", "_v"))
            nn.utils.remove_weight_norm(layer, name)
            nn.utils.parametrizations.weight_norm(layer, name, hook.dim)
            with torch.no_grad():
                layer.parametrizations[name].original0.copy_(g)
                layer.parametrizations[name].original1.copy_(v)
        elif isinstance(hook, SpectralNorm) and hook.name == name:
            was = layer.training
            layer.eval()  # the weights of eval mode: no power iteration
            nn.utils.remove_spectral_norm(layer, name)
            layer.train(was)
            warnings.warn(f"{type(layer).__name__}.{name}: its spectral norm (torch.nn.utils.spectral_norm) was "
                          "folded into the weights it gives in eval mode, which are quantized; QAT trains them "
                          "without it", UserWarning, stacklevel=4)


def _pruning_as_parametrization(layer: nn.Module, name: str, key: int) -> None:
    """The masked weights become a new stored parameter and the mask a parametrization: pruned weights stay
    zero through QAT, as the hook kept them. Not prune.remove, which writes the masked values into
    `<name>_orig` in place: a layer tied to that parameter would compute with pruned weights too."""
    orig, mask = getattr(layer, name + "_orig"), getattr(layer, name + "_mask").detach().clone()
    del layer._forward_pre_hooks[key]
    layer.__dict__.pop(name, None)  # the hook's last masked weights
    del layer._parameters[name + "_orig"]
    del layer._buffers[name + "_mask"]
    layer.register_parameter(name, nn.Parameter((orig * mask).detach().clone(), requires_grad=orig.requires_grad))
    parametrize.register_parametrization(layer, name, PruningMask(mask))


def _check_weight_axis(name: str | None, layer: nn.Module, spec: QuantSpec | None) -> None:
    """A per-channel weight spec's axis must be one of the layer's weight dims (a Linear's 2, a Conv2d's 4)."""
    if spec is None or spec.granularity != "channel" or isinstance(getattr(layer, "wq", None), WeightQuantizer):
        return
    dims = float_weight(layer).dim()
    if not -dims <= spec.axis < dims:
        where = "the layer" if name is None else f"layer {name or ROOT_LAYER!r}"
        raise ValueError(f"the weight spec of {where} ({type(layer).__name__}, weights of {dims} dims) is per "
                         f"channel along axis={spec.axis}; allowed: axis in {-dims}..{dims - 1} (overrides can "
                         "give this layer a spec of its own)")


def _quantize_weights(layer: nn.Module, spec: QuantSpec | None, stochastic: bool) -> None:
    if isinstance(getattr(layer, "wq", None), WeightQuantizer):  # a layer that quantizes what it computes
        layer.wq.stochastic = stochastic
        layer.wq.configure(spec)
        return
    for name in weight_names(layer):
        if spec is not None:
            _hook_norm_as_parametrization(layer, name)
        quantizer = _our_quantizer(layer, name)
        if quantizer is not None:
            quantizer.stochastic = stochastic
            quantizer.configure(spec)
        elif spec is not None:  # appended after any parametrization of the user's own (weight norm)
            # the parametrization moves the weight into a submodule, after the bias: dequantize_model puts it back
            layer.__dict__.setdefault("_qviz_parameter_order", list(layer._parameters))
            # a new module starts in training mode; in a model in eval mode it must not (stochastic twins,
            # no inference cache)
            quantizer = WeightQuantizer(spec, stochastic).train(layer.training)
            quantizer.groups = weight_groups(layer)
            parametrize.register_parametrization(layer, name, quantizer)


def _quantize_inputs(layer: nn.Module, spec: QuantSpec | None) -> None:
    if not takes_input_quantizer(layer):
        return
    names = ["input_quantizer", "key_quantizer", "value_quantizer"] if isinstance(layer, nn.MultiheadAttention) \
        else ["input_quantizer"]
    if not hasattr(layer, names[0]):
        if spec is None:
            return
        for n in names:  # in the layer's mode: a quantizer left in training mode moves its range in eval
            layer.add_module(n, ActivationQuantizer(spec).train(layer.training))
        layer.register_forward_pre_hook(_quantized_inputs, with_kwargs=True)
        return
    for n in names:
        getattr(layer, n).configure(spec)


def layer_inputs(layer: nn.Module, args: tuple, kwargs: dict) -> list:
    """The inputs a layer's input quantizers read, in their order (input_quantizers): attention's query,
    key and value whether passed by position or by name; else the first input. None where absent."""
    if isinstance(layer, nn.MultiheadAttention):
        return [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(_ATTENTION_INPUTS)]
    return [args[0] if args else kwargs.get("input")]


_ATTENTION_INPUTS = ("query", "key", "value")


def _quantized_inputs(layer: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the layer's inputs through its activation quantizers. A module-level function
    that reads the quantizers from the layer, so a deep copy of the model quantizes with its own."""
    if isinstance(layer, nn.MultiheadAttention):
        names = _ATTENTION_INPUTS
        values = layer_inputs(layer, args, kwargs)
        quantizers = (layer.input_quantizer, layer.key_quantizer, layer.value_quantizer)
        done: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (v, q) in enumerate(zip(values, quantizers, strict=True)):
            if not isinstance(v, torch.Tensor):
                continue
            same = next((out for src, out in done if src is v), None)  # self-attention: q, k, v are one tensor
            out = same if same is not None else q(v)
            q.stood_in = same is not None
            done.append((v, out))
            values[i] = out
        args = tuple(values[: len(args)]) + args[3:] if len(args) > 3 else tuple(values[: len(args)])
        kwargs = {**kwargs, **{n: values[i] for i, n in enumerate(names) if i >= len(args) and n in kwargs}}
        return args, kwargs
    if args and isinstance(args[0], torch.Tensor):
        return (layer.input_quantizer(args[0]), *args[1:]), kwargs
    if isinstance(kwargs.get("input"), torch.Tensor):
        return args, {**kwargs, "input": layer.input_quantizer(kwargs["input"])}
    return None


def _warn_unquantized(model: nn.Module) -> None:
    left = []
    for name, m in model.named_modules():
        if not name or is_layer(m) or isinstance(m, _NORMS + _OURS) or _inside_ours(name, model):
            continue
        # only parameters of 2 or more dims are weights a quantizer could take: 1-dim ones are per-feature
        # scales and shifts (norms of any library, nn.RMSNorm, layer scales), which stay float by design
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            left.append(f"{name} ({type(m).__name__})")
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        warnings.warn(f"these modules stay float (qviz quantizes Linear, Conv, ConvTranspose and "
                      f"MultiheadAttention weights): {shown}", UnquantizedModuleWarning, stacklevel=4)


def _fast_paths_off_when_needed(model: nn.Module, *, always: bool = False) -> None:
    """Fast paths off during the model's forwards once quantizers inside them would be skipped (or
    `always`, where the model holds such modules); a weights-only model keeps them."""
    needed = any(isinstance(m, _FAST_PATHS) and (always or any(
        isinstance(q, ActivationQuantizer) and q.spec is not None for q in m.modules())) for m in model.modules())
    has = getattr(model, "_qviz_fast_paths_hooked", False)
    if needed and not has:
        model.register_forward_pre_hook(_fast_paths_off)
        model.register_forward_hook(_fast_paths_back, always_call=True)
        model._qviz_fast_paths_hooked = True


# PyTorch's fast-path switch is one for the process, and explorers run models in worker threads: the
# forwards that need it off are counted, and the switch goes back only when the last of them ends (one
# model's end must not turn it on under another model still running in another thread)
_FAST_PATH_LOCK = threading.Lock()
_fast_path_off_forwards = 0
_fast_path_before = True


def _fast_paths_off(model, args):
    global _fast_path_off_forwards, _fast_path_before
    with _FAST_PATH_LOCK:
        if _fast_path_off_forwards == 0:
            _fast_path_before = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _fast_path_off_forwards += 1


def _fast_paths_back(model, args, output):
    global _fast_path_off_forwards
    with _FAST_PATH_LOCK:
        if _fast_path_off_forwards > 0:
            _fast_path_off_forwards -= 1
            if _fast_path_off_forwards == 0:
                torch.backends.mha.set_fastpath_enabled(_fast_path_before)


# --------------------------------------------------------------------------------------------------
# Batch-norm folding


def fold_batchnorms(model: nn.Module, example) -> list[tuple[str, str]]:
    """Fold, in place, every batch norm whose input is exactly the output of a Linear/Conv layer (004 eqs.
    20-21, eval statistics); the batch norm becomes an identity. Found by running `example` through the
    model once and following tensors, so no guess from module order can pair the wrong modules. Returns the
    (layer, batch norm) pairs folded.

    A pair folds only where nothing else sees the change: the layer runs once per forward, its output goes
    to the batch norm alone, and no other layer shares its weights (each of these would compute with the
    folded weights or output). A batch norm that follows a layer but cannot fold stays, with a warning that
    says why. Uses are seen as torch calls and in what the model returns; a layer output kept in Python
    (stored on a module, read with .tolist()) is not seen."""
    return _fold_batchnorms(model, example, stacklevel=3)


def _fold_batchnorms(model: nn.Module, example, stacklevel: int) -> list[tuple[str, str]]:
    layers = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)}
    norms = {m: n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    flow = _NormFlow(layers, norms)
    handles = [m.register_forward_hook(flow.after_layer) for m in layers] + \
        [m.register_forward_pre_hook(flow.before_norm) for m in norms] + \
        [m.register_forward_hook(flow.after_norm) for m in norms]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), flow:
            flow.used(_run(model, example))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    folded, kept = [], []
    for norm_name, sources in flow.sources.items():
        if len(sources) != 1:
            continue  # one norm fed by several layers cannot fold into one of them
        layer_name = next(iter(sources))
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        if norm.running_mean is None or layer.weight.shape[0] != norm.num_features:
            continue
        why = flow.why_not(layer_name, norm_name) or _why_weights_cannot_fold(model, layer)
        if why:
            kept.append(f"{norm_name} after {layer_name} ({why})")
            continue
        _fold_into(layer, norm)
        parent_name, _, child = norm_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        folded.append((layer_name, norm_name))
    if kept:
        warnings.warn("these batch norms stay unfolded, since folding would change what the model computes: "
                      + "; ".join(kept), UserWarning, stacklevel=stacklevel)
    return folded


class _NormFlow(torch.overrides.TorchFunctionMode):
    """What one forward shows about (layer, batch norm) pairs: which layer's output each norm took, how often
    each layer ran, and how many torch calls outside the norms took each layer output as an input (a skip
    connection reading the same tensor). Layer outputs are kept alive for the run, so that ids stay unique."""

    def __init__(self, layers: dict, norms: dict):
        super().__init__()
        self.layers, self.norms = layers, norms
        self.outputs: dict[int, tuple[str, torch.Tensor]] = {}
        self.sources: dict[str, set[str]] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.uses: collections.Counter[int] = collections.Counter()
        self.inside_norm = 0

    def after_layer(self, m, args, out):
        name = self.layers[m]
        self.calls[name] += 1
        if isinstance(out, torch.Tensor):
            self.outputs[id(out)] = (name, out)

    def before_norm(self, m, args):
        self.inside_norm += 1  # the norm's own reading of its input is the use folding keeps
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.outputs:
            self.sources.setdefault(self.norms[m], set()).add(self.outputs[id(args[0])][0])
            self.used(args[0])  # a second norm reading it is a use too

    def after_norm(self, m, args, out):
        self.inside_norm -= 1

    def used(self, values) -> None:
        """Each layer output among `values` (tensors, nested in tuples, lists or dicts) is used once more. The
        model's return value counts too: a layer output returned as it is leaves without a torch call."""
        for t in torch.utils._pytree.tree_leaves(values):
            if isinstance(t, torch.Tensor) and id(t) in self.outputs:
                self.uses[id(t)] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        # size, shape and dim calls return no tensor and read no values: they do not see a fold. A layer
        # output's one allowed use is its norm reading it (counted in before_norm).
        if not self.inside_norm and self.outputs and _holds_tensor(result):
            self.used((args, kwargs))
        return result

    def why_not(self, layer_name: str, norm_name: str) -> str | None:
        if self.calls[layer_name] > 1:
            return f"{layer_name} runs {self.calls[layer_name]} times per forward and would fold for every call"
        if any(self.uses[i] > 1 for i, (name, _) in self.outputs.items() if name == layer_name):
            return f"{layer_name}'s output also goes elsewhere than {norm_name}"
        return None


def _holds_tensor(value) -> bool:
    return any(isinstance(v, torch.Tensor) for v in torch.utils._pytree.tree_leaves(value))


def _why_weights_cannot_fold(model: nn.Module, layer: nn.Module) -> str | None:
    """Why folding cannot write into this layer's weight and bias (None if it can): computed weights
    (a parametrization or a weight-norm hook) would be recomputed over the write, shared ones would
    change every layer that holds them."""
    for attr in ("weight", "bias"):
        value = getattr(layer, attr)
        if value is None:
            continue
        if parametrize.is_parametrized(layer, attr) or not isinstance(layer._parameters.get(attr), nn.Parameter):
            return f"its {attr} is computed (a parametrization or a hook)"
        holders = sum(any(p is value for p in m._parameters.values()) for m in model.modules())
        if holders > 1:
            return f"its {attr} is shared with {holders - 1} other module(s)"
    return None


def _fold_into(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    ones, zeros = torch.ones_like(norm.running_mean), torch.zeros_like(norm.running_mean)
    w, b = fold_batchnorm(layer.weight.detach(), norm.weight.detach() if norm.affine else ones,
                          norm.bias.detach() if norm.affine else zeros, norm.running_mean, norm.running_var,
                          norm.eps, None if layer.bias is None else layer.bias.detach())
    with torch.no_grad():
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b)
        else:
            layer.bias.copy_(b)


def _run(model: nn.Module, batch, forward: Callable | None = None, doing: str | None = None):
    """model(batch): a tensor as the input, a tuple/list as (input, target, ...), a dict as keyword inputs.
    With `doing` ("calibrate ran the model on batch 3:"), an error the model raises carries a note of it."""
    seen = batch  # what the model was given, for the note
    if forward is not None:
        call = functools.partial(forward, model, batch)
    elif isinstance(batch, torch.Tensor):
        call = functools.partial(model, batch)
    elif isinstance(batch, tuple | list) and batch and isinstance(batch[0], torch.Tensor | Mapping):
        first = batch[0]  # (x, y), or (keyword inputs, y) as a DataLoader of dict samples gives
        call = functools.partial(model, **_keyword_inputs(model, first)) if isinstance(first, Mapping) else \
            functools.partial(model, first)
        seen = _FirstOf(batch) if len(batch) > 1 else batch
    elif isinstance(batch, Mapping):  # a dict, or Hugging Face's BatchEncoding
        call = functools.partial(model, **_keyword_inputs(model, batch))
    else:
        raise TypeError("a batch must be a tensor, a tuple/list whose first item is the input (a tensor or a dict "
                        f"of keyword inputs), or a dict of keyword inputs (or give forward=...), got "
                        f"{type(batch).__name__}")
    if doing is None:
        return call()
    with _noted_errors(doing, seen):
        return call()


def _keyword_inputs(model: nn.Module, batch: Mapping) -> dict:
    """A dict batch as keyword inputs. Its "labels" or "label" entry (a data collator's targets, which
    ModelAnalysis reads as y) is left out where the model's forward takes no such argument."""
    inputs = dict(batch)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature to read: pass everything
        return inputs
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in ("labels", "label"):
            if key not in params:
                inputs.pop(key, None)
    return inputs


class _FirstOf(tuple):
    """A tuple batch of which only the first item was the input ((input, target) pairs)."""


@contextlib.contextmanager
def _noted_errors(doing: str, batch, passing: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """An error raised inside (a batch of the wrong shape or dtype gives torch's own message from deep inside
    the user's model) carries a note: what was running, on which input. `passing` errors go as they are."""
    try:
        yield
    except passing:
        raise
    except Exception as err:
        err.add_note(f"(raised inside the model while {doing} {_describe(batch)})")
        raise


def _describe(batch) -> str:
    """A batch in a few words: the shapes and dtypes of its tensors."""
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}, {batch.dtype}"
    if isinstance(batch, dict):
        return "keyword inputs " + ", ".join(f"{k}={_describe(v)}" for k, v in list(batch.items())[:6])
    if isinstance(batch, _FirstOf):
        return (f"the first item of a tuple of {len(batch)}, {_describe(batch[0])}: a tuple or list batch is "
                "(input, target, ...); a model of several inputs takes a dict of keyword inputs, or forward=")
    if isinstance(batch, tuple | list):
        return f"a {type(batch).__name__} of " + "; ".join(_describe(v) for v in batch[:4])
    return type(batch).__name__


# --------------------------------------------------------------------------------------------------
# Calibration, inspection, the way back


def calibrate(qmodel: nn.Module, batches, *, method: str = "moving_average", percentile: float = 99.99,
              forward: Callable | None = None) -> nn.Module:
    """Set every activation range of a quantized model from data, without training (004 §3.1.2).

    batches: one input tensor, or an iterable of batches (a tensor, a tuple/list whose first item is the
    input, e.g. a DataLoader's (x, y), or a dict of keyword inputs as Hugging Face models take, alone or
    as that first item); or give
    forward(model, batch). method: "moving_average" of each batch's min/max (004 §2.5, what training
    finds: the network runs quantized while the ranges settle), "minmax" over all batches, "percentile"
    (clip at the given percentile of each side), or "mse" (the clip with the least squared quantization
    error). The last three observe the float network (weights and activations unquantized, as PyTorch's
    post-training flow calibrates), so the ranges do not depend on the bit widths. Learned clips (PACT)
    start at their MSE clip. The model runs in eval mode under no_grad (batch norms and dropout as at
    inference); it is calibrated in place and returned.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    _checks.choice("method", method, CALIBRATIONS)
    percentile = _checks.real("percentile", percentile, 50.0, 100.0, lo_open=True)
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable(model, batch) or None, got {type(forward).__name__}")
    if isinstance(batches, torch.Tensor | dict):
        batches = [batches]
    if not isinstance(batches, Iterable):
        raise TypeError(f"batches must be a tensor or an iterable of batches, got {type(batches).__name__}")
    quantizers = [m for m in qmodel.modules() if isinstance(m, ActivationQuantizer) and m.spec is not None]
    floating = [] if method == "moving_average" else [m for m in qmodel.modules() if isinstance(m, WeightQuantizer)]
    was_training = qmodel.training
    seen = 0
    for q in quantizers:
        q.start_calibration(method)
    for w in floating:
        w.bypass = True
    try:
        qmodel.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                _run(qmodel, batch, forward, doing=f"calibrate ran the model on batch {i}:")
                seen += 1
    finally:
        for w in floating:
            w.bypass = False
        for q in quantizers:
            q.finish_calibration(percentile) if seen else setattr(q, "calibrating", None)
        qmodel.train(was_training)
    if not seen:
        raise ValueError("batches is empty: calibration needs at least one batch")
    _check_values_seen(qmodel, quantizers)
    return qmodel


def _check_values_seen(qmodel: nn.Module, quantizers: list[ActivationQuantizer]) -> None:
    """Quantizers pass empty inputs through (a mixture-of-experts layer's expert given no tokens): one that
    saw only those in calibration has no range. All of them so: the batches were empty; some: a warning.
    Either comes after calibration ended: the ranges it did set stay."""
    called = [q for q in quantizers if q.empty_only is not None]
    empty = [q for q in called if q.empty_only]
    if not empty:
        return
    if len(empty) == len(called):
        raise ValueError("x is empty: every activation quantizer got only empty tensors from the batches; at least "
                         "one value is needed to estimate a range")
    names = {m: n for n, m in qmodel.named_modules()}
    warnings.warn(f"{len(empty)} activation quantizer(s) got only empty tensors in calibration and have no range "
                  f"({', '.join(names[q] for q in empty[:8])}{', ...' if len(empty) > 8 else ''}); the first "
                  "values they get set it (calibrate with batches that reach them)", UserWarning, stacklevel=3)


def quantized_layers(qmodel: nn.Module) -> list[dict]:
    """One row per quantizable layer, in network order: name, kind (its class), weights and activations
    (QuantSpec or None for float), params (its weights and bias) and weight_shape. "activations" is the
    quantizer of the layer's input; a network that declares its own activation points (nets.py) has none
    per layer unless overrides name the layer, and `quantized_points` lists its points. "calibrated": whether
    the input quantizers hold a range (None without them; self-attention's key and value quantizers need
    none, as the query's quantizes their one input): False after calibrate means the layer was never
    called as a module (its weights used through F.linear, say), so its input stays float."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    rows = []
    for name, layer in quantizable_layers(qmodel):
        w_spec = _installed_weight_spec(layer)
        a_quant = getattr(layer, "input_quantizer", None)
        params = sum(float_weight_numel for float_weight_numel in (_original(layer, n).numel()
                                                                   for n in weight_names(layer)))
        bias = getattr(layer, "bias", None) if not isinstance(layer, nn.MultiheadAttention) else layer.in_proj_bias
        params += 0 if bias is None else bias.numel()
        rows.append({"name": name, "kind": _kind(layer), "weights": w_spec,
                     "activations": None if a_quant is None else a_quant.spec, "params": params,
                     "weight_shape": tuple(float_weight(layer).shape), "calibrated": _calibrated(layer)})
    return rows


def _calibrated(layer: nn.Module) -> bool | None:
    quantizers = [q for q in input_quantizers(layer) if q.spec is not None]
    return all(q.calibrated or q.stood_in for q in quantizers) if quantizers else None


def _kind(layer: nn.Module) -> str:
    """The layer's class name (a parametrized layer's class is generated from it: report the real one)."""
    cls = type(layer)
    while cls.__module__ == parametrize.__name__ and cls.__bases__:
        cls = cls.__bases__[0]
    return cls.__name__


def quantized_points(qmodel: nn.Module) -> list[dict]:
    """One row per ActivationPoint a network declares: name, activations (QuantSpec or None), range."""
    return [{"name": name, "activations": p.spec, "range": p.quantizer.range()}
            for name, p in qmodel.named_modules() if isinstance(p, ActivationPoint)]


def _installed_weight_spec(layer: nn.Module) -> QuantSpec | None:
    if isinstance(getattr(layer, "wq", None), WeightQuantizer):
        return layer.wq.spec
    quantizer = _our_quantizer(layer, weight_names(layer)[0])
    return None if quantizer is None else quantizer.spec


def dequantize_model(qmodel: nn.Module, *, bake: bool = False) -> nn.Module:
    """A plain float copy of a quantized model: its float (shadow) weights, no quantizers, no hooks.
    bake=True keeps the quantized weight values instead (a float model that computes like the quantized
    one's weights, for tools that know nothing of qviz)."""
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    _checks.boolean("bake", bake)
    with _hook_norm_weights_detached(qmodel):  # a hook left on a float layer (a pruned bias) after a forward
        model = copy.deepcopy(qmodel)
    restored: dict[int, list[nn.Parameter]] = {}  # a weight shared by layers (tied) stays shared
    for _, layer in quantizable_layers(model):
        if isinstance(getattr(layer, "wq", None), WeightQuantizer):
            if bake and layer.wq.spec is not None and not isinstance(layer, LinearBN):
                with torch.no_grad():
                    layer.weight.copy_(layer.wq(layer.weight))
            layer.wq.configure(None)
        names = [name for name in weight_names(layer) if _our_quantizer(layer, name) is not None]
        if names:
            _remove_quantizers(layer, names, bake, restored)
        for name in ("input_quantizer", "key_quantizer", "value_quantizer"):
            if hasattr(layer, name):
                delattr(layer, name)
        for key, hook in list(layer._forward_pre_hooks.items()):
            if hook is _quantized_inputs:
                del layer._forward_pre_hooks[key]
                layer._forward_pre_hooks_with_kwargs.pop(key, None)
    for point in model.modules():
        if isinstance(point, ActivationPoint):
            point.configure(None)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _fast_paths_off:
            del model._forward_pre_hooks[key]
    for key, hook in list(model._forward_hooks.items()):
        if hook is _fast_paths_back:
            del model._forward_hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    model.__dict__.pop("_qviz_fast_paths_hooked", None)
    for hooks, ours in ((model._forward_pre_hooks, begin_forward), (model._forward_hooks, end_forward)):
        for key in [k for k, hook in hooks.items() if hook is ours]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    return model


def _bake_through(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a weight that stays parametrized by the user's own parametrizations to `value`: assigning it
    runs their right_inverse (weight norm: g and v of `value`, so the chain gives `value` back). One that
    cannot give `value` back (orthogonal and spectral norm project it onto their own set) leaves the
    weights at their float values, with a warning."""
    chain = layer.parametrizations[name]
    before = {k: v.detach().clone() for k, v in chain.state_dict().items()}
    try:
        with torch.no_grad():
            setattr(layer, name, value)
            gives = getattr(layer, name)
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as err:
        chain.load_state_dict(before)
        warnings.warn(f"{name} of {type(layer).__name__} has parametrizations of its own that cannot take given "
                      f"weights ({type(err).__name__}): they stay, and the weights keep their float values",
                      UserWarning, stacklevel=4)
        return
    off = float((gives - value).abs().max()) if value.numel() else 0.0
    if not off <= _BAKE_TOLERANCE * max(float(value.abs().max()) if value.numel() else 0.0, 1e-30):
        chain.load_state_dict(before)
        warnings.warn(f"{name} of {type(layer).__name__} has parametrizations of its own that turn the quantized "
                      f"weights into others (off by up to {off:.3g}): they stay, and the weights keep their float "
                      "values", UserWarning, stacklevel=4)


_BAKE_TOLERANCE = 1e-5  # relative: a right_inverse that gives the weights back does so to float rounding


def _remove_quantizers(layer: nn.Module, names: list[str], bake: bool, restored: dict) -> None:
    """Take qviz's quantizers out of a layer's weight parametrizations. torch's remove_parametrizations
    deletes the weight property from the layer's generated class, which a deep copy shares with the model
    it came from (the quantized model would lose its weights): so the copy gets a class of its own here,
    with properties only for what stays parametrized, and its float Parameters back (the very objects, so
    whatever shares one, a tied embedding included, still does). With bake, `restored` maps a float tensor
    to the Parameters made from it, so tied layers with equal quantized values stay tied."""
    plain = {}
    for name in names:
        chain = layer.parametrizations[name]
        if len(chain) > 1:  # the user's own parametrizations (weight norm) stay; only ours goes
            with torch.no_grad():
                value = getattr(layer, name).detach().clone() if bake else None
            del chain[next(i for i, p in enumerate(chain) if isinstance(p, WeightQuantizer))]
            if bake:
                _bake_through(layer, name, value)
            continue
        with torch.no_grad():
            value = getattr(layer, name).detach().clone() if bake else None
        plain[name] = (chain.original, value)
        del layer.parametrizations[name]
    if not plain:
        return
    generated = type(layer)
    original_class = generated.__bases__[0]
    if layer.parametrizations:
        layer.__class__ = type(generated.__name__, (original_class,),
                               {n: generated.__dict__[n] for n in layer.parametrizations if n in generated.__dict__})
    else:
        del layer._modules["parametrizations"]
        layer.__class__ = original_class
    for name, (original, value) in plain.items():
        if value is None:  # the copy's own float tensor: anything else that shares it (a tied embedding) still does
            layer.register_parameter(name, original if isinstance(original, nn.Parameter) else nn.Parameter(original))
            continue
        twins = restored.setdefault(id(original), [])
        param = next((p for p in twins if torch.equal(p.data, value)), None)
        if param is None:
            param = nn.Parameter(value, requires_grad=original.requires_grad)
            twins.append(param)
        layer.register_parameter(name, param)
    _restore_parameter_order(layer)


def _restore_parameter_order(layer: nn.Module) -> None:
    """The layer's parameters in the order they had before quantize_model (weight, then bias): whatever
    goes by position (parameters_to_vector, an optimizer's state_dict) pairs them as in the original."""
    order = layer.__dict__.pop("_qviz_parameter_order", None)
    if order is None:
        return
    params = layer._parameters
    keys = [k for k in order if k in params] + [k for k in params if k not in order]
    ordered = [(k, params[k]) for k in keys]
    params.clear()
    params.update(ordered)


# --------------------------------------------------------------------------------------------------
# ONNX


EXPORT_OPSET = 17  # scaled dot-product attention (every recent transformer) needs 14 or more


def export_onnx(qmodel: nn.Module, example, path: str | os.PathLike, *, opset: int = EXPORT_OPSET,
                dynamic_axes: str | Mapping | None = "batch") -> Path:
    """Write a quantized model as a QDQ ONNX graph (QuantizeLinear / DequantizeLinear pairs around each
    quantized weight and activation), which ONNX Runtime and TensorRT turn into integer kernels.

    example: an input as `calibrate` takes batches: a tensor, a tuple of positional inputs, or a dict of
    keyword inputs (Hugging Face models; the graph's inputs are then named after its keys). Positional
    inputs are named "input" (one) or "input0", "input1"..., and tensors inside tuples, lists and dicts
    after their place ("input0.1", "input0.mask"), one graph input each.
    Only what QuantizeLinear can express is exportable: uniform schemes (affine, symmetric, relu, pact,
    dorefa_act) of up to 8 bits, with calibrated ranges; lower bit widths travel in 8-bit codes with
    their own scale and a clip to their code range. Binary, ternary, DoReFa weights, ceil and stochastic
    schemes raise ValueError naming the layer. PyTorch's fused attention fast paths are off while
    exporting (their fused op has no ONNX form), and so is Hugging Face models' scaled-dot-product or
    flash attention (their `config._attn_implementation` reads "eager" until the export returns: the
    exporter has no form for grouped-query SDPA, as in Llama). The exporter also gets forms of torch.diff
    and of cumsum over bools and integers while exporting (a decoder's mask code without an attention
    mask uses both; see _onnx_ops). The graph's outputs are the tensors of the
    model's output in order, tuples, lists, dicts (Hugging Face model outputs), named tuples and dataclasses
    opened: the first is named "output", the others after their keys and positions ("pooler_output",
    "output.1"); other objects are not outputs (a decoder's key/value cache, which the exporter cannot
    trace). Keyword inputs that are not tensors are constants of the graph (use_cache=False); one holding
    tensors (in a container, a dataclass or an object such as a key/value cache) is refused: the graph
    would keep their values of the example as constants. Needs the `onnx` package (pip install "qviz[onnx]").

    dynamic_axes: which sizes of the graph's inputs and outputs may differ from the example's. "batch"
    (default): axis 0 of every input and output, labelled "batch" (one whose size differs from the first
    input's in the example gets a label of its own), so ONNX Runtime takes any batch size; None: every size
    as in the example; or a dict as torch.onnx.export takes it, naming every dynamic axis itself (axes it
    leaves out keep the example's size): graph input or output name -> {axis: label} or [axes], e.g.
    {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "output": {0:
    "batch", 1: "sequence"}} for any text length too. Name the axes with a dict where axis 0 is not the
    batch (nn.LSTM or nn.GRU without batch_first: (sequence, batch, features)) or where inputs have
    unrelated leading sizes (queries and documents). A size the model's code turns into a Python number
    stays fixed whatever this says; PyTorch's tracer warns about each (nn.MultiheadAttention fixes the
    sequence length so, float models too). When axis 0 of every input is dynamic, an example of batch 1 is
    traced repeated to a batch of 2: at batch 1 some code skips a step that the graph would then lack at
    other batch sizes (Hugging Face decoders without an attention mask expand their position ids only when
    the batch is not 1). A model that fails at batch 2 is traced at 1, with a warning, and its graph keeps
    the batch size of 1.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be a torch.nn.Module, got {type(qmodel).__name__}")
    qmodel = uncompiled(qmodel)
    opset = _checks.integer("opset", opset, 13, 23)
    path = _export_path(path)
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as err:
        raise ImportError('export_onnx needs the onnx package: pip install "qviz[onnx]"') from err
    args, kwargs = _example_inputs(example)
    for key, value in kwargs.items():
        if not isinstance(value, torch.Tensor) and _holds_tensors(value):
            raise ValueError(f"example[{key!r}] holds tensors inside its {type(value).__name__}, which the graph "
                             "could only bake in as constants; allowed: a tensor (a graph input) or a value "
                             "without tensors (a constant, such as use_cache=False)")
    for i, value in enumerate(args):
        holder = _foreign_holder(value)
        if holder is not None:
            where = f"example[{i}]" if isinstance(example, tuple) else "example"
            raise ValueError(f"{where} holds tensors inside its {holder}, which the exporter cannot take as "
                             "graph inputs; allowed: tensors, or tuples, lists and dicts of them")
    _check_exportable(qmodel)
    _check_float32(qmodel, args, kwargs)
    if dynamic_axes is not None and not isinstance(dynamic_axes, str | Mapping):
        raise TypeError(f'dynamic_axes must be "batch", None or a dict of graph input or output names to axes, '
                        f"got {type(dynamic_axes).__name__}")
    if isinstance(dynamic_axes, str) and dynamic_axes != "batch":
        raise ValueError(f'dynamic_axes={dynamic_axes!r} is not known; allowed: "batch", None or a dict of graph '
                         "input or output names to axes")
    was_training = qmodel.training
    qmodel.eval()
    _fast_paths_off(qmodel, ())  # counted with the forwards of models running in other threads
    attention: list = []
    try:
        attention = _eager_attention(qmodel)
        with torch.no_grad(), warnings.catch_warnings():
            outputs = _check_calibrated(qmodel, args, kwargs)
            batch_fixed = False
            if _doubles_batch_of_one(dynamic_axes, _graph_inputs(args, kwargs)):
                traced = _traced_batch(qmodel, args, kwargs)
                if traced is None:
                    batch_fixed = True
                else:
                    args, kwargs, outputs = traced
            # the TorchScript exporter is the one that writes fake-quantize ops as QDQ pairs; its tracer warns
            # that those parameters are constants, which is what they are meant to be. Its warnings about the
            # model's own code (a size turned into a Python number, which the graph then keeps fixed) stay.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"qviz\.")
            keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            constants = {k: v for k, v in kwargs.items() if k not in keys}
            inputs, output_names = (*args, *(kwargs[k] for k in keys)), _output_names(outputs)
            graph_inputs = _graph_inputs(args, kwargs)
            names = [name for name, _ in graph_inputs]
            axes = _graph_dynamic_axes(dynamic_axes, dict(graph_inputs),
                                       dict(zip(output_names, (t for _, t in _tensor_leaves(outputs)), strict=True)),
                                       batch_fixed)
            if inputs and isinstance(inputs[-1], dict):  # else the exporter binds it as keyword inputs
                inputs = (*inputs, {})
            with _exporting("trace"), _traced_as_tensors(qmodel, len(args), keys, constants), exporter_fixes():
                try:
                    torch.onnx.export(qmodel, inputs, str(path), opset_version=opset,
                                      dynamo=False, do_constant_folding=False, input_names=names,
                                      output_names=output_names, dynamic_axes=axes)
                except torch.onnx.errors.UnsupportedOperatorError as err:
                    err.add_note(_missing_operator_note(str(err), opset))
                    raise
    finally:
        qmodel.train(was_training)
        _fast_paths_back(qmodel, (), None)
        for config, implementation in attention:  # parents before their sub-configs, whose own values win
            with contextlib.suppress(AttributeError, ValueError, TypeError):
                config._attn_implementation = implementation
    return path


def _doubles_batch_of_one(dynamic_axes, graph_inputs: list) -> bool:
    """Whether export_onnx traces the example repeated to a batch of 2 (_traced_batch): its tensors are all of
    batch 1, and dynamic_axes makes axis 0 of each dynamic ("batch", or a dict naming it for every one)."""
    batched = [(name, t) for name, t in graph_inputs if isinstance(t, torch.Tensor) and t.dim()]
    if not batched or any(len(t) != 1 for _, t in batched):
        return False
    if dynamic_axes == "batch":
        return True
    if not isinstance(dynamic_axes, Mapping):
        return False

    def names_axis_zero(axes, rank: int) -> bool:  # unchecked here: _named_axes refuses bad entries later
        return isinstance(axes, Mapping | list | tuple) and any(type(a) is int and a in (0, -rank) for a in axes)

    return all(names_axis_zero(dynamic_axes.get(name, ()), t.dim()) for name, t in batched)


def _traced_batch(qmodel: nn.Module, args: tuple, kwargs: dict):
    """(args, kwargs, outputs) of an example of batch 1 repeated to 2, or None if the model fails at batch 2
    (with a warning: the graph then keeps the batch size of 1). At batch 1 a model's code may skip a step
    that other batch sizes need, and the graph traced there would lack it: Hugging Face decoders without an
    attention mask expand their position ids only when the batch is not 1."""

    def doubled(value):
        if isinstance(value, torch.Tensor):
            return torch.cat([value, value]) if value.dim() else value
        if isinstance(value, tuple | list):  # plain ones: export_onnx refuses other holders before
            return type(value)(doubled(item) for item in value)
        return {k: doubled(v) for k, v in value.items()} if isinstance(value, dict) else value

    try:
        twice, twice_kwargs = doubled(args), doubled(kwargs)
        return twice, twice_kwargs, _check_calibrated(qmodel, twice, twice_kwargs)
    except _RangeNotSet as err:  # a quantizer that runs only at other batch sizes: calibrating is the user's
        err.add_note("(export_onnx ran the example repeated to a batch of 2, to trace a graph for any batch size; "
                     "dynamic_axes=None traces the example as it is)")
        raise
    except Exception as err:  # the model's own limits (a reshape to a literal batch of 1)
        warnings.warn(f"export_onnx: the model fails on the example repeated to a batch of 2 ({type(err).__name__}: "
                      f"{str(err)[:200]}), so the graph keeps the example's batch size of 1", stacklevel=3)
        return None


def _graph_inputs(args: tuple, kwargs: dict) -> list[tuple[str, object]]:
    """(name, example value) of each graph input: keyword tensors by their keys, else _flat_inputs."""
    return [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)] if kwargs else _flat_inputs(args)


def _flat_inputs(args: tuple) -> list[tuple[str, object]]:
    """The graph's inputs from positional ones, named and in the order the exporter flattens them: "input"
    for a single tensor, "input0", "input1"... for several, and inside tuples, lists and dicts their
    positions and keys ("input0.1", "input1.mask"), dicts in insertion order as the exporter takes them.
    A number is a graph input too (a scalar); None is none."""

    def leaves(value, name: str) -> list[tuple[str, object]]:
        if isinstance(value, torch.Tensor | int | float):
            return [(name, value)]
        if isinstance(value, tuple | list):
            return [leaf for i, item in enumerate(value) for leaf in leaves(item, f"{name}.{i}")]
        if isinstance(value, dict):
            return [leaf for key, item in value.items() for leaf in leaves(item, f"{name}.{key}")]
        return []

    return [leaf for i, arg in enumerate(args) for leaf in leaves(arg, "input" if len(args) == 1 else f"input{i}")]


def _graph_dynamic_axes(dynamic_axes, inputs: dict, outputs: dict, batch_fixed: bool = False) -> dict | None:
    """export_onnx's dynamic_axes for torch.onnx.export, checked against the graph's input and output
    tensors (name -> the example's value); batch_fixed: axis 0 stays as in the example (_traced_batch)."""
    if dynamic_axes is None:
        return None
    graph = {name: t for name, t in {**inputs, **outputs}.items() if isinstance(t, torch.Tensor)}
    axes = _named_axes(dynamic_axes, graph)
    if batch_fixed:
        axes = {name: {a: label for a, label in d.items() if a != 0} for name, d in axes.items()}
    return {name: d for name, d in axes.items() if d}


def _named_axes(dynamic_axes, graph: dict) -> dict:
    """{name: {axis: label}} from "batch" or a dict as torch.onnx.export takes it, checked against graph."""
    if isinstance(dynamic_axes, str):  # "batch", checked by the caller
        # one label where the example's sizes agree: a second input of another leading size (documents
        # beside queries) gets its own, or the graph would declare the two equal
        sizes = [len(t) for t in graph.values() if t.dim()]
        return {name: {0: "batch" if len(t) == sizes[0] else f"{name}_0"} for name, t in graph.items() if t.dim()}
    axes = {}
    for name, wanted in dynamic_axes.items():
        if name not in graph:
            raise ValueError(f"dynamic_axes names {name!r}, which is not a tensor input or output of the graph; "
                             f"allowed: {sorted(graph)}")
        rank = graph[name].dim()
        if rank == 0:
            raise ValueError(f"dynamic_axes names {name!r}, which is a scalar in the example (no axes); allowed: "
                             f"tensors with axes, {sorted(n for n, t in graph.items() if t.dim())}")
        if isinstance(wanted, Mapping):
            pairs = list(wanted.items())
        elif isinstance(wanted, list | tuple):
            pairs = [(axis, None) for axis in wanted]
        else:
            raise TypeError(f"dynamic_axes[{name!r}] must be a dict of axes to labels or a list of axes, "
                            f"got {type(wanted).__name__}")
        axes[name] = {}
        for axis, label in pairs:
            if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank:
                raise ValueError(f"dynamic_axes[{name!r}] names axis {axis!r}; allowed: integers from {-rank} to "
                                 f"{rank - 1} ({name!r} has {rank} axes in the example)")
            if label is not None and not isinstance(label, str):
                raise TypeError(f"dynamic_axes[{name!r}][{axis}] must be a label (str), got {type(label).__name__}")
            if axis % rank in axes[name]:
                raise ValueError(f"dynamic_axes[{name!r}] names axis {axis % rank} twice (as {axis} too); allowed: "
                                 "each axis once")
            axes[name][axis % rank] = label or f"{name}_{axis % rank}"
    return axes


def _missing_operator_note(message: str, opset: int) -> str:
    """What to do about an operator PyTorch's exporter has no ONNX form for: a higher opset where it names
    one, else nothing export_onnx can change (the float model fails the same way)."""
    found = re.search(r"added in version (\d+)", message)
    if found and int(found.group(1)) <= 23:
        return f"export_onnx wrote opset={opset}; pass opset={found.group(1)} to export_onnx"
    return (f"export_onnx wrote opset={opset}; PyTorch's exporter has no ONNX form for this operator at any opset "
            "up to 23, so the float model cannot be exported either: replace the operation in the model (or keep "
            "it out of the part exported)")


def _eager_attention(model: nn.Module) -> list[tuple[object, str]]:
    """Switch every Hugging Face config in the model, sub-configs included, that names a fused attention
    implementation to "eager" (the same softmax(QK^T)V in plain operators). Returns (config, value before)
    for every config found, parents before their sub-configs: a parent's setter may write its value into
    its sub-configs, so restoring in this order leaves each one as it was."""
    configs: list = []
    seen: set[int] = set()

    def visit(config) -> None:
        if id(config) in seen or not isinstance(getattr(config, "_attn_implementation", None), str):
            return
        seen.add(id(config))
        configs.append(config)
        for value in vars(config).values():
            if hasattr(value, "_attn_implementation") and hasattr(value, "to_dict"):
                visit(value)

    for m in model.modules():
        if getattr(m, "config", None) is not None:
            visit(m.config)
    before = [(config, config._attn_implementation) for config in configs]
    for config, implementation in before:
        if implementation != "eager":
            with contextlib.suppress(AttributeError, ValueError, TypeError):  # a config that refuses keeps its own
                config._attn_implementation = "eager"
    return before


@contextlib.contextmanager
def _traced_as_tensors(model: nn.Module, n_args: int, keys: list[str], constants: dict):
    """The model's forward as the exporter traces it, set on the instance (a wrapper module would rename
    every parameter and node of the graph after itself): all inputs positional (the exporter binds a
    trailing dict to forward's named parameters), keyword tensors after the positional inputs in the order
    of `keys`, other keyword values bound as they are; returns the tensors of the output in order
    (`_tensor_leaves`)."""
    own = model.__dict__.get("forward")  # a forward set on the instance before, if any
    inner = model.forward
    with _root_hooks_inside(model) as hooked:

        def forward(*inputs):
            kwargs = dict(zip(keys, inputs[n_args:], strict=True), **constants)
            return tuple(t for _, t in _tensor_leaves(hooked(inner, inputs[:n_args], kwargs)))

        model.forward = forward
        try:
            yield
        finally:
            if own is None:
                del model.forward
            else:
                model.forward = own


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _root_hooks_inside(model: nn.Module):
    """The model's own forward hooks and pre-hooks, taken off it and run around its real forward, as
    Module.__call__ runs them: left on the model they would see the flat inputs and the tuple of output
    tensors the exporter traces (a hook scaling the output was dropped from the graph, or raised)."""
    saved = {name: getattr(model, name) for name in _HOOK_DICTS}
    pre, post = dict(saved["_forward_pre_hooks"]), dict(saved["_forward_hooks"])
    pre_kw, post_kw = set(saved["_forward_pre_hooks_with_kwargs"]), set(saved["_forward_hooks_with_kwargs"])

    def hooked(forward, args: tuple, kwargs: dict):
        for key, hook in pre.items():
            if key in pre_kw:
                result = hook(model, args, kwargs)
                if result is not None:
                    args, kwargs = result
            else:
                result = hook(model, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        out = forward(*args, **kwargs)
        for key, hook in post.items():
            result = hook(model, args, kwargs, out) if key in post_kw else hook(model, args, out)
            if result is not None:
                out = result
        return out

    for name in _HOOK_DICTS:
        setattr(model, name, type(saved[name])())
    try:
        yield hooked
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


def _export_path(path) -> Path:
    """The file to write, checked before the trace (which can take minutes on a large model)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; allowed: a file path, such as "
                         f"{str(path / 'model.onnx')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r} is in a folder that does not exist ({str(path.parent)!r}); "
                         "allowed: a file in an existing folder")
    return path


_HOLDING_DEPTH = 8  # deep enough for a Hugging Face cache (cache -> layers -> layer -> keys)


def _holds_tensors(value, seen: set[int] | None = None, depth: int = 0) -> bool:
    """Whether a keyword input holds tensors anywhere the graph could only bake them in as constants:
    inside tuples, lists, sets, dicts, dataclasses or an object's attributes (a decoder's key/value cache
    keeps its tensors there)."""
    if isinstance(value, torch.Tensor):
        return True
    if depth > _HOLDING_DEPTH or value is None or isinstance(value, (str, bytes, int, float, complex, type)):
        return False
    seen = set() if seen is None else seen
    if id(value) in seen:  # objects that refer back to themselves
        return False
    seen.add(id(value))
    return any(_holds_tensors(v, seen, depth + 1) for v in _inner_values(value))


def _inner_values(value) -> list:
    """What a value holds: a dict's values, a tuple's, list's or set's items, else an object's attributes
    and slots."""
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (tuple, list, set, frozenset)):
        return list(value)
    return [*getattr(value, "__dict__", {}).values(),
            *(getattr(value, slot) for slot in _slots(type(value)) if hasattr(value, slot))]


def _foreign_holder(value, seen: set[int] | None = None) -> str | None:
    """The type name of the first object other than a tuple, list or dict that holds tensors inside a
    positional input (the exporter flattens those three into graph inputs, nothing else; a named tuple
    reaches the model as a plain tuple, without its fields), or None."""
    if isinstance(value, torch.Tensor):
        return None
    seen = set() if seen is None else seen
    if id(value) in seen:  # a list that holds itself
        return None
    seen.add(id(value))
    if not isinstance(value, (dict, tuple, list)) or hasattr(value, "_fields"):
        return type(value).__name__ if _holds_tensors(value) else None
    return next((h for h in (_foreign_holder(v, seen) for v in _inner_values(value)) if h is not None), None)


def _slots(cls: type) -> list[str]:
    """The __slots__ names of a class and its bases (objects without a __dict__ keep their fields there)."""
    names: list[str] = []
    for base in cls.__mro__:
        slots = base.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return [n for n in names if n not in ("__dict__", "__weakref__")]


def _tensor_leaves(out, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in a model's output: tuples, lists, dicts, named tuples and
    dataclasses opened in order, named by their keys and fields, other objects (a key/value cache) left
    out."""
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, dict):
        return [leaf for key, value in out.items() for leaf in _tensor_leaves(value, str(key))]
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return [leaf for key, value in zip(out._fields, out, strict=True) for leaf in _tensor_leaves(value, key)]
    if isinstance(out, (tuple, list)):
        return [leaf for i, value in enumerate(out) for leaf in _tensor_leaves(value, f"{name}.{i}")]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [leaf for f in dataclasses.fields(out) for leaf in _tensor_leaves(getattr(out, f.name), f.name)]
    return []


def _output_names(out) -> list[str]:
    """The graph's output names: "output" for the first tensor (as for a model that returns one), the
    others named after their keys and positions, made unique."""
    leaves = _tensor_leaves(out)
    if not leaves:
        raise ValueError(f"export_onnx writes the tensors of the model's output, but its output "
                         f"({type(out).__name__}) holds none; allowed: a tensor, or tuples, lists, dicts, named "
                         "tuples or dataclasses of them")
    names = ["output"]
    for name, _ in leaves[1:]:
        unique, i = name, 1
        while unique in names:
            unique, i = f"{name}.{i}", i + 1
        names.append(unique)
    return names


def _example_inputs(example) -> tuple[tuple, dict]:
    """(positional, keyword) inputs from an example: a dict holds keyword inputs, a tuple positional ones."""
    if example is None:
        raise TypeError("example must be an input for the model (a tensor, a tuple of inputs or a dict of keyword "
                        "inputs), got None")
    if isinstance(example, dict):
        if not example or not all(isinstance(k, str) for k in example):
            raise ValueError("example as a dict must map input names (str) to values, as the model's keyword "
                             f"inputs; got keys {list(example)[:5]}")
        return (), dict(example)
    return (example if isinstance(example, tuple) else (example,)), {}


class _RangeNotSet(ValueError):
    """An activation quantizer ran without a range (calibrate first)."""


def _check_calibrated(qmodel: nn.Module, args: tuple, kwargs: dict):
    """One forward in which every quantizer that runs fixes its QuantizeLinear parameters (constants of the
    graph); returns its output. A quantizer that runs without a range is an error naming it; one that never
    runs (the key and value quantizers of self-attention, which share the query's tensor) is not in the
    graph and needs none."""
    names = {id(m): n for n, m in qmodel.named_modules() if isinstance(m, ActivationQuantizer)}
    missing: list[str] = []

    def check(module, inputs):
        if module.spec is not None and not module.calibrated and not missing:
            missing.append(names[id(module)])
            raise _RangeNotSet  # before the quantizer runs: in eval mode it would take this input's range

    handles = [m.register_forward_pre_hook(check) for m in qmodel.modules() if isinstance(m, ActivationQuantizer)]
    out = None
    try:
        with _exporting("prepare"):
            out = qmodel(*args, **kwargs)
    except Exception:
        if not missing:
            raise
    finally:
        for h in handles:
            h.remove()
    if missing:
        raise _RangeNotSet(f"{missing[0]}: activation range not set; run calibrate(qmodel, batches) before export")
    return out


def _check_exportable(qmodel: nn.Module) -> None:
    for name, m in qmodel.named_modules():
        quantizers = []
        if isinstance(m, WeightQuantizer) and m.spec is not None:
            quantizers.append(("weights", m.spec))
        if isinstance(m, ActivationQuantizer) and m.spec is not None:
            quantizers.append(("activations", m.spec))
        for what, spec in quantizers:
            scheme = SCHEMES[spec.scheme]
            if not scheme.onnx or spec.bits > 8:
                exportable = ", ".join(repr(n) for n, s in SCHEMES.items() if s.onnx)
                raise ValueError(f"{name} quantizes {what} with scheme {spec.scheme!r} at {spec.bits} bits, which "
                                 f"QuantizeLinear/DequantizeLinear cannot express; exportable: {exportable} up "
                                 "to 8 bits")


def _check_float32(qmodel: nn.Module, args: tuple, kwargs: dict) -> None:
    """The graph quantizes float32 tensors: QuantizeLinear takes no float64 at any opset and no float16 or
    bfloat16 before opset 19, so a model or input of another float dtype gave a graph ONNX Runtime refuses."""
    tensors = [(f"parameter {n}", p) for n, p in qmodel.named_parameters()]
    tensors += [(f"example input {i}", a) for i, a in enumerate(args)]
    tensors += [(f"example[{k!r}]", v) for k, v in kwargs.items()]
    for what, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
            raise ValueError(f"export_onnx writes float32 QDQ graphs, but {what} is {t.dtype}; allowed: float32 "
                             "(convert the model and inputs with .float() before quantizing)")


@contextlib.contextmanager
def _exporting(mode: str):
    from qviz.engine import quantizers

    token = quantizers.EXPORTING.set(mode)
    try:
        yield
    finally:
        quantizers.EXPORTING.reset(token)


# --------------------------------------------------------------------------------------------------
# Layers for the explorers: weights with the batch norm that follows


@dataclasses.dataclass
class WeightLayer:
    """A layer with a weight matrix or kernel, and its batch norm if one follows it."""

    name: str
    module: nn.Module
    bn: nn.Module | None

    @property
    def weight(self) -> torch.Tensor:
        """The float (shadow) weights, even when the layer is quantized."""
        if isinstance(self.module, LinearBN):
            return self.module.weight.detach()
        return float_weight(self.module).detach()

    def rows(self) -> torch.Tensor:
        """The float weights as one row per output channel, [out_channels, everything else] (a transposed
        convolution or GPT-2's Conv1D hold output channels along axis 1)."""
        return self.weight if isinstance(self.module, LinearBN) else output_channel_rows(self.module, self.weight)

    def folded_weight(self) -> torch.Tensor | None:
        """γ W / σ with the batch norm's running statistics (004 eq. 20), one row per output channel as
        `rows`, or None without a batch norm."""
        if self.bn is None:
            return None
        bn = self.bn
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_mean)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
        return fold_batchnorm(self.rows(), gamma, beta, bn.running_mean, bn.running_var, bn.eps)[0]


def _has_weights(layer: nn.Module) -> bool:
    """Whether a layer holds weights to look at: not a lazy layer before its first forward, not 0 x N."""
    tensors = [getattr(layer, n, None) for n in weight_names(layer)]
    return not is_lazy(layer) and all(isinstance(t, torch.Tensor) and t.numel() > 0 for t in tensors)


ROOT_LAYER = "(model)"  # the name weight_layers gives a model that is itself one layer (nn.Linear(4, 4))


def weight_layers(model: nn.Module) -> list[WeightLayer]:
    """Every layer with weights (Linear, Conv, ConvTranspose, MultiheadAttention, LinearBN) with the batch
    norm that follows it: its own (LinearBN), or the next module in registration order when that is a batch
    norm with as many features as the layer has outputs. Layers without weights to show (lazy ones before
    their first forward, 0 x N ones) are left out."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # a model that is itself a layer (nn.Linear(4, 4)) is its one layer, named ROOT_LAYER
    modules = [(n or ROOT_LAYER, m) for n, m in model.named_modules()
               if (n or is_layer(m)) and not _inside_ours(n, model)]
    layers = []
    for i, (name, m) in enumerate(modules):
        if isinstance(m, LinearBN):
            layers.append(WeightLayer(name, m, m.bn))
        elif is_layer(m) and _has_weights(m) and not any(
                isinstance(p, LinearBN) and name.startswith(n + ".") for n, p in modules):
            follower = modules[i + 1][1] if i + 1 < len(modules) else None
            out = output_channel_rows(m, float_weight(m)).shape[0] if not isinstance(m, nn.MultiheadAttention) else None
            is_bn = isinstance(follower, nn.modules.batchnorm._BatchNorm) and follower.num_features == out \
                and follower.running_mean is not None
            layers.append(WeightLayer(name, m, follower if is_bn else None))
    return layers


def weight_pairs(model: nn.Module, *, with_names: bool = False) -> list[tuple]:
    """(float weights, the weights the model computes with) of every quantizable layer, in eval mode and
    without gradients; LinearBN layers give their folded weights (004 eqs. 20-21). with_names prepends
    each layer's name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    pairs = []
    for name, layer in quantizable_layers(model):
        pair = layer_weight_pair(layer)
        pairs.append((name, *pair) if with_names else pair)
    return pairs


def layer_weight_pair(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(float weights, the weights the layer computes with) in eval mode, without gradients. LinearBN
    quantizes inside its forward, its folded weights (004 eqs. 20-21): reading .weight would give float."""
    with torch.no_grad():
        if isinstance(layer, LinearBN):
            w = layer.folded()[0] if layer.fold != "none" else layer.weight
            q = layer.wq(w) if layer.wq.spec is not None else w
        else:
            w = float_weight(layer)
            was = layer.training
            layer.eval()
            q = _joined([getattr(layer, n) for n in weight_names(layer)])
            layer.train(was)
    return w.detach(), q.detach()


def model_bytes(qmodel: nn.Module) -> dict:
    """Bytes of a model's layer weights: float32, and packed at each layer's weight bits (float layers count
    4 bytes a weight). A quick total; qviz.packed.memory_report gives the kernels' exact word rows."""
    total_float, total_packed = 0, 0
    for row in quantized_layers(qmodel):
        n = math.prod(row["weight_shape"])
        total_float += 4 * n
        spec = row["weights"]
        total_packed += 4 * n if spec is None else math.ceil(n * math.log2(max(2, spec.max_levels)) / 8)
    return {"float32_bytes": total_float, "quantized_bytes": total_packed}
