"""ModelExplorer: which layer of your network hurts, and what each bit buys."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import ipywidgets as W
import torch

from qviz import _checks
from qviz.engine.analysis import BIT_CHOICES, LayerSetting, ModelAnalysis
from qviz.widgets import _charts
from qviz.widgets._base import Explorer

GLOBAL, FLOAT = "global", "float"
BIT_OPTIONS = [(FLOAT, FLOAT), *((str(b), str(b)) for b in BIT_CHOICES)]
LAYER_OPTIONS = [("global", GLOBAL), *BIT_OPTIONS]


def _micro(seconds: float) -> str:
    """Seconds as microseconds to two significant digits: a small model's layers take well under one."""
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.2g}"


def _bits(value: str):
    return None if value == FLOAT else int(value)


def _option(bits) -> str:
    return FLOAT if bits is None else str(bits)


class ModelExplorer(Explorer):
    """Any PyTorch model on your data: per layer (in network order) the weight SQNR, the output SQNR with the
    float network's input (the layer's own error) and inside the quantized network (the propagated error),
    the sensitivity (the metric's drop when only that layer is quantized), parameters and packed bytes; the
    model's float vs quantized metric, bytes against float32 and a latency estimate from the packed kernels;
    a Pareto chart of the metric against bytes for uniform bit widths and a greedy mixed-precision path; and
    the picked layer up close: its weights against the levels, its input activations with the clip range,
    its quantizer's staircase with the layer's real levels.

    data: (X, y) scores by accuracy (or metric(outputs, y); higher_is_better=False for a loss); X alone
    scores by output SQNR against the float model. Controls: global weight and activation bits and the
    weight scheme; per layer (picked by clicking a bar of the weight SQNR panel, or from the menu) its own
    bits or "keep float". Rows stream in as they are computed; a change recomputes only what it
    invalidates (cached per layer setting).

    Python face: wait(), report(), set_bits(name, w_bits, a_bits), set_all_bits(w_bits, a_bits), config()
    (the overrides for quantize_model), save(path).
    """

    title = "Model explorer"
    selections = ("pick",)

    def __init__(self, model: torch.nn.Module, data, *, metric: Callable | None = None,
                 higher_is_better: bool = True, w_bits: int | None = 8,
                 a_bits: int | None = 8, **kwargs):
        self.analysis = ModelAnalysis(model, data, metric, higher_is_better=higher_is_better)
        self._initial = {"w_bits": self._check_bits("w_bits", w_bits), "a_bits": self._check_bits("a_bits", a_bits)}
        self._overrides: dict[str, tuple] = {}  # layer -> (w option, a option) as the layer menus hold them
        self._syncing = False
        self._pareto: dict = {}
        self._lock = threading.Lock()
        super().__init__(**kwargs)

    @staticmethod
    def _check_bits(name: str, bits):
        if bits is not None:
            _checks.choice(name, bits, [*BIT_CHOICES, None])
        return bits

    # ------------------------------------------------------------------ controls

    def _controls(self):
        style = {"description_width": "110px"}
        layers = self.analysis.layers
        self.w_bits = W.SelectionSlider(options=BIT_OPTIONS, value=_option(self._initial["w_bits"]),
                                        description="weight bits", style=style)
        self.a_bits = W.SelectionSlider(options=BIT_OPTIONS, value=_option(self._initial["a_bits"]),
                                        description="activation bits", style=style)
        self.scheme = W.Dropdown(options=[("symmetric per channel", "default"),
                                          *((n, n) for n in self.analysis.weight_schemes())],
                                 value="default", description="weight scheme", style=style)
        self.layer = W.Dropdown(options=layers, value=layers[0], description="layer", style=style)
        self.layer_w = W.SelectionSlider(options=LAYER_OPTIONS, value=GLOBAL, description="its weight bits",
                                         style=style)
        self.layer_a = W.SelectionSlider(options=LAYER_OPTIONS, value=GLOBAL, description="its input bits",
                                         style=style)
        self.keep_float = W.Checkbox(value=False, description="keep this layer float", indent=False)
        self.layer.observe(self._layer_picked, names="value")
        for control in (self.layer_w, self.layer_a, self.keep_float):
            control.observe(self._layer_changed, names="value")
        return [self.w_bits, self.a_bits, self.scheme, self.layer, self.layer_w, self.layer_a, self.keep_float]

    def _changed(self, change=None) -> None:
        if not self._syncing:
            self.refresh()

    def _layer_picked(self, change=None) -> None:
        """Show the picked layer's own settings in its controls (the layer menu's own change recomputes)."""
        w, a = self._overrides.get(self.layer.value, (GLOBAL, GLOBAL))
        self._syncing = True
        try:
            self.layer_w.value, self.layer_a.value = w, a
            self.keep_float.value = (w, a) == (FLOAT, FLOAT)
        finally:
            self._syncing = False

    def _layer_changed(self, change=None) -> None:
        if self._syncing:
            return
        name = self.layer.value
        if change is not None and change["owner"] is self.keep_float:
            setting = (FLOAT, FLOAT) if self.keep_float.value else (GLOBAL, GLOBAL)
            self._syncing = True
            try:
                self.layer_w.value, self.layer_a.value = setting
            finally:
                self._syncing = False
        else:
            setting = (self.layer_w.value, self.layer_a.value)
            self._syncing = True
            try:
                self.keep_float.value = setting == (FLOAT, FLOAT)
            finally:
                self._syncing = False
        if setting == (GLOBAL, GLOBAL):
            self._overrides.pop(name, None)
        else:
            self._overrides[name] = setting

    def _selected(self, name: str, value) -> None:
        picked = value.get("layer") if isinstance(value, dict) else None
        if isinstance(picked, list):
            picked = picked[0] if picked else None
        if picked is None and isinstance(value, dict):  # {"vlPoint": {"or": [{"layer": ...}]}}
            entries = (value.get("vlPoint") or {}).get("or") or [{}]
            picked = entries[0].get("layer")
        if picked in self.analysis.layers and picked != self.layer.value:
            self.layer.value = picked

    def _params(self) -> dict:
        return {"w_bits": self.w_bits.value, "a_bits": self.a_bits.value, "scheme": self.scheme.value,
                "layer": self.layer.value, "overrides": tuple(sorted(self._overrides.items()))}

    # ------------------------------------------------------------------ settings

    def _config(self, params: dict) -> dict[str, LayerSetting]:
        overrides = dict(params["overrides"])
        config = {}
        for name in self.analysis.layers:
            own_w, own_a = overrides.get(name, (GLOBAL, GLOBAL))
            w = params["w_bits"] if own_w == GLOBAL else own_w
            a = params["a_bits"] if own_a == GLOBAL else own_a
            try:
                config[name] = self.analysis.setting(name, _bits(w), _bits(a), params["scheme"])
            except ValueError as err:  # a layer's own weight bits may not suit a scheme picked later
                if own_w != GLOBAL:
                    err.add_note(f"(layer {name!r} has bits of its own: pick the layer and set them, or set all "
                                 "layers' bits)")
                raise
        return config

    def set_bits(self, name: str, w_bits: int | None, a_bits: int | None) -> None:
        """One layer's weight and activation bits (None: float); the explorer recomputes what that changes."""
        _checks.choice("name", name, self.analysis.layers)
        w, a = _option(self._check_bits("w_bits", w_bits)), _option(self._check_bits("a_bits", a_bits))
        self._overrides[name] = (w, a)
        if self.layer.value == name:
            self._layer_picked()
        self.refresh()

    def set_all_bits(self, w_bits: int | None, a_bits: int | None) -> None:
        """Every layer at these bits (None: float); per-layer settings are cleared."""
        w, a = _option(self._check_bits("w_bits", w_bits)), _option(self._check_bits("a_bits", a_bits))
        self._overrides.clear()
        self._syncing = True
        try:
            self.w_bits.value, self.a_bits.value = w, a
            self.layer_w.value, self.layer_a.value, self.keep_float.value = GLOBAL, GLOBAL, False
        finally:
            self._syncing = False
        self.refresh()

    def config(self) -> dict:
        """The overrides that make quantize_model(model, overrides=...) quantize each layer as shown here."""
        return self.analysis.overrides(self._config(self._params()))

    def report(self) -> dict:
        """The numbers on screen: {"layers": [name, params, w_bits, a_bits, weight_sqnr_db, output_sqnr_db,
        propagated_sqnr_db, sensitivity, packed_bytes, ...], "float_metric", "quant_metric", "packed_bytes",
        "float32_bytes", "latency"} (computed now for settings that the view has not reached yet)."""
        with self._lock:
            return self.analysis.report(self._config(self._params()))

    # ------------------------------------------------------------------ computing

    @contextlib.contextmanager
    def _working(self, cancel):
        """The analysis to one computation at a time, stopping within a layer once `cancel` is set."""
        with self._lock, self.analysis.cancellable(cancel):
            yield

    def _compute(self, params, cancel, progress):
        a = self.analysis
        with self._working(cancel):
            config = self._config(params)
            progress(0.05, "float pass")
            a.float_pass()
            rows = a.layer_rows(config)
            totals = a.totals(config)
            drill = a.drilldown(params["layer"], config[params["layer"]])
            state = {"rows": rows, "totals": totals, "drill": drill, "float_metric": a.float_metric,
                     "quant_metric": None, "latency": None, "pareto": self._pareto.get(self._pareto_key(params)),
                     "stage": "per-layer SQNR"}
        yield dict(state)
        if cancel.is_set():
            return
        with self._working(cancel):
            progress(0.2, "quantized network")
            evaluation = a.evaluate(config)
            state["rows"] = a.layer_rows(config, propagated=evaluation["propagated"])
            state["quant_metric"], state["stage"] = evaluation["metric"], "metric"
        yield dict(state)
        sensitivities, last = {}, time.monotonic()
        for i, name in enumerate(a.layers):
            if cancel.is_set():
                return
            with self._working(cancel):
                sensitivities[name] = a.sensitivity(name, config[name])
            if time.monotonic() - last > 0.4 or i == len(a.layers) - 1:
                progress(0.2 + 0.4 * (i + 1) / len(a.layers), f"sensitivity {i + 1} of {len(a.layers)}")
                with self._working(cancel):
                    state["rows"] = a.layer_rows(config, propagated=evaluation["propagated"],
                                                 sensitivities=sensitivities)
                state["stage"] = "sensitivity"
                yield dict(state)
                last = time.monotonic()
        with self._working(cancel):
            state["latency"] = a.latency_estimate(config)
        key = self._pareto_key(params)
        if key not in self._pareto:
            with self._working(cancel):
                points = a.pareto(_bits(params["a_bits"]), params["scheme"], cancel=cancel)
            drawn = 0.0
            while True:
                with self._working(cancel):  # one forward at a time: the user's calls wait for no more
                    chart = next(points, None)
                if chart is None or cancel.is_set():
                    break
                state["pareto"] = chart
                progress(0.65 + 0.35 * chart["progress"], "Pareto chart")
                if time.monotonic() - drawn > 0.4:  # the path grows on screen, without a redraw per forward
                    yield dict(state)
                    drawn = time.monotonic()
            if cancel.is_set():
                return
            self._pareto[key] = state["pareto"]
        state["stage"] = "done"
        yield dict(state)

    @staticmethod
    def _pareto_key(params) -> tuple:
        return (params["a_bits"], params["scheme"])

    # ------------------------------------------------------------------ drawing

    def _figure(self, fig, result, params):
        a = self.analysis
        metric = a.metric_name
        quant = result["quant_metric"]
        totals = result["totals"]
        rows = result["rows"]
        done = sum(r["sensitivity"] is not None for r in rows)
        failed = result["stage"] == "failed"
        so_far = "" if done == len(rows) else f" ({done}/{len(rows)}{', stopped by the error' if failed else ''})"
        titles = [
            ("weight SQNR (dB)", "click a layer"),
            ("output SQNR (dB)", "bars: own, ticks: in the network"),
            ("sensitivity", f"{a.sensitivity_name}, layer alone{so_far}"),
            ("packed bytes", f"{totals['packed_bytes']:,} of {totals['float32_bytes']:,} float32"),
        ]
        layers = _charts.layer_view(fig, rows, titles)
        pareto = result["pareto"] or {"uniform": [], "greedy": []}
        current = {"bytes": totals["packed_bytes"], "metric": quant if quant is not None else float("nan")}
        floating = {"bytes": totals["float32_bytes"], "metric": result["float_metric"]}
        status = f"quantized {quant:.4g}" if quant is not None else \
            "quantized: not computed (see the error)" if failed else "quantized: computing"
        chart = _charts.pareto_chart(fig, pareto["uniform"], pareto["greedy"], current, floating, metric,
                                     f"{metric}: float {result['float_metric']:.4g}, {status}")
        d = result["drill"]
        w = d["weights"]
        which = "levels" if w["levels_kernel"] is None else f"levels of kernel {w['levels_kernel']}"
        label = "float (8-bit levels shown)" if d["float_weights"] else which
        hist = _charts.weights_with_levels(fig, w["edges"], w["counts"], w["levels"],
                                           f"{params['layer']}: weights, {label}")
        act = d["activations"]
        clip = list(act["range"]) if act["range"] is not None else []
        act_title = ("input: never seen (not called as a module)" if not act["seen"] else
                     "input: float" if act["bits"] is None else f"input: {act['bits']}-bit clip range")
        acts = _charts.activation_histogram(fig, act["edges"], act["counts"], clip, act_title)
        st = d["staircase"]
        stair = _charts.layer_staircase(fig, st["x"], st["q"], st["levels"],
                                        f"its quantizer: {len(st['levels'])} levels")
        return _charts.model_figure(layers, chart, [hist, acts, stair])

    def _failed(self, error: BaseException) -> None:
        """The charts drawn so far stay, and stop saying that the rest is being computed."""
        super()._failed(error)
        if self.data is not None and self.data["stage"] != "done":
            self.data = {**self.data, "stage": "failed"}
            # called from the worker's error handler: a failure to redraw must not end the worker, and the
            # error that matters is already shown
            with contextlib.suppress(Exception):
                self._show(self._build(self.data, self.params))

    def _summary(self, result, params) -> str:
        a = self.analysis
        totals = result["totals"]
        ratio = totals["float32_bytes"] / max(1, totals["packed_bytes"])
        quant = "…" if result["quant_metric"] is None else f"{result['quant_metric']:.4g}"
        text = (f"{a.metric_name}: float {result['float_metric']:.4g}, quantized {quant} · weights "
                f"{totals['packed_bytes']:,} B packed vs {totals['float32_bytes']:,} B float32 ({ratio:.1f}x smaller)")
        lat = result["latency"]
        if lat is not None:
            text += (f" · kernels ≈ {_micro(lat['seconds'])} µs per sample vs {_micro(lat['float_seconds'])} µs "
                     "float32 (estimate from measured kernel throughput)")
        return text
