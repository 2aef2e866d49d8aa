"""Chart builders: plain data in, Vega-Lite specs out. They never compute what they show.

The builders write Vega-Lite JSON (the dicts Altair's `to_dict` produces) rather than Altair objects:
Altair's object model copies and validates a chart on every method call, which costs about 350 ms for
the quantizer explorer's figure; the dicts cost a few milliseconds, inside the 30 ms an update may
take. `as_altair(spec)` turns any of them into an Altair chart for composition; `alt.JupyterChart`
renders them as they are.

Everything that changes from one update to the next lives outside the chart's structure: data in
top-level named datasets (d0, d1, ... in building order) and text in params (t0, t1, ...). Two figures
built from different values but the same structure differ only there, so an explorer can send the
browser new data and params instead of a new chart, and the chart redraws without being compiled again.

Layers that tests and the browser suite look for carry names, which Vega turns into SVG classes such
as `levels_marks`. Sizes and fonts suit a projector.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import altair as alt
import numpy as np

BLUE, RED, GREY, INK = "#2166ac", "#b2182b", "#9e9e9e", "#222222"
GREEN, PURPLE, ORANGE = "#1b7837", "#762a83", "#e08214"
WIDTH, HEIGHT = 330, 250
SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"
CONFIG = {"axis": {"labelFontSize": 13, "titleFontSize": 14, "grid": True, "gridOpacity": 0.4},
          "title": {"fontSize": 15, "anchor": "start"},
          "legend": {"labelFontSize": 13, "titleFontSize": 13, "orient": "bottom"},
          "view": {"stroke": None}}


class Figure:
    """Collects the datasets and the texts of one figure while its views are built."""

    def __init__(self):
        self.datasets: dict[str, list[dict]] = {}
        self.texts: dict[str, str] = {}

    def data(self, **columns) -> dict:
        """Columns of equal length -> a named dataset (floats rounded so specs stay small)."""
        names = list(columns)
        arrays = [np.asarray(columns[n]).reshape(-1).tolist() for n in names]
        rows = [dict(zip(names, (_plain(v) for v in row), strict=True)) for row in zip(*arrays, strict=True)]
        name = f"d{len(self.datasets)}"
        self.datasets[name] = rows
        return {"name": name}

    def title(self, text: str, subtitle: str | None = None) -> dict:
        """A view title (and a second, smaller line) whose text is a param, so it can change without a new
        chart."""
        name = f"t{len(self.texts)}"
        self.texts[name] = text
        if subtitle is None:
            return {"text": {"expr": name}}
        sub = f"t{len(self.texts)}"
        self.texts[sub] = subtitle
        return {"text": {"expr": name}, "subtitle": {"expr": sub}, "subtitleFontSize": 12}

    def spec(self, body: dict, title: str | None = None) -> dict:
        """The top-level spec: body + datasets + text params + configuration (+ an overall title)."""
        # resize: later data and param updates (sent without a new spec) may widen axes and titles; without
        # it the view keeps its first size and clips them
        spec = {"$schema": SCHEMA, **body, "datasets": self.datasets, "config": CONFIG,
                "autosize": {"type": "pad", "resize": True}}
        if self.texts:
            spec["params"] = [{"name": n, "value": v} for n, v in self.texts.items()]
        if title:
            spec["title"] = {"text": title, "fontSize": 17, "anchor": "start"}
        return spec


def structure(spec: dict) -> str:
    """What must stay equal for a spec to be shown by sending only its data and params."""
    shape = {**spec, "datasets": sorted(spec.get("datasets", {})),
             "params": [p["name"] for p in spec.get("params", [])]}
    return json.dumps(shape, sort_keys=True)


def _plain(v):
    if isinstance(v, float):
        return round(v, 6) if np.isfinite(v) else None
    return v


def view(data: dict, mark: dict, encoding: dict | None = None, name: str | None = None, **props) -> dict:
    spec = {"data": data, "mark": mark, **props}
    if encoding:
        spec["encoding"] = encoding
    if name:
        spec["name"] = name
    return spec


def q(field: str, title: str | None = None, **extra) -> dict:
    """A quantitative channel."""
    enc = {"field": field, "type": "quantitative", **extra}
    if title is not None:
        enc["title"] = title
    return enc


def layer(*views: dict, **props) -> dict:
    return {"layer": list(views), **props}


def as_altair(spec: dict) -> alt.TopLevelMixin:
    """An Altair chart of a spec built here (for composing figures with Altair)."""
    return alt.Chart.from_dict(spec, validate=False)


# --------------------------------------------------------------------------------------------------
# Quantizer explorer


def staircase(fig: Figure, curve: dict, title: str) -> dict:
    """q(x) over the identity line, levels as horizontal rules, thresholds as vertical rules."""
    x = curve["x"]
    lo, hi = float(x[0]), float(x[-1])
    x_enc = q("x", "input x", scale={"domain": [lo, hi], "nice": False})
    y_enc = q("y", "q(x)", scale={"nice": False, "zero": False})  # the identity line and the levels set it
    inside = curve["thresholds"][(curve["thresholds"] >= lo) & (curve["thresholds"] <= hi)]
    layers = [
        view(fig.data(x=[lo, hi], y=[lo, hi]), {"type": "line", "color": GREY, "strokeDash": [5, 4]},
             {"x": x_enc, "y": y_enc}, "identity"),
        view(fig.data(y=curve["levels"]), {"type": "rule", "color": BLUE, "opacity": 0.35}, {"y": q("y")}, "levels"),
        view(fig.data(x=inside), {"type": "rule", "color": ORANGE, "opacity": 0.45, "strokeDash": [2, 3]},
             {"x": q("x")}, "thresholds"),
    ]
    if bool(curve["stochastic"]):
        step = max(1, len(x) // 250)
        layers.append(view(fig.data(x=x[::step], y=curve["q"][::step]),
                           {"type": "circle", "color": RED, "size": 14, "opacity": 0.5}, {"x": x_enc, "y": y_enc},
                           "sample"))
        layers.append(view(fig.data(x=x, y=curve["expected"]), {"type": "line", "color": INK, "strokeWidth": 2.5},
                           {"x": x_enc, "y": y_enc}, "expected"))
    else:
        layers.append(view(fig.data(x=x, y=curve["q"]),
                           {"type": "line", "color": INK, "strokeWidth": 2.5, "interpolate": "step-after"},
                           {"x": x_enc, "y": y_enc}, "staircase"))
    return layer(*layers, title=fig.title(title), width=WIDTH, height=HEIGHT)


def error_chart(fig: Figure, curve: dict) -> dict:
    """Quantization error x - E[q(x)] (002 §2.2's ε)."""
    x = curve["x"]
    x_enc = q("x", "input x", scale={"domain": [float(x[0]), float(x[-1])], "nice": False})
    return layer(view(fig.data(y=[0.0]), {"type": "rule", "color": GREY}, {"y": q("y")}, "zero"),
                 view(fig.data(x=x, e=curve["error"]), {"type": "line", "color": PURPLE, "strokeWidth": 2},
                      {"x": x_enc, "y": q("e", "error x − q(x)")}, "error"),
                 title="Quantization error", width=WIDTH, height=HEIGHT)


def gradient_chart(fig: Figure, curve: dict, ste_name: str) -> dict:
    """The STE gradient next to the true derivative (0 almost everywhere, a Dirac spike per threshold)."""
    x = curve["x"]
    lo, hi = float(x[0]), float(x[-1])
    top = float(max(1.0, np.max(curve["grad"]) * 1.15))
    x_enc = q("x", "input x", scale={"domain": [lo, hi], "nice": False})
    y_enc = q("g", "dq/dx", scale={"nice": False})
    inside = curve["thresholds"][(curve["thresholds"] >= lo) & (curve["thresholds"] <= hi)]
    return layer(
        # invisible points that set the y range from the data, so a new range needs no new chart
        view(fig.data(x=[lo, lo], g=[-0.05 * top, top]), {"type": "point", "opacity": 0}, {"x": x_enc, "y": y_enc},
             "bounds"),
        view(fig.data(x=[lo, hi], g=[0.0, 0.0]), {"type": "line", "color": GREY, "strokeWidth": 2},
             {"x": x_enc, "y": y_enc}, "true_derivative"),
        view(fig.data(x=inside), {"type": "rule", "color": GREY, "strokeDash": [2, 2]}, {"x": q("x")}, "dirac"),
        view(fig.data(x=x, g=curve["grad"]), {"type": "line", "color": GREEN, "strokeWidth": 2.5,
                                              "interpolate": "step-after"}, {"x": x_enc, "y": y_enc}, "ste"),
        title=fig.title(f"STE ({ste_name}) vs true derivative (0 a.e.)"), width=2 * WIDTH + 40, height=150)


def quantizer_figure(fig: Figure, curve: dict, title: str, ste_name: str) -> dict:
    return {"vconcat": [{"hconcat": [staircase(fig, curve, title), error_chart(fig, curve)]},
                        gradient_chart(fig, curve, ste_name)]}


# --------------------------------------------------------------------------------------------------
# Weight explorer


def _bars(fig: Figure, edges, counts, name: str, color: str, title: str, x_title: str, log_y: bool = False) -> dict:
    y = q("n", "count", **({"scale": {"type": "symlog"}} if log_y else {}))
    return view(fig.data(a=edges[:-1], b=edges[1:], n=counts), {"type": "rect", "color": color, "opacity": 0.75},
                {"x": q("a", x_title), "x2": {"field": "b"}, "y": y}, name, title=fig.title(title), width=WIDTH,
                height=HEIGHT)


def weight_histograms(fig: Figure, edges, counts, levels, quantized: dict, title: str) -> dict:
    """Float weights with the quantization levels overlaid, and the histogram of the quantized weights.

    quantized: {"values", "counts"} (one bar per level) or {"edges", "counts"} (binned, when every
    kernel has its own levels).
    """
    left = weights_with_levels(fig, edges, counts, levels, title)
    if "values" in quantized:
        right = view(fig.data(level=quantized["values"], n=quantized["counts"]),
                     {"type": "bar", "color": RED, "size": 6},
                     {"x": q("level", "quantized weight"), "y": q("n", "count")}, "quantized",
                     title=fig.title("Quantized weights per level"), width=WIDTH, height=HEIGHT)
    else:
        right = _bars(fig, quantized["edges"], quantized["counts"], "quantized", RED, "Quantized weights",
                      "quantized weight", log_y=True)
    return {"hconcat": [left, right]}


def weights_with_levels(fig: Figure, edges, counts, levels, title: str) -> dict:
    """The float weights' histogram with the quantization levels as rules."""
    hist = _bars(fig, edges, counts, "weights", BLUE, title, "weight", log_y=True)
    title_of_hist = hist.pop("title")
    for key in ("width", "height"):
        hist.pop(key)
    rules = view(fig.data(x=levels), {"type": "rule", "color": RED, "strokeWidth": 1.5, "opacity": 0.8},
                 {"x": q("x")}, "levels")
    return layer(hist, rules, title=title_of_hist, width=WIDTH, height=HEIGHT)


def _colors(domain: Sequence[str], colors: Sequence[str]) -> dict:
    return {"field": "group", "type": "nominal", "title": None,
            "scale": {"domain": list(domain), "range": list(colors)}}


def sqnr_histograms(fig: Figure, edges, per_layer, per_channel) -> dict:
    """Per-kernel SQNR histograms, per-layer vs per-channel quantization (004 Figs. 18-19)."""
    n = len(edges) - 1
    data = fig.data(a=np.tile(edges[:-1], 2), b=np.tile(edges[1:], 2), n=np.concatenate([per_layer, per_channel]),
                    group=["per-layer"] * n + ["per-channel"] * n)
    return view(data, {"type": "rect", "opacity": 0.6},
                {"x": q("a", "SQNR per output kernel (dB)"), "x2": {"field": "b"}, "y": q("n", "kernels", stack=None),
                 "color": _colors(["per-layer", "per-channel"], [ORANGE, GREEN])},
                "sqnr", title="SQNR per kernel", width=WIDTH, height=HEIGHT)


def power_histograms(fig: Figure, edges, before, after) -> dict:
    """Weight power W²/E[W²] before and after batch-norm folding (004 Appendix A)."""
    n = len(edges) - 1
    folded = after is not None
    groups = ["before folding"] * n + (["after folding"] * n if folded else [])
    data = fig.data(a=np.tile(edges[:-1], 2 if folded else 1), b=np.tile(edges[1:], 2 if folded else 1),
                    n=np.concatenate([before, after]) if folded else before, group=groups)
    return view(data, {"type": "rect", "opacity": 0.6},
                {"x": q("a", "W² / E[W²]"), "x2": {"field": "b"},
                 "y": q("n", "weights", stack=None, scale={"type": "symlog"}),
                 "color": _colors(["before folding", "after folding"], [BLUE, RED])},
                "power", title="Weight power distribution", width=WIDTH, height=HEIGHT)


def weights_figure(hist: dict, sqnr: dict, power: dict) -> dict:
    return {"vconcat": [hist, {"hconcat": [sqnr, power], "resolve": {"scale": {"color": "independent"}}}]}


# --------------------------------------------------------------------------------------------------
# Decision maps


def _map_panel(fig: Figure, url: str, title: str, name: str, lo: float, hi: float) -> dict:
    size = 260
    scale = {"domain": [lo, hi], "nice": False}
    image = view(fig.data(x=[(lo + hi) / 2], y=[(lo + hi) / 2], url=[url]),
                 {"type": "image", "width": size, "height": size, "smooth": True},
                 {"x": q("x", "x", scale=scale), "y": q("y", "y", scale=scale),
                  "url": {"field": "url", "type": "nominal"}}, name)
    return layer(image, title=fig.title(title), width=size, height=size)


def decision_maps(fig: Figure, float_url: str, quant_url: str, diff_url: str, titles: Sequence[str],
                  lo: float = 0.0, hi: float = 1.0) -> dict:
    """Float map, quantized map and their difference, side by side (pictures: see `_image.data_url`)."""
    return {"hconcat": [_map_panel(fig, float_url, titles[0], "float_map", lo, hi),
                        _map_panel(fig, quant_url, titles[1], "quant_map", lo, hi),
                        _map_panel(fig, diff_url, titles[2], "difference", lo, hi)]}


# --------------------------------------------------------------------------------------------------
# Kernel readout


def _hbars(fig: Figure, values: dict, name: str, colors: Sequence[str], title: str, x_title: str) -> dict:
    return view(fig.data(group=list(values), v=list(values.values())), {"type": "bar"},
                {"y": {"field": "group", "type": "nominal", "title": None, "sort": None}, "x": q("v", x_title),
                 "color": {"field": "group", "type": "nominal", "legend": None,
                           "scale": {"domain": list(values), "range": list(colors)[:len(values)]}}},
                name, title=fig.title(title), width=WIDTH, height=120)


def kernel_bars(fig: Figure, memory: dict, latency: dict, title_memory: str, title_latency: str) -> dict:
    """Bytes of float32 vs packed weights, and latency of torch vs the qviz kernel."""
    return {"hconcat": [_hbars(fig, memory, "memory", [GREY, BLUE, GREEN], title_memory, "bytes"),
                        _hbars(fig, latency, "latency", [GREY, RED], title_latency, "milliseconds (median)")],
            "resolve": {"scale": {"color": "independent"}}}


# --------------------------------------------------------------------------------------------------
# Sweeps


def heatmap(fig: Figure, xs: Sequence, ys: Sequence, matrix: Sequence[Sequence], x_title: str, y_title: str,
            metric: str, title: str) -> dict:
    """One cell per (x, y) setting, coloured by the metric, value printed; clicking a cell selects it."""
    cols = [(i, j, str(x), str(y), v) for j, y in enumerate(ys) for i, x in enumerate(xs)
            if (v := matrix[j][i]) is not None]
    values = [c[4] for c in cols]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    # viridis runs from dark purple to bright yellow: white digits on the dark 60%, black on the rest
    on_dark = [v - lo <= 0.6 * (hi - lo) for v in values]
    data = fig.data(xi=[c[0] for c in cols], yi=[c[1] for c in cols], x=[c[2] for c in cols],
                    y=[c[3] for c in cols], v=values, dark=on_dark)
    x_enc = {"field": "x", "type": "ordinal", "title": x_title, "sort": [str(x) for x in xs]}
    y_enc = {"field": "y", "type": "ordinal", "title": y_title, "sort": [str(y) for y in ys][::-1]}
    cells = view(data, {"type": "rect", "stroke": "white", "strokeWidth": 2, "cursor": "pointer"},
                 {"x": x_enc, "y": y_enc, "color": q("v", metric, scale={"scheme": "viridis"}),
                  "opacity": {"condition": {"param": "pick", "empty": True, "value": 1}, "value": 0.45}},
                 "cells", params=[{"name": "pick", "select": {"type": "point", "fields": ["xi", "yi"]}}])
    labels = view(data, {"type": "text", "fontSize": 13, "fontWeight": "bold"},
                  {"x": x_enc, "y": y_enc, "text": {"field": "v", "type": "quantitative", "format": ".3g"},
                   "color": {"condition": {"test": "datum.dark", "value": "white"}, "value": "black"}}, "values")
    return layer(cells, labels, title=fig.title(title), width=max(240, 70 * len(xs)), height=max(180, 50 * len(ys)))


def lines(fig: Figure, xs: Sequence, series: dict[str, Sequence], x_title: str, metric: str, title: str) -> dict:
    """The metric against one setting, one line per value of another."""
    rows = [(str(x), name, v) for name, values in series.items() for x, v in zip(xs, values, strict=True)
            if v is not None]
    data = fig.data(x=[r[0] for r in rows], group=[r[1] for r in rows], v=[r[2] for r in rows])
    return view(data, {"type": "line", "point": True, "strokeWidth": 2.5},
                {"x": {"field": "x", "type": "ordinal", "title": x_title, "sort": [str(x) for x in xs]},
                 "y": q("v", metric, scale={"zero": False}),
                 "color": {"field": "group", "type": "nominal", "title": None}}, "lines",
                title=fig.title(title), width=max(300, 80 * len(xs)), height=250)


def run_detail(fig: Figure, title: str, maps: Sequence[tuple[str, str]] | None, histogram: dict | None) -> dict:
    """What one run of a sweep looked like: its decision maps, or its quantized weights."""
    if maps:
        return {"hconcat": [_map_panel(fig, url, name, f"detail_{i}", 0.0, 1.0) for i, (name, url) in enumerate(maps)],
                "title": title}
    edges = np.asarray(histogram["edges"])
    body = _bars(fig, edges, np.asarray(histogram["counts"]), "detail_weights", RED, histogram["title"],
                 "quantized weight", log_y=True)
    return {**body, "title": title} if "title" not in body else {"vconcat": [body], "title": title}


def message(fig: Figure, text: str, title: str) -> dict:
    """A chart-sized panel that says why there is nothing to draw (no run matches, every run failed)."""
    data = fig.data(text=[text])
    return view(data, {"type": "text", "fontSize": 14, "align": "left", "baseline": "top", "x": 10, "y": 10,
                       "limit": 620, "lineBreak": "\n"}, {"text": {"field": "text"}}, "message",
                title=fig.title(title), width=640, height=120)


# --------------------------------------------------------------------------------------------------
# Model explorer


LAYER_PANEL_WIDTH = 170


def _layer_panel(fig: Figure, layers: Sequence[str], rows: Sequence[dict], field: str, name: str, color: str,
                 title: tuple[str, str], x_title: str, selectable: bool = False) -> dict:
    """One horizontal bar per layer (network order top to bottom); the picked layer stands out."""
    values = [r.get(field) for r in rows]
    data = fig.data(layer=list(layers), v=[v if v is not None and np.isfinite(v) else None for v in values])
    y = {"field": "layer", "type": "nominal", "sort": list(layers), "title": None,
         "axis": {"labelLimit": 200} if selectable else None}
    bars = view(data, {"type": "bar", "color": color, "cursor": "pointer"},
                {"y": y, "x": q("v", x_title),
                 "opacity": {"condition": {"param": "pick", "empty": False, "value": 1.0}, "value": 0.55},
                 "tooltip": [{"field": "layer"}, {"field": "v", "title": x_title, "format": ".4g"}]}, name)
    if selectable:
        bars["params"] = [{"name": "pick", "select": {"type": "point", "fields": ["layer"], "on": "click"}}]
    return {"layer": [bars], "title": fig.title(*title), "width": LAYER_PANEL_WIDTH,
            "height": max(120, 18 * len(layers))}


def layer_view(fig: Figure, rows: Sequence[dict], titles: Sequence[tuple[str, str]]) -> dict:
    """The per-layer view: weight SQNR, output SQNR (the layer's own and in the quantized network),
    sensitivity and packed bytes, side by side; clicking a bar of the first panel picks that layer.
    `titles` are (title, subtitle) pairs: two short lines keep the row within a projector's width."""
    layers = [r["name"] for r in rows]
    own = _layer_panel(fig, layers, rows, "output_sqnr_db", "own_sqnr", ORANGE, titles[1], "dB", False)
    propagated = view(fig.data(layer=layers, v=[r.get("propagated_sqnr_db") if r.get("propagated_sqnr_db") is not None
                                                and np.isfinite(r["propagated_sqnr_db"]) else None for r in rows]),
                      {"type": "tick", "color": INK, "thickness": 3, "size": 14},
                      {"y": {"field": "layer", "type": "nominal", "sort": layers, "title": None, "axis": None},
                       "x": q("v")}, "propagated_sqnr")
    own["layer"].append(propagated)
    return {"hconcat": [
        _layer_panel(fig, layers, rows, "weight_sqnr_db", "weight_sqnr", BLUE, titles[0], "dB", True),
        own,
        _layer_panel(fig, layers, rows, "sensitivity", "sensitivity", RED, titles[2], "sensitivity"),
        _layer_panel(fig, layers, rows, "packed_bytes", "packed_bytes", GREEN, titles[3], "bytes"),
    ], "spacing": 6}


def pareto_chart(fig: Figure, uniform: Sequence[dict], greedy: Sequence[dict], current: dict, floating: dict,
                 metric: str, title: str) -> dict:
    """The metric against model bytes: uniform bit widths, the greedy mixed-precision path, float, and
    the current setting as a large mark."""
    x = q("bytes", "weight bytes", scale={"type": "log"})
    y = q("metric", metric, scale={"zero": False})
    uni = fig.data(bytes=[p["bytes"] for p in uniform], metric=[p["metric"] for p in uniform],
                   label=[p["label"] for p in uniform])
    path = fig.data(bytes=[p["bytes"] for p in greedy], metric=[p["metric"] for p in greedy],
                    label=[p["label"] for p in greedy])
    # neighbouring bit widths often sit a few pixels apart (W6 and W8 lose almost nothing): their labels
    # alternate above and below the points so that no two neighbours overlap
    by_bytes = sorted(uniform, key=lambda p: p["bytes"])
    above, below = ({"bytes": [p["bytes"] for p in part], "metric": [p["metric"] for p in part],
                     "label": [p["label"] for p in part]} for part in (by_bytes[0::2], by_bytes[1::2]))
    return layer(
        view(path, {"type": "line", "color": PURPLE, "point": {"size": 25}, "strokeWidth": 1.5},
             {"x": x, "y": y, "order": {"field": "bytes", "sort": "descending"},
              "tooltip": [{"field": "label"}, {"field": "metric", "format": ".4g"}, {"field": "bytes"}]}, "greedy"),
        view(uni, {"type": "line", "color": BLUE, "point": {"size": 40}, "strokeDash": [4, 3]},
             {"x": x, "y": y, "tooltip": [{"field": "label"}, {"field": "metric", "format": ".4g"}]}, "uniform"),
        view(fig.data(**above), {"type": "text", "dy": -10, "fontSize": 12, "color": BLUE},
             {"x": x, "y": y, "text": {"field": "label"}}, "uniform_labels"),
        view(fig.data(**below), {"type": "text", "dy": 14, "fontSize": 12, "color": BLUE},
             {"x": x, "y": y, "text": {"field": "label"}}, "uniform_labels_below"),
        view(fig.data(bytes=[floating["bytes"]], metric=[floating["metric"]]),
             {"type": "point", "shape": "diamond", "size": 120, "color": GREY, "filled": True}, {"x": x, "y": y},
             "float_point"),
        view(fig.data(bytes=[current["bytes"]], metric=[current["metric"]]),
             {"type": "point", "size": 260, "color": RED, "filled": True, "stroke": "white", "strokeWidth": 2},
             {"x": x, "y": y}, "current"),
        title=fig.title(title), width=2 * WIDTH - 140, height=HEIGHT)


def activation_histogram(fig: Figure, edges, counts, clip: Sequence[float], title: str) -> dict:
    """A layer's input activations with its quantizer's clip range as two rules."""
    hist = _bars(fig, edges, counts, "activations", PURPLE, title, "input activation", log_y=True)
    hist_title = hist.pop("title")
    for key in ("width", "height"):
        hist.pop(key)
    rules = view(fig.data(x=list(clip)), {"type": "rule", "color": RED, "strokeWidth": 2, "strokeDash": [5, 3]},
                 {"x": q("x")}, "clip")
    return layer(hist, rules, title=hist_title, width=WIDTH, height=HEIGHT)


def layer_staircase(fig: Figure, x, q_values, levels, title: str) -> dict:
    """The layer's weight quantizer on the range of its weights, with its real levels."""
    return layer(view(fig.data(y=levels), {"type": "rule", "color": BLUE, "opacity": 0.35}, {"y": q("y")},
                      "layer_levels"),
                 view(fig.data(x=x, y=q_values), {"type": "line", "color": INK, "strokeWidth": 2.5,
                                                  "interpolate": "step-after"},
                      {"x": q("x", "weight"), "y": q("y", "quantized weight")}, "layer_staircase"),
                 title=fig.title(title), width=WIDTH, height=HEIGHT)


def model_figure(layers: dict, pareto: dict, drill: Sequence[dict]) -> dict:
    """The model explorer, about 950 pixels wide for a projector: the per-layer view on top, the Pareto chart
    beside the picked layer's weights, then that layer's input activations and quantizer."""
    weights, *rest = drill
    return {"vconcat": [layers, {"hconcat": [pareto, weights]}, {"hconcat": rest}], "spacing": 18}
