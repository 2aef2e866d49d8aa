"""qviz: interactive widgets and a PyTorch engine for exploring neural-network quantization."""

__version__ = "0.1.0"
