"""DecisionMapExplorer: float and quantized decision maps of an FCDNN on the semicircles (002 §3)."""

from __future__ import annotations

import threading

import ipywidgets as W
import numpy as np

from qviz import _checks
from qviz.engine import (
    QAT_SCHEDULE,
    SCHEMES,
    Schedule,
    _cache,
    activation_spec,
    decision_map,
    decision_map_stages,
    float_model,
    post_training_quantize,
    prepare_qat,
    qat_clr_period,
    semicircle_evaluation,
    semicircles,
    train_iter,
    weight_spec,
)
from qviz.widgets import _charts
from qviz.widgets._base import Explorer
from qviz.widgets._image import data_url

WIDTHS = [16, 32, 64, 128, 200, 256]
BITS = [("float", 0), ("1", 1), ("2", 2), ("3", 3), ("4", 4), ("6", 6), ("8", 8)]
PREVIEW_STRIDE = 2  # the first map of a change shows one point per 2x2 block of the grid
METHODS = [("PTQ (no retraining)", "ptq"), ("QAT", "qat"), ("QAT + CLR", "qat_clr"), ("QAT + L_Lip", "qat_lip"),
           ("QAT + CLR + L_Lip", "qat_clr_lip")]


def weight_scheme_menu() -> list[tuple[str, str]]:
    """"auto" (002's choice per bit width, see weight_spec) and every deterministic weight scheme."""
    return [("auto", "auto"), *((s.menu_label, n) for n, s in SCHEMES.items()
                                if s.kind == "weights" and not s.stochastic)]


def activation_scheme_menu() -> list[tuple[str, str]]:
    return [(s.menu_label, n) for n, s in SCHEMES.items() if s.kind == "activations" and not s.stochastic]


