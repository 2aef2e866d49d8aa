"""fake_quantize + per-channel SQNR versus PyTorch's built-in fake quantization, on the same tensors.

Prints the median time of qviz's `fake_quantize` (per-channel affine, ranges estimated from the tensor,
as a widget does on every slider move) followed by `sqnr_db(..., axis=channel)`, the time of
`torch.fake_quantize_per_channel_affine` alone on the same tensor with the same scales, and the ratio,
all measured interleaved in one run. Run: .venv/bin/python benchmarks/quantizers.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_medians, table

from qviz.engine import QuantSpec, fake_quantize, minmax, quant_params, sqnr_db

SHAPES = {"512x512 (linear, channel axis 0)": ((512, 512), 0),
          "3x3x256x256 (conv HWIO, channel axis 3)": ((3, 3, 256, 256), 3)}


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for label, (shape, axis) in SHAPES.items():
        w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        spec = QuantSpec("affine", bits=4, granularity="channel", axis=axis)
        lo, hi = minmax(w, "channel", axis)
        p = quant_params(lo, hi, 4)
        scale, zp = p.scale.reshape(-1), p.zero_point.reshape(-1).to(torch.int32)

        t = interleaved_medians({
            "ours": lambda w=w, spec=spec, axis=axis: sqnr_db(w, fake_quantize(w, spec), axis=axis),
            "fq": lambda w=w, spec=spec: fake_quantize(w, spec),
            "torch": lambda w=w, s=scale, z=zp, a=axis, p=p: torch.fake_quantize_per_channel_affine(
                w, s, z, a, p.qmin, p.qmax),
        }, rounds=60)
        rows.append([label, f"{t['ours'] * 1e3:.2f}", f"{t['fq'] * 1e3:.2f}", f"{t['torch'] * 1e3:.2f}",
                     f"{t['ours'] / t['torch']:.1f}x", f"{t['fq'] / t['torch']:.1f}x"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of 60 interleaved rounds\n")
    print(table(rows, ["tensor", "qviz fq+sqnr ms", "qviz fq ms", "torch fq ms", "fq+sqnr / torch",
                       "fq / torch"]))


if __name__ == "__main__":
    main()
