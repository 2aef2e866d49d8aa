"""How fast the ModelExplorer answers on a ResNet-18-shaped network (Hugging Face's ResNet from a config:
64-128-256-512 channels, two basic blocks per stage, 11.2M parameters, 21 quantized layers) with 32 images of
64x64 and no labels (output SQNR as the metric), on 2 threads.

Goals (issue 12): the full per-layer view (every row with its sensitivity) within 30 s, the first rows
within 3 s, and one layer's bit change within 1 s; the Pareto chart is timed too. The float forward pass
over the same images is printed as the yardstick (the machine is shared, so absolute times drift).

`--full-size` measures instead what a practitioner's own model costs: ModelAnalysis on ResNet-50 at 224x224
(Hugging Face's, from its config: 54 quantized layers, 25.6M parameters) with 32 images and labels, its float
pass, every layer's SQNRs and the metric without sensitivities, the samples whose layer tensors it keeps, and
the process's peak memory.

`--full-size --pareto` also times the Pareto chart there (several minutes).

Run: .venv/bin/python benchmarks/model_explorer.py [--full-size [--pareto]]   (needs transformers)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table
from quantize import resnet18_shaped

import qviz


def main() -> None:
    torch.set_num_threads(2)
    model = resnet18_shaped()
    images = {"pixel_values": torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        model(**images)
        start = time.perf_counter()
        model(**images)
        forward = time.perf_counter() - start
    start = time.perf_counter()
    explorer = qviz.ModelExplorer(model, images)  # computes in the background, as in a notebook
    layers = len(explorer.analysis.layers)
    first_rows = _since(start, explorer, lambda d: len(d["rows"]) == layers)
    full_view = _since(start, explorer, lambda d: all(r["sensitivity"] is not None for r in d["rows"]))
    pareto = _since(start, explorer, lambda d: d["stage"] == "done")
    changes = []
    for i, name in enumerate(explorer.analysis.layers[1:7]):
        before = explorer.data
        start = time.perf_counter()
        explorer.set_bits(name, 4 if i % 2 else 2, 8)
        changes.append(_since(start, explorer, lambda d, before=before: d is not before and d["stage"] == "done"))
    explorer.close()
    rows = [["float forward, 32 images", f"{forward:.2f}", ""],
            ["first rows (weight and own output SQNR of every layer)", f"{first_rows:.2f}", "<= 3"],
            ["full per-layer view (every sensitivity)", f"{full_view:.2f}", "<= 30"],
            ["Pareto chart (uniform widths + greedy path)", f"{pareto:.2f}", ""],
            ["one layer's bit change, median of 6", f"{statistics.median(changes):.2f}", "<= 1"]]
    print(f"torch {torch.__version__}, 2 threads; ResNet-18-shaped network, {layers} quantized layers, 32 images "
          "of 64x64, output SQNR as the metric\n")
    print(table(rows, ["step", "seconds", "goal"]))


def _since(start: float, explorer, predicate, timeout: float = 300.0) -> float:
    while time.perf_counter() - start < timeout:
        data = explorer.data
        if data is not None and predicate(data):
            return time.perf_counter() - start
        time.sleep(0.005)
    raise TimeoutError("the explorer did not get there")


def full_size() -> None:
    import resource

    # transformers looks for an optional package named `kernels`, and this folder's kernels.py is not it
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import transformers

    from qviz.engine.analysis import ModelAnalysis

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000)).eval()
    images = {"pixel_values": torch.randn(32, 3, 224, 224)}
    labels = torch.randint(0, 1000, (32,))
    with torch.no_grad():
        start = time.perf_counter()
        model(**images)
        forward = time.perf_counter() - start
    analysis = ModelAnalysis(model, (images, labels))
    start = time.perf_counter()
    analysis.float_pass()
    float_pass = time.perf_counter() - start
    times = []
    for bits in (8, 4):
        start = time.perf_counter()
        analysis.report(analysis.uniform_config(bits, 8), with_sensitivity=False)
        times.append(time.perf_counter() - start)
    rows = [["float forward, 32 images", f"{forward:.2f}"],
            [f"float pass (keeps the layer tensors of {analysis._samples} samples)", f"{float_pass:.2f}"],
            ["every layer's SQNRs + metric, W8A8 (no sensitivity)", f"{times[0]:.2f}"],
            ["every layer's SQNRs + metric, W4A8 (no sensitivity)", f"{times[1]:.2f}"],
            ["one sensitivity (a forward over the data), about", f"{forward:.2f}"]]
    if "--pareto" in sys.argv[1:]:
        rows += _pareto_rows(analysis)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__}, 2 threads; ResNet-50, {len(analysis.layers)} quantized layers, 32 images of "
          f"224x224; peak memory of the process {peak:,.0f} MB\n")
    print(table(rows, ["step", "seconds"]))


def _pareto_rows(analysis) -> list[list[str]]:
    """The Pareto chart at full size: when its first mixed-precision point shows, and all of it."""
    start = time.perf_counter()
    first = None
    for chart in analysis.pareto(8):
        if first is None and len(chart["greedy"]) > 1:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    points = len(chart["uniform"]) + len(chart["greedy"])
    return [["Pareto chart: its first mixed-precision point", f"{first:.1f}"],
            [f"Pareto chart: all {points} points", f"{total:.1f}"]]


if __name__ == "__main__":
    full_size() if "--full-size" in sys.argv[1:] else main()
