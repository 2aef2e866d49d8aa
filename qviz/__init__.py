"""qviz: interactive widgets and a PyTorch engine for exploring neural-network quantization.

`qviz.engine` (PyTorch + numpy) and `qviz.packed` (the Cython kernels) need no UI; the explorers
(`qviz.QuantizerExplorer`, `WeightExplorer`, `DecisionMapExplorer`, `KernelReadout`, `Dashboard`,
`SweepExplorer`, `ModelExplorer`) are
imported on first use so that scripts never pay for ipywidgets and Altair.
"""

__version__ = "0.1.0"

_WIDGETS = {"QuantizerExplorer", "WeightExplorer", "DecisionMapExplorer", "KernelReadout", "Dashboard",
            "SweepExplorer", "ModelExplorer"}


def __getattr__(name: str):
    if name in _WIDGETS:
        from qviz import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'qviz' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WIDGETS])
