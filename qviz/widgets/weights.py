"""WeightExplorer: a layer's weights against the quantization levels, SQNR per kernel, weight power."""

from __future__ import annotations

import threading

import ipywidgets as W
import torch

from qviz.engine import SCHEMES, QuantSpec, float_model, weight_layers, weight_report
from qviz.widgets import _charts
from qviz.widgets._base import Explorer

MAX_BITS = 8  # the slider's end: 256 levels already fill the histogram


def scheme_menu() -> list[tuple[str, str]]:
    """(label, scheme) pairs from the registry: "uniform" (affine or symmetric by the range toggle), then
    every deterministic weight scheme, registered ones included."""
    others = [(s.menu_label, n) for n, s in SCHEMES.items()
              if s.kind == "weights" and not s.stochastic and not _is_uniform(n)]
    return [("uniform", "uniform"), *others]


def _is_uniform(name: str) -> bool:
    return getattr(SCHEMES[name], "symmetric", None) is not None  # the affine/symmetric family


def bits_range(menu_value: str) -> tuple[int, int]:
    if menu_value == "uniform":
        return 2, MAX_BITS
    lo, hi = SCHEMES[menu_value].bits
    return lo, min(hi, MAX_BITS)


class WeightExplorer(Explorer):
    """Any torch.nn.Module's weights under a quantizer: histogram with the levels, the quantized
    histogram, per-kernel SQNR for per-layer vs per-channel quantization (004 Figs. 18-19), the weight
    power distribution before/after batch-norm folding (004 Appendix A) and the overall SQNR.

    model=None trains (once, then loads from the cache) an FCDNN 128-4 with batch norm on the semicircles,
    unless train_default=False: then it waits for `set_model` (the dashboard hands it the decision map's).
    """

    title = "Weight explorer"

    def __init__(self, model: torch.nn.Module | None = None, *, train_default: bool = True, **kwargs):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self._model = model
        self._layers = weight_layers(model) if model is not None else None
        if self._layers is not None and not self._layers:
            raise ValueError("model has no Linear or Conv layers with weights to explore")
        self._model_lock = threading.Lock()
        self._train_default = bool(train_default)
        super().__init__(**kwargs)

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model

    def set_model(self, model: torch.nn.Module) -> None:
        """Explore another model (the dashboard hands over the decision map's float model)."""
        layers = weight_layers(model)
        if not layers:
            raise ValueError("model has no Linear or Conv layers with weights to explore")
        with self._model_lock:
            self._model, self._layers = model, layers
        self._fill_layers()
        self.refresh()

    def _controls(self):
        style = {"description_width": "80px"}
        self.layer = W.Dropdown(options=[("(training the default model)", "")], description="layer", style=style)
        self.scheme = W.Dropdown(options=scheme_menu(), value="uniform", description="scheme", style=style)
        self.bits = W.IntSlider(value=4, min=2, max=8, description="bits", style=style)
        self.granularity = W.ToggleButtons(options=[("per-layer", "tensor"), ("per-channel", "channel")],
                                           value="tensor", style={"button_width": "110px"})
        self.symmetric = W.ToggleButtons(options=[("symmetric", True), ("asymmetric", False)], value=True,
                                         style={"button_width": "110px"})
        self.fold = W.Checkbox(value=False, description="fold batch norm", indent=False)
        self.scheme.observe(self._scheme_changed, names="value")
        self._fill_layers()
        self._scheme_changed()
        return [self.layer, self.scheme, self.bits, self.granularity, self.symmetric, self.fold]

    def _fill_layers(self) -> None:
        if self._layers is None:
            return
        options = [(f"{layer.name} {tuple(layer.weight.shape)}{' + BN' if layer.bn is not None else ''}", layer.name)
                   for layer in self._layers]
        current = self.layer.value
        self.layer.options = options  # (resets the value to the first option)
        self.layer.value = current if current in [o[1] for o in options] else options[min(1, len(options) - 1)][1]

    def _scheme_changed(self, change=None) -> None:
        lo, hi = bits_range(self.scheme.value)
        with self.bits.hold_trait_notifications():
            self.bits.max = max(hi, self.bits.min)
            self.bits.min = lo
            self.bits.max = hi
            self.bits.value = min(max(self.bits.value, lo), hi)
        self.bits.disabled = lo == hi
        self.symmetric.disabled = self.scheme.value != "uniform"

    def _params(self) -> dict:
        return {"layer": self.layer.value, "scheme": self.scheme.value, "bits": self.bits.value,
                "granularity": self.granularity.value, "symmetric": self.symmetric.value, "fold": self.fold.value}

    @staticmethod
    def spec_for(params: dict) -> QuantSpec:
        scheme = params["scheme"]
        if scheme == "uniform":
            scheme = "symmetric" if params["symmetric"] else "affine"
        kw = {"narrow": True} if scheme == "symmetric" else {}
        return QuantSpec(scheme, bits=params["bits"], granularity=params["granularity"], axis=0, **kw)

    def _ensure_model(self, cancel, progress) -> bool:
        if self._layers is not None:
            return True
        if not self._train_default:
            progress(0.0, "waiting for a model")
            return False
        progress(0.0, "training the default FCDNN 128-4 with batch norm (once; later loads from the cache)")
        model = float_model(128, 4, batchnorm=True, cancel=cancel,
                            callback=lambda p: progress(p["step"] / p["steps"], f"training: step {p['step']}"))
        with self._model_lock:
            self._model, self._layers = model, weight_layers(model)
        self._fill_layers()
        return True

    def _compute(self, params, cancel, progress):
        if not self._ensure_model(cancel, progress):
            return
        params = {**params, "layer": params["layer"] or self.layer.value}
        layer = next((x for x in self._layers if x.name == params["layer"]), self._layers[0])
        spec = self.spec_for(params)
        folded = layer.folded_weight()  # rows per output channel, as layer.rows()
        flat = folded if params["fold"] and folded is not None else layer.rows()
        report = weight_report(flat, spec, folded=folded)
        yield {"report": report, "spec": spec, "layer": layer.name, "has_bn": folded is not None,
               "folded": params["fold"] and folded is not None}

    def _apply(self, result, params):
        self.fold.disabled = not result["has_bn"]
        super()._apply(result, params)

    def _figure(self, fig, result, params):
        r = result["report"]
        name = result["layer"] + (" folded" if result["folded"] else "")
        which = "levels" if r["levels_kernel"] is None else f"levels of kernel {r['levels_kernel']}"
        hist = _charts.weight_histograms(fig, r["edges"], r["counts"], r["levels"], r["quantized"],
                                         f"{name}: float weights, {which}")
        sqnr = _charts.sqnr_histograms(fig, r["sqnr_edges"], r["sqnr_layer_counts"], r["sqnr_channel_counts"])
        power = _charts.power_histograms(fig, r["power_edges"], r["power_before"], r["power_after"])
        return _charts.weights_figure(hist, sqnr, power)

    def _summary(self, result, params) -> str:
        r = result["report"]
        return (f"overall SQNR {r['sqnr_db']:.1f} dB with {result['spec'].scheme} {result['spec'].bits}-bit "
                f"{'per-channel' if result['spec'].granularity == 'channel' else 'per-layer'}; "
                f"{r['levels_used']} distinct values used")
