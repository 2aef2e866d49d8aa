"""ModelAnalysis on the cases where a number could silently depend on something else: the user's model
changing after the analysis was made, the order settings were tried in, keyword inputs, layer kinds whose
work is not output elements x fan-in."""

from __future__ import annotations

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
