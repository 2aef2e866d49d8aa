"""Chart builders: plain data in, `altair` charts out. They never compute what they show.

Layers that tests and the browser suite look for carry names (`name=`), which Vega turns into SVG
classes such as `levels_marks`. Sizes and fonts suit a projector.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np

BLUE, RED, GREY, INK = "#2166ac", "#b2182b", "#9e9e9e", "#222222"
GREEN, PURPLE, ORANGE = "#1b7837", "#762a83", "#e08214"
PANEL = {"width": 330, "height": 250}


def _values(**columns) -> alt.Data:
    """Columns of equal length -> inline rows (floats rounded so specs stay small)."""
    names = list(columns)
    arrays = [np.asarray(columns[n]).reshape(-1) for n in names]
    rows = [dict(zip(names, (_plain(v) for v in row), strict=True)) for row in zip(*arrays, strict=True)]
    return alt.Data(values=rows)


def _plain(v):
    if isinstance(v, np.floating | float):
        return round(float(v), 6) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def finish(chart: alt.TopLevelMixin, title: str | None = None) -> alt.TopLevelMixin:
    """Top-level configuration: readable fonts, no chart border, an optional overall title."""
    if title:
        chart = chart.properties(title=alt.TitleParams(title, fontSize=17, anchor="start"))
    return (chart.configure_axis(labelFontSize=13, titleFontSize=14, grid=True, gridOpacity=0.4)
            .configure_title(fontSize=15, anchor="start")
            .configure_legend(labelFontSize=13, titleFontSize=13, orient="bottom")
            .configure_view(stroke=None))


# --------------------------------------------------------------------------------------------------
# Quantizer explorer


def staircase(curve: dict, title: str) -> alt.LayerChart:
    """q(x) over the identity line, levels as horizontal rules, thresholds as vertical rules."""
    x = curve["x"]
    lo, hi = float(x[0]), float(x[-1])
    ys = np.concatenate([curve["q"], x, curve["levels"]])
    y_dom = [float(min(ys.min(), lo)), float(max(ys.max(), hi))]
    xs = alt.X("x:Q", title="input x", scale=alt.Scale(domain=[lo, hi], nice=False))
    ys_enc = alt.Y("y:Q", title="q(x)", scale=alt.Scale(domain=y_dom, nice=False))
    identity = alt.Chart(_values(x=[lo, hi], y=[lo, hi]), name="identity").mark_line(
        color=GREY, strokeDash=[5, 4], strokeWidth=1.5).encode(xs, ys_enc)
    levels = alt.Chart(_values(y=curve["levels"]), name="levels").mark_rule(
        color=BLUE, opacity=0.35, strokeWidth=1).encode(y="y:Q")
    inside = curve["thresholds"][(curve["thresholds"] >= lo) & (curve["thresholds"] <= hi)]
    thresholds = alt.Chart(_values(x=inside), name="thresholds").mark_rule(
        color=ORANGE, opacity=0.45, strokeDash=[2, 3]).encode(x="x:Q")
    layers = [identity, levels, thresholds]
    if bool(curve["stochastic"]):
        step = max(1, len(x) // 250)
        layers.append(alt.Chart(_values(x=x[::step], y=curve["q"][::step]), name="sample").mark_circle(
            color=RED, size=14, opacity=0.5).encode(xs, ys_enc))
        layers.append(alt.Chart(_values(x=x, y=curve["expected"]), name="expected").mark_line(
            color=INK, strokeWidth=2.5).encode(xs, ys_enc))
    else:
        layers.append(alt.Chart(_values(x=x, y=curve["q"]), name="staircase").mark_line(
            color=INK, strokeWidth=2.5, interpolate="step-after").encode(xs, ys_enc))
    return alt.layer(*layers).properties(title=title, **PANEL)


def error_chart(curve: dict) -> alt.LayerChart:
    """Quantization error x - E[q(x)] (002 §2.2's ε)."""
    x = curve["x"]
    xs = alt.X("x:Q", title="input x", scale=alt.Scale(domain=[float(x[0]), float(x[-1])], nice=False))
    zero = alt.Chart(_values(y=[0.0]), name="zero").mark_rule(color=GREY).encode(y="y:Q")
    err = alt.Chart(_values(x=x, e=curve["error"]), name="error").mark_line(color=PURPLE, strokeWidth=2).encode(
        xs, alt.Y("e:Q", title="error x − q(x)"))
    return alt.layer(zero, err).properties(title="Quantization error", **PANEL)


def gradient_chart(curve: dict, ste_name: str) -> alt.LayerChart:
    """The STE gradient next to the true derivative (0 almost everywhere, a Dirac spike per threshold)."""
    x = curve["x"]
    lo, hi = float(x[0]), float(x[-1])
    xs = alt.X("x:Q", title="input x", scale=alt.Scale(domain=[lo, hi], nice=False))
    top = float(max(1.0, np.max(curve["grad"]) * 1.15))
    y = alt.Y("g:Q", title="dq/dx", scale=alt.Scale(domain=[-0.05 * top, top], nice=False))
    true = alt.Chart(_values(x=[lo, hi], g=[0.0, 0.0]), name="true_derivative").mark_line(
        color=GREY, strokeWidth=2).encode(xs, y)
    inside = curve["thresholds"][(curve["thresholds"] >= lo) & (curve["thresholds"] <= hi)]
    spikes = alt.Chart(_values(x=inside), name="dirac").mark_rule(color=GREY, strokeDash=[2, 2]).encode(x="x:Q")
    ste = alt.Chart(_values(x=x, g=curve["grad"]), name="ste").mark_line(
        color=GREEN, strokeWidth=2.5, interpolate="step-after").encode(xs, y)
    return alt.layer(true, spikes, ste).properties(
        title=f"STE ({ste_name}) vs true derivative (0 a.e.)", width=2 * PANEL["width"] + 40, height=150)


def quantizer_figure(curve: dict, title: str, ste_name: str) -> alt.VConcatChart:
    return alt.vconcat(alt.hconcat(staircase(curve, title), error_chart(curve)), gradient_chart(curve, ste_name))


# --------------------------------------------------------------------------------------------------
# Weight explorer


def _bars(edges: np.ndarray, counts: np.ndarray, name: str, color: str, title: str, x_title: str,
          log_y: bool = False) -> alt.Chart:
    data = _values(a=edges[:-1], b=edges[1:], n=counts)
    y = alt.Y("n:Q", title="count", scale=alt.Scale(type="symlog") if log_y else alt.Undefined)
    return alt.Chart(data, name=name).mark_rect(color=color, opacity=0.75).encode(
        x=alt.X("a:Q", title=x_title), x2="b:Q", y=y).properties(title=title, **PANEL)


def weight_histograms(edges: np.ndarray, counts: np.ndarray, levels: np.ndarray, level_counts: np.ndarray,
                      layer: str) -> alt.HConcatChart:
    """Float weights with the quantization levels overlaid, and how many weights each level takes."""
    hist = _bars(edges, counts, "weights", BLUE, f"{layer}: float weights and levels", "weight", log_y=True)
    rules = alt.Chart(_values(x=levels), name="levels").mark_rule(color=RED, strokeWidth=1.5).encode(x="x:Q")
    used = alt.Chart(_values(level=levels, n=level_counts), name="quantized").mark_bar(color=RED, size=6).encode(
        x=alt.X("level:Q", title="quantized weight"), y=alt.Y("n:Q", title="count")).properties(
        title="Quantized weights per level", **PANEL)
    return alt.hconcat(alt.layer(hist, rules), used)


def sqnr_histograms(edges: np.ndarray, per_layer: np.ndarray, per_channel: np.ndarray) -> alt.Chart:
    """Per-kernel SQNR histograms, per-layer vs per-channel quantization (004 Figs. 18-19)."""
    n = len(edges) - 1
    data = _values(a=np.tile(edges[:-1], 2), b=np.tile(edges[1:], 2), n=np.concatenate([per_layer, per_channel]),
                   scheme=["per-layer"] * n + ["per-channel"] * n)
    return alt.Chart(data, name="sqnr").mark_rect(opacity=0.6).encode(
        x=alt.X("a:Q", title="SQNR per output kernel (dB)"), x2="b:Q", y=alt.Y("n:Q", title="kernels", stack=None),
        color=alt.Color("scheme:N", scale=alt.Scale(domain=["per-layer", "per-channel"], range=[ORANGE, GREEN]),
                        title=None)).properties(title="SQNR per kernel", **PANEL)


def power_histograms(edges: np.ndarray, before: np.ndarray, after: np.ndarray, folded: bool) -> alt.Chart:
    """Weight power W²/E[W²] before and after batch-norm folding (004 Appendix A)."""
    n = len(edges) - 1
    labels = ["before folding"] * n + (["after folding"] * n if folded else [])
    counts = np.concatenate([before, after]) if folded else before
    a = np.tile(edges[:-1], 2 if folded else 1)
    b = np.tile(edges[1:], 2 if folded else 1)
    return alt.Chart(_values(a=a, b=b, n=counts, stage=labels), name="power").mark_rect(opacity=0.6).encode(
        x=alt.X("a:Q", title="W² / E[W²]"), x2="b:Q",
        y=alt.Y("n:Q", title="weights", stack=None, scale=alt.Scale(type="symlog")),
        color=alt.Color("stage:N", title=None, scale=alt.Scale(domain=["before folding", "after folding"],
                                                              range=[BLUE, RED]))).properties(
        title="Weight power distribution", **PANEL)


def weights_figure(hist: alt.HConcatChart, sqnr: alt.Chart, power: alt.Chart) -> alt.VConcatChart:
    return alt.vconcat(hist, alt.hconcat(sqnr, power))


# --------------------------------------------------------------------------------------------------
# Decision maps


def _map_panel(url: str, title: str, name: str, points: dict | None, lo: float, hi: float) -> alt.LayerChart:
    size = 260
    scale = alt.Scale(domain=[lo, hi], nice=False)
    image = alt.Chart(_values(x=[(lo + hi) / 2], y=[(lo + hi) / 2], url=[url]), name=name).mark_image(
        width=size, height=size).encode(x=alt.X("x:Q", scale=scale, title="x"), y=alt.Y("y:Q", scale=scale, title="y"),
                                        url="url:N")
    layers = [image]
    if points is not None:
        data = _values(x=points["x"], y=points["y"], label=points["label"])
        layers.append(alt.Chart(data, name="points").mark_circle(size=7, opacity=0.5, stroke="white",
                                                                 strokeWidth=0.2).encode(
            x=alt.X("x:Q", scale=scale), y=alt.Y("y:Q", scale=scale),
            color=alt.Color("label:N", scale=alt.Scale(domain=[0, 1], range=[BLUE, RED]), legend=None)))
    return alt.layer(*layers).properties(title=title, width=size, height=size)


def decision_maps(float_url: str, quant_url: str, diff_url: str, points: dict | None, titles: Sequence[str],
                  lo: float = 0.0, hi: float = 1.0) -> alt.HConcatChart:
    """Float map, quantized map (over the training points) and their difference, side by side."""
    return alt.hconcat(_map_panel(float_url, titles[0], "float_map", points, lo, hi),
                       _map_panel(quant_url, titles[1], "quant_map", points, lo, hi),
                       _map_panel(diff_url, titles[2], "difference", None, lo, hi))


# --------------------------------------------------------------------------------------------------
# Kernel readout


def kernel_bars(memory: dict, latency: dict | None, title_memory: str, title_latency: str) -> alt.HConcatChart:
    """Bytes of float32 vs packed weights, and latency of torch vs the qviz kernel."""
    mem = alt.Chart(_values(what=list(memory), v=list(memory.values())), name="memory").mark_bar().encode(
        y=alt.Y("what:N", title=None, sort=None), x=alt.X("v:Q", title="bytes"),
        color=alt.Color("what:N", legend=None, scale=alt.Scale(range=[GREY, BLUE, GREEN, ORANGE]))).properties(
        title=title_memory, width=PANEL["width"], height=120)
    if latency is None:
        return alt.hconcat(mem)
    lat = alt.Chart(_values(what=list(latency), v=list(latency.values())), name="latency").mark_bar().encode(
        y=alt.Y("what:N", title=None, sort=None), x=alt.X("v:Q", title="milliseconds (median)"),
        color=alt.Color("what:N", legend=None, scale=alt.Scale(range=[GREY, RED, PURPLE]))).properties(
        title=title_latency, width=PANEL["width"], height=120)
    return alt.hconcat(mem, lat)
