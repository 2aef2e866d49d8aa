"""ModelAnalysis on the cases where a number could silently depend on something else: the user's model
changing after the analysis was made, the order settings were tried in, keyword inputs, layer kinds whose
work is not output elements x fan-in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qviz.engine.analysis import ModelAnalysis


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
