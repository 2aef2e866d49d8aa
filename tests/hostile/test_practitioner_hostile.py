"""The practitioner's half on hostile input: quantize_model, calibrate, export_onnx, dequantize_model and
ModelAnalysis handed bad arguments, awkward models and data.

Every call either raises a ValueError/TypeError naming the argument, or returns an answer the test checks.
The user's model is never changed by any of them, failed calls included.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math

import hostile
import pytest
import torch
from torch import nn

from qviz.engine import QuantSpec, calibrate, dequantize_model, export_onnx, quantize_model, quantized_layers
from qviz.engine.analysis import ModelAnalysis


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


X = torch.randn(4, 16)
Y = torch.tensor([0, 1, 2, 1])


@dataclasses.dataclass
class _Holder:
    t: torch.Tensor


class _Itself:
    def __init__(self):
        self.me = self


_Pair = collections.namedtuple("_Pair", "a b")  # reaches a traced model as a plain tuple


@pytest.mark.parametrize(("kwargs", "names"), [
    ({"weights": 0}, ["weights", "1..16"]),
    ({"weights": -1}, ["weights"]),
    ({"weights": 32}, ["weights"]),
    ({"weights": 2**70}, ["weights"]),
    ({"weights": 3.5}, ["weights"]),
    ({"weights": "8"}, ["weights"]),
    ({"weights": True}, ["weights"]),
    ({"weights": torch.tensor(8)}, ["weights"]),
    ({"activations": 0}, ["activations"]),
    ({"activations": float("nan")}, ["activations"]),
    ({"activations": [8]}, ["activations"]),
    ({"activations": QuantSpec("affine", 8, granularity="channel", axis=1)}, ["activations", "'affine'", "per channel",
                                                                             "granularity='tensor'"]),
    ({"activations": QuantSpec("pact", 4, granularity="channel", axis=1)}, ["activations", "'pact'", "per channel"]),
    ({"overrides": {"0": {"activations": QuantSpec("relu", 4, granularity="channel", axis=1)}}},
     ["overrides['0']", "'relu'", "granularity='tensor'"]),
    ({"weights": QuantSpec("symmetric", 8, granularity="channel", axis=2)},
     ["layer '0' (Linear, weights of 2 dims) is per channel along axis=2; allowed: axis in -2..1"]),
    ({"overrides": {"2": {"weights": QuantSpec("symmetric", 8, granularity="channel", axis=-3)}}},
     ["layer '2' (Linear, weights of 2 dims) is per channel along axis=-3"]),
    ({"overrides": {"nope": 4}}, ["overrides", "nope"]),
    ({"overrides": {"": 4}}, ["overrides"]),
    ({"overrides": {"0": "x"}}, ["overrides['0']"]),
    ({"overrides": {"0": 3.5}}, ["overrides['0']"]),
    ({"overrides": {"0": {"weights": 4, "bits": 2}}}, ["overrides['0']", "bits"]),
    ({"overrides": {"0": {"activations": 0}}}, ["overrides['0']['activations']"]),
    ({"overrides": {0: 4}}, ["overrides"]),
    ({"overrides": ["0"]}, ["overrides"]),
    ({"stochastic": "yes"}, ["stochastic"]),
    ({"fold_batchnorm": 1}, ["fold_batchnorm"]),
    ({"fold_batchnorm": True}, ["fold_batchnorm", "example"]),
])
def test_quantize_model_refuses_bad_settings_by_name(kwargs, names):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    hostile.expect_clear_error(hostile.run(quantize_model, model, **kwargs), *names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("batches", "kwargs", "names"), [
    (torch.randint(0, 3, (4, 16)), {}, ["x", "floating-point"]),
    (torch.empty(0, 16), {}, ["x is empty"]),
    (torch.full((4, 16), float("nan")), {}, ["x contains NaN"]),
    (torch.full((4, 16), float("inf")), {}, ["x contains NaN"]),
    ([X, torch.cat([X[:2], torch.full((2, 16), float("nan"))])], {}, ["x contains NaN"]),
    ([], {}, ["batches is empty"]),
    (iter([]), {}, ["batches is empty"]),
    ((b for b in []), {}, ["batches is empty"]),
    (5, {}, ["batches"]),
    ("abc", {}, ["batch"]),
    ([None], {}, ["batch"]),
    (X, {"method": "bogus"}, ["method"]),
    (X, {"method": "percentile", "percentile": float("nan")}, ["percentile"]),
    (X, {"method": "percentile", "percentile": 0.0}, ["percentile"]),
    (X, {"forward": "not callable"}, ["forward"]),
])
def test_calibrate_refuses_bad_batches_by_name(batches, kwargs, names):
    qm = quantize_model(_model(), 8, 8)
    hostile.expect_clear_error(hostile.run(calibrate, qm, batches, **kwargs), *names)


def test_a_failed_calibration_leaves_a_model_that_calibrates_and_runs():
    qm = quantize_model(_model(), 8, 8)
    hostile.expect_clear_error(hostile.run(calibrate, qm, [X, torch.full((4, 16), float("inf"))]), "NaN or Inf")
    hostile.expect_answer(hostile.run(lambda: calibrate(qm, X)(X)), lambda y: bool(torch.isfinite(y).all()),
                          "a forward after calibrating again")


@pytest.mark.parametrize(("example", "path", "kwargs", "names"), [
    (X, None, {}, ["path"]),
    (X, 5, {}, ["path"]),
    (X, "FOLDER", {}, ["path", "folder"]),
    (X, "FOLDER/missing/m.onnx", {}, ["path", "folder that does not exist"]),
    (X, "FOLDER/m.onnx", {"opset": 12}, ["opset"]),
    (X, "FOLDER/m.onnx", {"opset": 24}, ["opset"]),
    (X, "FOLDER/m.onnx", {"opset": "17"}, ["opset"]),
    (None, "FOLDER/m.onnx", {}, ["example"]),
    ({}, "FOLDER/m.onnx", {}, ["example"]),
    ({1: X}, "FOLDER/m.onnx", {}, ["example"]),
    (_Holder(X), "FOLDER/m.onnx", {}, ["example", "_Holder"]),
    ((X, [_Itself(), _Holder(X)]), "FOLDER/m.onnx", {}, ["example[1]", "_Holder"]),
    ((X, _Pair(X, X)), "FOLDER/m.onnx", {}, ["example[1]", "_Pair"]),
    ({"input": X, "extra": _Holder(X)}, "FOLDER/m.onnx", {}, ["example['extra']", "_Holder"]),
    ({"input": X, "extra": {"a": [X]}}, "FOLDER/m.onnx", {}, ["example['extra']"]),
    (X.double(), "FOLDER/m.onnx", {}, ["float64", "float32"]),
    (X, "FOLDER/m.onnx", {"dynamic_axes": "sequence"}, ["dynamic_axes", '"batch", None or a dict']),
    (X, "FOLDER/m.onnx", {"dynamic_axes": True}, ["dynamic_axes", "bool"]),
    (X, "FOLDER/m.onnx", {"dynamic_axes": ["input"]}, ["dynamic_axes", "list"]),
    (X, "FOLDER/m.onnx", {"dynamic_axes": {"input_ids": [0]}}, ["dynamic_axes", "'input_ids'", "'input', 'output'"]),
    (X, "FOLDER/m.onnx", {"dynamic_axes": {"input": [2]}}, ["dynamic_axes['input']", "from -2 to 1"]),
    (X, "FOLDER/m.onnx", {"dynamic_axes": {"input": [0.0]}}, ["dynamic_axes['input']", "axis 0.0"]),
    (X, "FOLDER/m.onnx", {"dynamic_axes": {"input": {0: None, 1: ["n"]}}}, ["dynamic_axes['input'][1]", "str"]),
    (X, "FOLDER/m.onnx", {"dynamic_axes": {"output": "batch"}}, ["dynamic_axes['output']", "list of axes"]),
    (X, "FOLDER/m.onnx", {"dynamic_axes": {1: [0]}}, ["dynamic_axes", "1", "'input', 'output'"]),
])
def test_export_refuses_bad_arguments_by_name(tmp_path, example, path, kwargs, names):
    pytest.importorskip("onnx")
    qm = calibrate(quantize_model(_model(), 8, 8), X)
    if isinstance(path, str):
        path = path.replace("FOLDER", str(tmp_path))
    hostile.expect_clear_error(hostile.run(export_onnx, qm, example, path, **kwargs), *names)
    hostile.expect_answer(hostile.run(qm, X), lambda y: y.shape == (4, 3), "the model after a refused export")
    assert not qm.training


@pytest.mark.parametrize(("qmodel", "names"), [
    (quantize_model(_model(), 1, 8), ["xnor", "exportable"]),
    (quantize_model(_model(), 8, 8), ["activation range not set", "calibrate"]),
])
def test_export_refuses_what_qdq_cannot_express_by_layer(tmp_path, qmodel, names):
    pytest.importorskip("onnx")
    hostile.expect_clear_error(hostile.run(export_onnx, qmodel, X, tmp_path / "m.onnx"), *names)


@pytest.mark.parametrize(("fn", "args", "names"), [
    (dequantize_model, ("model",), ["qmodel"]),
    (dequantize_model, (nn.Linear(2, 2), {"bake": 1}), ["bake"]),
    (quantized_layers, (None,), ["qmodel"]),
    (quantize_model, (torch.jit.script(nn.Linear(2, 2)),), ["TorchScript"]),
    (quantize_model, (nn.Sequential(nn.LazyLinear(3)),), ["lazy", "overrides"]),
])
def test_other_practitioner_functions_refuse_bad_arguments_by_name(fn, args, names):
    kwargs = args[-1] if isinstance(args[-1], dict) else {}
    args = args[:-1] if kwargs else args
    hostile.expect_clear_error(hostile.run(fn, *args, **kwargs), *names)


@pytest.mark.parametrize(("data", "kwargs", "names"), [
    ("x", {}, ["data"]),
    ([X, X, X], {}, ["data"]),
    (torch.empty(0, 16), {}, ["data X is empty"]),
    (torch.full((4, 16), float("nan")), {}, ["data X", "NaN"]),
    ({}, {}, ["data X"]),
    ({"input": X, "other": X[:2]}, {}, ["data X", "samples"]),
    ((X, torch.randint(0, 3, (5,))), {}, ["data X", "y"]),
    ((X, torch.randn(4)), {}, ["data y", "metric"]),
    ((X, Y.reshape(4, 1)), {}, ["data y"]),
    ((X, [0, 1, 2, 1]), {}, ["data y"]),
    (X, {"metric": "accuracy"}, ["metric"]),
    (X, {"batch_size": 0}, ["batch_size"]),
    (X, {"batch_size": 2.5}, ["batch_size"]),
    (X, {"higher_is_better": 0}, ["higher_is_better"]),
    (iter([]), {}, ["data", "no batch"]),
    (iter([1, 2]), {}, ["data batch 0"]),
    ([(X,), (X[:, :3],)], {}, ["data's batches", "one shape"]),
    ([(X, Y), (X,)], {}, ["data's batches", "labels"]),
    ([{"input": X}, {"other": X}], {}, ["data's batches"]),
    ((X, Y), {"higher_is_better": False}, ["higher_is_better", "metric"]),
])
def test_the_analysis_refuses_bad_data_by_name(data, kwargs, names):
    hostile.expect_clear_error(hostile.run(ModelAnalysis, _model(), data, **kwargs), *names)


class _TrimsToLongest(nn.Module):
    """Output as long as the batch's longest sequence: batches of other lengths give other shapes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask):
        return self.fc(x[:, : int(mask.sum(1).max())])


