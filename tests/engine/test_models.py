"""FCDNN (002 §3): residual scaling, shortcut quantization, overrides, batch-norm folding."""

import pytest
import torch
from torch import nn

from qviz.engine import FCDNN, LinearBN, QuantSpec, fold_batchnorm, quantized_fcdnn, quantized_layers
from qviz.engine.layers import WeightQuantizer


def _linear_bn(in_features, out_features, spec=None, fold="corrected"):
    layer = LinearBN(in_features, out_features, fold=fold)
    layer.wq.configure(spec)
    return layer


def test_depth_counts_linear_layers_like_002_appendix_a():
    def params(m):
        return sum(p.numel() for p in m.parameters())
    assert len(FCDNN(200, 4).layers) == 4
    assert round(params(FCDNN(200, 4)), -3) == 81_000  # "The 200-4 FCDNN ... contain 81K"
    assert round(params(FCDNN(128, 6)), -3) == 67_000  # "128-6 ... 66K" (66.8K with biases)


def test_residual_connections_add_and_halve():
    torch.manual_seed(0)
    m = FCDNN(8, 4, residual=True).eval()
    x = torch.randn(5, 2)
    states = m.hidden_states(x)
    h = x * m.input_scale
    h1 = torch.relu(m.layers[0](h))
    h2 = 0.5 * (torch.relu(m.layers[1](h1)) + h1)
    h3 = 0.5 * (torch.relu(m.layers[2](h2)) + h2)
    for got, want in zip(states, [h1, h2, h3], strict=True):
        assert torch.allclose(got, want)
    assert torch.allclose(m(x), m.layers[3](h3))


def test_quantized_shortcut_actually_quantizes_the_sum():
    torch.manual_seed(0)
    a = QuantSpec("relu", bits=2)
    plain = FCDNN(16, 4, residual=True, a_spec=a)
    qra = quantized_fcdnn(plain, None, a, quantize_shortcut=True)
    x = torch.rand(512, 2)
    plain.calibrate(x)
    qra.calibrate(x)
    for i, h in enumerate(qra.hidden_states(x)):
        assert torch.unique(h).numel() <= 4, f"hidden state {i} has more than 2^2 values"
    assert torch.unique(plain.hidden_states(x)[-1]).numel() > 4  # the unquantized sum has many values


def test_overrides_keep_first_and_last_layer_in_float():
    w = QuantSpec("ternary", bits=2)
    m = FCDNN(16, 4, w_spec=w, overrides={0: {"w_spec": None}, -1: {"w_spec": None}})
    assert [row["weights"] for row in quantized_layers(m)] == [None, w, w, None]
    assert isinstance(m.layers[0], nn.Linear) and m.layers[0].in_features == 2  # still a plain Linear
    assert torch.unique(m.layers[1].weight).numel() <= 3


def test_activation_quantizer_uses_its_moving_range_in_eval():
    m = FCDNN(16, 3, a_spec=QuantSpec("relu", bits=2)).train()
    m(torch.rand(256, 2))
    m.eval()
    h = m.hidden_states(torch.rand(64, 2))[0]
    assert torch.unique(h).numel() <= 4


@pytest.mark.parametrize("fold", ["naive", "corrected"])
def test_folded_batchnorm_equals_unfolded_in_eval_mode(fold):
    torch.manual_seed(0)
    layer = _linear_bn(6, 5, fold=fold).train()
    for _ in range(20):  # let the moving statistics move
        layer(torch.randn(64, 6) * 2 + 1)
    layer.bn.weight.data.uniform_(0.5, 1.5)
    layer.bn.bias.data.normal_()
    layer.eval()
    x = torch.randn(10, 6)
    unfolded = layer.bn(nn.functional.linear(x, layer.weight))
    assert torch.allclose(layer(x), unfolded, atol=1e-5)
    w, b = fold_batchnorm(layer.weight, layer.bn.weight, layer.bn.bias, layer.bn.running_mean,
                          layer.bn.running_var, layer.bn.eps)
    assert torch.allclose(layer(x), x @ w.T + b, atol=1e-5)


def test_corrected_folding_matches_batchnorm_in_training_until_frozen():
    """004 eqs. 24-27: with float weights the corrected graph reproduces batch norm on batch statistics."""
    torch.manual_seed(0)
    layer = _linear_bn(6, 5, fold="corrected").train()
    x = torch.randn(64, 6)
    y = layer(x)
    z = nn.functional.linear(x, layer.weight)
    want = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + layer.bn.eps)
    assert torch.allclose(y, want * layer.bn.weight + layer.bn.bias, atol=1e-5)
    layer.freeze()
    before = layer.bn.running_mean.clone()
    layer(x + 5)
    assert torch.equal(layer.bn.running_mean, before)  # frozen statistics do not move


def test_the_weight_quantizer_of_a_linear_bn_is_a_weight_quantizer():
    assert isinstance(_linear_bn(3, 2).wq, WeightQuantizer)


def _quantized_weights_over_batches(layer, batches):
    seen = []
    hook = layer.wq.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    for x in batches:
        layer(x)
    hook.remove()
    return max(float((w - seen[0]).abs().max()) for w in seen)


