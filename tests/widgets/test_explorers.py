"""Every explorer, driven by setting traits (no browser): the chart data changes as the engine says."""

import json
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import qviz
from qviz import packed
from qviz.engine import FCDNN, Schedule, float_model, quantizer_levels, transfer_curve
from qviz.widgets import (
    Dashboard,
    DecisionMapExplorer,
    KernelReadout,
    QuantizerExplorer,
    WeightExplorer,
    _charts,
)
from qviz.widgets._image import POINT_COLORS
from qviz.widgets.decision import BITS


def _png_pixels(url: str) -> np.ndarray:
    """Decode the RGB PNG data URLs qviz writes (8-bit, filter 0) back to an array."""
    import base64
    import struct
    import zlib

    data = base64.b64decode(url.split(",", 1)[1])
    w, h = struct.unpack(">II", data[16:24])
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    return rows[:, 1:].reshape(h, w, 3)


def _layer_values(spec: dict, name: str) -> list:
    """The data rows of the view called `name` (Altair may suffix it: levels_0) anywhere in a spec."""
    found = []
    pattern = re.compile(re.escape(name) + r"(_\d+)?")
    datasets = spec.get("datasets", {})

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and pattern.fullmatch(node["name"]) and "data" in node:
                data = node["data"]
                found.extend(data["values"] if "values" in data else datasets[data["name"]])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return found


@pytest.fixture
def quantizer():
    e = QuantizerExplorer(background=False)
    yield e
    e.close()


def test_explorers_are_importable_from_qviz():
    assert qviz.QuantizerExplorer is QuantizerExplorer
    assert qviz.Dashboard is Dashboard
    with pytest.raises(AttributeError):
        qviz.NoSuchExplorer  # noqa: B018


def test_quantizer_bits_change_the_staircase_as_the_engine_says(quantizer):
    for bits in (2, 3, 4):
        quantizer.bits.value = bits
        spec = QuantizerExplorer.spec_for(quantizer._params())
        curve = transfer_curve(spec, -1.5, 1.5, 601)
        levels = [row["y"] for row in _layer_values(quantizer.spec, "levels")]
        assert len(levels) == 2**bits
        assert np.allclose(sorted(levels), curve["levels"], atol=1e-6)
        staircase = _layer_values(quantizer.spec, "staircase")
        assert np.allclose([r["y"] for r in staircase], curve["q"], atol=1e-5)


def test_a_view_made_after_cheap_updates_draws_the_current_chart(quantizer):
    """Data updates reach the views on screen as messages; a view made later (Voila renders its page after
    the notebook ran, a reload, saved widget state) draws the chart model's `spec`, which must be current."""
    view, first = quantizer.view, quantizer.spec
    for bits in (3, 4):
        quantizer.bits.value = bits
    assert quantizer.view is view and quantizer.spec is not first  # the cheap path: same widget, new data
    state = view.get_state()  # what a new front end receives
    assert state["spec"] == quantizer.spec
    assert len(_layer_values(state["spec"], "levels")) == 16


def test_quantizer_every_control_reaches_the_spec(quantizer):
    quantizer.scheme.value = "symmetric"
    quantizer.signed.value = False
    quantizer.narrow.value = True
    quantizer.range.value = (-0.5, 1.2)
    quantizer.ste.value = "saturated"
    spec = quantizer.data["spec"]
    assert (spec.scheme, spec.signed, spec.narrow, spec.clip, spec.ste) == ("symmetric", False, True, 1.2, "saturated")
    assert len(quantizer.data["curve"]["levels"]) == 2**quantizer.bits.value - 1  # narrow drops one
    quantizer.scheme.value = "pact"
    quantizer.ste.value = "default"
    quantizer.alpha.value = 0.7
    assert quantizer.data["spec"].alpha == 0.7 and quantizer.narrow.disabled and not quantizer.alpha.disabled
    grad = quantizer.data["curve"]["grad"]
    x = quantizer.data["curve"]["x"]
    assert np.array_equal(grad, ((x >= 0) & (x <= 0.7)).astype(np.float32))  # PACT's STE with the control's α


