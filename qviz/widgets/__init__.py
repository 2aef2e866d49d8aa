"""The explorers: ipywidgets controls and offline Altair charts over the engine and kernels."""

from qviz.widgets._base import Explorer, enable_offline
from qviz.widgets.dashboard import Dashboard
from qviz.widgets.decision import DecisionMapExplorer
from qviz.widgets.kernels import KernelReadout
from qviz.widgets.model import ModelExplorer
from qviz.widgets.quantizer import QuantizerExplorer
from qviz.widgets.sweeps import SweepExplorer
from qviz.widgets.weights import WeightExplorer

__all__ = ["Dashboard", "DecisionMapExplorer", "Explorer", "KernelReadout", "ModelExplorer", "QuantizerExplorer",
           "SweepExplorer", "WeightExplorer", "enable_offline"]