def test_naive_folding_makes_quantized_weights_jitter_and_corrected_does_not():
    """004 §3.2.2: folding with batch statistics makes Q(w) jump from batch to batch; the correction
    quantizes with the long-term statistics (which only drift), and freezing stops even the drift."""
    torch.manual_seed(0)
    spec = QuantSpec("symmetric", bits=4)
    warm = [torch.randn(32, 8) for _ in range(50)]
    batches = [torch.randn(32, 8) * s for s in (0.5, 1.0, 2.0, 1.5, 0.7)]
    jitter = {}
    for fold in ("naive", "corrected"):
        layer = _linear_bn(8, 4, spec, fold=fold).train()
        for x in warm:
            layer(x)
        jitter[fold] = _quantized_weights_over_batches(layer, batches)
        if fold == "corrected":
            layer.freeze()
            assert _quantized_weights_over_batches(layer, batches) == 0.0
    assert jitter["naive"] > 5 * jitter["corrected"]


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"width": 0}, ValueError, "width=0"),
    ({"depth": 1}, ValueError, "depth=1"),
    ({"width": 2.5}, TypeError, "width must be an integer"),
    ({"w_spec": "ternary"}, TypeError, "w_spec must be a QuantSpec"),
    ({"bn_fold": "magic"}, ValueError, "bn_fold='magic'"),
    ({"overrides": {9: {"w_spec": None}}}, ValueError, "overrides key=9"),
    ({"overrides": {0: {"bits": 2}}}, ValueError, "keys among 'w_spec', 'a_spec'"),
])
def test_bad_configurations_raise_clear_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        FCDNN(**kwargs)


def test_unknown_scheme_is_refused_where_it_is_named():
    with pytest.raises(ValueError, match="scheme='nope'"):
        FCDNN(w_spec=QuantSpec("nope"))


def test_inference_quantizes_weights_once_and_notices_changes():
    torch.manual_seed(0)
    m = FCDNN(8, 3, w_spec=QuantSpec("symmetric", bits=3)).eval()
    x = torch.rand(4, 2)
    with torch.inference_mode():
        first = m(x)
        assert torch.equal(m(x), first)
    with torch.no_grad():
        # the float shadow weights behind the quantized ones; an in-place change bumps their version, and the
        # cache must not hide it
        m.layers[1].parametrizations.weight.original.mul_(2.0)
    with torch.inference_mode():
        assert not torch.equal(m(x), first)
    bn = FCDNN(8, 3, w_spec=QuantSpec("symmetric", bits=3), batchnorm=True).eval()
    with torch.inference_mode():
        assert bn(x).shape == (4, 2)  # folded weights are computed tensors: quantized afresh, never cached


def test_the_inference_cache_notices_weights_written_through_data_and_a_cast():
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from qviz.engine import calibrate, quantize_model

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    qm = calibrate(quantize_model(model, 8, 8), [x])  # calibration's eval forwards fill the cache
    with torch.no_grad():
        assert qm(x).abs().max() > 0
        # weight averaging and vector_to_parameters write through .data: the version stays, the storage changes
        vector_to_parameters(torch.zeros_like(parameters_to_vector(qm.parameters())), qm.parameters())
        assert torch.equal(qm(x), torch.zeros(8, 4))
        for i in (0, 2):  # an EMA's copy: in place through .data, same storage, same version
            qm[i].parametrizations.weight.original.data.copy_(model[i].weight)
            qm[i].bias.data.copy_(model[i].bias)
        assert torch.equal(qm(x), calibrate(quantize_model(model, 8, 8), [x])(x))
    qm = calibrate(quantize_model(model, 8, 8), [x]).double()  # Module._apply casts through .data too
    with torch.no_grad():
        y = qm(x.double())
    assert y.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(y, model.double()(x.double()), rtol=0.05, atol=0.05)


def test_a_write_into_the_weight_read_in_inference_does_not_stay_in_the_cache():
    """In eval under no_grad a layer's weight attribute is the cached quantized tensor: pruning it in place
    (w[w.abs() < t] = 0) changed only those forwards, not grad-enabled ones nor the baked model. Like every
    write to a parametrized weight, it now reaches no forward."""
    from qviz.engine import dequantize_model, quantize_model

    torch.manual_seed(0)
    x = torch.randn(5, 16)
    qm = quantize_model(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), 8, None).eval()
    with torch.no_grad():
        before = qm(x)
        w = qm[0].weight
        w[w.abs() < 0.1] = 0
        assert torch.equal(qm(x), before)
        assert int((qm[0].weight == 0).sum()) == int((dequantize_model(qm, bake=True)[0].weight == 0).sum())
    assert torch.equal(qm(x).detach(), before)


def test_pact_replaces_the_relu_before_it_with_the_same_values_and_gradients():
    """002 §2.2: PACT's clip(x, 0, α) is the activation function; a ReLU before it would run twice."""
    from qviz.engine.layers import ActivationPoint

    point = ActivationPoint()
    point.configure(QuantSpec("pact", bits=3))
    point.quantizer.alpha.data.fill_(1.5)
    assert point.quantizer.clips_at_zero
    z = torch.randn(512, 16) * 2
    z[z.abs() < 1e-3] = 0.5  # (the two differ only where z == 0 exactly)
    a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    out = point.after_relu(a)
    ref = point.quantizer(torch.relu(b))
    assert torch.equal(out, ref)
    weights = torch.randn(512, 16)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)
    # while calibration passes float activations through, the ReLU must stay
    point.quantizer.start_calibration("mse")
    assert not point.quantizer.clips_at_zero
    assert bool((point.after_relu(z) >= 0).all())
    point.quantizer.finish_calibration()
    point.configure(QuantSpec("relu", bits=3))
    assert not point.quantizer.clips_at_zero
