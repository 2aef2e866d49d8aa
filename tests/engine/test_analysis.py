"""ModelAnalysis on the cases where a number could silently depend on something else: the user's model
changing after the analysis was made, the order settings were tried in, keyword inputs, layer kinds whose
work is not output elements x fan-in."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from keyword_model import Features
from torch import nn

from qviz.engine.analysis import ModelAnalysis
from qviz.engine.quantize import calibrate, quantize_model


class _Counting(nn.Sequential):
    """Counts its own forwards (a copy counts its own)."""

    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_the_analysis_never_runs_the_users_model_and_reads_it_as_it_was_when_made():
    torch.manual_seed(0)
    model = _Counting(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    x = torch.randn(32, 8)
    analysis = ModelAnalysis(model, x)
    with torch.no_grad():
        expected = model(x)
        model[0].weight.mul_(10)  # the user goes on with their model (the explorer computes meanwhile)
    report = analysis.report(analysis.uniform_config(8, 8))
    assert model.calls == 1  # only the call above: the analysis ran its own copy
    assert torch.equal(analysis._float_outputs, expected) and model.training
    assert report["quant_metric"] > 30  # W8A8 output SQNR of the model as it was, not 10x weights vs old ranges


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_a_config_naming_some_layers_leaves_the_others_float_whatever_was_tried_before():
    x = torch.randn(64, 8)
    fresh = ModelAnalysis(_mlp(), x)
    used = ModelAnalysis(_mlp(), x)
    used.metric_of(used.uniform_config(1, 1))  # every layer tried at 1 bit first
    partial = {"2": fresh.setting("2", 3, 4)}
    whole = {**{n: fresh.setting(n, None, None) for n in fresh.layers}, **partial}
    assert used.metric_of(partial) == fresh.metric_of(partial) == fresh.metric_of(whole)
    assert used.evaluate(partial)["metric"] == fresh.evaluate(whole)["metric"]
    assert fresh.totals(partial)["packed_bytes"] < fresh.totals({})["packed_bytes"]


@pytest.mark.parametrize("config,error,words", [
    ([("0", None)], TypeError, ["config", "dict"]),
    ({"0": (8, 8)}, TypeError, ["config['0']", "LayerSetting"]),
    ({"nope": None}, ValueError, ["'nope'", "allowed"]),
])
def test_a_config_that_is_not_one_is_refused_by_name(config, error, words):
    analysis = ModelAnalysis(_mlp(), torch.randn(8, 8))
    with pytest.raises(error) as caught:
        analysis.metric_of(config)
    assert all(w in str(caught.value) for w in words), caught.value


class _Attention(nn.Module):
    """Self-attention with its key and value passed by name, out of order, at ranges 100x apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        key, value = 100 * x, 0.01 * x.flip(1)
        return self.head(self.attn(x, value=value, key=key, need_weights=False)[0])


def test_attention_inputs_passed_by_name_calibrate_their_own_quantizers():
    x = torch.randn(16, 6, 16)
    analysis = ModelAnalysis(_Attention(), x)
    analysis.float_pass()
    query, (k_lo, k_hi), (v_lo, v_hi) = analysis._input_ranges["attn"]
    assert query == pytest.approx((float(x.min()), float(x.max())), rel=1e-5)
    assert (k_lo, k_hi) == pytest.approx((100 * float(x.min()), 100 * float(x.max())), rel=1e-5)
    assert (v_lo, v_hi) == pytest.approx((0.01 * float(x.min()), 0.01 * float(x.max())), rel=1e-5)
    assert analysis.metric_of(analysis.uniform_config(8, 8)) > 25  # dB; 0 with key and value ranges swapped


def test_an_attentions_own_error_does_not_depend_on_what_its_output_projection_was_set_to_before():
    x = torch.randn(16, 6, 16)
    fresh, used = ModelAnalysis(_Attention(), x), ModelAnalysis(_Attention(), x)
    assert "attn.out_proj" in used.layers
    used.metric_of({"attn.out_proj": used.setting("attn.out_proj", 2, None)})
    setting = fresh.setting("attn", 4, 8)
    assert used.output_sqnr("attn", setting) == fresh.output_sqnr("attn", setting)


