"""Dashboard: the four explorers in one layout, sharing the model and the weight bit width."""

from __future__ import annotations

import os
from pathlib import Path

import ipywidgets as W

from qviz.widgets import _charts
from qviz.widgets._base import enable_offline
from qviz.widgets.decision import DecisionMapExplorer
from qviz.widgets.kernels import KernelReadout
from qviz.widgets.quantizer import QuantizerExplorer
from qviz.widgets.weights import WeightExplorer


class Dashboard(W.VBox):
    """QuantizerExplorer, WeightExplorer, DecisionMapExplorer and KernelReadout stacked under one
    "weight bits" slider that drives all four. The weight explorer and the kernel readout follow the
    decision map's float model (its layers, its weights) unless a model is given.
    """

    def __init__(self, model=None, *, background: bool = True):
        enable_offline()
        self.quantizer = QuantizerExplorer(background=background)
        self.decision = DecisionMapExplorer(background=background)
        # without a model of its own the weight explorer shows the decision map's, rather than train another
        self.weights = WeightExplorer(model, background=background, train_default=model is not None)
        self.kernels = KernelReadout(model, background=background)
        self.explorers = [self.quantizer, self.weights, self.decision, self.kernels]
        self.bits = W.IntSlider(value=2, min=1, max=8, description="weight bits (all)",
                                style={"description_width": "120px"})
        self.bits.observe(self._share_bits, names="value")
        if model is None:
            self.decision.on_float_model(self.weights.set_model)
            self.decision.on_float_model(self.kernels.set_model)
        super().__init__([self.bits, *self.explorers], layout=W.Layout(grid_gap="18px"))
        self.add_class("qviz-dashboard")

    def _share_bits(self, change) -> None:
        bits = change["new"]
        for slider in (self.quantizer.bits, self.weights.bits):
            if slider.min <= bits <= slider.max:
                slider.value = bits
        if bits in [v for _, v in self.decision.w_bits.options]:
            self.decision.w_bits.value = bits
        if bits in self.kernels.bits.options:
            self.kernels.bits.value = bits

    def wait(self, timeout: float = 300.0) -> bool:
        return all(e.wait(timeout) for e in self.explorers)

    def figure_spec(self) -> dict:
        """All four views stacked, as one Vega-Lite spec."""
        fig = _charts.Figure()
        return fig.spec({"vconcat": [e._figure(fig, e.data, e.params) for e in self.explorers]}, "qviz dashboard")

    def save(self, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
        """Write all four views to `path` (.png, .svg, .pdf or self-contained .html)."""
        from qviz.widgets.export import save_spec

        self.wait()
        return save_spec(self.figure_spec(), path, scale=scale)

    def close(self) -> None:
        for e in getattr(self, "explorers", ()):  # (a dashboard whose construction failed has none)
            e.close()
        super().close()
