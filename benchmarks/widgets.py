"""Python-side update latency of each explorer: control change -> new chart handed to the front end.

Median of 50 changes, run synchronously (no debounce, no worker thread) so the number is the work
itself: engine call, chart building and the JupyterChart update. Targets (DESIGN.md): staircase +
STE <= 30 ms; histogram + per-kernel SQNR of a 512x512 layer <= 50 ms. Decision maps of a cached model on
a 200x200 grid (issue 13): first map <= 100 ms; finished map <= 1.5x decision_map of the float model
timed in the same run, and <= 50 ms for 128-4. Run: .venv/bin/python benchmarks/widgets.py
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

from qviz.engine import decision_map, float_model
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


def map_latency(width: int, depth: int, a_bits: int | None, cache: str) -> list[str]:
    """Median times from a weight-bits change to the first and to the last map applied to the explorer,
    with one float decision_map timed after each change (the floor: the finished map's work)."""
    base = float_model(width, depth, cache=cache)  # cached before timing
    d = DecisionMapExplorer(width=width, depth=depth, a_bits=a_bits, resolution=200, background=False, cache=cache)
    applied = []
    apply = d.runner._apply

    def timed_apply(result, params):
        apply(result, params)
        applied.append(time.perf_counter())

    d.runner._apply = timed_apply
    first, finished, floor = [], [], []
    for i, bits in enumerate(itertools.islice(itertools.cycle([1, 2, 3, 4, 6, 8]), CHANGES // 2 + 3)):
        applied.clear()
        start = time.perf_counter()
        d.w_bits.value = bits
        t = time.perf_counter()
        decision_map(base, resolution=200)
        if i >= 3:
            first.append(applied[0] - start)
            finished.append(applied[-1] - start)
            floor.append(time.perf_counter() - t)
    f, done, fl = (statistics.median(v) * 1e3 for v in (first, finished, floor))
    goals = "first <= 100, finished <= 1.5x float" + (", finished <= 50" if width == 128 else "")
    return [f"{width}-{depth}", f"{a_bits} bits" if a_bits else "float", f"{f:.1f}", f"{done:.1f}", f"{fl:.1f}",
            f"{done / fl:.2f}x", goals]


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
    maps = []
    with tempfile.TemporaryDirectory() as cache:
        for width, depth in ((128, 4), (256, 8)):
            for a_bits in (None, 4):
                maps.append(map_latency(width, depth, a_bits, cache))
    k = KernelReadout(background=False)
    k.budget.value = 0.05
    rows.append(["KernelReadout (4096x4096, 50 ms budget)", "bits 1/2/4/8",
                 f"{latency(k.bits, [1, 2, 4, 8]) * 1e3:.1f}", "(bounded by the budget)"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {CHANGES} changes\n")
    print(table(rows, ["explorer", "control", "update ms", "target ms"]))
    print("\nDecisionMapExplorer, cached float model, 200x200 grid, weight bits 1..8 (PTQ): the preview (one point per "
          "2x2 block) and the finished map, against decision_map of the float model timed in the same run\n")
    print(table(maps, ["network", "activations", "first map ms", "finished ms", "float map ms", "finished / float",
                       "goals"]))


if __name__ == "__main__":
    main()
