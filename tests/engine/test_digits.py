"""The sweeps' real data set and its models: the 8x8 digits, a LeNet-300-100-shaped MLP and small residual
CNNs with the three block types of 002 Fig. 4 (basic, pre-activation, depthwise) with QA and QRA."""

import pytest
import torch
from torch.nn.utils import parametrize

from qviz.engine import QuantSpec, accuracy, fit, quantize_model, quantized_layers
from qviz.engine.data import digits
from qviz.engine.experiments import digits_experiment, digits_model
from qviz.engine.nets import BLOCKS, MLP, ResidualBlock, SmallResNet

A2 = QuantSpec("dorefa_act", bits=2)  # 4 levels in [0, 1] (003 eq. 3-7)


def test_digits_split_is_seeded_and_scaled():
    X, y, X_test, y_test = digits(seed=0)
    assert X.shape == (1348, 64) and X_test.shape == (449, 64)  # 1,797 images, a quarter held out
    assert X.dtype == torch.float32 and 0.0 <= X.min() and X.max() <= 1.0
    assert set(y.tolist()) == set(range(10)) and set(y_test.tolist()) == set(range(10))
    again = digits(seed=0)
    assert torch.equal(again[0], X) and torch.equal(again[3], y_test)
    assert not torch.equal(digits(seed=1)[0], X)
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=0.0)


def test_mlp_has_lenet_300_100_shape():
    net = MLP()
    assert sum(p.numel() for p in net.parameters()) == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert net(torch.rand(5, 64)).shape == (5, 10)
    with pytest.raises(ValueError, match="sizes"):
        MLP((64,))


@pytest.mark.parametrize("kind", BLOCKS)
def test_residual_block_adds_its_input(kind):
    """With the body's last convolution zeroed the block passes its input through the shortcut (after the
    final ReLU in the basic block, which adds before its ReLU)."""
    torch.manual_seed(0)
    block = ResidualBlock(kind, 4).eval()
    convs = [m for m in block.body if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        convs[-1].weight.zero_()
    x = torch.randn(2, 4, 8, 8)
    expected = torch.relu(x) if kind == "basic" else x
    assert torch.allclose(block(x), expected, atol=1e-6)


@pytest.mark.parametrize("kind", BLOCKS)
def test_residual_sum_is_quantized_qra(kind):
    torch.manual_seed(0)
    x = torch.rand(2, 4, 8, 8)
    plain = ResidualBlock(kind, 4).eval()
    quantized = quantize_model(plain, QuantSpec("symmetric", bits=2), A2).eval()
    assert plain(x).unique().numel() > 50
    out = quantized(x)
    assert out.shape == x.shape and out.unique().numel() <= 4  # the shortcut sum itself is 2-bit
    conv = next(m for m in quantized.body if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.unique().numel() <= 4  # weights too


def test_small_resnet_keeps_first_and_last_layer_float():
    net = SmallResNet("depthwise", blocks=2, channels=8, w_spec=QuantSpec("symmetric", bits=2), a_spec=A2)
    assert net(torch.rand(3, 64)).shape == (3, 10)
    specs = {row["name"]: row["weights"] for row in quantized_layers(net)}
    assert specs["stem"] is None and specs["head"] is None
    assert all(spec is not None for name, spec in specs.items() if name.startswith("body."))
    with pytest.raises(ValueError, match="block"):
        SmallResNet("bottleneck")


def test_a_quantized_twin_starts_from_the_float_weights():
    torch.manual_seed(0)
    base = digits_model("cnn", "preact", blocks=1, channels=4)
    twin = quantize_model(base, QuantSpec("symmetric", bits=4), A2, overrides=base.quantization_overrides())
    assert torch.equal(twin.stem.weight, base.stem.weight)  # kept float
    conv = twin.body[0].body[1]
    assert torch.equal(conv.parametrizations.weight.original, base.body[0].body[1].weight)
    assert parametrize.is_parametrized(conv, "weight") and not parametrize.is_parametrized(base.body[0].body[1])
    assert conv.parametrizations.weight[0].spec == QuantSpec("symmetric", bits=4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", BLOCKS)
def test_each_block_type_learns_the_digits(kind):
    X, y, X_test, y_test = digits(seed=0)
    net = fit(digits_model("cnn", kind, blocks=1, channels=8), X, y, epochs=30, seed=0)
    assert accuracy(net, X_test, y_test) > 0.8  # chance is 0.1


@pytest.mark.slow
def test_digits_experiment_row(tmp_path):
    row = digits_experiment("mlp", w_bits=2, a_bits=4, epochs=2, cache=tmp_path)
    assert row["acc_float"] > 0.9 and 0.5 < row["acc_quant"] <= 1.0
    assert row["w_scheme"] == "ceil" and row["a_scheme"] == "ceil_act"  # 001's quantizers by default
    assert len(row["weight_counts"]) == 40 and row["weight_layer"] == "layers.0"
    finer = digits_experiment("mlp", w_bits=6, a_bits=4, epochs=2, cache=tmp_path)
    assert finer["sqnr_db"] > row["sqnr_db"] + 6  # Q_b has no zero level: 2 bits are coarse for small weights
