"""What every explorer shares: offline charts, the runner, the status panel, export and a static snapshot."""

from __future__ import annotations

import base64
import os
import threading
import time
import weakref
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

        from qviz.engine import _cache

        name = f"jupyterchart-offline-{_cache.key([alt.__version__, vl_convert.__version__], 16)}.js"
        path = _cache.folder() / name
        known = hasattr(alt.JupyterChart, "_esm")  # the attribute the bundle replaces (Altair 5.4+)
        bundle = _cache.read(path, _offline_bundle, "offline chart bundle") if known else None
        if bundle is None:
            alt.JupyterChart.enable_offline()
            bundle = alt.JupyterChart._esm
            _cache.write_text(path, bundle)  # a read-only home only costs the next kernel seconds
        alt.JupyterChart._esm = serialize_view_updates(bundle)
        alt.JupyterChart._is_offline = True


# JupyterChart's front end applies each data or param update to the Vega view as it arrives and then awaits
# view.runAsync(). An update that arrives while the previous run is still in flight is applied to a running
# dataflow, and Vega drops it: the chart keeps the older data (seen in the browser tests as a bits slider at
# 8 whose staircase still had the 128 levels of 7 bits, once in a few runs). The replacement queues every
# update behind the previous run, so the last update is always the one drawn.
_UPDATE_HANDLERS = (
    ('model.on("change:_params",async new_params=>{for(const[param,value]of Object.entries(new_params.changed?'
     'new_params.changed._params:new_params)){api.view.signal(param,value);}await api.view.runAsync();});',
     'let qvizQueue=Promise.resolve();const qvizApply=apply=>{qvizQueue=qvizQueue.then(async()=>{apply();'
     'await api.view.runAsync();}).catch(error=>console.error(error));};'
     'model.on("change:_params",new_params=>{const changed=Object.entries(new_params.changed?'
     'new_params.changed._params:new_params);qvizApply(()=>{for(const[param,value]of changed){'
     'api.view.signal(param,value);}});});'),
    ('model.on("change:_py_to_js_updates",async updates=>{const py_to_js_updates=updates.changed?'
     'updates.changed._py_to_js_updates:updates;for(const update of py_to_js_updates??[]){'
     'if(update.namespace==="signal"){setSignalValue(api.view,update.name,update.scope,update.value);}'
     'else if(update.namespace==="data"){setDataValue(api.view,update.name,update.scope,update.value);}}'
     'await api.view.runAsync();});',
     'model.on("change:_py_to_js_updates",updates=>{const py_to_js_updates=updates.changed?'
     'updates.changed._py_to_js_updates:updates;qvizApply(()=>{for(const update of py_to_js_updates??[]){'
     'if(update.namespace==="signal"){setSignalValue(api.view,update.name,update.scope,update.value);}'
     'else if(update.namespace==="data"){setDataValue(api.view,update.name,update.scope,update.value);}}});});'),
)


def serialize_view_updates(esm: str) -> str:
    """JupyterChart's module with its two update handlers queued one behind the other (see above). An
    Altair whose module reads differently is left as it is, with a warning: updates may then be lost."""
    if all(new in esm for _, new in _UPDATE_HANDLERS):
        return esm
    if not all(esm.count(old) == 1 for old, _ in _UPDATE_HANDLERS):
        import warnings

        warnings.warn(f"Altair {alt.__version__}'s JupyterChart module is not the one qviz knows; fast slider "
                      "updates may occasionally leave a chart showing an older value", RuntimeWarning, stacklevel=3)
        return esm
    for old, new in _UPDATE_HANDLERS:
        esm = esm.replace(old, new)
    return esm


def _offline_bundle(path: Path) -> str:
    """The cached JupyterChart module with Vega inlined; a truncated or foreign file is no bundle."""
    text = path.read_text(encoding="utf-8")
    if len(text) < 100_000 or "vega" not in text:
        raise ValueError(f"{len(text)} characters that are not the Vega bundle")
    return text