def test_a_loss_scored_with_higher_is_better_false_ranks_the_most_harmful_layer_most_sensitive():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(128, 8)
    with torch.no_grad():
        target = model(x)

    def mse(out, y):
        return float(((out - y) ** 2).mean())

    loss = ModelAnalysis(model, (x, target), mse, higher_is_better=False)
    sqnr = ModelAnalysis(model, x)  # the output noise each layer causes, in dB: the same order
    assert loss.sensitivity_name == "metric rise"
    at = {n: loss.setting(n, 2, None) for n in loss.layers}
    by_loss = sorted(loss.layers, key=lambda n: loss.sensitivity(n, at[n]))
    by_noise = sorted(sqnr.layers, key=lambda n: sqnr.sensitivity(n, at[n]))
    assert by_loss == by_noise and all(loss.sensitivity(n, at[n]) > 0 for n in loss.layers)
    first = min(loss.layers, key=lambda n: loss.sensitivity(n, loss.setting(n, 4, None)))
    assert first == min(sqnr.layers, key=lambda n: sqnr.sensitivity(n, sqnr.setting(n, 4, None)))
    assert list(loss.pareto(None))[-1]["greedy"][1]["label"] == f"{first} W4"  # the least harmful first


@pytest.mark.parametrize("kwargs,error", [({"higher_is_better": "no"}, TypeError),
                                          ({"higher_is_better": False}, ValueError)])
def test_higher_is_better_is_a_bool_and_false_needs_a_metric(kwargs, error):
    with pytest.raises(error, match="higher_is_better"):
        ModelAnalysis(_mlp(), torch.randn(8, 8), **kwargs)


def _flops_per_sample(layer: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    return counter.get_total_flops() // 2 // len(x)


@pytest.mark.parametrize("layer,shape", [
    (nn.Linear(12, 5), (3, 7, 12)),
    (nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), (3, 6, 9, 9)),
    (nn.Conv1d(4, 6, 5, dilation=2), (3, 4, 20)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (3, 4, 5, 5)),
    (nn.ConvTranspose1d(4, 3, 4, stride=3, output_padding=1), (3, 4, 6)),
    (nn.ConvTranspose3d(2, 4, 2, stride=2), (3, 2, 3, 3, 3)),
])
def test_multiply_accumulates_per_sample_match_torchs_own_count(layer, shape):
    x = torch.randn(shape)
    analysis = ModelAnalysis(nn.Sequential(layer), x)
    assert analysis.macs("0") == _flops_per_sample(layer, x)


