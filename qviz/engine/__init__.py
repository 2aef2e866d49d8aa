"""The qviz quantization engine: PyTorch + numpy only, usable from a script with no UI."""

from qviz.engine.metrics import compression_ratio, levels_used, quantization_error, sqnr_db, weight_power
from qviz.engine.models import fold_batchnorm
from qviz.engine.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QuantParams,
    code_range,
    minmax,
    quant_params,
)
from qviz.engine.quantizers import (
    SCHEMES,
    STES,
    QuantSpec,
    describe_schemes,
    fake_quantize,
    quantize_gradient,
    quantize_gradients_of,
    quantizer_levels,
    quantizer_thresholds,
    scheme_names,
    transfer_curve,
)

__all__ = [
    "SCHEMES",
    "STES",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "QuantParams",
    "QuantSpec",
    "code_range",
    "compression_ratio",
    "describe_schemes",
    "fake_quantize",
    "fold_batchnorm",
    "levels_used",
    "minmax",
    "quant_params",
    "quantization_error",
    "quantize_gradient",
    "quantize_gradients_of",
    "quantizer_levels",
    "quantizer_thresholds",
    "scheme_names",
    "sqnr_db",
    "transfer_curve",
    "weight_power",
]