def test_quantizer_keeps_bits_inside_the_scheme_range(quantizer):
    quantizer.bits.value = 5
    quantizer.scheme.value = "ternary"
    assert quantizer.bits.value == 2 and quantizer.bits.disabled
    quantizer.scheme.value = "binary"
    assert quantizer.bits.value == 1
    assert len(_layer_values(quantizer.spec, "levels")) == 2


def test_stochastic_schemes_show_a_sample_and_the_expected_value(quantizer):
    quantizer.scheme.value = "stochastic"
    spec = quantizer.spec
    assert _layer_values(spec, "sample") and _layer_values(spec, "expected")
    assert not _layer_values(spec, "staircase")


def test_errors_show_inside_the_widget_and_it_keeps_working(quantizer):
    quantizer.scheme.value = "relu"
    quantizer.range.value = (-1.0, -0.5)  # a clip that is not positive
    assert "range upper end" in quantizer.status.error.value
    assert quantizer.status.error.layout.display != "none"
    quantizer.range.value = (-1.0, 0.8)
    assert quantizer.status.error.value == ""
    assert quantizer.data["spec"].clip == 0.8


@pytest.fixture(scope="module")
def bn_model():
    return float_model(32, 3, batchnorm=True, schedule=Schedule(steps=40, batch_size=256), use_cache=False)


def test_weight_explorer_controls_change_the_histograms(bn_model):
    e = WeightExplorer(bn_model, background=False)
    try:
        assert "+ BN" in e.layer.label
        layer = next(x for x in packed_layers(bn_model) if x.name == e.layer.value)
        e.bits.value = 3
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        spec = WeightExplorer.spec_for(e._params())
        expected = np.unique(quantizer_levels(w, spec).numpy().round(9))
        assert np.allclose(e.data["report"]["levels"], expected)
        assert [r["x"] for r in _layer_values(e.spec, "levels")] == pytest.approx(list(expected))
        per_layer = e.data["report"]["sqnr_db"]
        e.granularity.value = "channel"
        assert e.data["report"]["sqnr_db"] > per_layer  # per-channel fits each kernel's range
        before = e.data["report"]["edges"].copy()
        e.fold.value = True
        assert e.data["folded"] and not np.allclose(e.data["report"]["edges"], before)
        assert e.data["report"]["power_after"] is not None
        e.symmetric.value = False
        assert e.data["spec"].scheme == "affine"
        e.scheme.value = "ternary"
        e.granularity.value = "tensor"
        assert len(e.data["report"]["levels"]) == 3 and e.bits.value == 2
    finally:
        e.close()


def packed_layers(model):
    from qviz.engine import weight_layers

    return weight_layers(model)


def test_weight_explorer_reads_transposed_convolutions_per_output_channel():
    """A ConvTranspose2d holds output channels along weight axis 1 (with groups, one slot per group): its
    per-channel report and its batch-norm folding are per output channel, 6 here, not per input channel."""
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 3, groups=2), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 4.0)
    e = WeightExplorer(net, background=False)
    try:
        e.layer.value = "0"
        assert not e.fold.disabled
        e.granularity.value = "channel"
        assert e.data["report"]["sqnr_per_channel"].shape == (6,)
        e.fold.value = True
        assert e.status.error.value == "" and e.data["folded"]
        assert e.data["report"]["sqnr_per_channel"].shape == (6,)
    finally:
        e.close()