# Hide the static snapshot when the live widget rendered just before it (JupyterLab, Voila); a page
# without widget JavaScript (nbconvert's HTML opened offline) shows the snapshot instead.
# Seconds a replaced chart view stays open before it is closed: ample for a front end to finish creating it.
RETIRE_AFTER_S = 30.0

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
    and `_figure(fig, result, params)` (a Vega-Lite body built by the pure functions of `_charts`).
    `data` holds the latest result, `spec` the Vega-Lite spec on screen and `chart` the same as an
    Altair chart.
    """

    title = ""
    selections: tuple[str, ...] = ()  # names of click selections the charts define (see _selected)

    def __init__(self, *, background: bool = True, debounce_s: float = 0.04, **kwargs: Any):
        enable_offline()
        self.status = StatusPanel()
        self.data: Any = None
        self.spec: dict | None = None
        self._shape: str | None = None
        self.params: dict = {}
        # the chart widget is created with its first spec: a chart that ever drew a placeholder would keep
        # applying later data and params to it (see _show)
        self.view: W.Widget = W.HTML("<i style='color:#777'>computing…</i>")
        self._retired: list[tuple[float, W.Widget]] = []  # replaced views, closed later (see _retire)
        self.runner = Runner(self._compute, self._apply, on_error=self._failed,
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
        # three fixed columns: the controls fit a 1024-pixel projector and never jump as values change
        for control in controls:
            if not isinstance(control, W.Box | W.Checkbox):
                control.layout.width = "320px"
        return W.GridBox(controls, layout=W.Layout(grid_template_columns="repeat(3, 330px)", grid_gap="4px 12px"))

    def _params(self) -> dict:
        raise NotImplementedError

    def _compute(self, params: dict, cancel: threading.Event, progress):
        raise NotImplementedError

    def _figure(self, fig: _charts.Figure, result: Any, params: dict) -> dict:
        raise NotImplementedError

    def _summary(self, result: Any, params: dict) -> str:
        return ""

    def _failed(self, error: BaseException) -> None:
        """A computation raised: the error shows inside the explorer (explorers whose charts announce
        work still to come override this to say it will not come)."""
        self.status.show_error(error)

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

    def _build(self, result: Any, params: dict, title: str | None = None) -> dict:
        fig = _charts.Figure()
        return fig.spec(self._figure(fig, result, params), title)

    def _apply(self, result: Any, params: dict) -> None:
        spec = self._build(result, params)
        self._show(spec)
        self.data, self.params = result, params
        summary = self._summary(result, params)
        if summary:
            self.status.text.value = summary

    def _new_view(self) -> alt.JupyterChart:
        view = alt.JupyterChart(alt.Chart(alt.Data(values=[])).mark_point(),
                                embed_options={"renderer": "svg", "actions": False})
        view.add_class("qviz-chart")
        if self.selections:  # the front end reports clicks on these through _vl_selections
            from altair.jupyter.jupyter_chart import PointSelection, Selections

            # what JupyterChart itself sets up when given an Altair chart with point selections
            view.selections = Selections({n: PointSelection(name=n, value=[], store=[]) for n in self.selections})
            view._selection_types = {name: "point" for name in self.selections}
            view._vl_selections = {name: {"value": None, "store": []} for name in self.selections}
            view.observe(self._selection_changed, names="_vl_selections")
        return view

    def _selection_changed(self, change) -> None:
        for name, state in (change["new"] or {}).items():
            if state and state.get("value") not in (None, [], {}) and state != (change["old"] or {}).get(name):
                try:
                    self._selected(name, state["value"])
                except Exception as e:  # shown inside the widget, which keeps working
                    self.status.show_error(e)

    def _selected(self, name: str, value) -> None:
        """A click on the chart selected `value` in selection `name` (explorers with selections override)."""

    def _show(self, spec: dict) -> None:
        """Send `spec` to the front end: only its changed datasets and params when the chart's structure is
        the one on screen (the browser redraws without compiling a chart), else a new chart.

        A new structure gets a new JupyterChart widget rather than a new spec for the old one: the
        widget's front end keeps listening to data and param updates with every chart it ever drew,
        and those old charts would fail on names they do not have.
        """
        shape = _charts.structure(spec)
        texts = {p["name"]: p["value"] for p in spec.get("params", [])}
        if self.spec is not None and shape == self._shape:
            old = self.spec["datasets"]
            updates = [{"namespace": "data", "name": name, "scope": [], "value": rows}
                       for name, rows in spec["datasets"].items() if rows != old.get(name)]
            with self.view.hold_sync():
                if updates:
                    self.view._py_to_js_updates = updates
                self.view._params = texts
            # A view made later (Voila renders the page after the notebook ran, a reload, saved widget state)
            # draws `spec` and never sees the updates before it: the kernel's copy of `spec` must be current.
            # Stored without a change event, so the views on screen keep their cheap updates (a new `spec`
            # would recompile the chart in every one of them).
            self.view._trait_values["spec"] = spec
        else:
            view = self._new_view()
            with view.hold_sync():
                view._params = texts
                view.spec = spec  # JupyterChart's `chart` trait would re-validate a whole chart
            old_view, self.view = self.view, view
            self.children = tuple(view if child is old_view else child for child in self.children)
            self._retire(old_view)
        self.spec, self._shape = spec, shape

    def _retire(self, view: W.Widget) -> None:
        """Close a replaced view once the front end is surely done with it.

        Closing it at once races the front end: a box still creating the views of children it was just
        sent ("computing…" is replaced milliseconds after display when the first result is quick) fails
        with "Could not add child view to box" when one of them is gone.
        """
        now = time.monotonic()
        self._retired.append((now, view))
        while self._retired and now - self._retired[0][0] > RETIRE_AFTER_S:
            self._retired.pop(0)[1].close()

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until the explorer has shown the result of its latest control change."""
        return self.runner.wait(timeout)

    def close(self) -> None:
        if hasattr(self, "runner"):  # __del__ also calls close on an explorer whose __init__ failed
            self.runner.close()
            self.view.close()
            for _, view in self._retired:
                view.close()
            self._retired.clear()
        super().close()

    # ------------------------------------------------------------ export

    @property
    def chart(self) -> alt.TopLevelMixin | None:
        """The chart on screen as an Altair chart (to compose or restyle with Altair)."""
        return None if self.spec is None else _charts.as_altair(self.spec)

    def figure_spec(self) -> dict:
        """The current view with the settings in its title, as one Vega-Lite spec (what `save` renders)."""
        if self.data is None:
            raise ValueError("nothing to show yet: the explorer has not finished its first update")
        title = f"{self.title} — " + ", ".join(f"{k}={v}" for k, v in self.params.items())
        return self._build(self.data, self.params, title)

    def save(self, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
        """Write the current view to `path`: .png, .svg, .pdf or self-contained .html (all offline)."""
        from qviz.widgets.export import save_spec

        self.wait()
        return save_spec(self.figure_spec(), path, scale=scale)

    def snapshot_html(self) -> str:
        """A static PNG of the current view for pages without widget JavaScript."""
        from qviz.widgets.export import png_bytes

        png = base64.b64encode(png_bytes(self.figure_spec(), scale=1.0)).decode("ascii")
        return (f"{_SNAPSHOT_CSS}<div class='qviz-snapshot'><img alt='{self.title}' "
                f"src='data:image/png;base64,{png}'></div>")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)
        _snapshots.promise(self)


