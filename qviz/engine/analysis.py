"""Which layer of a network hurts, and what each bit buys: the numbers behind the ModelExplorer.

`ModelAnalysis(model, data, metric=None)` quantizes a copy of `model` once (quantize_model) and then only
reconfigures its quantizers, so a change of one layer's bits costs the work that change invalidates:

- per layer: weight SQNR (float vs quantized weights), output SQNR with the float network's input (the
  layer's own error) and inside the quantized network (the propagated error), sensitivity (the drop of the
  metric when only that layer is quantized), parameters and packed bytes;
- for the model: the float and quantized metric, packed bytes against float32, and a latency estimate from
  the packed kernels' measured throughput;
- a Pareto chart's points: uniform bit widths and a greedy mixed-precision path that lowers the least
  sensitive layer first.

data is (X, y), scored by accuracy (or metric(outputs, y), higher is better unless higher_is_better=False,
a loss), or X alone, scored by the output SQNR in dB against the float model's outputs. X is a tensor, or a
dict of tensors for models that take keyword inputs (Hugging Face's pixel_values). data may also be an
iterable of batches (a DataLoader): its first DATA_SAMPLES samples are taken. Activation ranges are
calibrated once, by min/max of the float network's activations over X (calibrate's "minmax"), so they do
not depend on the bit widths being tried; feeding `analysis.overrides(config)` to quantize_model and
calibrating the same way reproduces every number (to the last bits where attention runs weights-only:
PyTorch's fused fast path, which the analysis keeps off, then runs in quantize_model's copy). Results are
cached per layer setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import statistics
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from qviz import _checks
from qviz.engine.metrics import histogram, sqnr_db, weight_report
from qviz.engine.observers import range_dtype
from qviz.engine.quantize import (
    TRANSPOSED_CONVS,
    UnquantizedModuleWarning,
    _fast_paths_off_when_needed,
    _has_weights,
    _noted_errors,
    _original,
    channel_axis,
    configure_layer,
    default_activation_spec,
    default_weight_spec,
    float_weight,
    input_quantizers,
    is_lazy,
    layer_inputs,
    layer_weight_pair,
    output_channel_rows,
    quantizable_layers,
    quantize_model,
    takes_input_quantizer,
    uncompiled,
    weight_groups,
    weight_names,
)
from qviz.engine.quantizers import SCHEMES, QuantSpec, quantizer_levels, quantizer_thresholds

BIT_CHOICES = (1, 2, 3, 4, 5, 6, 8)
PARETO_BITS = (2, 3, 4, 6, 8)
GREEDY_LADDER = (8, 4, 2)  # the bit widths the greedy path steps each layer through
GREEDY_POINTS = 16  # metrics measured per rung of the greedy path, at most: each is a forward over the data
DATA_SAMPLES = 256  # samples taken from an iterable of batches (a DataLoader): a few dozen suffice
EMPTY_BATCHES_MOST = 100  # empty batches in a row after which an iterable is read no further
CAPTURE_SAMPLES = 64  # samples whose per-layer inputs and outputs are kept for the layer SQNRs, at most
CAPTURE_SHARE = 8  # ... and no more than 1/8 of qviz's memory limit (256 MiB of 2 GiB): ResNet-50 at 224x224
# keeps ~150 MB a sample, so 64 samples took 9.6 GB; the quantized network's capture needs as much again


class AnalysisCancelled(Exception):
    """Raised inside a ModelAnalysis computation whose cancel event was set (see ModelAnalysis.cancellable)."""


@dataclasses.dataclass(frozen=True)
class LayerSetting:
    """One layer's quantization: weight and activation specs (None: float)."""

    weights: QuantSpec | None
    activations: QuantSpec | None


FLOAT = LayerSetting(None, None)


def _outputs(out) -> torch.Tensor:
    """A model's output as one tensor: .logits of Hugging Face outputs, else their first floating-point field
    (a base model's last_hidden_state, Encodec's audio_values rather than its integer audio_codes; a
    ModelOutput is a dict of its fields that are set), the first floating-point value of a dict, a
    dataclass or a tuple; the first tensor of any dtype when none is floating-point."""
    found = _first_tensor(out, floating=True)
    if found is None:
        found = _first_tensor(out, floating=False)
    if found is None:
        raise TypeError("the model's output must be a tensor, or hold one (a tuple, dict or dataclass of tensors, "
                        f"or .logits), got {type(out).__name__}")
    return found