def test_weight_explorer_takes_any_module():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 5))
    e = WeightExplorer(net, background=False)
    try:
        assert [o[1] for o in e.layer.options] == ["0", "4"]
        e.layer.value = "0"
        assert not e.fold.disabled  # the conv is followed by its batch norm
        assert e.data["report"]["sqnr_per_channel"].shape == (8,)
    finally:
        e.close()
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        WeightExplorer("not a model")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import os

    path = tmp_path_factory.mktemp("qviz-cache")
    old = os.environ.get("QVIZ_CACHE_DIR")
    os.environ["QVIZ_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["QVIZ_CACHE_DIR"]
    else:
        os.environ["QVIZ_CACHE_DIR"] = old


def _small_decision(**kw):
    e = DecisionMapExplorer(background=False, resolution=40, qat_steps=20, refresh_every=10, points=200, **kw)
    return e


def test_decision_map_changes_with_width_and_bits(cache, monkeypatch):
    from qviz.engine import experiments

    monkeypatch.setattr(experiments, "FLOAT_SCHEDULE", Schedule(steps=30, batch_size=128))
    monkeypatch.setattr("qviz.widgets.decision.float_model",
                        lambda *a, **k: float_model(*a, schedule=Schedule(steps=30, batch_size=128), **k))
    e = _small_decision()
    try:
        first = e.data["quant"]["probs"].copy()
        e.width.value = 32
        assert not np.allclose(e.data["quant"]["probs"], first)
        assert e.float_model.width == 32
        e.w_bits.value = 0  # float weights, float activations: the "quantized" map is the float map
        assert np.allclose(e.data["quant"]["probs"], e.data["float"]["probs"])
        e.a_bits.value = 2
        assert e.data["a_spec"].scheme == "pact" and e.data["a_spec"].bits == 2
        e.method.value = "qat"
        assert e.data["stage"] == "QAT step 20"
        e.residual.value = True
        e.shortcut.value = True
        assert e.float_model.residual
        spec = e.spec
        assert _layer_values(spec, "float_map")[0]["url"].startswith("data:image/png;base64,")
        for panel in ("float_map", "quant_map"):  # the 200 training points are drawn into both maps
            pixels = _png_pixels(_layer_values(spec, panel)[0]["url"])
            for color in POINT_COLORS:
                assert (pixels == color).all(axis=-1).sum() >= 9  # at least one dot of each class
    finally:
        e.close()


def test_decision_map_streams_ptq_then_qat_refinements(cache, monkeypatch):
    monkeypatch.setattr("qviz.widgets.decision.float_model",
                        lambda *a, **k: float_model(*a, schedule=Schedule(steps=30, batch_size=128), **k))
    e = _small_decision()
    stages = []
    original = e._apply

    def spy(result, params):
        stages.append(result["stage"])
        original(result, params)

    e._apply = spy
    e.runner._apply = spy
    try:
        e.method.value = "qat_clr"
        assert stages[-4:] == ["PTQ preview", "PTQ", "QAT step 10", "QAT step 20"]
        # the preview shows each 2x2 block's point; the finished PTQ map is decision_map's
        stages.clear()
        previews = []
        e.runner._apply = lambda result, params: (previews.append(result), spy(result, params))
        e.method.value = "ptq"
        preview, done = previews[-2:]
        assert preview["quant"]["preview"] and "preview" not in done["quant"]
        p = preview["quant"]["probs"]
        assert np.array_equal(p[0::2], p[1::2]) and np.array_equal(p[:, 0::2], p[:, 1::2])
        assert np.array_equal(p[1::2, 1::2], done["quant"]["probs"][1::2, 1::2])
    finally:
        e.close()


def test_a_newer_change_cancels_stale_training(cache, monkeypatch):
    monkeypatch.setattr("qviz.widgets.decision.float_model",
                        lambda *a, **k: float_model(*a, schedule=Schedule(steps=30, batch_size=128), **k))
    e = DecisionMapExplorer(resolution=32, qat_steps=100_000, refresh_every=50, points=100)
    try:
        assert e.wait(60)
        e.method.value = "qat"  # a long QAT run starts in the background
        threading.Event().wait(1.0)
        e.method.value = "ptq"  # ... and this must cancel it
        assert e.wait(20), "the stale QAT run was not cancelled"
        assert e.data["stage"] == "PTQ" and e.params["method"] == "ptq"  # (the finished map, after its preview)
    finally:
        e.close()


def test_kernel_readout_bytes_follow_bits_and_latency_is_measured():
    e = KernelReadout(background=False)
    try:
        e.out_features.value, e.in_features.value, e.budget.value = 256, 512, 0.05
        e.kind.value = "lut"
        e.bits.value = 4
        mem = e.data["memory"]
        assert mem == packed.memory_report(256, 512, bits=4, codebook_bits=32)
        assert e.data["latency"]["qviz_s"] > 0 and e.data["latency"]["torch_s"] > 0
        e.bits.value = 2
        assert e.data["memory"]["packed_bytes"] == mem["packed_bytes"] // 2
        rows = _layer_values(e.spec, "memory")
        assert {r["v"] for r in rows} >= {256 * 512 * 4, e.data["memory"]["packed_bytes"]}
        e.kind.value = "binary"
        assert e.bits.value == 1 and e.data["latency"]["kind"] == "binary"
        assert "middle half of them" in e.status.text.value
    finally:
        e.close()


def test_kernel_readout_says_when_its_runs_disagree():
    """A reading whose runs disagree (a busy machine) is flagged in the chart's title and the text below,
    not shown as a clean speed-up."""
    from qviz.widgets.kernels import runs_disagree

    e = KernelReadout(background=False)
    try:
        e.out_features.value, e.in_features.value, e.budget.value = 64, 128, 0.05
        lat = dict(e.data["latency"])
        steady = {**lat, "ratio": 4.0, "ratio_low": 3.8, "ratio_high": 4.2}
        torn = {**lat, "ratio": 4.0, "ratio_low": 0.8, "ratio_high": 6.0}
        assert not runs_disagree(steady) and runs_disagree(torn)
        assert runs_disagree({**lat, "ratio_low": 0.95, "ratio_high": 1.1})  # faster in some, slower in others
        for result, flagged in ((steady, False), (torn, True)):
            data = {**e.data, "latency": result}
            assert ("disagree" in e._summary(data, e.params)) is flagged
            fig = _charts.Figure()
            title = json.dumps([e._figure(fig, data, e.params), fig.texts])
            assert ("runs disagree" in title) is flagged and "4.00x faster" in title
    finally:
        e.close()


def test_kernel_readout_picks_shapes_from_a_model():
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    e = KernelReadout(net, background=False)
    try:
        e.budget.value = 0.05
        e.source.value = "2"
        assert (e.out_features.value, e.in_features.value) == (10, 32) and e.out_features.disabled
        assert e.data["memory"]["weights"] == 320
    finally:
        e.close()


def test_kernel_readout_reads_output_channels_of_transposed_convolutions():
    """ConvTranspose2d(8, 6, 3, groups=2) holds [8, 3, 3, 3]: 6 output channels of 4 inputs x 3 x 3."""
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 6, 3, groups=2), torch.nn.Conv2d(6, 5, 3))
    e = KernelReadout(net, background=False)
    try:
        e.budget.value = 0.05
        e.source.value = "0"
        assert (e.out_features.value, e.in_features.value, e.kernel.value) == (6, 4, (3, 3))
        assert e.data["memory"]["weights"] == net[0].weight.numel()
        e.source.value = "1"
        assert (e.out_features.value, e.in_features.value) == (5, 6)
    finally:
        e.close()