def _first_rows_shorter(n: int, length: int) -> torch.Tensor:
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: 2 * n // 3, 6:] = 0
    return mask


@pytest.mark.parametrize(("model", "data", "names"), [
    (nn.Sequential(nn.LazyLinear(3)), X, ["not made yet"]),
    (nn.Sequential(nn.ReLU()), X, ["no Linear"]),
    (nn.Sequential(), X, ["no Linear"]),
    (nn.Linear(16, 1), (X, torch.zeros(4, dtype=torch.long)), ["outputs have shape", "metric"]),
    (nn.Conv1d(4, 3, 3), (torch.randn(4, 4, 10), Y), ["outputs have shape", "metric"]),
    (_model(), (X, torch.tensor([0, 1, 2, 7])), ["data y", "class"]),
    (_TrimsToLongest(), {"x": torch.randn(300, 10, 4), "mask": _first_rows_shorter(300, 10)},
     ["outputs differ in shape from batch to batch", "pad sequences"]),
])
def test_the_analysis_refuses_models_it_cannot_score_by_name(model, data, names):
    if isinstance(model, nn.Linear) and model.out_features == 1:
        model = nn.Sequential(model, nn.Flatten(0))  # a single logit per sample: outputs (N,)
    lazy = any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())
    before = {} if lazy else copy.deepcopy(model.state_dict())
    hostile.expect_clear_error(hostile.run(lambda: ModelAnalysis(model, data).float_metric), *names)
    if lazy:  # not made by running the model
        assert any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


