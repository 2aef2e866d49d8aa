"""Bit-packed kernels against PyTorch float32 (and PyTorch's dynamic int8 linear), same shapes, 2 threads.

For each M x K x N, qviz and torch run alternately in one process until a time budget is spent (see
qviz.packed.measure_latency); activation packing is inside qviz's timed call, weights are packed
beforehand. "x float" is torch float32 time / qviz time (above 1: qviz is faster), "x int8" the same
against torch's dynamic int8 linear. "ceiling" is the achieved fraction of the machine's measured
popcount ceiling (bit-ops per second over XOR-popcounted bits per second, both at 2 threads).
Run: .venv/bin/python benchmarks/kernels.py [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table

from qviz import packed

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (256, 2048, 2048), (1024, 1024, 1024)]
KERNELS = [("binary", 1, "binary XOR-popcount"), ("hybrid", 1, "hybrid AND-popcount (W1 x A{0,1})"),
           ("lowbit", 2, "2-bit x 2-bit bit-serial"), ("lowbit", 4, "4-bit x 4-bit bit-serial"),
           ("lut", 4, "4-bit codebook W x float A"), ("lut", 2, "2-bit codebook W x float A")]
THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per kernel and shape")
    budget = parser.parse_args().budget
    torch.set_num_threads(THREADS)
    ceiling = packed.popcount_ceiling(threads=THREADS, seconds=1.0)
    print(f"torch {torch.__version__}; qviz path {packed.kernel_path()} of {packed.available_paths()}; "
          f"OpenMP {packed.openmp_enabled()}; {THREADS} threads")
    print(f"popcount ceiling: {ceiling / 1e9:.0f} Gbit/s (XOR-popcount of L1-resident rows, {THREADS} threads)\n")
    rows = []
    for kind, bits, label in KERNELS:
        for m, k, n in SHAPES:
            r = packed.measure_latency(kind, m, k, n, bits=bits, budget_s=budget, threads=THREADS, with_int8=True)
            frac = "" if r["bit_ops_per_s"] is None else f"{r['bit_ops_per_s'] / ceiling:.0%}"
            rows.append([label, f"{m}x{k}x{n}", f"{r['qviz_s'] * 1e3:.3f}", f"{r['torch_s'] * 1e3:.3f}",
                         f"{r['torch_int8_s'] * 1e3:.3f}", f"{r['ratio']:.2f}", f"{r['ratio_int8']:.2f}", frac,
                         str(r["runs"])])
    print(table(rows, ["kernel", "MxKxN", "qviz ms", "torch f32 ms", "torch int8 ms", "x float", "x int8",
                       "ceiling", "runs"]))
    print("\n003 Chapter 5 layer (3x16x16 input, 8 output channels, no padding), packed-index conv vs torch conv2d:")
    conv_rows = []
    for kernel in (3, 4, 5):
        for bits, label in ((1, "binary"), (2, "ternary (2-bit)")):
            r = packed.measure_conv_latency(kernel=kernel, bits=bits, budget_s=budget / 2, threads=THREADS)
            mem = packed.memory_report(8, 3, kernel=(kernel, kernel), bits=bits, codebook_bits=16 if bits == 1 else 32)
            conv_rows.append([f"{kernel}x{kernel}", label, f"{r['qviz_s'] * 1e6:.1f}", f"{r['torch_s'] * 1e6:.1f}",
                              f"{r['ratio']:.2f}", f"{mem['ratio_formula']:.2f}", f"{mem['ratio_dense']:.2f}",
                              f"{mem['ratio']:.2f}"])
    print(table(conv_rows, ["filter", "codes", "qviz us", "torch us", "x float", "memory (eq. 2-17)",
                            "memory (dense)", "memory (word rows)"]))


if __name__ == "__main__":
    main()
