"""Bit-packed kernels against the machine's own roof and bandwidth, PyTorch float32 and PyTorch int8 (2 threads).

What it prints, in order:
- the CPU (model, family/model/stepping, flags that matter), torch, the qviz code path and the others it has;
- the roof of every code path: register-resident loops of the kernels' own instructions (qviz.packed.roof):
  "pop" XOR + popcount + add in bit-MACs/s, "dot" byte dot products (vpdpbusd / vpmaddubsw) in MACs/s,
  "fma" float32 multiply-adds in MACs/s, all threads at once;
- read bandwidth from a buffer that fits the L3 cache and from one far beyond it (DRAM);
- every kernel on four shapes: qviz time (float activations go in as they are and are packed inside the matmul;
  weights prepared beforehand, as a deployed layer holds them; both sides write into a result array of their own,
  reused), torch float32 (torch.matmul(x, W.T, out=...)), torch's dynamic int8 linear (fbgemm: it quantizes the
  activations inside its time, as qviz does), torch._int_mm (oneDNN's int8 GEMM on operands quantized beforehand; AMX
  tiles on CPUs that have them), the ratios (for float32 also the middle half of the per-round ratios: a neighbour's
  load shows as a wide range), and how close qviz is to the hardware: "% roof" (compute: achieved ops/s
  over the path's roof for that kind of instruction) or, at M = 1, "% bw" (prepared weight bytes per second over the
  read bandwidth of a buffer as large as the weights with warm weights, i.e. of the cache level that holds them;
  over the DRAM bandwidth with cold weights: copies cycled through, 256 MiB of them).
  "warm": untimed identical calls for 1 ms right before each timed one (weights and activations in the caches and the
  core as a run of qviz calls leaves it, as in a loop over one layer: the case the roof goals are about); "cold": the
  same lead-in, each call on the next weight copy (weights from DRAM, the core as earlier layers leave it). Rows
  without either start right after torch's call, from whatever it left: at the larger shapes its float weights
  flush the L3, and on some CPUs the core runs slower for a while after its GEMM (the header measures this:
  "clock after torch");
- 003 Chapter 5's layer: packed-index convolution against torch conv2d, and its memory.

Runs alternate qviz / torch / int8 in one process until a time budget is spent and report medians
(qviz.packed.measure_latency), so drift on a shared machine hits all alike. --path forces a code path
(the run prints the roofs of every path regardless). On an AVX-512 machine, `--avx2-torch` restricts
PyTorch's float32 GEMM to AVX2 as well (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY,
set before torch loads), to approximate an AVX2-only CPU; fbgemm's int8 is not restricted by these.
The header says where parallel regions run (`packed.threading()`): PyTorch's OpenMP team by default
when qviz and PyTorch share one OpenMP runtime; QVIZ_THREADING=pool runs them on qviz's own pool.
Run: .venv/bin/python benchmarks/kernels.py [--budget SECONDS] [--path avx2] [--avx2-torch] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--budget", type=float, default=1.5, help="seconds per kernel and shape")
parser.add_argument("--path", default=None, help="force a qviz code path (default: the fastest that passed)")
parser.add_argument("--avx2-torch", action="store_true", help="restrict torch's float32 GEMM to AVX2")
parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
parser.add_argument("--threads", type=int, default=2, help="threads for qviz and torch alike (default 2)")
ARGS = parser.parse_args()
if ARGS.avx2_torch:  # must precede the first import of torch
    os.environ.update(MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table  # noqa: E402

from qviz import _dispatch, packed  # noqa: E402

THREADS = ARGS.threads
SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (256, 2048, 2048), (1024, 1024, 1024)]
KERNELS = [("binary", 1, "binary XOR-popcount", "pop"), ("hybrid", 1, "hybrid AND-popcount (W1 x A{0,1})", "pop"),
           ("lowbit", 2, "2-bit x 2-bit", "dot"), ("lowbit", 4, "4-bit x 4-bit", "dot"),
           ("lut", 4, "4-bit codebook W x float A", "fma"), ("lut", 2, "2-bit codebook W x float A", "fma")]
L3_TEST, DRAM_TEST = 8 * 2**20, 256 * 2**20
KERNEL_COLUMNS = ["kernel", "MxKxN", "qviz ms", "torch f32 ms", "torch int8 ms", "int8 GEMM ms", "x f32",
                  "x f32 middle half", "x int8", "x int8 GEMM", "% roof / % bw", "runs"]


def cpu_description() -> str:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    shown = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vpopcntdq", "avx512_vnni", "avx_vnni", "amx_int8")
             if f in flags]
    return (f"{fields.get('model name', '?')} (vendor {fields.get('vendor_id', '?')}, "
            f"family {fields.get('cpu family')}, model {fields.get('model')}, stepping {fields.get('stepping')}); "
            f"{os.cpu_count()} CPUs; "
            f"flags: {' '.join(shown)}")


def clock_after_torch(rounds: int = 30) -> float:
    """Speed of a scalar register loop (the portable roof, 0.1 ms) right after a torch float32 GEMM, over
    its speed after the same loop: below 100% when the core slows down after PyTorch's heavy calls."""
    x, w, out = torch.randn(16, 4096), torch.randn(4096, 4096), torch.empty(16, 4096)
    def probe():
        return packed.roof("pop", path="portable", threads=1, seconds=1e-4)
    after, steady = [], []
    for _ in range(rounds):
        torch.matmul(x, w.T, out=out)
        after.append(probe())
        for _ in range(10):  # a few milliseconds of the loop itself
            probe()
        steady.append(probe())
    return statistics.median(after) / statistics.median(steady)