def _first_tensor(out, floating: bool) -> torch.Tensor | None:
    """The first tensor in out (floating-point or complex ones only, if `floating`): .logits first, then
    the values of a dict, dataclass, tuple or list in their order, depth first."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() or out.is_complex() or not floating else None
    if getattr(out, "logits", None) is not None:
        found = _first_tensor(out.logits, floating)
        if found is not None:
            return found
    if isinstance(out, dict):
        out = list(out.values())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    if isinstance(out, tuple | list):
        for v in out:
            found = _first_tensor(v, floating) if v is not None else None
            if found is not None:
                return found
    return None


def _is_batches(data) -> bool:
    """Whether data is an iterable of batches (a DataLoader, a list of (x, y) pairs) rather than X, (X, y)."""
    if isinstance(data, torch.Tensor | Mapping | str | bytes):
        return False
    if isinstance(data, tuple | list):  # X or (X, y), X a tensor or a dict of them; else batches
        if not data or isinstance(data[0], torch.Tensor):
            return False
        if isinstance(data[0], Mapping):  # (X, y) with keyword inputs, or a list of dict batches
            return not (len(data) == 1 or (len(data) == 2 and isinstance(data[1], torch.Tensor | None)))
        return isinstance(data[0], tuple | list)
    return hasattr(data, "__iter__")


def _from_batches(batches) -> tuple:
    """(X, y) from the first batches of an iterable, up to DATA_SAMPLES samples (and no further than
    EMPTY_BATCHES_MOST empty batches in a row): each batch a tensor, an (x, y, ...) tuple or list, or a dict
    of keyword inputs whose "labels" (or "label") entry is y, as Hugging Face's data collators give it."""
    xs, ys, count, empty_run = [], [], 0, 0
    for i, batch in enumerate(batches):
        x, y = _split_batch(batch, i)
        xs.append(x)
        ys.append(y)
        n = _count(x)
        count += n
        empty_run = 0 if n else empty_run + 1
        if count >= DATA_SAMPLES:
            break
        if empty_run == EMPTY_BATCHES_MOST:  # an endless loader of empty batches would never reach DATA_SAMPLES
            if not count:
                raise ValueError(f"data's first {EMPTY_BATCHES_MOST} batches hold no samples; allowed: batches "
                                 "that hold samples")
            break
    if not xs:
        raise ValueError("data is an iterable of batches with no batch in it; allowed: X, (X, y) or batches")
    if len({y is None for y in ys}) > 1:
        raise ValueError("data's batches hold labels in some batches only; allowed: labels in every batch or none")
    try:
        X = {k: torch.cat([x[k] for x in xs])[:DATA_SAMPLES] for k in xs[0]} if isinstance(xs[0], dict) else \
            torch.cat(xs)[:DATA_SAMPLES]
        y = None if ys[0] is None else torch.cat(ys)[:DATA_SAMPLES]
    except (RuntimeError, TypeError, KeyError) as err:
        raise ValueError(f"data's batches do not join into one X and y ({type(err).__name__}: {err}); allowed: "
                         "batches of one shape and kind (pad sequences to one length)") from err
    return X, y


def _labelled_dict(data) -> bool:
    return isinstance(data, Mapping) and any(k in data for k in ("labels", "label"))


def _split_batch(batch, i: int) -> tuple:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], torch.Tensor | Mapping):
        x, y = batch[0], batch[1] if len(batch) > 1 else None
    elif isinstance(batch, Mapping):  # Hugging Face's collators give a BatchEncoding, a Mapping
        label = next((k for k in ("labels", "label") if k in batch), None)
        x, y = {k: v for k, v in batch.items() if k != label}, None if label is None else batch[label]
    else:
        raise TypeError(f"data batch {i} must be a tensor, an (x, y) tuple or list, or a dict of keyword inputs, "
                        f"got {type(batch).__name__}")
    if isinstance(x, Mapping):
        x = dict(x)
        if not x:
            raise ValueError(f"data batch {i} has no inputs (an empty dict, or labels only); allowed: a tensor or "
                             "a dict of keyword inputs")
    return x, y


def _rows(x, start: int, stop: int):
    """Samples start..stop of X, copied: a model that changes its input in place (x.sub_(mean)) would change
    the user's data through a view, and every later pass would see other inputs."""
    return {k: v[start:stop].clone() for k, v in x.items()} if isinstance(x, dict) else x[start:stop].clone()


