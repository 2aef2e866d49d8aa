"""Transposed convolutions: weights [in, out/groups, *k], output channels along axis 1.

With groups, each slot of axis 1 serves one output channel per group: per-channel quantization must
still give every output channel a scale of its own (a group with large weights must not coarsen the
codes of another), in the model, in its ONNX export and in the analysis.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qviz.engine import calibrate, export_onnx, quantize_model, sqnr_db, weight_pairs
from qviz.engine.quantize import weight_layers


def _per_output_channel(w: torch.Tensor, groups: int, bits: int) -> torch.Tensor:
    """Symmetric narrow per-channel fake quantization, written out slice by slice: output channel
    g * out/groups + j reads w[g * in/groups : (g+1) * in/groups, j]."""
    i, o = w.shape[:2]
    top = 2 ** (bits - 1) - 1
    q = torch.empty_like(w)
    for g in range(groups):
        rows = slice(g * i // groups, (g + 1) * i // groups)
        for j in range(o):
            part = w[rows, j]
            scale = part.abs().max() / top
            q[rows, j] = torch.clamp(torch.round(part / scale), -top, top) * scale
    return q


@pytest.mark.parametrize(("conv", "kernel"),
                         [(nn.ConvTranspose1d, 3), (nn.ConvTranspose2d, 3), (nn.ConvTranspose3d, 2)])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_transposed_convolution_weights_get_one_scale_per_output_channel(conv, kernel, groups):
    torch.manual_seed(groups)
    layer = conv(2 * groups, 2 * groups, kernel, groups=groups)
    with torch.no_grad():
        layer.weight[: 2] *= 1000  # the first group's weights dwarf the others'
    want = _per_output_channel(layer.weight.detach().clone(), groups, 4)
    qm = quantize_model(nn.Sequential(layer), weights=4).eval()
    ((w, q),) = weight_pairs(qm)
    torch.testing.assert_close(q, want, rtol=1e-6, atol=0)
    # the small groups keep fine codes: their error is a step of their own range, not of the first group's
    if groups > 1:
        small = w[2:]
        assert (q[2:] - small).abs().max() <= small.abs().max() / 7 / 2 * (1 + 1e-5)


def test_grouped_transposed_convolution_exports_to_onnx_with_its_per_channel_scales(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        model[2].weight[:2] *= 50
    x = torch.randn(8, 1, 6, 6)
    qm = calibrate(quantize_model(model, 4, 8), x)
    path = export_onnx(qm, x[:1], tmp_path / "transposed.onnx")
    with torch.no_grad():
        ours = qm(x).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options)
    theirs = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    assert sqnr_db(ours, theirs) > 100


def test_analysis_counts_a_grouped_transposed_convolutions_output_channels():
    from qviz.engine.analysis import LayerSetting, ModelAnalysis
    from qviz.engine.quantize import default_weight_spec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(4, 1, 5, 5)
    model(x)
    layers = {layer.name: layer for layer in weight_layers(model)}
    assert layers["1"].bn is model[2]  # the follower has out_channels = 6 features, not 6 / groups
    analysis = ModelAnalysis(model, x)  # metric None: output SQNR against the float model
    assert analysis.layer_shape("1") == (6, 2, (3, 3))  # 6 x 2 x 9 = the weight's 108 values
    spec = default_weight_spec(4, model[1])
    float_bytes = analysis.float32_bytes("1")
    packed_bytes = analysis.packed_bytes("1", LayerSetting(spec, None))
    assert 0 < packed_bytes < float_bytes
    drill = analysis.drilldown("1", LayerSetting(spec, None))
    assert drill["weights"]["sqnr_db"] > 15


def test_batch_norm_after_a_transposed_convolution_folds_per_output_channel():
    torch.manual_seed(1)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].running_var.uniform_(0.5, 4.0)
        model[1].running_mean.uniform_(-1.0, 1.0)
    (layer,) = weight_layers(model)
    bn = model[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = model[0].weight.detach()
    for c in range(6):  # output channel c = g * 3 + j reads w[2 g : 2 g + 2, j]
        g, j = divmod(c, 3)
        torch.testing.assert_close(layer.rows()[c], w[2 * g:2 * g + 2, j].reshape(-1))
        torch.testing.assert_close(layer.folded_weight()[c], scale[c].detach() * w[2 * g:2 * g + 2, j].reshape(-1))