@pytest.mark.parametrize(("call", "names"), [
    (lambda a: a.setting("nope", 8, 8), ["name", "'0', '2'"]),
    (lambda a: a.setting(["0"], 8, 8), ["name"]),
    (lambda a: a.setting("0", 0, 8), ["weights"]),
    (lambda a: a.setting("0", 8, 3.5), ["activations"]),
    (lambda a: a.setting("0", 8, 8, scheme="bogus"), ["scheme"]),
    (lambda a: next(a.pareto("x")), ["activations"]),
    (lambda a: next(a.pareto(8, scheme="bogus")), ["scheme"]),
    (lambda a: a.uniform_config(99, 8), ["weights"]),
    (lambda a: a.setting("0", 8, 8, scheme="ternary"), ["w_bits=8", "'ternary'"]),
    (lambda a: a.metric_of([("0", None)]), ["config", "dict"]),
    (lambda a: a.metric_of({"0": (8, 8)}), ["config['0']", "LayerSetting"]),
    (lambda a: a.evaluate({"nope": None}), ["'nope'"]),
    (lambda a: a.totals("W8"), ["config"]),
    (lambda a: a.report({0: None}), ["name=0"]),
    (lambda a: a.latency_estimate(None), ["config"]),
    (lambda a: a.setting("0", None, 8, scheme="bogus"), ["scheme"]),
    (lambda a: a.drilldown("0", None), ["setting must be a LayerSetting"]),
    (lambda a: a.sensitivity("0", (8, 8)), ["setting must be a LayerSetting"]),
    *[(lambda a, call=call: call(a, "fc"), ["name='fc'", "'0', '2'"]) for call in (
        lambda a, n: a.weight_sqnr(n, a.setting("0", 8, 8)), lambda a, n: a.output_sqnr(n, a.setting("0", 8, 8)),
        lambda a, n: a.sensitivity(n, a.setting("0", 8, 8)), lambda a, n: a.drilldown(n, a.setting("0", 8, 8)),
        lambda a, n: a.packed_bytes(n, a.setting("0", 8, 8)), lambda a, n: a.float32_bytes(n),
        lambda a, n: a.params(n), lambda a, n: a.macs(n), lambda a, n: a.layer_shape(n))],
])
def test_the_analysis_refuses_bad_settings_by_name(call, names):
    analysis = ModelAnalysis(_model(), (X, Y))
    hostile.expect_clear_error(hostile.run(call, analysis), *names)
    hostile.expect_answer(hostile.run(lambda: analysis.report(analysis.uniform_config(4, 8))["quant_metric"]),
                          math.isfinite, "a report after a refused setting")