def _count(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _joined_outputs(outs: list[torch.Tensor]) -> torch.Tensor:
    """The outputs of the batches the analysis ran, as one tensor of one row per sample."""
    shapes = {tuple(o.shape[1:]) for o in outs}
    if len(shapes) > 1:
        raise ValueError(f"the model's outputs differ in shape from batch to batch ({sorted(shapes)[:4]} per "
                         "sample), so they cannot be scored together; allowed: outputs of one shape per sample "
                         "(pad sequences to one length in the data)")
    return torch.cat(outs)


def _propagated_sqnr(want: torch.Tensor, got: torch.Tensor) -> float:
    """A layer's output SQNR inside the quantized network; NaN where its output differs in shape from the
    float network's: a mixture-of-experts router that sends another number of tokens to an expert once the
    network is quantized gives it rows with no float counterpart. (The same number of other tokens cannot
    be told apart from the same ones: it compares other rows, and reads low.)"""
    return sqnr_db(want, got) if want.shape == got.shape else math.nan


def _call(model: nn.Module, x):
    with _noted_errors("the analysis ran it on", x, passing=(AnalysisCancelled,)):
        return model(**x) if isinstance(x, dict) else model(x)


class ModelAnalysis:
    """Per-layer and whole-model quantization numbers of `model` on `data` (see the module docstring)."""

    def __init__(self, model: nn.Module, data, metric: Callable | None = None, *, batch_size: int = 256,
                 higher_is_better: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = uncompiled(model)  # torch.compile's wrapper: the analysis names the layers of what it compiles
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be callable(outputs, y) or None, got {type(metric).__name__}")
        lazy = [f"{name!r} ({type(layer).__name__})" for name, layer in quantizable_layers(model) if is_lazy(layer)]
        if lazy:  # running the model would make them in the user's model, and the copy's quantizers stale
            raise ValueError(f"model has layers whose weights are not made yet: {', '.join(lazy[:3])}; allowed: "
                             "a model run once on an example input first (that makes them)")
        self.X, self.y = self._check_data(data)
        self._check_labels(self.y, metric)
        self.metric_fn = metric
        if not isinstance(higher_is_better, bool):
            raise TypeError(f"higher_is_better must be True (accuracy, SQNR) or False (a loss), got "
                            f"{type(higher_is_better).__name__}")
        if not higher_is_better and metric is None:
            raise ValueError("higher_is_better=False needs metric=callable(outputs, y): accuracy and output SQNR "
                             "are higher-is-better; allowed: True, or False with a metric such as a loss")
        self.higher_is_better = higher_is_better
        self.batch_size = _checks.integer("batch_size", batch_size, 1)
        self.model = model  # never run: the float numbers come from the quantized copy with every quantizer off
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnquantizedModuleWarning)
            self.qmodel = quantize_model(model, None, None).eval()
        # PyTorch's fused attention rounds differently; off in every pass, the float one too, the numbers do
        # not depend on which configs were tried before (it is off wherever attention inputs are quantized)
        _fast_paths_off_when_needed(self.qmodel, always=True)
        self.unquantized = [str(w.message) for w in caught if issubclass(w.category, UnquantizedModuleWarning)]
        # a layer of 0 features (nn.Linear(16, 0)) has no weights to quantize and no output to measure
        self.layers = [name for name, layer in quantizable_layers(self.qmodel) if _has_weights(layer)]
        if not self.layers:
            raise ValueError("model has no Linear, Conv, ConvTranspose or MultiheadAttention layer with weights to "
                             "quantize")
        self._modules = dict(quantizable_layers(self.qmodel))
        self._kinds = {name: type(layer).__name__ for name, layer in quantizable_layers(model)}
        self._inner = {name: [n for n in self.layers if n != name and (not name or n.startswith(name + "."))]
                       for name in self.layers}  # "" is a model that is itself one layer: all others are in it
        self._cache: dict = {}
        self._applied: dict[str, LayerSetting] = {}
        self._input_ranges: dict[str, list[tuple[float, float]]] = {}
        self._captured_float: dict[str, tuple] | None = None
        self._work: dict[str, int] = {}
        self._samples = min(CAPTURE_SAMPLES, _count(self.X))  # set by float_pass from the memory a sample takes
        self._cancel: threading.Event | None = None
        self._float_outputs: torch.Tensor | None = None
        self._rates: dict | None = None
        self.metric_name = "accuracy" if self.y is not None and metric is None else (
            "metric" if metric is not None else "output SQNR (dB)")

    # ------------------------------------------------------------------ data and settings

    @staticmethod
    def _check_data(data):
        if _is_batches(data):
            data = _from_batches(data)
        elif _labelled_dict(data) or (isinstance(data, tuple | list) and len(data) == 1 and _labelled_dict(data[0])):
            # one dict batch, alone or as [batch]: its "labels" are y, as in a loader's batches, not an input
            data = _split_batch(data if isinstance(data, Mapping) else data[0], 0)
        if isinstance(data, tuple | list):
            if len(data) not in (1, 2):
                raise ValueError(f"data must be X or (X, y), got a sequence of {len(data)} items")
            X, y = data[0], (data[1] if len(data) == 2 else None)
        else:
            X, y = data, None
        if isinstance(X, Mapping):  # Hugging Face's BatchEncoding too
            X = dict(X)
        if isinstance(X, dict):
            if not X or not all(isinstance(v, torch.Tensor) for v in X.values()):
                raise TypeError("data X as a dict must map input names to tensors (keyword inputs of the model)")
            sizes = {len(v) for v in X.values()}
            if len(sizes) != 1:
                raise ValueError(f"data X's tensors must hold as many samples each, got {sorted(sizes)}")
        elif not isinstance(X, torch.Tensor):
            raise TypeError(f"data must be X or (X, y) with X a torch.Tensor (or a dict of them), got "
                            f"{type(X).__name__}")
        if _count(X) == 0:
            raise ValueError("data X is empty: the analysis needs at least one sample")
        for name, t in (X.items() if isinstance(X, dict) else [("X", X)]):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"data {name} contains NaN or Inf; allowed: finite values")
        if y is not None:
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"data y must be a torch.Tensor or None, got {type(y).__name__}")
            if len(y) != _count(X):
                raise ValueError(f"data X has {_count(X)} samples but y has {len(y)}; allowed: as many each")
        return X, y

    @staticmethod
    def _check_labels(y, metric) -> None:
        """Without a metric the analysis scores accuracy: y must then hold one class index per sample."""
        if y is None or metric is not None:
            return
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
            raise ValueError(f"data y ({y.dtype}, shape {tuple(y.shape)}) is scored by accuracy when metric is None, "
                             "which needs one integer class index per sample; allowed: y of shape (N,) with an "
                             "integer dtype, or metric=callable(outputs, y) for other targets")

    def setting(self, name: str, w_bits, a_bits, scheme: str = "default") -> LayerSetting:
        """The specs for bit widths (None: float) with a weight scheme ("default": 004's symmetric per-channel)."""
        layer = self._modules[self._layer_name(name)]
        self.scheme_bits(scheme)  # checks the scheme's name, float weights too
        if w_bits is None:
            weights = None
        elif scheme == "default":
            weights = default_weight_spec(w_bits, layer)
        else:
            lo, hi = self.scheme_bits(scheme)
            w_bits = _checks.integer("w_bits", w_bits, 1, 16)
            if not lo <= w_bits <= hi:  # the weight bits a menu holds may not suit the scheme picked next
                allowed = str(lo) if lo == hi else f"{lo} to {hi}"
                raise ValueError(f"w_bits={w_bits} does not suit weight scheme {scheme!r}, which takes {allowed} "
                                 f"bits; allowed: w_bits={allowed}, or another scheme")
            kw = {"granularity": "channel", "axis": channel_axis(layer)} if scheme in ("symmetric", "affine") else {}
            weights = QuantSpec(scheme, bits=w_bits, **kw)
        takes = takes_input_quantizer(layer)  # MultiheadAttention's output projection: weights only
        activations = None if a_bits is None or not takes else default_activation_spec(a_bits)
        return LayerSetting(weights, activations)

    def _layer_name(self, name: object) -> str:
        if not isinstance(name, str) or name not in self.layers:
            shown = ", ".join(repr(n) for n in self.layers[:8]) + (", ..." if len(self.layers) > 8 else "")
            raise ValueError(f"name={name!r} is not a quantizable layer of the model; allowed: {shown}")
        return name

    def _layer_setting(self, name: object, setting: object) -> str:
        """The checked name, after checking that setting is a LayerSetting (the per-layer methods' arguments)."""
        name = self._layer_name(name)
        if not isinstance(setting, LayerSetting):
            raise TypeError(f"setting must be a LayerSetting (from setting() or uniform_config()), got "
                            f"{type(setting).__name__}")
        return name

    @staticmethod
    def weight_schemes() -> list[str]:
        return [n for n, s in SCHEMES.items() if s.kind == "weights" and not s.stochastic]

    def _complete(self, config) -> dict[str, LayerSetting]:
        """A config naming some layers, the others float: every number is then of one whole network
        (a partial config used to leave the others at whatever was tried last)."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict of layer name -> LayerSetting (from setting() or "
                            f"uniform_config()), got {type(config).__name__}")
        for name, setting in config.items():
            self._layer_name(name)
            if not isinstance(setting, LayerSetting):
                raise TypeError(f"config[{name!r}] must be a LayerSetting (from setting()), got "
                                f"{type(setting).__name__}")
        return {name: config.get(name, FLOAT) for name in self.layers}

    def overrides(self, config: dict[str, LayerSetting]) -> dict:
        """quantize_model overrides that reproduce `config` (the layers it does not name float)."""
        return overrides_of(self._complete(config))

    def _apply(self, config: dict[str, LayerSetting]) -> None:
        """Reconfigure only the layers whose setting changed. A new input quantizer takes the min/max of the
        float network's inputs to that layer over all of X, which is what calibrate(..., "minmax") sets."""
        self.float_pass()
        for name, setting in config.items():
            if self._applied.get(name) == setting:
                continue
            layer = self._modules[name]
            configure_layer(layer, setting.weights, setting.activations)
            wide = range_dtype(float_weight(layer))  # as calibrate keeps a range: float64 for a float64 model
            for quantizer, (lo, hi) in zip(input_quantizers(layer), self._input_ranges[name], strict=False):
                if quantizer.spec is not None and not quantizer.observer.initialized and lo <= hi:
                    quantizer.observer.min_val = torch.tensor([lo], dtype=wide)
                    quantizer.observer.max_val = torch.tensor([hi], dtype=wide)
            self._applied[name] = setting

    # ------------------------------------------------------------------ the float pass

    @contextlib.contextmanager
    def cancellable(self, cancel: threading.Event | None) -> Iterator[None]:
        """Computations inside stop within one layer once `cancel` is set, raising AnalysisCancelled (an
        explorer closed or outdated while a large model's pass runs must not keep the process busy)."""
        before, self._cancel = self._cancel, cancel
        try:
            yield
        finally:
            self._cancel = before

    def _stop_if_cancelled(self, *_) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise AnalysisCancelled("the analysis was cancelled")

    def _capture(self, model: nn.Module, modules: dict[str, nn.Module], samples: int | None = None,
                 work: dict[str, int] | None = None) -> tuple[dict, torch.Tensor]:
        """Run the first `samples` (default: the captured ones) through `model`, keeping each layer's inputs
        and output (of its last call, if called more than once) and adding up the multiply-accumulates of
        all its calls into `work`."""
        seen: dict[str, tuple] = {}
        handles = []
        for name, m in modules.items():
            # copies, not views: the model may change a tensor in place after the layer (ReLU(inplace=True)
            # after a conv, `out += residual`), and a view would then hold what it became
            def pre(mod, args, kwargs, name=name):
                self._stop_if_cancelled()
                seen[name] = [tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                              {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}]

            def post(mod, args, out, name=name):
                seen[name].append(_outputs(out).detach().clone())
                if work is not None:
                    for counted, macs in self._call_macs(name, mod, *seen[name]):
                        work[counted] = work.get(counted, 0) + macs

            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(m.register_forward_hook(post))
        try:
            with torch.no_grad(), _checks.no_finite_checks():  # the data was checked once, in __init__
                out = _outputs(_call(model, _rows(self.X, 0, self._samples if samples is None else samples)))
        finally:
            for h in handles:
                h.remove()
        return seen, out

    def _samples_that_fit(self, captured: dict) -> int:
        """How many samples' layer inputs and outputs fit CAPTURE_SHARE of the memory limit, from one's."""
        from qviz._timing import memory_limit

        one = sum(t.numel() * t.element_size() for args, kwargs, out in captured.values()
                  for t in (*args, *kwargs.values(), out) if isinstance(t, torch.Tensor))
        return max(1, min(CAPTURE_SAMPLES, _count(self.X), memory_limit() // CAPTURE_SHARE // max(one, 1)))

    def _all_float(self) -> None:
        """Every quantizer of the copy off: it then computes what the user's model computes."""
        for name, layer in self._modules.items():
            if self._applied.get(name) != FLOAT:
                configure_layer(layer, None, None)
        self._applied = dict.fromkeys(self._modules, FLOAT)

    def float_pass(self) -> None:
        """One pass of the float model over X: its outputs, each layer's inputs and output for the first
        samples (CAPTURE_SAMPLES, fewer where their layer tensors would take more than 1/CAPTURE_SHARE of
        the memory limit; at least one), and the range of every layer's inputs over all of X."""
        if self._captured_float is not None:
            return
        ranges: dict[str, list[list[float]]] = {}
        handles = []
        for name, m in self._modules.items():
            def observe(mod, args, kwargs, name=name):
                # by the quantizers' order, however the inputs were passed: attn(x, value=v, key=k)
                inputs = layer_inputs(mod, args, kwargs)
                seen = ranges.setdefault(name, [[math.inf, -math.inf] for _ in inputs])
                for r, t in zip(seen, inputs, strict=False):
                    if isinstance(t, torch.Tensor) and t.numel():
                        r[0], r[1] = min(r[0], float(t.min())), max(r[1], float(t.max()))

            handles.append(m.register_forward_pre_hook(observe, with_kwargs=True))
        try:
            # the copy, not the user's model: the user may run or change theirs meanwhile (the explorer
            # computes in the background), and it was copied when the analysis was made
            self._all_float()
            work: dict[str, int] = {}
            captured, head = self._capture(self.qmodel, self._modules, samples=1, work=work)
            self._samples = self._samples_that_fit(captured)
            if self._samples > 1:
                ranges.clear()  # the first sample is observed again
                work.clear()
                captured, head = self._capture(self.qmodel, self._modules, work=work)
            rest = self._forward(self.qmodel, start=self._samples) if _count(self.X) > self._samples else None
        finally:
            for h in handles:
                h.remove()
        self._captured_float = captured
        self._work = work  # of the captured samples, every call: a layer used twice (tied weights) works twice
        self._float_outputs = head if rest is None else _joined_outputs([head, rest])
        self._input_ranges = {name: [tuple(r) for r in ranges.get(name, [])] for name in self.layers}

    def _forward(self, model: nn.Module, start: int = 0) -> torch.Tensor:
        outs = []
        with torch.no_grad(), _checks.no_finite_checks():
            for i in range(start, _count(self.X), self.batch_size):
                self._stop_if_cancelled()
                outs.append(_outputs(_call(model, _rows(self.X, i, i + self.batch_size))))
        return _joined_outputs(outs)

    def _score(self, outputs: torch.Tensor) -> float:
        if self.metric_fn is not None:
            value = float(self.metric_fn(outputs, self.y if self.y is not None else self._float_outputs))
            if not math.isfinite(value):
                raise ValueError(f"metric returned {value}; allowed: a finite number for every set of outputs")
            return value
        if self.y is not None:
            if outputs.dim() != 2 or len(outputs) != len(self.y):
                raise ValueError(f"the model's outputs have shape {tuple(outputs.shape)}, which accuracy cannot score "
                                 f"against data y of shape {tuple(self.y.shape)}; allowed: outputs of one row of "
                                 "class scores per sample, (N, classes), or metric=callable(outputs, y)")
            if int(self.y.max()) >= outputs.shape[-1] or int(self.y.min()) < 0:
                raise ValueError(f"data y holds classes {int(self.y.min())}..{int(self.y.max())} but the model gives "
                                 f"{outputs.shape[-1]} outputs per sample; allowed: class indices 0.."
                                 f"{outputs.shape[-1] - 1}, or metric=callable(outputs, y)")
            return float((outputs.argmax(-1) == self.y).float().mean())
        return float(sqnr_db(self._float_outputs, outputs))

    @property
    def float_metric(self) -> float:
        self.float_pass()
        if "float_metric" not in self._cache:
            self._cache["float_metric"] = self._score(self._float_outputs)
        return self._cache["float_metric"]

    # ------------------------------------------------------------------ per layer

    def weight_sqnr(self, name: str, setting: LayerSetting) -> float:
        name = self._layer_setting(name, setting)
        key = ("weight_sqnr", name, setting.weights)
        if key not in self._cache:
            if setting.weights is None:
                self._cache[key] = math.inf
            else:
                self._apply({name: setting})
                w, q = layer_weight_pair(self._modules[name])
                self._cache[key] = sqnr_db(w.reshape(-1), q.reshape(-1))
        return self._cache[key]

    def output_sqnr(self, name: str, setting: LayerSetting) -> float:
        """The layer's own error: its output with the float network's input, quantized vs float."""
        name = self._layer_setting(name, setting)
        key = ("output_sqnr", name, setting)
        if key not in self._cache:
            self.float_pass()
            if setting.weights is None and setting.activations is None:
                self._cache[key] = math.inf
            elif name not in self._captured_float:  # never called as a module: no output of its own
                self._cache[key] = math.nan
            else:
                # a layer inside it (attention's output projection) float, whatever was tried last
                self._apply({name: setting, **dict.fromkeys(self._inner[name], FLOAT)})
                args, kwargs, want = self._captured_float[name]
                with torch.no_grad(), _checks.no_finite_checks():
                    got = _outputs(self._modules[name](*args, **kwargs))
                self._cache[key] = sqnr_db(want, got)
        return self._cache[key]

    def evaluate(self, config: dict[str, LayerSetting]) -> dict:
        """The quantized network under `config`: its metric and every layer's propagated output SQNR."""
        config = self._complete(config)
        key = ("evaluate", _freeze(config))
        if key not in self._cache:
            self.float_pass()
            self._apply(config)
            captured, head = self._capture(self.qmodel, self._modules)
            propagated = {name: _propagated_sqnr(self._captured_float[name][2], captured[name][2])
                          if name in captured and name in self._captured_float else math.nan for name in self.layers}
            del captured
            outputs = head if _count(self.X) <= self._samples else _joined_outputs(
                [head, self._forward(self.qmodel, start=self._samples)])
            self._cache[key] = {"metric": self._score(outputs), "propagated": propagated}
        return self._cache[key]

    def metric_of(self, config: dict[str, LayerSetting]) -> float:
        """The metric of the quantized network under `config` (no per-layer capture)."""
        config = self._complete(config)
        key = ("metric", _freeze(config))
        if key not in self._cache:
            full = self._cache.get(("evaluate", _freeze(config)))
            if full is not None:
                return full["metric"]
            self.float_pass()
            self._apply(config)
            self._cache[key] = self._score(self._forward(self.qmodel))
        return self._cache[key]

    @property
    def scored_by_sqnr(self) -> bool:
        return self.y is None and self.metric_fn is None

    @property
    def sensitivity_name(self) -> str:
        if self.scored_by_sqnr:
            return "output noise (dB)"
        return f"{self.metric_name} drop" if self.higher_is_better else f"{self.metric_name} rise"

    def sensitivity(self, name: str, setting: LayerSetting) -> float:
        """How much the metric worsens when only this layer is quantized (float metric minus that metric;
        the other way round for a metric where lower is better, a loss).
        Scored by output SQNR, where the float network's own SQNR is infinite, it is the output noise that
        layer alone causes, in dB relative to the signal (-SQNR): higher is more sensitive either way."""
        name = self._layer_setting(name, setting)
        if setting.weights is None and setting.activations is None:
            return -math.inf if self.scored_by_sqnr else 0.0
        alone = self.metric_of({name: setting})  # the other layers float
        if self.scored_by_sqnr:
            return -alone
        return self.float_metric - alone if self.higher_is_better else alone - self.float_metric

    # ------------------------------------------------------------------ bytes and time

    def layer_shape(self, name: str) -> tuple[int, int, tuple[int, int]]:
        """(out_features, in_features per group, kernel) of a layer's weight, as memory_report takes them."""
        if not isinstance(name, str) or name not in self._modules:  # a layer of 0 features too (the float pass)
            self._layer_name(name)
        layer = self._modules[name]
        w = float_weight(layer)
        if isinstance(layer, nn.MultiheadAttention) and not layer._qkv_same_embed_dim:
            # query, key and value of different widths (kdim, vdim) come joined flat: 3 x embed_dim
            # output channels, one scale each, over their mean width
            out = 3 * layer.embed_dim
            return out, w.numel() // out, (1, 1)
        axis = channel_axis(layer)
        # a grouped transposed convolution: out/groups slots of axis 1 and all `in` of axis 0 give the
        # weight count; its output channels (one scale each) are out_channels
        groups = weight_groups(layer)
        out, fan_in = w.shape[axis] * groups, w.shape[1 - axis] // groups if w.dim() > 1 else 1
        k = tuple(int(v) for v in w.shape[2:])
        kernel = (1, 1) if not k else (1, k[0]) if len(k) == 1 else (math.prod(k[:-1]), k[-1])
        return int(out), int(fan_in), kernel

    def packed_bytes(self, name: str, setting: LayerSetting) -> int:
        """Bytes of the layer's weights as the packed kernels hold them: codes in rows of 64-bit words
        (memory_report), plus a scale and zero-point (levels evenly spaced: affine, symmetric, DoReFa,
        ternary) or a float32 codebook of the levels (the others: ceil's skip zero) per tensor or per
        output channel. Float32 when the layer is float."""
        from qviz import packed

        name = self._layer_setting(name, setting)
        out, fan_in, kernel = self.layer_shape(name)
        spec = setting.weights
        if spec is None:
            return self.float32_bytes(name)
        levels = spec.max_levels
        bits = next((b for b in packed.CODE_BITS if 2**b >= levels), None)
        if bits is None:  # 9 to 16 bits: no packed kernel takes them; 16-bit integers hold them
            codes = 2 * out * fan_in * kernel[0] * kernel[1]
        else:
            codes = packed.memory_report(out, fan_in, kernel=kernel, bits=bits, codebook_bits=0)["packed_bytes"]
        groups = out if spec.granularity == "channel" else 1
        return int(codes + groups * (8 if self._evenly_spaced(name, spec) else 4 * levels))

    def _evenly_spaced(self, name: str, spec: QuantSpec) -> bool:
        """Whether the levels `spec` gives this layer's weights are evenly spaced (in every channel), so that
        a scale and a zero point give them: read from the levels themselves, not from the scheme's class."""
        key = ("evenly_spaced", name, spec)
        if key not in self._cache:
            rows = quantizer_levels(float_weight(self._modules[name]).detach(), spec)
            rows = rows.reshape(-1, rows.shape[-1]).double()
            steps = rows.diff(dim=-1)
            # levels are float32: k * step rounds to within a few ulps of the largest level
            ulps = 16 * torch.finfo(torch.float32).eps * rows.abs().amax(dim=-1, keepdim=True)
            self._cache[key] = bool(((steps - steps[:, :1]).abs() <= ulps).all())
        return self._cache[key]

    def float32_bytes(self, name: str) -> int:
        out, fan_in, kernel = self.layer_shape(name)
        return 4 * out * fan_in * kernel[0] * kernel[1]

    def params(self, name: str) -> int:
        layer = self._modules[self._layer_name(name)]
        bias = layer.in_proj_bias if isinstance(layer, nn.MultiheadAttention) else getattr(layer, "bias", None)
        return int(float_weight(layer).numel() + (0 if bias is None else bias.numel()))

    def macs(self, name: str) -> int:
        """Multiply-accumulates of the layer's weights per sample, over all its calls in the float pass."""
        name = self._layer_name(name)
        self.float_pass()
        return self._work.get(name, 0) // self._samples

    def _call_macs(self, name: str, layer: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor):
        """(layer name, multiply-accumulates) of one call: output elements x fan-in x kernel; a transposed
        convolution scatters each input element to out/groups x kernel outputs; attention projects query,
        key and value (each rows x its width x embed_dim), and its output projection, which it uses without
        calling it as a module, the query's rows x embed_dim x embed_dim."""
        if isinstance(layer, nn.MultiheadAttention):
            query, key, value = layer_inputs(layer, args, kwargs)
            yield name, sum(t.numel() for t in (query, key, value) if isinstance(t, torch.Tensor)) * layer.embed_dim
            if isinstance(query, torch.Tensor):
                yield f"{name}.out_proj" if name else "out_proj", query.numel() * layer.embed_dim
        elif isinstance(layer, TRANSPOSED_CONVS):
            yield name, layer_inputs(layer, args, kwargs)[0].numel() * math.prod(float_weight(layer).shape[1:])
        else:
            _, fan_in, kernel = self.layer_shape(name)
            yield name, int(out.numel() * fan_in * kernel[0] * kernel[1])

    def kernel_rates(self, budget_s: float = 0.05, rounds: int = 3) -> dict:
        """Multiply-accumulates per second of each packed kernel and of torch float32 (measured once). Each
        kernel runs interleaved with torch on the same shapes, and its rate is torch's typical rate times
        the median of `rounds` such runs' ratios: ratios measured in one run hold on a busy machine where
        absolute times drift, and the median drops a run the host disturbed (1 in 6 here moved the W8
        estimate from 1.35x to 0.79x float32)."""
        if self._rates is None:
            from qviz import packed

            kernels = (("binary", 1), ("lowbit", 2), ("lowbit", 4), ("lut", 4), ("lut", 8))
            runs = {key: [packed.measure_latency(key[0], 16, 1024, 1024, bits=key[1], budget_s=budget_s)
                          for _ in range(rounds)] for key in kernels}
            float_rate = statistics.median(r["macs"] / r["torch_s"] for rs in runs.values() for r in rs)
            self._rates = {"float": float_rate,
                           **{key: float_rate * statistics.median(r["ratio"] for r in rs) for key, rs in runs.items()}}
        return self._rates

    def kernel_for(self, setting: LayerSetting) -> tuple[str, int] | str:
        """The packed kernel a layer would run on: XOR-popcount for W1A1, bit-serial for equal 2- or 4-bit
        weights and activations, codebook for up-to-8-bit weights with wider activations, else float."""
        w = setting.weights
        if w is None:
            return "float"
        a = setting.activations
        levels = w.max_levels
        if levels <= 2 and a is not None and a.bits == 1:
            return ("binary", 1)
        if a is not None and a.bits == w.bits and w.bits in (2, 4):
            return ("lowbit", w.bits)
        if levels <= 16:
            return ("lut", 4)
        if levels <= 256:
            return ("lut", 8)
        return "float"

    def latency_estimate(self, config: dict[str, LayerSetting]) -> dict:
        """Seconds per sample: Σ MACs / rate of the layer's kernel, and the same all in torch float32."""
        config = self._complete(config)
        rates = self.kernel_rates()
        total = float_total = 0.0
        for name in self.layers:
            macs = self.macs(name)
            total += macs / rates[self.kernel_for(config[name])]
            float_total += macs / rates["float"]
        return {"seconds": total, "float_seconds": float_total}

    # ------------------------------------------------------------------ one layer up close

    def drilldown(self, name: str, setting: LayerSetting, *, bins: int = 60) -> dict:
        """What the explorer shows for one layer: its weights against the levels (weight_report), its input
        activations with the clip range, and its quantizer's staircase with the layer's real levels (of the
        output channel with the widest range when per channel)."""
        name = self._layer_setting(name, setting)
        self.float_pass()
        self._apply({name: setting})
        layer = self._modules[name]
        flat = output_channel_rows(layer, float_weight(layer).detach())
        spec = setting.weights or QuantSpec("affine", 8)  # a float layer: show 8-bit levels for scale
        out = {"weights": weight_report(flat, spec.replace(axis=0) if spec.granularity == "channel" else spec,
                                        bins=bins), "float_weights": setting.weights is None}
        captured = self._captured_float.get(name)
        x = None if captured is None else next((a for a in captured[0] if isinstance(a, torch.Tensor)), None)
        if x is None and captured is not None:
            x = next((v for v in captured[1].values() if isinstance(v, torch.Tensor)), None)
        edges, counts = histogram(x.float(), bins) if x is not None and x.numel() else ([], [])
        q = getattr(layer, "input_quantizer", None)
        out["activations"] = {"edges": edges, "counts": counts, "seen": x is not None,
                              "range": None if q is None or q.spec is None else q.range(),
                              "bits": None if setting.activations is None else setting.activations.bits}
        out["staircase"] = self._staircase(flat, spec)
        return out

    @staticmethod
    def _staircase(flat: torch.Tensor, spec: QuantSpec, points: int = 401) -> dict:
        spec = spec.replace(axis=0) if spec.granularity == "channel" else spec
        levels, thresholds = quantizer_levels(flat, spec), quantizer_thresholds(flat, spec)
        if levels.dim() == 2:  # per channel: the widest kernel's levels, as the weight histogram shows
            row = int(flat.abs().amax(1).argmax())
            levels, thresholds = levels[row], thresholds[row]
        lo, hi = float(flat.min()), float(flat.max())
        margin = 0.1 * (hi - lo) or 1.0
        x = torch.linspace(lo - margin, hi + margin, points)
        q = levels[torch.searchsorted(thresholds.contiguous(), x)]
        return {"x": x.numpy(), "q": q.numpy(), "levels": levels.numpy()}

    # ------------------------------------------------------------------ the whole picture, streamed

    def uniform_config(self, w_bits, a_bits, scheme: str = "default") -> dict[str, LayerSetting]:
        return {n: self.setting(n, w_bits, a_bits, scheme) for n in self.layers}

    def layer_rows(self, config: dict[str, LayerSetting], *, propagated: dict | None = None,
                   sensitivities: dict | None = None) -> list[dict]:
        config = self._complete(config)
        rows = []
        for name in self.layers:
            s = config[name]
            rows.append({
                "name": name, "kind": self._kinds[name], "params": self.params(name),
                "w_bits": None if s.weights is None else s.weights.bits,
                "a_bits": None if s.activations is None else s.activations.bits,
                "w_scheme": None if s.weights is None else s.weights.scheme,
                "weight_sqnr_db": self.weight_sqnr(name, s), "output_sqnr_db": self.output_sqnr(name, s),
                "propagated_sqnr_db": None if propagated is None else propagated[name],
                "sensitivity": None if sensitivities is None else sensitivities.get(name),
                "packed_bytes": self.packed_bytes(name, s), "float32_bytes": self.float32_bytes(name),
            })
        return rows

    def totals(self, config: dict[str, LayerSetting]) -> dict:
        """The model's weight bytes, packed and float32: weights two layers share (tied) count once, at the
        setting of the first layer that holds them."""
        config = self._complete(config)
        held, alive, packed_bytes, float_bytes = set(), [], 0, 0
        for n in self.layers:
            layer = self._modules[n]
            # weight norm's weights are computed afresh: kept alive, their ids cannot pass to the next layer's
            alive.append(tuple(_original(layer, w) for w in weight_names(layer)))
            weights = tuple(id(t) for t in alive[-1])
            if weights in held:
                continue
            held.add(weights)
            packed_bytes += self.packed_bytes(n, config[n])
            float_bytes += self.float32_bytes(n)
        return {"packed_bytes": packed_bytes, "float32_bytes": float_bytes}

    @staticmethod
    def scheme_bits(scheme: str) -> tuple[int, int]:
        """The weight bit widths a scheme allows as setting() builds it ("default": 1 to 16; signed
        symmetric: from 2, one level each side of zero)."""
        if scheme == "default":
            return (1, 16)
        lo, hi = SCHEMES[_checks.choice("scheme", scheme, ["default", *ModelAnalysis.weight_schemes()])].bits
        while lo < hi and not _builds(scheme, lo):
            lo += 1
        return lo, hi

    def pareto(self, a_bits, scheme: str = "default", *, cancel=None) -> Iterator[dict]:
        """Points of the Pareto chart: uniform weight bit widths, then the greedy mixed-precision path
        (every layer starts at the widest rung of GREEDY_LADDER the scheme allows and steps down, the least
        sensitive layer first).

        Yields the chart as it grows, {"uniform", "greedy", "progress"}, after every forward pass over the
        data, so a caller can draw it while it is measured and stop early; the last value is the whole
        chart. Each rung costs one sensitivity per layer (a forward over the data each) and at most
        GREEDY_POINTS metrics: a deep network's path steps several layers between two measured points."""
        lo, hi = self.scheme_bits(scheme)
        ladder = [b for b in GREEDY_LADDER if lo <= b <= hi] or [lo]
        widths = [b for b in PARETO_BITS if lo <= b <= hi] or [lo]
        groups = _groups(len(self.layers), GREEDY_POINTS)
        planned = len(widths) + 1 + (len(ladder) - 1) * (len(self.layers) + len(groups))
        chart, done = {"uniform": [], "greedy": []}, 0

        def grown(forwards: int = 1) -> dict:
            nonlocal done
            done += forwards
            return {"uniform": list(chart["uniform"]), "greedy": list(chart["greedy"]),
                    "progress": min(done / planned, 1.0)}

        def point(label: str, config: dict[str, LayerSetting]) -> dict:
            return {"label": label, "bytes": self.totals(config)["packed_bytes"], "metric": self.metric_of(config)}

        for bits in widths:
            chart["uniform"].append(point(f"W{bits}", self.uniform_config(bits, a_bits, scheme)))
            yield grown()
            if cancel is not None and cancel.is_set():
                return
        config = self.uniform_config(ladder[0], a_bits, scheme)
        chart["greedy"].append(point(f"all W{ladder[0]}", config))
        yield grown()
        for lower in ladder[1:]:
            lowered = {n: self.setting(n, lower, a_bits, scheme) for n in self.layers}
            ranks = {}
            for name in self.layers:
                if cancel is not None and cancel.is_set():
                    return
                ranks[name] = self._greedy_rank(name, lowered[name])
                yield grown()
            order = sorted(self.layers, key=ranks.__getitem__)
            for first, stop in groups:
                if cancel is not None and cancel.is_set():
                    return
                names = order[first:stop]
                config = {**config, **{n: lowered[n] for n in names}}
                label = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)} layers)"
                chart["greedy"].append(point(f"{label} W{lower}", config))
                yield grown()

    def _greedy_rank(self, name: str, setting: LayerSetting) -> tuple[float, float]:
        """The greedy path's order: sensitivity first; ties (common when a few dozen samples are scored by
        accuracy, where many layers cost no sample) go to the layer whose own output is less disturbed."""
        return _ranked(self.sensitivity(name, setting)), _ranked(-self.output_sqnr(name, setting))

    def report(self, config: dict[str, LayerSetting], *, with_sensitivity: bool = True) -> dict:
        """Everything at once (what a script wants): per-layer rows, metrics, bytes, latency."""
        config = self._complete(config)
        evaluation = self.evaluate(config)
        sens = {n: self.sensitivity(n, config[n]) for n in self.layers} if with_sensitivity else None
        return {"layers": self.layer_rows(config, propagated=evaluation["propagated"], sensitivities=sens),
                "float_metric": self.float_metric, "quant_metric": evaluation["metric"],
                "metric_name": self.metric_name, **self.totals(config),
                "latency": self.latency_estimate(config)}


