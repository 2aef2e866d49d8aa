"""ModelExplorer on a user's digits CNN and on a Hugging Face ResNet with unlabeled data, driven through its
Python face and its controls (no browser)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import qviz
from qviz.engine import accuracy, calibrate, fit, quantize_model, sqnr_db
from qviz.engine.data import digits
from qviz.engine.quantize import UnquantizedModuleWarning


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x.reshape(-1, 1, 8, 8))))
        h = torch.max_pool2d(torch.relu(self.bn2(self.conv2(h))), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


@pytest.fixture(scope="module")
def trained():
    X, y, X_test, y_test = digits(0)
    torch.manual_seed(0)
    return fit(DigitsCNN(), X, y, epochs=20, seed=0), X_test, y_test


@pytest.fixture(scope="module")
def shared(trained):
    net, X_test, y_test = trained
    e = qviz.ModelExplorer(net, (X_test, y_test), background=False)
    yield e
    e.close()


@pytest.fixture
def explorer(shared):
    """The module's explorer back at W8A8 with the default scheme (its caches make each test cheap)."""
    shared.scheme.value = "default"
    shared.set_all_bits(8, 8)
    shared.layer.value = "conv1"
    return shared


def test_w8a8_stays_within_three_points_of_float(explorer):
    r = explorer.report()
    assert r["float_metric"] > 0.95
    assert r["quant_metric"] >= r["float_metric"] - 0.03
    assert [row["name"] for row in r["layers"]] == ["conv1", "conv2", "fc1", "fc2"]  # network order
    assert all({"name", "params", "w_bits", "a_bits", "weight_sqnr_db", "output_sqnr_db", "sensitivity",
                "packed_bytes"} <= set(row) for row in r["layers"])
    assert r["packed_bytes"] < r["float32_bytes"] / 3
    assert r["layers"][1]["params"] == 16 * 32 * 9 + 32


def test_lowering_one_layer_to_2_bits_lowers_its_weight_sqnr_and_the_models_bytes(explorer):
    before = explorer.report()
    explorer.set_bits("fc1", 2, 8)
    after = explorer.report()
    row = {r["name"]: r for r in after["layers"]}
    old = {r["name"]: r for r in before["layers"]}
    assert row["fc1"]["weight_sqnr_db"] < old["fc1"]["weight_sqnr_db"] - 20
    assert row["fc1"]["w_bits"] == 2 and row["conv1"]["w_bits"] == 8
    assert after["packed_bytes"] < before["packed_bytes"]
    assert row["fc1"]["packed_bytes"] < old["fc1"]["packed_bytes"]
    # the view shows it too: the fc1 row of the weight SQNR panel
    shown = explorer.data["rows"][2]
    assert shown["name"] == "fc1" and shown["weight_sqnr_db"] == pytest.approx(row["fc1"]["weight_sqnr_db"])


def test_keeping_the_most_sensitive_layer_float_recovers_at_least_as_much_as_the_least(explorer):
    explorer.set_all_bits(2, None)
    layers = explorer.report()["layers"]
    ranked = sorted(layers, key=lambda r: r["sensitivity"])
    least, most = ranked[0]["name"], ranked[-1]["name"]
    explorer.set_bits(most, None, None)
    keep_most = explorer.report()["quant_metric"]
    explorer.set_all_bits(2, None)
    explorer.set_bits(least, None, None)
    keep_least = explorer.report()["quant_metric"]
    assert ranked[-1]["sensitivity"] > ranked[0]["sensitivity"]
    assert keep_most >= keep_least, (most, keep_most, least, keep_least)


def test_config_fed_to_quantize_model_reproduces_the_metric(explorer, trained):
    net, X_test, y_test = trained
    explorer.set_all_bits(4, 4)
    explorer.set_bits("conv1", None, None)
    explorer.set_bits("fc2", 8, 8)
    shown = explorer.report()["quant_metric"]
    qm = calibrate(quantize_model(net, overrides=explorer.config()), X_test, method="minmax")
    assert accuracy(qm, X_test, y_test) == pytest.approx(shown, abs=1e-9)


def test_the_controls_pick_a_layer_and_change_its_bits(explorer):
    explorer.layer.value = "conv2"
    assert explorer.layer_w.value == "global" and not explorer.keep_float.value
    explorer.layer_w.value = "3"
    assert explorer.config()["conv2"]["weights"].bits == 3
    assert explorer.data["rows"][1]["w_bits"] == 3
    explorer.keep_float.value = True
    assert explorer.config()["conv2"] == {"weights": None, "activations": None}
    assert math.isinf(explorer.data["rows"][1]["weight_sqnr_db"])
    explorer.layer.value = "fc1"  # another layer shows its own (global) settings
    assert explorer.layer_w.value == "global" and not explorer.keep_float.value
    explorer._selected("pick", {"layer": ["conv2"]})  # a click on conv2's bar
    assert explorer.layer.value == "conv2" and explorer.keep_float.value


