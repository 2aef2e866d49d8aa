"""The explorers under careless use: bad constructor arguments are refused by name, odd models and tables
are shown for what they are, the dashboard follows its model whatever is cached, and displaying an explorer
never makes the next cell wait."""

from __future__ import annotations

import time

import hostile
import numpy as np
import pytest
import torch
from torch import nn

from qviz import packed
from qviz.engine import Schedule, float_model
from qviz.engine.sweep import SweepResult
from qviz.widgets import (
    Dashboard,
    DecisionMapExplorer,
    KernelReadout,
    QuantizerExplorer,
    SweepExplorer,
    WeightExplorer,
)

TINY = Schedule(steps=30, batch_size=128)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QVIZ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("qviz.widgets.decision.float_model",
                        lambda *a, **k: float_model(*a, **{**k, "schedule": TINY}))
    return tmp_path


def _closing(make):
    def build():
        explorer = make()
        explorer.close()
        return explorer

    return build


@pytest.mark.parametrize(("make", "name"), [
    (lambda: QuantizerExplorer(scheme="nope", background=False), "scheme"),
    (lambda: QuantizerExplorer(bits=99, background=False), "bits"),
    (lambda: QuantizerExplorer(bits="3", background=False), "bits"),
    (lambda: QuantizerExplorer(scheme="binary", bits=2, background=False), "bits"),
    (lambda: WeightExplorer("model", background=False), "model"),
    (lambda: WeightExplorer(nn.ReLU(), background=False), "model"),
    (lambda: DecisionMapExplorer(width=100, background=False), "width"),
    (lambda: DecisionMapExplorer(depth=50, background=False), "depth"),
    (lambda: DecisionMapExplorer(w_bits=5, background=False), "w_bits"),
    (lambda: DecisionMapExplorer(a_bits="2", background=False), "a_bits"),
    (lambda: DecisionMapExplorer(method="adam", background=False), "method"),
    (lambda: DecisionMapExplorer(resolution=0, background=False), "resolution"),
    (lambda: DecisionMapExplorer(residual=1, background=False), "residual"),
    (lambda: DecisionMapExplorer(cache=3, background=False), "cache"),
    (lambda: KernelReadout(3, background=False), "model"),
    (lambda: SweepExplorer([{"width": 64}]), "result"),
    (lambda: SweepExplorer(SweepResult([], [])), "result"),
    (lambda: Dashboard(model="net", background=False), "model"),
])
def test_bad_explorer_arguments_are_refused_by_name(make, name, cache):
    hostile.expect_clear_error(hostile.run(_closing(make)), name)


def test_numpy_arguments_are_welcome():
    out = hostile.run(_closing(lambda: QuantizerExplorer(scheme=np.str_("affine"), bits=np.int64(3),
                                                         background=False)))
    hostile.expect_answer(out, lambda e: e.bits.value == 3 and e.data["spec"].bits == 3, "numpy bits")


# ------------------------------------------------------------------------------------------------ kernel readout