def test_dashboard_shares_bits_and_the_model(cache, monkeypatch):
    monkeypatch.setattr("qviz.widgets.decision.float_model",
                        lambda *a, **k: float_model(*a, schedule=Schedule(steps=30, batch_size=128), **k))
    model = FCDNN(16, 3)
    d = Dashboard(model, background=False)
    try:
        d.kernels.budget.value = 0.05
        d.bits.value = 4
        assert d.quantizer.bits.value == 4 and d.weights.bits.value == 4 and d.decision.w_bits.value == 4
        assert d.kernels.bits.value == 4
        assert d.weights.model is model
    finally:
        d.close()
    assert BITS[0] == ("float", 0)


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf", ".html"])
def test_save_writes_every_format_offline(quantizer, tmp_path, suffix):
    path = quantizer.save(tmp_path / f"figure{suffix}")
    data = path.read_bytes()
    assert len(data) > 1000
    magic = {".png": b"\x89PNG", ".svg": b"<svg", ".pdf": b"%PDF", ".html": b"<!DOCTYPE html>"}[suffix]
    assert data.lstrip().startswith(magic) or magic in data[:300]
    if suffix == ".html":
        assert b"https://cdn" not in data  # self-contained: Vega is inlined, nothing to fetch
    with pytest.raises(ValueError, match=r"path suffix='\.gif'"):
        quantizer.save(tmp_path / "figure.gif")