class _CrossAttention(nn.Module):
    """Attention over 5 keys of width 6 and values of width 10 (kdim, vdim), passed by name."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=10, batch_first=True)

    def forward(self, x):
        key, value = torch.ones(len(x), 5, 6), torch.ones(len(x), 5, 10)
        return self.attn(x, value=value, key=key)[0]


def test_attention_counts_its_three_input_projections_and_its_output_projection():
    analysis = ModelAnalysis(_CrossAttention(), torch.randn(4, 3, 8))
    assert analysis.macs("attn") == 3 * 8 * 8 + 5 * 6 * 8 + 5 * 10 * 8  # query rows x E x E, key, value
    assert analysis.macs("attn.out_proj") == 3 * 8 * 8


def test_weights_of_9_to_16_bits_count_two_bytes_each():
    analysis = ModelAnalysis(nn.Sequential(nn.Linear(64, 10)), torch.randn(4, 64))
    for bits in (9, 12, 16):
        setting = analysis.setting("0", bits, None)
        assert analysis.packed_bytes("0", setting) == 2 * 64 * 10 + 10 * 8  # codes, a scale + zero-point a row
        assert analysis.totals({"0": setting})["packed_bytes"] == analysis.packed_bytes("0", setting)
    assert analysis.report(analysis.uniform_config(12, 8))["packed_bytes"] < 4 * 64 * 10


def test_a_batch_norm_folded_layer_shows_the_error_of_its_folded_quantized_weights():
    from qviz.engine import FCDNN

    torch.manual_seed(0)
    model = FCDNN(width=16, depth=2, batchnorm=True).eval()
    analysis = ModelAnalysis(model, torch.randn(32, 2))
    name = next(n for n in analysis.layers if analysis._kinds[n] == "LinearBN")
    two, eight = (analysis.weight_sqnr(name, analysis.setting(name, b, None)) for b in (2, 8))
    assert 0 < two < 20 < eight < 60  # was inf: the weights read from the layer are its float ones


def test_a_network_that_declares_its_activation_points_is_reproduced_by_its_config():
    from qviz.engine import MLP, calibrate, quantize_model

    torch.manual_seed(0)
    model = MLP((8, 16, 16, 3)).eval()
    x = torch.randn(64, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    analysis = ModelAnalysis(model, (x, y))
    config = {**analysis.uniform_config(8, 2), "layers.0": analysis.setting("layers.0", 4, None)}
    shown = analysis.metric_of(config)
    qm = calibrate(quantize_model(model, overrides=analysis.overrides(config)), x, method="minmax")
    inputs = {n: getattr(getattr(qm.get_submodule(n), "input_quantizer", None), "spec", None)
              for n in analysis.layers}
    assert inputs["layers.0"] is None and inputs["layers.1"].bits == inputs["layers.2"].bits == 2
    assert all(qm.get_submodule(n).quantizer.spec is None for n in ("acts.0", "acts.1"))  # the analysis's way
    with torch.no_grad():
        assert float((qm.eval()(x).argmax(1) == y).float().mean()) == shown
    assert shown < 1.0  # 2-bit inputs cost something: the check above compares quantized networks


def test_a_declared_networks_own_points_still_take_a_pattern_that_names_them():
    from qviz.engine import MLP, quantize_model

    qm = quantize_model(MLP((8, 16, 16, 3)), 8, 4, overrides={"acts.1": {"activations": 2}, "layers.2": 3})
    points = {n: m.quantizer.spec for n, m in qm.named_modules() if n in ("acts.0", "acts.1")}
    assert points["acts.0"].bits == 4 and points["acts.1"].bits == 2
    assert not any(getattr(m, "input_quantizer", None) is not None and m.input_quantizer.spec is not None
                   for m in qm.modules())  # activations at the points only


def test_a_layer_called_twice_a_forward_counts_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.fc(torch.relu(self.fc(x))))

    class PerSample(nn.Module):  # a loop over the batch: one call a sample
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return torch.stack([self.fc(row) for row in x])

    class TwoShapes(nn.Module):  # one convolution on the image and on its half-size copy
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) + self.conv(x[:, :, ::2, ::2]).mean((2, 3))

    twice = ModelAnalysis(Twice(), torch.randn(10, 6))
    assert twice.macs("fc") == 2 * 36 and twice.macs("head") == 12
    assert ModelAnalysis(PerSample(), torch.randn(10, 6)).macs("fc") == 12
    assert ModelAnalysis(TwoShapes(), torch.randn(2, 3, 8, 8)).macs("conv") == (64 + 16) * 4 * 27


def test_attention_with_key_and_value_widths_of_their_own_has_three_embed_dims_of_channels():
    from qviz import packed

    analysis = ModelAnalysis(_CrossAttention(), torch.randn(4, 3, 8))
    assert analysis.layer_shape("attn") == (24, 8, (1, 1))  # 8 x (8 + 6 + 10) weights
    codes = packed.memory_report(24, 8, bits=8, codebook_bits=0)["packed_bytes"]
    assert analysis.packed_bytes("attn", analysis.setting("attn", 8, None)) == codes + 24 * 8
    assert analysis.float32_bytes("attn") == 4 * 8 * 24


def test_the_latency_estimates_speed_up_is_the_ratio_each_kernel_measured_against_torch_in_its_own_run(
        monkeypatch):
    from qviz import packed

    ratios = {("binary", 1): 9.0, ("lowbit", 2): 3.0, ("lowbit", 4): 2.0, ("lut", 4): 1.5, ("lut", 8): 1.2}
    torch_ms = itertools.cycle([1.0, 4.0, 2.0, 8.0, 3.0])  # the host got busier and quieter between the runs
    disturbed = itertools.cycle([1.0, 0.5, 1.0])  # and one run of each three was disturbed on one side

    def measured(kind, m, k, n, *, bits, budget_s):
        torch_s = next(torch_ms) * 1e-3
        ratio = ratios[(kind, bits)] * next(disturbed)
        return {"macs": m * k * n, "torch_s": torch_s, "qviz_s": torch_s / ratio, "ratio": ratio}

    monkeypatch.setattr(packed, "measure_latency", measured)
    analysis = ModelAnalysis(_mlp(), torch.randn(16, 8))
    for w_bits, a_bits, ratio in ((8, 8, 1.2), (4, 8, 1.5), (2, 2, 3.0)):
        estimate = analysis.latency_estimate(analysis.uniform_config(w_bits, a_bits))
        assert estimate["float_seconds"] / estimate["seconds"] == pytest.approx(ratio)
    floating = analysis.latency_estimate({})
    assert floating["seconds"] == pytest.approx(floating["float_seconds"])


def test_a_data_loader_gives_the_same_numbers_as_its_tensors():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(90, 8), torch.randint(0, 3, (90,))
    config = {"2": ModelAnalysis(_mlp(), (x, y)).setting("2", 2, 4)}
    by_tensors = ModelAnalysis(_mlp(), (x, y)).metric_of(config)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    assert ModelAnalysis(_mlp(), loader).metric_of(config) == by_tensors
    unlabeled = ModelAnalysis(_mlp(), DataLoader(TensorDataset(x), batch_size=16))
    assert unlabeled.y is None and unlabeled.metric_name == "output SQNR (dB)"
    pairs = ModelAnalysis(_mlp(), [(x[:45], y[:45]), (x[45:], y[45:])])  # a list of (x, y) batches
    assert torch.equal(pairs.X, x) and torch.equal(pairs.y, y)


def test_a_long_loader_gives_its_first_samples_only_and_is_not_read_to_its_end():
    from qviz.engine.analysis import DATA_SAMPLES

    read = []

    def batches():
        for i in range(1000):
            read.append(i)
            yield torch.randn(50, 8), torch.randint(0, 3, (50,))

    analysis = ModelAnalysis(_mlp(), batches())
    assert len(analysis.X) == len(analysis.y) == DATA_SAMPLES and len(read) == -(-DATA_SAMPLES // 50)


def test_an_endless_loader_of_empty_batches_is_refused_and_one_that_runs_dry_is_read_no_further():
    from qviz.engine.analysis import EMPTY_BATCHES_MOST

    def empty_forever():
        while True:
            yield torch.randn(0, 8), torch.zeros(0, dtype=torch.long)

    with pytest.raises(ValueError, match=f"first {EMPTY_BATCHES_MOST} batches hold no samples"):
        ModelAnalysis(_mlp(), empty_forever())

    def some_then_empty_forever():
        yield torch.randn(20, 8), torch.randint(0, 3, (20,))
        yield from empty_forever()

    analysis = ModelAnalysis(_mlp(), some_then_empty_forever())
    assert len(analysis.X) == len(analysis.y) == 20


def test_dict_batches_give_their_labels_entry_as_y():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, features, scale):
            return self.fc(features * scale)

    batches = [{"features": torch.randn(10, 8), "scale": torch.ones(10, 1), "labels": torch.randint(0, 3, (10,))}
               for _ in range(3)]
    analysis = ModelAnalysis(Keyword(), batches)
    assert set(analysis.X) == {"features", "scale"} and len(analysis.y) == 30
    assert analysis.metric_name == "accuracy" and 0 <= analysis.float_metric <= 1


@pytest.mark.parametrize("data,error,words", [
    (iter([]), ValueError, ["no batch"]),
    ([(torch.randn(4, 8), torch.zeros(4, dtype=torch.long)), (torch.randn(4, 8),)], ValueError, ["labels"]),
    ([(torch.randn(4, 8),), (torch.randn(4, 5),)], ValueError, ["do not join", "one shape"]),
    ([("a", "b")], TypeError, ["data batch 0"]),
    (iter([3]), TypeError, ["data batch 0", "int"]),
])
def test_batches_that_do_not_make_one_data_set_are_refused_by_name(data, error, words):
    with pytest.raises(error) as caught:
        ModelAnalysis(_mlp(), data)
    assert all(w in str(caught.value) for w in words), caught.value


def _reproduced(analysis, model, x, config) -> float:
    """The output SQNR (dB) of quantize_model(overrides=analysis.overrides(config)), calibrated as the analysis
    is, against the float model run as the analysis runs it (PyTorch's fused attention off)."""
    from qviz.engine import calibrate, quantize_model, sqnr_db

    qm = calibrate(quantize_model(model, overrides=analysis.overrides(config)), x, method="minmax").eval()
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            want = model.eval()(**x) if isinstance(x, dict) else model.eval()(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    with torch.no_grad():
        return float(sqnr_db(want, qm(**x) if isinstance(x, dict) else qm(x)))


def test_a_config_in_any_order_or_naming_some_layers_is_reproduced_by_its_overrides():
    model, x = _Attention().eval(), torch.randn(16, 6, 16)
    analysis = ModelAnalysis(model, x)
    full = {"attn.out_proj": analysis.setting("attn.out_proj", 8, None),  # the child before its parent
            "head": analysis.setting("head", 4, 8), "attn": analysis.setting("attn", 2, 8)}
    partial = {"attn": analysis.setting("attn", 2, 8)}  # its output projection float, as the analysis reads it
    for config in (full, partial):
        assert _reproduced(analysis, model, x, config) == pytest.approx(analysis.metric_of(config), abs=1e-9)
    assert analysis.metric_of(full) != pytest.approx(analysis.metric_of(partial), abs=1e-3)


class _FastPathAttention(nn.Module):
    """Self-attention that PyTorch's fused fast path takes in eval mode (batch first, q is k is v, a mask)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x, mask):
        h = self.ln(x)
        return self.head(self.attn(h, h, h, key_padding_mask=mask)[0].mean(1))


def test_the_analysis_of_attention_does_not_depend_on_which_configs_came_first():
    model = _FastPathAttention().eval()
    mask = torch.zeros(80, 6, dtype=torch.bool)
    mask[:, -1] = torch.rand(80, generator=torch.Generator().manual_seed(0)) < 0.5
    x = {"x": torch.randn(80, 6, 16, generator=torch.Generator().manual_seed(1)), "mask": mask}
    analysis = ModelAnalysis(model, x)
    inputs_quantized = {"attn": analysis.setting("attn", None, 8), "head": analysis.setting("head", None, 2)}
    weights_only = {"attn": analysis.setting("attn", 4, None), "head": analysis.setting("head", 8, None)}
    fresh = ModelAnalysis(model, x).metric_of(weights_only)
    assert analysis.metric_of(inputs_quantized) == pytest.approx(_reproduced(analysis, model, x, inputs_quantized),
                                                                 abs=1e-9)
    assert analysis.metric_of(weights_only) == fresh  # after a config that turned the fast path off


def test_every_weight_scheme_takes_the_bit_widths_scheme_bits_gives():
    analysis = ModelAnalysis(_mlp(), torch.randn(4, 8))
    for scheme in analysis.weight_schemes():
        lo, hi = analysis.scheme_bits(scheme)
        for bits in {lo, hi, min(lo + 1, hi)}:
            assert analysis.setting("0", bits, None, scheme).weights.bits == bits
        if lo > 1:
            with pytest.raises(ValueError, match=f"w_bits={lo - 1}"):
                analysis.setting("0", lo - 1, None, scheme)
    assert analysis.scheme_bits("symmetric")[0] == 2


def test_a_model_that_is_itself_an_attention_layer_measures_it_with_its_output_projection_float():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 8)
    data = {"query": x, "key": x, "value": x}
    fresh = ModelAnalysis(nn.MultiheadAttention(8, 2, batch_first=True), data)
    used = ModelAnalysis(fresh.model, data)
    used.weight_sqnr("out_proj", used.setting("out_proj", 2, None))  # leaves out_proj at 2 bits in the copy
    setting = fresh.setting("", 8, 8)
    assert used.output_sqnr("", setting) == fresh.output_sqnr("", setting) > 30


def test_hugging_face_style_batches_are_mappings_and_an_empty_one_is_refused_by_name():
    from collections import UserDict

    class BatchEncoding(UserDict):  # what Hugging Face's data collators return
        pass

    batches = [BatchEncoding(features=torch.randn(6, 8), labels=torch.randint(0, 3, (6,))) for _ in range(2)]
    analysis = ModelAnalysis(Features(), batches)
    assert set(analysis.X) == {"features"} and len(analysis.y) == 12
    assert set(ModelAnalysis(Features(), BatchEncoding(features=torch.randn(4, 8))).X) == {"features"}
    for empty in ([({}, torch.zeros(2))], iter([{"labels": torch.zeros(2)}])):
        with pytest.raises(ValueError, match="data batch 0 has no inputs"):
            ModelAnalysis(Features(), empty)


def _relu_convs(inplace: bool) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(512, 4)).eval()


def test_a_layer_output_changed_in_place_afterwards_is_measured_as_the_layer_gave_it():
    # VGG's ReLU(inplace=True) after each conv: the captured outputs must be the convs', not the ReLUs'
    torch.manual_seed(0)
    data = (torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,)))
    rows = {}
    for inplace in (False, True):
        analysis = ModelAnalysis(_relu_convs(inplace), data)
        rows[inplace] = [(r["name"], round(r["output_sqnr_db"], 6), round(r["propagated_sqnr_db"], 6))
                         for r in analysis.report(analysis.uniform_config(8, 8))["layers"]]
    assert rows[True] == rows[False]
    assert all(out > 30 for _, out, _ in rows[True]), rows


class _KeywordClassifier(nn.Module):  # a Hugging Face-style forward: keyword inputs, and labels= it ignores
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, input_ids, labels=None):
        return self.fc(input_ids)


def test_one_labelled_dict_batch_is_scored_by_its_labels_in_every_form():
    torch.manual_seed(0)
    batch = {"input_ids": torch.randn(40, 8), "labels": torch.randint(0, 3, (40,))}
    halves = [{k: v[:20] for k, v in batch.items()}, {k: v[20:] for k, v in batch.items()}]
    scores = set()
    for data in (halves, iter([batch]), [batch], batch):
        torch.manual_seed(1)  # the same classifier each time
        analysis = ModelAnalysis(_KeywordClassifier(), data)
        assert analysis.metric_name == "accuracy" and list(analysis.X) == ["input_ids"]
        assert torch.equal(analysis.y, batch["labels"])
        scores.add(analysis.float_metric)
    assert len(scores) == 1


@pytest.mark.parametrize(("scheme", "bits", "per_group"), [
    ("dorefa", 3, 8), ("ternary", 2, 8), ("binary", 1, 8), ("ceil", 3, 4 * 8), ("symmetric", 4, 8)])
def test_packed_bytes_give_evenly_spaced_levels_a_scale_and_zero_point_and_others_a_codebook(scheme, bits,
                                                                                             per_group):
    from qviz import packed

    torch.manual_seed(0)
    analysis = ModelAnalysis(nn.Sequential(nn.Linear(64, 10)), torch.randn(4, 64))
    setting = analysis.setting("0", bits, None, scheme=scheme)
    groups = 10 if setting.weights.granularity == "channel" else 1
    code_bits = next(b for b in packed.CODE_BITS if 2**b >= setting.weights.max_levels)
    codes = packed.memory_report(10, 64, bits=code_bits, codebook_bits=0)["packed_bytes"]
    assert analysis.packed_bytes("0", setting) == codes + groups * per_group  # ceil's levels skip zero: uneven
    assert analysis.packed_bytes("0", setting) < analysis.float32_bytes("0")


class _TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False), nn.Linear(64, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_weights_two_layers_share_count_once_in_the_model_bytes():
    torch.manual_seed(0)
    model = _TiedLinears()
    analysis = ModelAnalysis(model, (torch.randn(50, 64), torch.randint(0, 3, (50,))))
    config = analysis.uniform_config(8, 8)
    totals = analysis.totals(config)
    assert totals["float32_bytes"] == 4 * (64 * 64 + 3 * 64)  # the weights stored: one shared, the head's
    assert totals["packed_bytes"] == analysis.packed_bytes("a", config["a"]) + analysis.packed_bytes("head",
                                                                                                     config["head"])
    assert analysis.report(config)["float32_bytes"] == totals["float32_bytes"]
    normed = nn.Sequential(*[nn.utils.parametrizations.weight_norm(nn.Linear(16, 16)) for _ in range(3)])
    analysis = ModelAnalysis(normed, torch.randn(8, 16))  # computed weights: three, none shared
    assert analysis.totals(analysis.uniform_config(8, 8))["float32_bytes"] == 3 * 4 * 16 * 16


def test_a_float64_models_numbers_are_quantize_models_to_the_last_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(100, 10, dtype=torch.float64)
    analysis = ModelAnalysis(model, x)
    config = analysis.uniform_config(4, 4)
    assert analysis.evaluate(config)["metric"] == _reproduced(analysis, model, x, config)


class _CentresInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 3)
        self.register_buffer("mean", torch.full((10,), 0.5))

    def forward(self, x):
        x.sub_(self.mean)  # preprocessing in place, on the tensor it is given
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_model_that_changes_its_input_in_place_leaves_the_users_data_and_every_pass_alike():
    torch.manual_seed(0)
    x, y = torch.randn(100, 10), torch.randint(0, 3, (100,))
    before = x.clone()
    analysis = ModelAnalysis(_CentresInPlace(), (x, y))
    report = analysis.report(analysis.uniform_config(8, 8))
    assert torch.equal(x, before)
    assert report["float_metric"] == analysis.metric_of({}) and report["float_metric"] > 0


class _Routed(nn.Module):
    """A mixture of two experts: each sample goes to the expert its projection's first feature picks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.e0, self.e1, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.threshold = 0.0

    def forward(self, x):
        h = self.proj(x)
        route = h[:, 0] > self.threshold
        out = torch.zeros_like(h)
        out[route] = self.e0(h[route])
        out[~route] = self.e1(h[~route])
        return self.head(out)


def test_experts_whose_samples_change_once_quantized_have_no_propagated_sqnr():
    model = _Routed().eval()
    X = torch.randn(200, 8)
    with torch.no_grad():
        model.threshold = float(model.proj(X)[:, 0].median())  # half the samples sit near the boundary
    analysis = ModelAnalysis(model, X)
    config = analysis.uniform_config(2, 2)
    qmodel = quantize_model(model, 2, 2)
    calibrate(qmodel, [X], method="minmax")
    with torch.no_grad():
        routed = int((qmodel.proj(X)[:, 0] > model.threshold).sum())
    assert routed != 100  # the quantized projection sends other samples to e0 than the float one
    propagated = analysis.evaluate(config)["propagated"]
    assert math.isnan(propagated["e0"]) and math.isnan(propagated["e1"])
    assert math.isfinite(propagated["proj"]) and math.isfinite(propagated["head"])
    report = analysis.report(config)
    assert math.isfinite(report["quant_metric"]) and len(report["layers"]) == 4


class _CodesAndValues(nn.Module):
    """A codec's output: integer codes first (all equal here), the decoded float values after them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        z = self.enc(x)
        return {"codes": torch.zeros(len(x), 4, dtype=torch.long), "values": self.dec(z)}


def test_the_output_scored_is_the_first_floating_point_one_not_integer_codes():
    model = _CodesAndValues().eval()
    X = torch.randn(64, 8)
    analysis = ModelAnalysis(model, X)
    quantized = calibrate(quantize_model(model, 4, 4), [X], method="minmax")
    with torch.no_grad():
        want, got = model(X)["values"], quantized(X)["values"]
    expected = float(10 * torch.log10(want.pow(2).mean() / (want - got).pow(2).mean()))
    assert analysis.evaluate(analysis.uniform_config(4, 4))["metric"] == pytest.approx(expected, abs=1e-3)
    assert math.isfinite(expected)
