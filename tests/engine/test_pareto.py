"""The Pareto chart's greedy mixed-precision path: grown one forward at a time, a bounded number of
measured points per rung on deep networks, every layer lowered in the end, ties broken by each layer's
own output error."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from torch import nn

from qviz.engine.analysis import GREEDY_POINTS, ModelAnalysis, _groups


@pytest.mark.parametrize("n,most", [(0, 16), (1, 16), (5, 16), (16, 16), (17, 16), (54, 16), (161, 16), (7, 3)])
def test_groups_cover_every_layer_once_in_order_in_nearly_equal_runs(n, most):
    groups = _groups(n, most)
    covered = [i for start, stop in groups for i in range(start, stop)]
    assert covered == list(range(n))
    assert len(groups) == min(n, most)
    lengths = [stop - start for start, stop in groups]
    assert not lengths or max(lengths) - min(lengths) <= 1


def _deep(layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(12, 12), nn.ReLU())], nn.Linear(12, 3))


def test_a_deep_networks_path_measures_at_most_greedy_points_per_rung_and_ends_with_every_layer_lowered():
    model = _deep(GREEDY_POINTS + 9)
    x = torch.randn(64, 12)
    analysis = ModelAnalysis(model, x)  # scored by output SQNR
    charts = list(analysis.pareto(8))
    chart = charts[-1]
    greedy = chart["greedy"]
    assert len(analysis.layers) == GREEDY_POINTS + 10
    assert len(greedy) == 1 + 2 * GREEDY_POINTS  # all W8, then each of the rungs 4 and 2
    assert any("layers) W4" in p["label"] for p in greedy) and any("layers) W2" in p["label"] for p in greedy)
    w2 = next(p for p in chart["uniform"] if p["label"] == "W2")
    # the path's last point is the whole network at 2 bits: the uniform W2 point, measured again
    assert greedy[-1]["bytes"] == w2["bytes"] and greedy[-1]["metric"] == pytest.approx(w2["metric"])
    assert greedy[GREEDY_POINTS]["bytes"] == next(p for p in chart["uniform"] if p["label"] == "W4")["bytes"]
    assert all(a["bytes"] >= b["bytes"] for a, b in itertools.pairwise(greedy)) and greedy[0]["bytes"] > w2["bytes"]


def test_the_path_grows_one_forward_at_a_time_and_its_progress_ends_at_one():
    model = _deep(5)
    analysis = ModelAnalysis(model, torch.randn(32, 12))
    charts = list(analysis.pareto(8))
    layers = len(analysis.layers)
    assert len(charts) == 5 + 1 + 2 * (layers + layers)  # uniform widths, all W8, then per rung ranks + points
    steps = [c["progress"] for c in charts]
    assert all(a < b for a, b in itertools.pairwise(steps)) and steps[-1] == 1.0
    assert [len(c["uniform"]) for c in charts[:5]] == [1, 2, 3, 4, 5]
    assert [len(c["greedy"]) for c in charts] == sorted(len(c["greedy"]) for c in charts)


def test_a_cancelled_path_stops_at_the_next_forward():
    analysis = ModelAnalysis(_deep(5), torch.randn(32, 12))
    cancel = threading.Event()
    charts = analysis.pareto(8, cancel=cancel)
    for _ in range(8):  # into the first rung's sensitivities
        last = next(charts)
    cancel.set()
    assert list(charts) == [] and len(last["greedy"]) == 1


class _Exact(nn.Module):
    """Two layers: `noisy` with random weights, `exact` with integer weights that 4-bit narrow symmetric
    per-channel levels hold exactly (every row reaches +-7), so its own output error is nil."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.noisy = nn.Linear(8, 8)
        self.exact = nn.Linear(8, 4)
        w = torch.randint(-6, 7, (4, 8)).float()
        w[:, 0] = 7.0
        with torch.no_grad():
            self.exact.weight.copy_(w)

    def forward(self, x):
        return self.exact(torch.relu(self.noisy(x)))


def test_layers_that_cost_the_metric_nothing_are_lowered_in_order_of_their_own_output_error():
    x = torch.randn(40, 8)
    # a metric that no layer moves: every sensitivity is 0, a tie the layers' own output errors break
    analysis = ModelAnalysis(_Exact(), (x, torch.zeros(40)), metric=lambda out, y: 1.0)
    assert analysis.layers == ["noisy", "exact"]
    greedy = list(analysis.pareto(None))[-1]["greedy"]
    assert [p["label"] for p in greedy[:3]] == ["all W8", "exact W4", "noisy W4"]