def test_snapshot_is_a_static_png_for_pages_without_widget_javascript(quantizer):
    html = quantizer.snapshot_html()
    assert "data:image/png;base64," in html and "qviz-snapshot" in html


def test_every_figure_is_a_valid_vega_lite_spec(quantizer, bn_model, tmp_path):
    """The live path skips Altair's validation for speed; the specs must still be valid Vega-Lite."""
    from altair.utils.schemapi import validate_jsonschema
    from altair.vegalite.v6.schema import core

    schema = core.load_schema()
    explorers = [quantizer, WeightExplorer(bn_model, background=False), KernelReadout(background=False)]
    explorers[2].out_features.value, explorers[2].in_features.value, explorers[2].budget.value = 64, 64, 0.02
    quantizer.scheme.value = "stochastic"  # the sample + expected-value variant too
    for e in explorers:
        validate_jsonschema(e.spec, schema)
        validate_jsonschema(e.figure_spec(), schema)
        assert e.chart is not None  # and Altair can load it for composition
        # data updates without a new spec may need a larger view (longer labels): Vega must resize for them
        assert e.spec["autosize"] == {"type": "pad", "resize": True}
    for e in explorers[1:]:
        e.close()


def test_sweep_explorer_heatmap_filters_lines_and_clicks(tmp_path):
    from qviz.engine.sweep import grid, run_sweep
    from qviz.widgets import SweepExplorer

    result = run_sweep(grid(x=[1, 2, 3], y=["a", "b"], seed=[0, 1]), "echo", executor="serial", cache=tmp_path,
                       progress=False)
    for row in result.rows:  # give the echo rows a metric to plot
        row["acc_quant"] = row["x"] / 10 + (0.01 if row["y"] == "b" else 0) + row["seed"] / 100
    e = SweepExplorer(result, background=False)
    try:
        assert e.data["kind"] == "heatmap" and e.params["x"] == "x" and e.params["y"] == "y"
        cells = _layer_values(e.spec, "cells")
        assert len(cells) == 6  # 3 x 2 cells, seeds averaged
        assert {round(c["v"], 4) for c in cells} == {round(x / 10 + d + 0.005, 4) for x in (1, 2, 3) for d in (0, .01)}
        e.filters["seed"].value = "1"
        assert {round(c["v"], 4) for c in _layer_values(e.spec, "cells")} == {
            round(x / 10 + d + 0.01, 4) for x in (1, 2, 3) for d in (0, .01)}
        e.y.value = "(line chart)"
        assert e.data["kind"] == "lines" and set(e.data["series"]) == {"y=a", "y=b"}
        e.y.value = "y"
        # a click as the front end reports it: Vega's point-selection signal for cell (x=3, y='a')
        e.view._vl_selections = {"pick": {"value": {"xi": [2], "yi": [0], "vlPoint": {"or": [{"xi": 2, "yi": 0}]}},
                                          "store": []}}
        assert "nothing to draw" in e.detail.value and "x=3" in e.detail.value
        svg = e.save(tmp_path / "sweep.svg").read_text()  # the same export as every explorer
        assert svg.startswith("<svg") and "acc_quant" in svg
    finally:
        e.close()