class DecisionMapExplorer(Explorer):
    """Width, depth, residual, quantized shortcut, weight / activation bits, schemes and method: the float
    and quantized decision maps over the training points, their correct-answer accuracy and the
    difference map. A change shows a preview of the PTQ map at once (one point per 2x2 block of the grid),
    completes it in place, then QAT refinements stream in with a progress bar; a newer change cancels
    stale work (last write wins).

    Float models are trained once per architecture and then loaded from the cache (a first 256-8 takes
    about half a minute on 2 cores; the progress bar says so).
    """

    title = "Decision-map explorer"

    def __init__(self, *, width: int = 128, depth: int = 4, residual: bool = False, w_bits: int | None = 2,
                 a_bits: int | None = None, method: str = "ptq", resolution: int = 120,
                 qat_steps: int = QAT_SCHEDULE.steps, refresh_every: int = 100, points: int = 1500,
                 cache: str | None = None, **kwargs):
        bits = [b for _, b in BITS if b]
        self._initial = {
            "width": _checks.choice("width", width, WIDTHS),
            "depth": _checks.integer("depth", depth, 2, 8),
            "residual": _checks.boolean("residual", residual),
            "w_bits": 0 if w_bits is None else _checks.choice("w_bits", w_bits, [*bits, None]),
            "a_bits": 0 if a_bits is None else _checks.choice("a_bits", a_bits, [*bits, None]),
            "method": _checks.choice("method", method, [m for _, m in METHODS]),
        }
        self.resolution = _checks.integer("resolution", resolution, 2, 1024)
        self.qat_steps = _checks.integer("qat_steps", qat_steps, 1, 10**6)
        self.refresh_every = _checks.integer("refresh_every", refresh_every, 1)
        _checks.integer("points", points, 0, 20000)
        self.cache = None if cache is None else _cache.folder(cache)  # where float models are cached
        X, y = semicircles(0)
        keep = (X[:, 0] > 0) & (X[:, 0] < 1) & (X[:, 1] > 0) & (X[:, 1] < 1)
        pick = np.random.default_rng(0).permutation(int(keep.sum()))[:points]
        self._points = {"x": X[keep][pick, 0].numpy(), "y": X[keep][pick, 1].numpy(), "label": y[keep][pick].numpy()}
        self._model_listeners = []
        self._model_lock = threading.Lock()
        self.float_model = None
        self._float_key = None  # (width, depth, residual) of float_model
        self._float_map = None
        super().__init__(**kwargs)

    def on_float_model(self, callback) -> None:
        """Call callback(model) whenever the float model behind the maps changes, and at once if there is
        one already (a model from the cache can be ready before anyone listens)."""
        with self._model_lock:
            self._model_listeners.append(callback)
            current = self.float_model
        if current is not None:
            callback(current)

    def _controls(self):
        style = {"description_width": "95px"}
        init = self._initial
        self.width = W.SelectionSlider(options=WIDTHS, value=init["width"], description="width", style=style)
        self.depth = W.IntSlider(value=init["depth"], min=2, max=8, description="depth", style=style)
        self.w_bits = W.SelectionSlider(options=BITS, value=init["w_bits"], description="weight bits", style=style)
        self.a_bits = W.SelectionSlider(options=BITS, value=init["a_bits"], description="activation bits",
                                        style=style)
        self.w_scheme = W.Dropdown(options=weight_scheme_menu(), value="auto", description="weights", style=style)
        self.a_scheme = W.Dropdown(options=activation_scheme_menu(), value="pact", description="activations",
                                   style=style)
        self.method = W.Dropdown(options=METHODS, value=init["method"], description="method", style=style)
        self.residual = W.Checkbox(value=init["residual"], description="residual", indent=False)
        self.shortcut = W.Checkbox(value=False, description="quantize shortcut", indent=False)
        return [self.width, self.depth, self.method, self.w_bits, self.a_bits, self.w_scheme, self.a_scheme,
                W.HBox([self.residual, self.shortcut])]

    def _params(self) -> dict:
        return {"width": self.width.value, "depth": self.depth.value, "residual": self.residual.value,
                "shortcut": self.shortcut.value, "w_bits": self.w_bits.value or None,
                "a_bits": self.a_bits.value or None, "w_scheme": self.w_scheme.value, "a_scheme": self.a_scheme.value,
                "method": self.method.value}

    def _compute(self, params, cancel, progress):
        arch = f"{params['width']}-{params['depth']}{' residual' if params['residual'] else ''}"
        key = (params["width"], params["depth"], params["residual"])
        with self._model_lock:
            base = self.float_model if self._float_key == key else None
        if base is None:  # the cache reads a new copy from disk on every call: only when the network changes
            progress(0.0, f"float {arch}: loading or training")
            base = float_model(params["width"], params["depth"], params["residual"], cache=self.cache, cancel=cancel,
                               callback=lambda p: progress(0.5 * p["step"] / p["steps"], f"training float {arch}: "
                                                           f"step {p['step']} of {p['steps']}"))
        with self._model_lock:
            changed = base is not self.float_model
            self.float_model, self._float_key = base, key
            listeners = list(self._model_listeners) if changed else []
        for listener in listeners:
            listener(base)
        if self._float_map is None or self._float_map[0] is not base:  # one float map per float model
            self._float_map = (base, decision_map(base, resolution=self.resolution))
        float_map = self._float_map[1]
        w_spec = weight_spec(params["w_bits"], params["w_scheme"])
        a_spec = activation_spec(params["a_bits"], params["a_scheme"])
        changes = {"quantize_shortcut": params["shortcut"] and params["residual"]}
        ptq = post_training_quantize(base, w_spec, a_spec, **changes)
        # a preview from a quarter of the grid first, then the rest of it: the picture follows the slider
        # and the finished map costs no more than one map
        stride = PREVIEW_STRIDE if self.resolution >= 4 * PREVIEW_STRIDE else 1
        for qmap in decision_map_stages(ptq, resolution=self.resolution, preview_stride=stride):
            yield {"float": float_map, "quant": qmap, "stage": "PTQ preview" if qmap.get("preview") else "PTQ",
                   "w_spec": w_spec, "a_spec": a_spec}
        if params["method"] == "ptq" or (w_spec is None and a_spec is None):
            return
        X, y = semicircles(0)
        model = prepare_qat(base, w_spec, a_spec, X=X, **changes)
        schedule = Schedule(steps=self.qat_steps, lr=QAT_SCHEDULE.lr, batch_size=QAT_SCHEDULE.batch_size)
        method = params["method"]
        for p in train_iter(model, X, y, schedule, report_every=self.refresh_every, cancel=cancel,
                            evaluate=semicircle_evaluation(self.refresh_every, self.resolution),
                            clr_period=qat_clr_period(schedule) if "clr" in method else None,
                            lip_weight=1e-4 if "lip" in method else 0.0):
            progress(0.5 + 0.5 * p["step"] / p["steps"], f"QAT step {p['step']} of {p['steps']}")
            if "map" in p:
                yield {"float": float_map, "quant": p["map"], "stage": f"QAT step {p['step']}",
                       "w_spec": w_spec, "a_spec": a_spec}

    def _figure(self, fig, result, params):
        f, q = result["float"], result["quant"]
        label = "W" + (str(params["w_bits"]) if params["w_bits"] else "F") + "A" + (
            str(params["a_bits"]) if params["a_bits"] else "F")
        wrong_f = (f["predicted"] != f["correct"]).astype(float)
        wrong_q = (q["predicted"] != q["correct"]).astype(float)
        titles = [f"float: {f['accuracy']:.1%} correct", f"{label} {result['stage']}: {q['accuracy']:.1%} correct",
                  "difference (green: newly wrong, purple: fixed)"]
        extent = (f["lo"], f["hi"])
        if f.get("url") is None:  # the float map's picture is drawn once per float model
            f["url"] = data_url(f["probs"], points=self._points, extent=extent)
        return _charts.decision_maps(fig, f["url"], data_url(q["probs"], points=self._points, extent=extent),
                                     data_url(wrong_f - wrong_q, -1.0, 1.0, diverging_difference=True),
                                     titles, f["lo"], f["hi"])

    def _summary(self, result, params) -> str:
        return (f"{params['width']}-{params['depth']}: float {result['float']['accuracy']:.1%}, "
                f"quantized {result['quant']['accuracy']:.1%} ({result['stage']})")
