"""What every explorer shares: offline charts, the runner, the status panel, export and a static snapshot."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import altair as alt
import ipywidgets as W

from qviz.widgets import _charts
from qviz.widgets._runtime import Runner, StatusPanel

_offline_lock = threading.Lock()


def enable_offline() -> None:
    """Render every chart with the Vega bundle vl-convert ships: no CDN, no network (lecture halls, air gaps).

    Bundling takes seconds, so the bundle is kept in the user cache directory, keyed by the Altair and
    vl-convert versions; later kernels load it in milliseconds.
    """
    with _offline_lock:
        if getattr(alt.JupyterChart, "_is_offline", False):
            return
        import vl_convert

        key = hashlib.sha256(f"{alt.__version__}-{vl_convert.__version__}".encode()).hexdigest()[:16]
        cache = Path(os.environ.get("QVIZ_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                     / "qviz") / f"jupyterchart-offline-{key}.js"
        if cache.exists() and hasattr(alt.JupyterChart, "_esm"):
            alt.JupyterChart._esm = cache.read_text()
            alt.JupyterChart._is_offline = True
            return
        alt.JupyterChart.enable_offline()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(alt.JupyterChart._esm)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home only costs the next kernel a few seconds


# Hide the static snapshot when the live widget rendered just before it (JupyterLab, Voila); a page
# without widget JavaScript (nbconvert's HTML opened offline) shows the snapshot instead.
_SNAPSHOT_CSS = ("<style>.jp-OutputArea-child:has(.widget-vbox) + .jp-OutputArea-child .qviz-snapshot,"
                 ".output_area:has(.widget-vbox) + .output_area .qviz-snapshot{display:none}</style>")


def _value_widgets(widgets):
    """Every widget with a value among `widgets` and inside their containers."""
    for w in widgets:
        if isinstance(w, W.Box):
            yield from _value_widgets(w.children)
        elif w.has_trait("value"):
            yield w


class Explorer(W.VBox):
    """Base class: controls on top, one offline JupyterChart, a status panel with progress and errors.

    Subclasses define `_controls()` (a list of widgets whose `value` changes trigger updates),
    `_params()`, `_compute(params, cancel, progress)` (a generator of results, run off the main thread)
    and `_figure(result, params)` (an Altair chart from a result, built by the pure functions of
    `_charts`). `data` holds the latest result, `chart` the latest chart.
    """

    title = ""

    def __init__(self, *, background: bool = True, debounce_s: float = 0.04, **kwargs: Any):
        enable_offline()
        self.status = StatusPanel()
        self.data: Any = None
        self.chart: alt.TopLevelMixin | None = None
        self.params: dict = {}
        self.view = alt.JupyterChart(alt.Chart(alt.Data(values=[])).mark_point(),
                                     embed_options={"renderer": "svg", "actions": False})
        self.view.add_class("qviz-chart")
        self.runner = Runner(self._compute, self._apply, on_error=self.status.show_error,
                             on_progress=self.status.progress, on_done=self.status.done,
                             debounce_s=debounce_s, background=background)
        self.controls = self._controls()
        for control in _value_widgets(self.controls):
            control.observe(self._changed, names="value")
        header = W.HTML(f"<b style='font-size:16px'>{self.title}</b>")
        super().__init__([header, self._layout_controls(self.controls), self.view, self.status], **kwargs)
        self.add_class("qviz-explorer")
        self.refresh()

    # ------------------------------------------------------------ subclass hooks

    def _controls(self) -> list[W.Widget]:
        raise NotImplementedError

    def _layout_controls(self, controls: list[W.Widget]) -> W.Widget:
        return W.GridBox(controls, layout=W.Layout(grid_template_columns="repeat(3, max-content)",
                                                   grid_gap="4px 16px"))

    def _params(self) -> dict:
        raise NotImplementedError

    def _compute(self, params: dict, cancel: threading.Event, progress):
        raise NotImplementedError

    def _figure(self, result: Any, params: dict) -> alt.TopLevelMixin:
        raise NotImplementedError

    def _summary(self, result: Any, params: dict) -> str:
        return ""

    # ------------------------------------------------------------ updates

    def _changed(self, change=None) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute from the controls as they stand (called on every control change)."""
        try:
            params = self._params()
        except (TypeError, ValueError) as e:
            self.status.show_error(e)
            return
        self.status.clear_error()
        self.runner.request(params)

    def _apply(self, result: Any, params: dict) -> None:
        chart = _charts.finish(self._figure(result, params))
        self.data, self.params, self.chart = result, params, chart
        self.view.chart = chart
        summary = self._summary(result, params)
        if summary:
            self.status.text.value = summary

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until the explorer has shown the result of its latest control change."""
        return self.runner.wait(timeout)

    def close(self) -> None:
        if hasattr(self, "runner"):  # __del__ also calls close on an explorer whose __init__ failed
            self.runner.close()
            self.view.close()
        super().close()

    # ------------------------------------------------------------ export

    def figure(self) -> alt.TopLevelMixin:
        """The current view as one Altair chart with the settings in its title (what `save` writes)."""
        if self.data is None:
            raise ValueError("nothing to show yet: the explorer has not finished its first update")
        settings = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return _charts.finish(self._figure(self.data, self.params), f"{self.title} — {settings}")

    def save(self, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
        """Write the current view to `path`: .png, .svg, .pdf or self-contained .html (all offline)."""
        from qviz.widgets.export import save_chart

        self.wait()
        return save_chart(self.figure(), path, scale=scale)

    def snapshot_html(self) -> str:
        """A static PNG of the current view for pages without widget JavaScript."""
        from qviz.widgets.export import png_bytes

        png = base64.b64encode(png_bytes(self.figure(), scale=1.0)).decode("ascii")
        return (f"{_SNAPSHOT_CSS}<div class='qviz-snapshot'><img alt='{self.title}' "
                f"src='data:image/png;base64,{png}'></div>")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)
        if self.wait(float(os.environ.get("QVIZ_SNAPSHOT_TIMEOUT", "300"))) and self.data is not None:
            display({"text/html": self.snapshot_html()}, raw=True)