def test_chart_updates_are_queued_behind_the_running_vega_update():
    """JupyterChart applied a data update to a Vega view still running the previous one, and Vega dropped
    it; the module qviz renders with queues them (the browser suite's quantizer test caught the drop)."""
    import altair as alt

    from qviz.widgets._base import _UPDATE_HANDLERS, enable_offline, serialize_view_updates

    enable_offline()
    esm = alt.JupyterChart._esm
    assert "qvizQueue" in esm and all(old not in esm for old, _ in _UPDATE_HANDLERS)
    assert serialize_view_updates(esm) == esm  # applying it twice changes nothing
    with pytest.warns(RuntimeWarning, match="not the one qviz knows"):
        assert serialize_view_updates("export default {}") == "export default {}"


def test_close_stops_the_worker_and_a_script_ending_mid_training_exits_cleanly(cache, monkeypatch):
    monkeypatch.setattr("qviz.widgets.decision.float_model",
                        lambda *a, **k: float_model(*a, schedule=Schedule(steps=30, batch_size=128), **k))
    e = DecisionMapExplorer(resolution=32, qat_steps=100_000, refresh_every=50, points=100)
    assert e.wait(60)
    e.method.value = "qat"
    threading.Event().wait(0.5)
    worker = e.runner._thread
    assert worker is not None and worker.is_alive()
    e.close()
    assert not worker.is_alive(), "close() left the training thread running"
    e.method.value = "ptq"  # controls of a closed explorer do nothing
    assert e.runner.idle()

    # Before the fix a script that ended while an explorer trained aborted in PyTorch's teardown.
    script = ("import qviz, time\n"
              "d = qviz.DecisionMapExplorer(width=64, depth=3, method='qat', qat_steps=100000)\n"
              "time.sleep(3)\n"
              "print('ending')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ending" in done.stdout


def test_a_replaced_view_stays_open_until_the_front_end_is_done_with_it(monkeypatch):
    # closing "computing…" the moment the first chart replaces it failed in JupyterLab with "Could not add
    # child view to box" when the box was still creating its children's views
    e = QuantizerExplorer(background=False)
    placeholder = e._retired[0][1]
    assert placeholder not in e.children and placeholder.comm is not None, "the replaced view was closed at once"
    monkeypatch.setattr("qviz.widgets._base.RETIRE_AFTER_S", 0.0)
    import ipywidgets as W
    e._retire(W.HTML())  # the next replacement closes views retired long enough ago
    assert placeholder.comm is None
    e.close()
    assert all(view.comm is None for _, view in e._retired) and e.view.comm is None


def test_a_bits_change_reuses_the_float_model_and_its_map(cache, monkeypatch):
    # the cache hands out a fresh copy on every call; reloading it made every bits change redraw the float
    # map too (a second full map per change: 2.3x the float map's time for a 256-8 instead of about 1x)
    loads, float_maps = [], []
    monkeypatch.setattr("qviz.widgets.decision.float_model", lambda *a, **k: loads.append(a) or float_model(
        *a, schedule=Schedule(steps=30, batch_size=128), **k))
    import qviz.widgets.decision as decision
    real_map = decision.decision_map
    monkeypatch.setattr(decision, "decision_map", lambda *a, **k: float_maps.append(1) or real_map(*a, **k))
    e = DecisionMapExplorer(width=32, depth=3, resolution=24, background=False)
    try:
        for bits in (1, 4, 8):
            e.w_bits.value = bits
        assert len(loads) == 1 and len(float_maps) == 1
        e.depth.value = 4  # another network: loaded once more, its own float map
        assert len(loads) == 2 and len(float_maps) == 2 and e.float_model.depth == 4
    finally:
        e.close()


def test_sweep_explorer_says_why_when_no_run_recorded_a_metric(tmp_path):
    """Every run finished but none has a number to plot (a string, or no metric column at all)."""
    from qviz.engine.sweep import SweepResult
    from qviz.widgets import SweepExplorer

    settings = [{"width": 64, "w_bits": 1}, {"width": 128, "w_bits": 2}]
    for extra in ({"acc_quant": "high"}, {}):
        e = SweepExplorer(SweepResult([{**s, **extra, "status": "ok"} for s in settings], settings), background=False)
        try:
            assert e.status.error.value == "" and e.data["kind"] == "message"
            assert "No run recorded a number" in e.data["text"]
        finally:
            e.close()