class Stem(nn.Module):
    """A ResNet-style 7x7 stem, a 1-D and a 3-D convolution and a non-square kernel."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.wide = nn.Conv2d(64, 32, (7, 3), padding=(3, 1))
        self.temporal = nn.Conv1d(32, 16, 5)
        self.volume = nn.Conv3d(4, 8, (3, 5, 2))
        self.fc = nn.Linear(16, 10)


@pytest.mark.parametrize(("layer", "shape", "kernel"), [
    ("stem", (64, 3), (7, 7)), ("wide", (32, 64), (7, 3)), ("temporal", (16, 32), (1, 5)),
    ("volume", (8, 4), (15, 2)), ("fc", (10, 16), (1, 1)),
])
def test_kernel_readout_reports_any_kernel_size_of_a_model_layer(layer, shape, kernel):
    readout = KernelReadout(Stem(), background=False)
    try:
        readout.budget.value = 0.05
        readout.source.value = layer
        want = packed.memory_report(*shape, kernel=kernel, bits=readout.bits.value, codebook_bits=32)
        out = hostile.run(lambda: (readout.data["memory"], readout.data["latency"]))
        k = shape[1] * kernel[0] * kernel[1]
        hostile.expect_answer(out, lambda v: v[0] == want and v[1] is not None and v[1]["k"] == k,
                              f"kernel readout of {layer}")
    finally:
        readout.close()


# ------------------------------------------------------------------------------------------------ sweeps


SETTINGS = [{"width": w, "w_bits": b, "depth": d} for (w, b, d) in [(64, 1, 3), (128, 2, 4), (64, 2, 3)]]


def test_sweep_explorer_says_when_no_run_matches_the_filters_and_keeps_working():
    rows = [{**s, "acc_quant": 0.5 + i / 10, "status": "ok"} for i, s in enumerate(SETTINGS)]
    explorer = SweepExplorer(SweepResult(rows, SETTINGS), background=False)
    try:
        explorer.x.value, explorer.y.value = "w_bits", "(line chart)"
        explorer.filters["width"].value, explorer.filters["depth"].value = "128", "3"
        hostile.expect_answer(hostile.run(lambda: explorer.data), lambda d: d["kind"] == "message"
                              and "No run matches width=128, depth=3" in d["text"] and not explorer.status.error.value,
                              "filters that match nothing")
        explorer.filters["depth"].value = "4"
        hostile.expect_answer(hostile.run(lambda: explorer.data), lambda d: d["kind"] == "lines", "back to a match")
    finally:
        explorer.close()


def test_sweep_explorer_shows_a_table_where_every_run_failed():
    rows = [{**s, "status": "error", "error": "RuntimeError: out of memory"} for s in SETTINGS]
    out = hostile.run(_closing(lambda: SweepExplorer(SweepResult(rows, SETTINGS), background=False)))
    hostile.expect_answer(out, lambda e: e.data["kind"] == "message" and "out of memory" in e.data["text"],
                          "a table of failed runs")


# ------------------------------------------------------------------------------------------------ dashboard


def test_the_dashboard_wires_all_explorers_to_the_decision_maps_model_when_it_is_cached(cache):
    float_model(128, 4, cache=cache, schedule=TINY)  # warm: the model is ready before anyone listens
    dashboard = Dashboard(background=True)
    try:
        assert dashboard.wait(120)
        model = dashboard.decision.float_model

        def wired(_):
            kernel_layers = [x.module for x in dashboard.kernels._model_layers]
            return (model is not None and dashboard.weights.model is model
                    and kernel_layers == [layer for layer in model.layers]
                    and dashboard.weights.data is not None and dashboard.kernels.source.options[1][1] == "layers.0")

        hostile.expect_answer(hostile.run(lambda: None), wired, "a dashboard over a cached model")
    finally:
        dashboard.close()


def test_the_dashboards_weight_explorer_trains_nothing_of_its_own(cache):
    dashboard = Dashboard(background=True)
    try:
        assert dashboard.wait(120)
        cached = sorted(p.name for p in (cache / "float").glob("*.pt"))
        hostile.expect_answer(hostile.run(lambda: cached), lambda names: len(names) == 1,
                              "one float model for the whole dashboard")
    finally:
        dashboard.close()


# ------------------------------------------------------------------------------------------------ display


def test_displaying_an_explorer_returns_while_its_model_trains_and_the_picture_follows(tmp_path):
    """In a real kernel driven as JupyterLab drives it (allow_stdin=True): the cell that shows a decision
    map over an untrained model returns at once, the next cell runs while training goes on, and once the
    explorer has its first result a later cell fills in the static picture."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", env={"QVIZ_CACHE_DIR": str(tmp_path),
                                                          "PATH": __import__("os").environ["PATH"]})
    try:
        def run(code, timeout=120):
            msg_id = kc.execute(code, allow_stdin=True)
            outputs, start = [], time.monotonic()
            while True:
                msg = kc.get_iopub_msg(timeout=timeout)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                outputs.append(msg)
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    return outputs, time.monotonic() - start

        run("import qviz")
        _, seconds = run("d = qviz.DecisionMapExplorer(width=200, depth=4, resolution=40)\nd")
        assert seconds < 10, f"the explorer cell blocked for {seconds:.1f} s"
        after, seconds = run("print('next cell', d.float_model is None)")
        text = "".join(m["content"].get("text", "") for m in after if m["msg_type"] == "stream")
        assert "next cell True" in text, "the next cell did not run while the float model was training"
        waited, _ = run("d.wait(300)", timeout=400)  # the picture comes with this cell, once the map exists
        later, _ = run("1 + 1")
        updates = [m for m in waited + later if m["msg_type"] == "update_display_data"]
        hostile.expect_answer(hostile.run(lambda: updates), lambda u: len(u) == 1 and "data:image/png;base64"
                              in u[0]["content"]["data"]["text/html"], "the snapshot delivered by a later cell")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_an_error_replaces_the_summary_of_the_last_good_result_and_a_good_layer_brings_it_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    e = WeightExplorer(model, background=False)
    try:
        assert "overall SQNR" in e.status.text.value and e.status.error.value == ""
        assert e.layer.value == "2"  # the explorer opens on the last layer
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        e.layer.value = "0"
        assert "NaN" in e.status.error.value and e.status.text.value == ""
        hostile.tally("clear_error")
        e.layer.value = "2"
        assert e.status.error.value == "" and "overall SQNR" in e.status.text.value
    finally:
        e.close()