def test_the_view_has_every_part(explorer):
    d = explorer.data
    assert d["stage"] == "done" and d["quant_metric"] is not None and d["latency"]["seconds"] > 0
    assert len(d["pareto"]["uniform"]) == 5 and len(d["pareto"]["greedy"]) == 1 + 2 * 4
    assert all(r["sensitivity"] is not None for r in d["rows"])
    drill = d["drill"]
    assert drill["staircase"]["levels"].size == 255  # 8-bit narrow symmetric: the layer's own levels
    assert drill["activations"]["range"] is not None and sum(drill["activations"]["counts"]) > 0


def test_a_layers_own_bits_that_a_new_scheme_refuses_are_named_inside_the_explorer():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)], nn.Linear(16, 3))
    e = qviz.ModelExplorer(model, (torch.randn(60, 16), torch.randint(0, 3, (60,))), background=False)
    e.set_bits("4", 8, 8)
    e.w_bits.value = "2"
    e.scheme.value = "ternary"  # the global 2 bits suit it; layer 4's own 8 do not
    assert "w_bits=8" in e.status.error.value and "layer '4' has bits of its own" in e.status.error.value
    e.set_all_bits(2, 8)
    assert e.status.error.value == "" and {r["w_scheme"] for r in e.report()["layers"]} == {"ternary"}
    e.scheme.value = "default"
    e.layer.value, e.layer_a.value = "0", "4"  # layer 0's own activation bits only: its weights are global
    e.w_bits.value = "8"
    e.scheme.value = "ternary"  # refused for the global 8 bits: no layer's own bits to blame
    assert "w_bits=8" in e.status.error.value and "bits of its own" not in e.status.error.value


def test_bad_settings_show_inside_and_the_explorer_keeps_working(explorer):
    explorer.scheme.value = "ternary"  # ternary takes 2 bits only; the global 8 is refused
    shown = explorer.status.error.value
    assert "w_bits=8" in shown and "'ternary'" in shown and "takes 2 bits" in shown
    explorer.w_bits.value = "2"
    assert explorer.status.error.value == "" and explorer.report()["layers"][0]["w_scheme"] == "ternary"
    with pytest.raises(ValueError, match="name"):
        explorer.set_bits("conv9", 4, 4)
    with pytest.raises(ValueError, match="w_bits"):
        explorer.set_bits("conv1", 7, 4)


@pytest.mark.parametrize(("data", "name"), [
    ("images", "data"), ((torch.ones(3, 64), torch.ones(4)), "y"), ((torch.full((2, 64), float("nan")),), "NaN"),
    (torch.empty(0, 64), "empty"), ((torch.ones(2, 64), torch.ones(2), 3), "data"),
])
def test_bad_data_is_refused_by_name(trained, data, name):
    with pytest.raises((TypeError, ValueError), match=name):
        qviz.ModelExplorer(trained[0], data, background=False)


def test_a_hugging_face_resnet_with_unlabeled_data_is_scored_by_output_sqnr(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       layer_type="basic", num_labels=10)
    model = transformers.ResNetForImageClassification(config).eval()
    images = {"pixel_values": torch.randn(12, 3, 32, 32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnquantizedModuleWarning)  # every parametrized module is handled
        e = qviz.ModelExplorer(model, images, background=False)
    try:
        r = e.report()
        assert r["metric_name"] == "output SQNR (dB)" and math.isinf(r["float_metric"])
        assert 20 < r["quant_metric"] < 60  # W8A8
        assert len(r["layers"]) == 7 and r["layers"][0]["name"].endswith("embedder.convolution")
        e.set_all_bits(3, 8)
        low = e.report()["quant_metric"]
        assert low < r["quant_metric"] - 10
        with torch.no_grad():
            want = sqnr_db(model(**images).logits,
                           calibrate(quantize_model(model, overrides=e.config()), [images], method="minmax")(
                               **images).logits)
        assert want == pytest.approx(low, abs=1e-6)
        e.save(tmp_path / "resnet.png")
        assert (tmp_path / "resnet.png").stat().st_size > 10_000
    finally:
        e.close()


def test_every_dataset_the_figure_sends_is_drawn(explorer):
    """A dataset no view uses is dropped by Vega-Lite, and a data update to it fails in the browser."""
    import json

    import vl_convert

    spec = explorer.spec
    compiled = vl_convert.vegalite_to_vega(spec)
    names = {d["name"] for d in (json.loads(compiled) if isinstance(compiled, str) else compiled)["data"]}
    assert set(spec["datasets"]) <= names


def test_pareto_labels_alternate_above_and_below_so_neighbours_do_not_overlap(explorer):
    from test_explorers import _layer_values

    spec = explorer.spec
    above, below = _layer_values(spec, "uniform_labels"), _layer_values(spec, "uniform_labels_below")
    uniform = sorted(explorer.data["pareto"]["uniform"], key=lambda p: p["bytes"])
    assert len(uniform) >= 3
    assert [r["label"] for r in above] == [p["label"] for p in uniform[0::2]]
    assert [r["label"] for r in below] == [p["label"] for p in uniform[1::2]]


class _Slow(nn.Module):
    """Layers that take a while each (a large model's pass on a small machine), counting their calls."""

    def __init__(self, layers: int = 12, pause: float = 0.15):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(16, 16) for _ in range(layers))
        self.pause, self.calls = pause, 0

    def forward(self, x):
        for fc in self.fcs:
            self.calls += 1
            time.sleep(self.pause)
            x = torch.relu(fc(x))
        return x


