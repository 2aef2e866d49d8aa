"""Bad input raises ValueError / TypeError that names the argument and the allowed values."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qviz.engine import (
    SCHEMES,
    QuantSpec,
    compression_ratio,
    fake_quantize,
    quant_params,
    quantize_gradient,
    sqnr_db,
    transfer_curve,
)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"scheme": "nope"}, ValueError, ["scheme='nope'", "'affine'", "'ceil_act'"]),
        ({"scheme": "affine", "bits": 0}, ValueError, ["bits=0", "1..16"]),
        ({"scheme": "affine", "bits": 17}, ValueError, ["bits=17", "1..16"]),
        ({"scheme": "symmetric", "bits": 1}, ValueError, ["bits=1", "2..16"]),
        ({"scheme": "binary", "bits": 2}, ValueError, ["bits=2", "allowed: 1"]),
        ({"scheme": "ternary", "bits": 3}, ValueError, ["bits=3", "allowed: 2"]),
        ({"scheme": "affine", "bits": 2.5}, TypeError, ["bits", "integer"]),
        ({"scheme": "affine", "bits": True}, TypeError, ["bits", "integer"]),
        ({"granularity": "row"}, ValueError, ["granularity='row'", "'tensor'", "'channel'"]),
        ({"ste": "magic"}, ValueError, ["ste='magic'", "'identity'", "'clipped'", "'saturated'"]),
        ({"delta_rule": "fast"}, ValueError, ["delta_rule='fast'", "'twn'", "'exact'"]),
        ({"scheme": "binary", "bits": 1, "clip": 1.0}, ValueError, ["clip", "'affine'"]),
        ({"clip": -1.0}, ValueError, ["clip=-1", "(0, inf]"]),
        ({"clip": float("nan")}, ValueError, ["clip", "finite"]),
        ({"clip": (1.0, 0.5)}, ValueError, ["clip=(1, 0.5)", "lo < hi"]),
        ({"scheme": "relu", "clip": (0.0, 1.0)}, ValueError, ["clip", "one positive number"]),
        ({"scheme": "affine", "alpha": 1.0}, ValueError, ["alpha", "'ceil'", "'pact'"]),
        ({"scheme": "ceil", "alpha": 0.0}, ValueError, ["alpha=0", "(0, inf]"]),
        ({"scheme": "relu", "narrow": True}, ValueError, ["narrow", "'symmetric'"]),
        ({"narrow": "yes"}, TypeError, ["narrow", "True or False"]),
        ({"axis": 1.5}, TypeError, ["axis", "integer"]),
    ],
)
def test_bad_specs_name_the_argument_and_the_allowed_values(kwargs, error, words):
    with pytest.raises(error) as info:
        QuantSpec(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused_by_every_scheme(name, bad):
    lo = SCHEMES[name].bits[0] if name != "symmetric" else 2
    x = torch.randn(4, 5)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        fake_quantize(x, QuantSpec(name, bits=lo))


@pytest.mark.parametrize("name", ["affine", "symmetric", "stochastic", "xnor", "ternary", "dorefa", "ceil",
                                  "relu", "pact", "ceil_act"])
def test_empty_tensors_are_refused_where_a_range_is_needed(name):
    bits = 2 if name in ("symmetric", "ternary") else SCHEMES[name].bits[0]
    with pytest.raises(ValueError, match="empty"):
        fake_quantize(torch.empty(0, 3), QuantSpec(name, bits=bits))


@pytest.mark.parametrize("name", ["binary", "bnn_act", "dorefa_act"])
def test_empty_tensors_pass_where_no_range_is_needed(name):
    assert fake_quantize(torch.empty(0, 3), QuantSpec(name, bits=1)).shape == (0, 3)


def test_a_fixed_clip_needs_no_data():
    assert fake_quantize(torch.empty(0), QuantSpec("affine", bits=4, clip=1.0)).numel() == 0


def test_axis_out_of_range():
    with pytest.raises(ValueError) as info:
        fake_quantize(torch.randn(3, 4), QuantSpec("affine", granularity="channel", axis=2))
    assert "axis=2" in str(info.value) and "-2..1" in str(info.value)


@pytest.mark.parametrize(("x", "error", "word"), [
    (np.ones((2, 2), dtype=np.float32), TypeError, "torch.from_numpy"),
    ([1.0, 2.0], TypeError, "torch.Tensor"),
    (torch.ones(3, dtype=torch.int64), TypeError, "floating-point"),
])
def test_wrong_tensor_types(x, error, word):
    with pytest.raises(error, match=word):
        fake_quantize(x, QuantSpec())


def test_spec_must_be_a_quantspec():
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        fake_quantize(torch.ones(3), {"scheme": "affine"})


def test_alpha_only_for_schemes_that_learn_it():
    with pytest.raises(ValueError, match="alpha is not used by scheme 'affine'"):
        fake_quantize(torch.ones(3), QuantSpec(), alpha=torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"alpha must be a torch\.Tensor"):
        fake_quantize(torch.ones(3), QuantSpec("pact", bits=2), alpha=1.0)


def test_transfer_curve_arguments():
    with pytest.raises(ValueError, match="lo < hi"):
        transfer_curve(QuantSpec(), lo=1.0, hi=-1.0)
    with pytest.raises(ValueError, match="n=1"):
        transfer_curve(QuantSpec(), n=1)
    with pytest.raises(ValueError, match="lo=nan"):
        transfer_curve(QuantSpec(), lo=float("nan"))


def test_metric_arguments():
    with pytest.raises(ValueError, match="same shape"):
        sqnr_db(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        sqnr_db(np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError, match="axis=3"):
        sqnr_db(np.ones((2, 2)), np.ones((2, 2)), axis=3)
    with pytest.raises(ValueError, match="k=1"):
        compression_ratio(27, 32, 1)
    with pytest.raises(ValueError, match="reversed"):
        quant_params(1.0, -1.0, 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_gradient(torch.tensor([1.0, float("inf")]), 4)


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.one_of(st.sampled_from(list(SCHEMES)), st.text(max_size=6)),
    bits=st.one_of(st.integers(-3, 40), st.floats(allow_nan=True), st.none(), st.text(max_size=2)),
    granularity=st.one_of(st.sampled_from(["tensor", "channel"]), st.text(max_size=4)),
    axis=st.one_of(st.integers(-5, 5), st.floats()),
    clip=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                   st.tuples(st.floats(-3, 3), st.floats(-3, 3))),
    shape=st.lists(st.integers(0, 4), max_size=3),
)
def test_garbage_specs_and_tensors_raise_only_value_or_type_errors(scheme, bits, granularity, axis, clip, shape):
    try:
        spec = QuantSpec(scheme=scheme, bits=bits, granularity=granularity, axis=axis, clip=clip)
    except (TypeError, ValueError):
        return
    x = torch.randn(shape)
    try:
        q = fake_quantize(x, spec, generator=torch.Generator().manual_seed(0))
    except (TypeError, ValueError):
        return
    assert q.shape == x.shape and torch.isfinite(q).all()


def _notes(err: BaseException) -> str:
    return " ".join(getattr(err, "__notes__", []))


def test_a_nan_in_a_quantized_model_names_the_quantizer_that_met_it():
    """"x contains NaN" alone does not say where in a network of many layers the NaN arose."""
    from torch import nn

    from qviz.engine.quantize import calibrate, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    qm = quantize_model(model, 4, 4)
    X = torch.randn(32, 8)
    calibrate(qm, [X])
    bad = X.clone()
    bad[3, 2] = float("nan")
    for training in (False, True):
        qm.train(training)
        with pytest.raises(ValueError, match="x contains NaN or Inf") as info:
            qm(bad)
        assert "the input of layer '0'" in _notes(info.value)
    qm.eval()
    with torch.no_grad():  # an overflow inside the network: the layer after it meets the inf
        qm[2].parametrizations.weight.original.fill_(3e38)
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        qm(X)
    assert _notes(info.value) == "(raised by the quantizer of the input of layer '4')"
    with torch.no_grad():
        qm[2].parametrizations.weight.original[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        qm(X)
    assert "the weight of layer '2'" in _notes(info.value)


def test_attention_quantizers_name_their_input():
    from torch import nn

    from qviz.engine.quantize import calibrate, quantize_model

    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    qm = quantize_model(attention, 4, 4)
    q, kv = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    calibrate(qm, [(q, kv, kv)], forward=lambda m, b: m(*b))
    kv[1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        qm(q, kv, kv)
    assert "the key of layer '(model)'" in _notes(info.value)


def test_every_quantizer_of_a_paper_network_knows_where_it_sits():
    from qviz.engine import FCDNN, QuantSpec
    from qviz.engine.layers import ActivationQuantizer, WeightQuantizer

    model = FCDNN(8, 3, w_spec=QuantSpec("symmetric", bits=3), batchnorm=True)
    where = {n: q.where for n, q in model.named_modules() if isinstance(q, ActivationQuantizer | WeightQuantizer)}
    assert where["layers.0.wq"] == "the weight of layer 'layers.0'"  # LinearBN's folded weights
    assert where["layers.2.parametrizations.weight.0"] == "the weight of layer 'layers.2'"
    assert where["acts.0.quantizer"] == "activation point 'acts.0'"