@functools.cache
def warm_bandwidth(nbytes: int) -> float:
    """Read bandwidth from a buffer as large as the weights, read again and again: the cache level that
    holds warm weights of that size (L2 for 2 MiB split over 2 cores with 2 MiB each; L3 for more)."""
    return max(packed.read_bandwidth(nbytes, threads=THREADS, seconds=0.3) for _ in range(3))


def main() -> None:
    if ARGS.path:
        packed.set_kernel_path(ARGS.path)
    torch.set_num_threads(THREADS)
    path = packed.kernel_path()
    print(f"CPU: {cpu_description()}; load average before the run {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"
          f"{', MKL/oneDNN limited to AVX2' if ARGS.avx2_torch else ''}); qviz path {path} of "
          f"{packed.available_paths()}; parallel regions on {packed.threading()} (OpenMP runtimes: "
          f"{', '.join(Path(p).name for p in _dispatch.openmp_runtimes()) or 'none'}); "
          f"{THREADS} threads\n")

    # a roof is what the hardware can do: the best of five short runs (a busy neighbour only lowers it)
    roofs = {p: {k: max(packed.roof(k, path=p, threads=THREADS, seconds=0.15) for _ in range(5))
                 for k in ("pop", "dot", "fma")} for p in packed.available_paths()}
    print(f"Roof of each code path, {THREADS} threads (register-resident loops of the kernels' instructions):")
    print(table([[p, f"{r['pop'] / 1e12:.2f} Tbit-MAC/s", f"{r['dot'] / 1e9:.0f} GMAC/s",
                  f"{r['fma'] / 1e9:.0f} GMAC/s"] for p, r in roofs.items()],
                ["path", "pop (XOR+popcount+add)", "dot (int8)", "fma (float32)"]))
    l3 = max(packed.read_bandwidth(L3_TEST, threads=THREADS, seconds=0.3) for _ in range(3))
    dram = max(packed.read_bandwidth(DRAM_TEST, threads=THREADS, seconds=0.5) for _ in range(3))
    print(f"\nRead bandwidth, {THREADS} threads: {l3 / 1e9:.0f} GB/s from an {L3_TEST >> 20} MiB buffer (in L3), "
          f"{dram / 1e9:.0f} GB/s from {DRAM_TEST >> 20} MiB (DRAM)\n")

    print(f"Clock after torch: {clock_after_torch():.0%} of its usual speed for a scalar loop right after a torch "
          "float32 GEMM (16x4096x4096); rows without \"warm\" start there\n")

    roof = dict(roofs[path])
    rows, against_roof = [], []  # against_roof: (row, ops/s, roof kind), filled in once the roof is final
    shapes = SHAPES[:2] if ARGS.quick else SHAPES
    for kind, bits, label, roof_kind in KERNELS:
        for m, k, n in shapes:
            caches = ("warm", "cold") if m == 1 else ("", "warm")
            for cache in caches:
                cold = cache == "cold"
                r = packed.measure_latency(kind, m, k, n, bits=bits, budget_s=ARGS.budget, threads=THREADS,
                                           with_int8=True, cold=cold, warm=cache == "warm")
                if m == 1:
                    bw = r["weight_bytes"] / r["qviz_s"]
                    near = f"{bw / (dram if cold else warm_bandwidth(r['weight_bytes'])):.0%} bw ({bw / 1e9:.0f} GB/s)"
                else:
                    near = "% roof"
                int_mm = (f"{r['int_mm_s'] * 1e3:.3f}", f"{r['ratio_int_mm']:.2f}") if r["int_mm_s"] else ("-", "-")
                rows.append([label, f"{m}x{k}x{n} {cache}".strip(), f"{r['qviz_s'] * 1e3:.3f}",
                             f"{r['torch_s'] * 1e3:.3f}", f"{r['torch_int8_s'] * 1e3:.3f}", int_mm[0],
                             f"{r['ratio']:.2f}", f"{r['ratio_low']:.2f}-{r['ratio_high']:.2f}",
                             f"{r['ratio_int8']:.2f}", int_mm[1], near, str(r["runs"])])
                if m != 1:
                    against_roof.append((rows[-1], r["bit_ops_per_s"] if roof_kind == "pop" else r["qviz_macs_per_s"],
                                         roof_kind))
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    # A roof is a maximum: a neighbour busy during the first measurement lowers it (one run read 2.55
    # Tbit-MAC/s for the same loop that gave 2.74 on another path), and every % roof would rise with it.
    for kind in roof:
        roof[kind] = max(roof[kind], *(packed.roof(kind, path=path, threads=THREADS, seconds=0.15) for _ in range(5)))
    for row, ops, kind in against_roof:
        row[KERNEL_COLUMNS.index("% roof / % bw")] = f"{ops / roof[kind]:.0%} roof"
    print(f"Roof of path {path} used for % roof (the larger of the measurements before and after the kernels): "
          f"pop {roof['pop'] / 1e12:.2f} Tbit-MAC/s, dot {roof['dot'] / 1e9:.0f} GMAC/s, fma {roof['fma'] / 1e9:.0f} "
          "GMAC/s\n")
    print(f"Kernels on path {path}, {THREADS} threads (x f32 / x int8 / x int8 GEMM: torch time over qviz time, "
          "above 1 = qviz faster; x f32 middle half: the quartiles of the ratio over the rounds, each round's "
          "pair timed back to back; int8 GEMM = torch._int_mm on operands quantized beforehand):")
    print(table(rows, KERNEL_COLUMNS))

    print("\n003 Chapter 5 layer (3x16x16 input, 8 output channels, no padding), packed-index conv vs torch conv2d:")
    conv_rows = []
    for kernel in (3, 4, 5):
        for bits, label in ((1, "binary"), (2, "ternary (2-bit)")):
            r = packed.measure_conv_latency(kernel=kernel, bits=bits, budget_s=ARGS.budget / 2, threads=THREADS)
            mem = packed.memory_report(8, 3, kernel=(kernel, kernel), bits=bits, codebook_bits=16 if bits == 1 else 32)
            conv_rows.append([f"{kernel}x{kernel}", label, f"{r['qviz_s'] * 1e6:.1f}", f"{r['torch_s'] * 1e6:.1f}",
                              f"{r['ratio']:.2f}", f"{mem['ratio_formula']:.2f}", f"{mem['ratio_dense']:.2f}",
                              f"{mem['ratio']:.2f}"])
    print(table(conv_rows, ["filter", "codes", "qviz us", "torch us", "x float", "memory (eq. 2-17)",
                            "memory (dense)", "memory (word rows)"]))


if __name__ == "__main__":
    main()