class _Snapshots:
    """Static pictures of displayed explorers, for pages without widget JavaScript (an nbconvert report),
    delivered without making the notebook wait.

    Displaying an explorer leaves an empty placeholder output. After each cell runs (IPython's post_execute
    event) every placeholder whose explorer has its first result gets its PNG. In an interactive front end
    (the kernel was told it may ask for input: JupyterLab, Notebook 7) the next cell never waits for a
    result: the picture arrives with whichever later cell runs once it exists. Headless runs (nbconvert,
    nbclient, papermill: no input possible, nobody interacting) wait for it, up to QVIZ_SNAPSHOT_TIMEOUT
    seconds, so a report always carries its pictures.
    """

    def __init__(self):
        self._pending: list[tuple[weakref.ref, object]] = []
        self._hooked = False

    def promise(self, explorer: Explorer) -> None:
        from IPython import get_ipython
        from IPython.display import display

        shell = get_ipython()
        if shell is None:  # a plain Python shell: no outputs to fill later
            return
        handle = display({"text/html": ""}, raw=True, display_id=True)
        self._pending.append((weakref.ref(explorer), handle))
        if not self._hooked:
            shell.events.register("post_execute", self.deliver)
            self._hooked = True

    def deliver(self) -> None:
        waiting = not _interactive()
        # interactive: a quarter second lets a quick explorer (a staircase) picture itself in its own cell
        timeout = float(os.environ.get("QVIZ_SNAPSHOT_TIMEOUT" if waiting else "QVIZ_SNAPSHOT_GRACE",
                                       "300" if waiting else "0.25"))
        still = []
        for ref, handle in self._pending:
            explorer = ref()
            if explorer is None or getattr(explorer.runner, "_closed", False):
                continue
            ready = explorer.wait(timeout)
            timeout = 0.0 if not waiting else timeout  # one grace period per cell, not one per explorer
            if not (ready and explorer.data is not None):
                if not waiting:
                    still.append((ref, handle))
                continue
            try:
                handle.update({"text/html": explorer.snapshot_html()}, raw=True)
            except Exception as e:  # a picture that cannot be drawn leaves the placeholder; say why there
                explorer.status.show_error(e)
        self._pending = still


def _interactive() -> bool:
    """Does a person's front end run this cell? Interactive front ends let the kernel ask for input;
    nbconvert, nbclient, papermill and Voila's executor do not."""
    from IPython import get_ipython

    kernel = getattr(get_ipython(), "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", False))


_snapshots = _Snapshots()