def test_a_cancelled_analysis_stops_within_a_layer_and_computes_again_afterwards():
    from qviz.engine.analysis import AnalysisCancelled, ModelAnalysis

    model = _Slow(pause=0.0)
    analysis = ModelAnalysis(model, torch.randn(8, 16))
    cancel = threading.Event()
    stop_at = 3

    copy = analysis.qmodel  # the analysis runs its copy of the model, never the user's

    def set_after(module, args):
        if copy.calls == stop_at:
            cancel.set()

    handles = [fc.register_forward_pre_hook(set_after) for fc in copy.fcs]
    with analysis.cancellable(cancel), pytest.raises(AnalysisCancelled):
        analysis.float_pass()
    assert copy.calls == stop_at + 1 and model.calls == 0  # stopped as the next layer began
    for h in handles:
        h.remove()
    analysis.float_pass()  # without the event: the whole pass, and right numbers
    with torch.no_grad():
        assert torch.equal(analysis._float_outputs, model(analysis.X))
    assert math.isfinite(analysis.report(analysis.uniform_config(4, 8))["quant_metric"])


def test_closing_an_explorer_stops_a_large_models_pass_at_once():
    """A pass of 12 slow layers takes ~2 s a sample batch; close() must not wait for it to end."""
    explorer = qviz.ModelExplorer(_Slow(), torch.randn(8, 16))
    time.sleep(0.5)  # inside the float pass
    started = time.monotonic()
    assert explorer.runner.close(timeout=5.0)
    assert time.monotonic() - started < 1.0