def _builds(scheme: str, bits: int) -> bool:
    try:
        QuantSpec(scheme, bits=bits)
    except ValueError:
        return False
    return True


def _ranked(value: float) -> float:
    """NaN (a metric that could not be scored, a layer never called as a module) sorts last, not at random."""
    return math.inf if math.isnan(value) else value


def _groups(n: int, most: int) -> list[tuple[int, int]]:
    """Split n layers in order into at most `most` runs of nearly equal length: (start, stop) pairs."""
    bounds = [round(i * n / min(n, most)) for i in range(min(n, most) + 1)] if n else [0]
    return list(itertools.pairwise(bounds))


def _freeze(config: dict[str, LayerSetting]) -> tuple:
    return tuple(sorted(config.items()))


def _escape(name: str) -> str:
    """A module name as an fnmatch pattern that matches exactly it (names may hold [ ] * ?)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def overrides_of(config: dict[str, LayerSetting]) -> dict:
    """quantize_model overrides that reproduce a config naming every layer (ModelAnalysis.overrides fills
    in the others), whatever quantize_model's own defaults: everything float first ("*", activation points
    included: the analysis quantizes layer inputs), then each layer, parents before children (a pattern
    also matches what is inside the module it names, so a layer inside another, an attention's output
    projection, must come after it to keep its own setting)."""
    layers = sorted(config.items(), key=lambda item: item[0].count("."))  # stable: network order within a depth
    return {"*": None} | {_escape(name): {"weights": s.weights, "activations": s.activations} for name, s in layers}
