"""SweepExplorer: heat maps and line charts of a sweep's table; click a cell to see that run."""

from __future__ import annotations

import ast

import ipywidgets as W

from qviz.engine.sweep import SweepResult
from qviz.widgets import _charts
from qviz.widgets._base import Explorer
from qviz.widgets._image import data_url

METRICS = ["acc_quant", "acc_float", "test_quant", "sqnr_db", "model_bytes", "roughness_quant", "train_seconds",
           "params"]
AVERAGE = "(average)"
NO_RESULTS = "(no results)"
NONE = "(line chart)"


class SweepExplorer(Explorer):
    """A sweep's results as a heat map (x setting x y setting, coloured by a metric) or as lines (the metric
    against x, one line per y value); the other varying settings are fixed by menus or averaged. Click a
    heat-map cell to see that run: its decision maps (semicircle sweeps) or its quantized weights (digits).
    """

    title = "Sweep explorer"
    selections = ("pick",)

    def __init__(self, result: SweepResult, **kwargs):
        if not isinstance(result, SweepResult):
            raise TypeError(f"result must be a SweepResult (from qviz.engine.sweep.run_sweep), got "
                            f"{type(result).__name__}")
        if not result.rows:
            raise ValueError("result has no rows to show")
        self.result = result
        self.detail = W.HTML("<i style='color:#777'>click a cell to see that run</i>")
        super().__init__(**kwargs)
        self.children = (*self.children, self.detail)

    def _controls(self):
        style = {"description_width": "70px"}
        varying = self.result.varying() or [self.result.columns()[0]]
        metrics = [m for m in METRICS if any(_is_number(r.get(m)) for r in self.result.rows)] or [NO_RESULTS]
        self.x = W.Dropdown(options=varying, value=varying[0], description="x", style=style)
        self.y = W.Dropdown(options=[*varying, NONE], value=varying[1] if len(varying) > 1 else NONE,
                            description="y", style=style)
        self.metric = W.Dropdown(options=metrics, value=metrics[0], description="metric", style=style)
        self.filters = {}
        for name in varying:
            values = [repr(v) for v in _distinct_sorted(s.get(name) for s in self.result.settings)]
            self.filters[name] = W.Dropdown(options=[AVERAGE, *values], value=AVERAGE, description=name, style=style)
        return [self.x, self.y, self.metric, *self.filters.values()]

    def _params(self) -> dict:
        fixed = {name: d.value for name, d in self.filters.items()
                 if d.value != AVERAGE and name not in (self.x.value, self.y.value)}
        return {"x": self.x.value, "y": self.y.value, "metric": self.metric.value, "fixed": fixed}

    def _rows(self, params) -> SweepResult:
        conditions = {name: _setting(value) for name, value in params["fixed"].items()}
        return self.result.where(**conditions) if conditions else self.result

    def _compute(self, params, cancel, progress):
        table = self._rows(params)
        failed = [r for r in table.rows if r.get("status") != "ok"]
        if params["metric"] == NO_RESULTS or not table.rows or len(failed) == len(table.rows):
            yield {"kind": "message", "text": self._why_empty(params, table, failed)}
            return
        if params["y"] == NONE or params["y"] == params["x"]:
            others = [v for v in table.varying() if v != params["x"]]
            if others:  # one line per value of the next varying setting
                xs, groups, matrix = table.pivot(params["x"], others[0], params["metric"])
                series = {f"{others[0]}={_label(g)}": row for g, row in zip(groups, matrix, strict=True)}
            else:
                xs, _, matrix = table.pivot(params["x"], params["x"], params["metric"])
                series = {params["metric"]: [row[i] for i, row in enumerate(matrix)]}
            yield {"kind": "lines", "xs": [_label(x) for x in xs], "series": series, "table": table}
            return
        xs, ys, matrix = table.pivot(params["x"], params["y"], params["metric"])
        yield {"kind": "heatmap", "xs": xs, "ys": ys, "matrix": matrix, "table": table}

    @staticmethod
    def _why_empty(params, table, failed) -> str:
        if not table.rows:
            where = ", ".join(f"{k}={v}" for k, v in params["fixed"].items())
            return f"No run matches {where}. Set a filter back to {AVERAGE} or pick another value."
        if not failed:  # every run finished, but none recorded a number for any metric shown here
            return (f"No run recorded a number for any of the metrics {', '.join(METRICS)}, so there is nothing to "
                    "plot. Check what the sweep's runs return.")
        first = failed[0].get("error", "no error message recorded")
        return f"All {len(failed)} runs here failed, so there is nothing to plot. First error: {first}"

    def _figure_labels(self, values):
        return [_label(v) for v in values]

    def _figure(self, fig, result, params):
        where = ", ".join(f"{k}={v}" for k, v in params["fixed"].items()) or "others averaged"
        title = f"{params['metric']} ({where})"
        if result["kind"] == "message":
            return _charts.message(fig, result["text"], title)
        if result["kind"] == "lines":
            return _charts.lines(fig, result["xs"], result["series"], params["x"], params["metric"], title)
        return _charts.heatmap(fig, self._figure_labels(result["xs"]), self._figure_labels(result["ys"]),
                               result["matrix"], params["x"], params["y"], params["metric"], title)

    # ------------------------------------------------------------ clicks

    def _selected(self, name: str, value) -> None:
        # Vega's point-selection signal: {"xi": [1], "yi": [0], "vlPoint": {"or": [{"xi": 1, "yi": 0}]}}
        picked = (value.get("vlPoint") or {}).get("or", [None])[0] if isinstance(value, dict) else None
        if not isinstance(picked, dict) or self.data is None or self.data["kind"] != "heatmap":
            return
        x = self.data["xs"][int(picked["xi"])]
        y = self.data["ys"][int(picked["yi"])]
        self.show_run(**{self.params["x"]: x, self.params["y"]: y}, **{
            k: _setting(v) for k, v in self.params["fixed"].items()})

    def show_run(self, **settings) -> dict:
        """Show the first run whose settings match `settings` below the chart; returns its row."""
        import vl_convert

        match = self.result.where(**settings)
        if not match.rows:
            self.detail.value = f"<i>no run with {settings}</i>"
            return {}
        row = match.rows[0]
        title = ", ".join(f"{k}={v}" for k, v in match.settings[0].items())
        fig = _charts.Figure()
        if "quant_map" in row:
            maps = [(f"float: {row['acc_float']:.1%}", data_url(row["float_map"])),
                    (f"quantized: {row['acc_quant']:.1%}", data_url(row["quant_map"]))]
            body = _charts.run_detail(fig, title, maps, None)
        elif "weight_edges" in row:
            hist = {"edges": row["weight_edges"], "counts": row["weight_counts"],
                    "title": f"{row['weight_layer']}: quantized weights ({row['acc_quant']:.1%} correct)"}
            body = _charts.run_detail(fig, title, None, hist)
        elif row.get("status") != "ok":
            self.detail.value = f"<b>this run failed</b>: {row.get('error', '')}"
            return row
        else:
            self.detail.value = f"<i>{title}: nothing to draw for this run</i>"
            return row
        self.detail.value = vl_convert.vegalite_to_svg(fig.spec(body))
        return row


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _distinct_sorted(values) -> list:
    """Distinct setting values, numbers in numeric order, None (float) last."""
    distinct = {repr(v): v for v in values}
    return sorted(distinct.values(), key=lambda v: (v is None, not _is_number(v), v if _is_number(v) else repr(v)))


def _setting(text: str):
    """A filter menu's entry (the repr of a setting's value) back to the value."""
    return ast.literal_eval(text)


def _label(value) -> str:
    """How a setting's value reads on an axis: None (no quantization) reads "float"."""
    return "float" if value is None else str(value)