def test_a_script_that_ends_while_an_explorer_computes_exits_at_once(tmp_path):
    """At exit qviz stops every explorer's worker (one still inside PyTorch when the interpreter tears down
    aborts the process: "terminate called without an active exception", exit code 134). A pass through
    layers of a second each used to run on for the whole close timeout (10 s); it now stops within a layer."""
    script = tmp_path / "ends_early.py"
    script.write_text(
        "import atexit, time\n"
        "atexit.register(lambda: print('exited', time.monotonic(), flush=True))  # runs after qviz's own\n"
        "import torch\nfrom torch import nn\nimport qviz\n"
        "class Slow(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fcs = nn.ModuleList(nn.Linear(64, 64) for _ in range(30))\n"
        "    def forward(self, x):\n"
        "        for fc in self.fcs:\n"
        "            time.sleep(1.0)\n"
        "            x = torch.relu(fc(x))\n"
        "        return x\n"
        "explorer = qviz.ModelExplorer(Slow(), torch.randn(8, 64))\n"
        "time.sleep(1.5)\nprint('leaving', time.monotonic(), flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    times = dict(line.split() for line in done.stdout.splitlines() if line.split()[0] in ("leaving", "exited"))
    assert float(times["exited"]) - float(times["leaving"]) < 2.5, done.stdout


def test_the_layer_captures_fit_a_share_of_the_memory_limit(monkeypatch):
    """Each layer's inputs and outputs are kept for up to 64 samples, fewer where they would take more
    than 1/8 of the memory limit (ResNet-50 at 224 x 224: ~150 MB a sample)."""
    import qviz._timing
    from qviz.engine.analysis import CAPTURE_SAMPLES, ModelAnalysis

    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(100, 256), torch.randint(0, 10, (100,))
    one_sample = (256 + 256 + 256 + 10) * 4  # inputs and outputs of both layers, float32
    monkeypatch.setattr(qviz._timing, "memory_limit", lambda: 8 * one_sample * 5)
    small = ModelAnalysis(model, (x, y))
    small.float_pass()
    assert small._samples == 5 and all(len(out) == 5 for _, _, out in small._captured_float.values())
    monkeypatch.undo()
    full = ModelAnalysis(model, (x, y))
    full.float_pass()
    assert full._samples == CAPTURE_SAMPLES
    config = full.uniform_config(4, 4)
    assert small.evaluate(config)["metric"] == full.evaluate(config)["metric"]  # the metric uses every sample
    assert small.macs("0") == full.macs("0") == 256 * 256


def test_evaluate_runs_the_quantized_network_once_over_the_data():
    from qviz.engine.analysis import ModelAnalysis

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    for n in (20, 100):  # within the captured samples, and beyond them
        analysis = ModelAnalysis(model, (torch.randn(n, 8), torch.randint(0, 3, (n,))))
        analysis.float_pass()
        seen = []
        handle = analysis.qmodel[0].register_forward_pre_hook(lambda m, a, seen=seen: seen.append(len(a[0])))
        metric = analysis.evaluate(analysis.uniform_config(4, 8))["metric"]
        handle.remove()
        assert sum(seen) == n
        assert 0.0 <= metric <= 1.0


def test_the_summary_shows_a_small_models_latency_in_fractions_of_a_microsecond():
    from qviz.widgets.model import _micro

    assert [_micro(s) for s in (3.2e-7, 4.56e-6, 2.5e-5, 1.234e-3)] == ["0.32", "4.6", "25", "1,234"]
    explorer = qviz.ModelExplorer(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(16, 8))
    assert explorer.wait()
    summary = explorer.status.text.value
    explorer.close()
    assert "kernels ≈ " in summary and " 0 µs" not in summary


class _SlowNet(nn.Module):
    """Eight small layers behind a forward that takes 0.1 s, so a rung of the greedy path (8 sensitivities
    and 8 points) takes 1.6 s."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(*[m for _ in range(7) for m in (nn.Linear(8, 8), nn.ReLU())], nn.Linear(8, 3))

    def forward(self, x):
        time.sleep(0.1)
        return self.body(x)


def test_the_pareto_path_grows_on_screen_and_the_explorer_answers_between_forwards():
    explorer = qviz.ModelExplorer(_SlowNet(), torch.randn(16, 8))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            shown = explorer.data.get("pareto") if explorer.data else None
            if shown and len(shown["greedy"]) >= 2 and explorer.data["stage"] != "done":
                break
            time.sleep(0.02)
        else:
            pytest.fail("no part of the greedy path was shown before the chart was done")
        partial = len(explorer.data["pareto"]["greedy"])
        start = time.monotonic()
        explorer.report()  # waits for the forward under way, not for the rest of the rung
        waited = time.monotonic() - start
        assert explorer.wait(timeout=120)
        assert len(explorer.data["pareto"]["greedy"]) == 1 + 2 * 8 > partial
        assert waited < 0.8, waited
    finally:
        explorer.close()


def test_an_error_after_the_first_rows_leaves_charts_that_no_longer_say_computing():
    import json

    calls = []

    def metric(outputs, y):  # the float network scores; the quantized one does not
        calls.append(len(outputs))
        return 0.5 if len(calls) == 1 else float("nan")

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    explorer = qviz.ModelExplorer(model, (torch.randn(16, 8), torch.zeros(16)), metric=metric, background=False)
    try:
        assert "metric" in explorer.status.error.value
        assert explorer.data["stage"] == "failed" and explorer.data["rows"]  # the first rows stay on screen
        drawn = json.dumps(explorer.spec)
        assert "quantized: not computed (see the error)" in drawn and "computing" not in drawn
        explorer.set_all_bits(4, 8)  # still working: the next settings fail the same way, shown inside
        assert "metric" in explorer.status.error.value and explorer.data["stage"] == "failed"
    finally:
        explorer.close()


def test_the_explorer_takes_a_data_loader(trained):
    from torch.utils.data import DataLoader, TensorDataset

    net, X_test, y_test = trained
    explorer = qviz.ModelExplorer(net, DataLoader(TensorDataset(X_test, y_test), batch_size=64), background=False)
    try:
        report = explorer.report()
        assert report["float_metric"] > 0.95 and len(explorer.analysis.X) == min(256, len(X_test))
    finally:
        explorer.close()
