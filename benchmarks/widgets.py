"""Python-side update latency of each explorer: control change -> new chart handed to the front end.

Median of 50 changes, run synchronously (no debounce, no worker thread) so the number is the work
itself: engine call, chart building and the JupyterChart update. Targets (DESIGN.md): staircase +
STE <= 30 ms; histogram + per-kernel SQNR of a 512x512 layer <= 50 ms; decision map of a cached model
on a 200x200 grid <= 100 ms. Run: .venv/bin/python benchmarks/widgets.py
"""

from __future__ import annotations

import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table

from qviz.engine import float_model
from qviz.widgets import DecisionMapExplorer, KernelReadout, QuantizerExplorer, WeightExplorer

CHANGES = 50


def latency(control, values) -> float:
    cycle = itertools.cycle(values)
    times = []
    for _ in range(CHANGES + 3):
        value = next(cycle)
        start = time.perf_counter()
        control.value = value
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    q = QuantizerExplorer(background=False)
    rows.append(["QuantizerExplorer", "bits 2..8", f"{latency(q.bits, [2, 3, 4, 5, 6, 7, 8]) * 1e3:.1f}",
                 "staircase + STE <= 30"])
    layer = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512))
    layer[1].running_var.uniform_(0.5, 2.0)
    w = WeightExplorer(layer, background=False)
    w.granularity.value = "channel"
    rows.append(["WeightExplorer (512x512 + BN)", "bits 2..8", f"{latency(w.bits, [2, 3, 4, 5, 6, 7, 8]) * 1e3:.1f}",
                 "histogram + per-kernel SQNR <= 50"])
    with tempfile.TemporaryDirectory() as cache:
        for width, depth in ((128, 4), (256, 8)):
            float_model(width, depth, cache=cache)  # cached before timing
            d = DecisionMapExplorer(width=width, depth=depth, resolution=200, background=False, cache=cache)
            ms = latency(d.w_bits, [1, 2, 3, 4, 6, 8]) * 1e3
            rows.append([f"DecisionMapExplorer {width}-{depth} (cached, 200x200)", "weight bits, PTQ", f"{ms:.1f}",
                         "decision map <= 100"])
    k = KernelReadout(background=False)
    k.budget.value = 0.05
    rows.append(["KernelReadout (4096x4096, 50 ms budget)", "bits 1/2/4/8",
                 f"{latency(k.bits, [1, 2, 4, 8]) * 1e3:.1f}", "(bounded by the budget)"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {CHANGES} changes\n")
    print(table(rows, ["explorer", "control", "update ms", "target ms"]))


if __name__ == "__main__":
    main()
