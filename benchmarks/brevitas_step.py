"""One QAT step of the 128-4 semicircle network in qviz and in Brevitas, against a float step.

The same network (2 -> 128 -> 128 -> 128 -> 2, ReLU), batch 1024, Adam, measured interleaved in one
process: float PyTorch; qviz with ternary weights (TWN) and 2-bit PACT activations (what the
DecisionMapExplorer trains at W2/A2); Brevitas with 2-bit narrow symmetric per-tensor weights (levels
{-s, 0, s}, s from max|w|: its ternary) and 2-bit unsigned activations with a learned scale (QuantReLU,
its PACT). Both quantize every layer's weights and every hidden activation.

Brevitas is not a qviz dependency. Install it beside qviz without touching the pinned PyTorch:
    .venv/bin/pip install --no-deps --target /tmp/brevitas brevitas==0.13.4 dependencies==2.0.1 unfoldNd
    PYTHONPATH=/tmp/brevitas .venv/bin/python benchmarks/brevitas_step.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_medians, table
from experiments import training_steps

from qviz.engine import activation_spec, float_model, quantized_fcdnn, semicircles, weight_spec
from qviz.engine.train import QAT_SCHEDULE


def brevitas_twin(base) -> nn.Module:
    import brevitas.nn as qnn

    layers = []
    for i, linear in enumerate(base.layers):
        q = qnn.QuantLinear(linear.in_features, linear.out_features, bias=True, weight_bit_width=2)
        q.load_state_dict(linear.state_dict(), strict=False)
        layers.append(q)
        if i < len(base.layers) - 1:
            layers.append(qnn.QuantReLU(bit_width=2))
    scale = base.input_scale

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*layers)

        def forward(self, x):
            return self.body(x * scale)

    return Net()


def main() -> None:
    try:
        import brevitas
    except ImportError:
        print(__doc__)
        raise SystemExit("brevitas is not installed (see above)") from None
    torch.set_num_threads(2)
    base = float_model(128, 4)
    X, y = semicircles(0)
    models = {"float": copy.deepcopy(base),
              "qviz W2/A2": quantized_fcdnn(base, weight_spec(2), activation_spec(2)).calibrate(X[:4096]),
              "brevitas W2/A2": brevitas_twin(base)}
    t = interleaved_medians(training_steps(models, X, y), rounds=200, warmup=20)
    print(f"torch {torch.__version__}, brevitas {brevitas.__version__}, {torch.get_num_threads()} threads, "
          f"batch {QAT_SCHEDULE.batch_size}, medians of 200 interleaved steps\n")
    rows = [[name, f"{seconds * 1e3:.2f}", f"{seconds / t['float']:.2f}x"] for name, seconds in t.items()]
    print(table(rows, ["step", "ms", "vs float"]))


if __name__ == "__main__":
    main()
