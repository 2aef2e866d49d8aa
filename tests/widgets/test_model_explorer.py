"""ModelExplorer on a user's digits CNN and on a Hugging Face ResNet with unlabeled data, driven through its
Python face and its controls (no browser)."""

from __future__ import annotations

import math
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


def test_bad_settings_show_inside_and_the_explorer_keeps_working(explorer):
    explorer.scheme.value = "ternary"  # ternary takes 2 bits only; the global 8 is refused
    assert "bits=8" in explorer.status.error.value
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
