"""Rerun the synthetic study of 002 (Boo, Shin, Sung 2020; §3.2, Appendix A) with fixed seeds and check its findings.

For 128-3, 128-4, 256-3, 200-4, 128-6 and 128-8, without and with residual connections (the residual
runs quantize the shortcut sums, as 002 Fig. 10 does), the float model is trained (or loaded from the
cache) and retrained with 2-bit weights (W2), 2-bit activations (A2) and both (W2A2): PACT activations,
TWN-style ternary weights (002 eq. 1's three levels with an L2-fitted step). The table shows
correct-answer accuracy on the 200x200 grid over (0,1)² and, in brackets, the roughness of the decision
map (fraction of neighbouring cells with different predictions: high = noisy). Each of the paper's
findings is then checked against these numbers. Takes about 10 minutes on 2 cores.
Run: .venv/bin/python benchmarks/paper_002.py [--seed N] [--cache DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table

from qviz.engine import run_experiment

MODELS = [(128, 3), (128, 4), (256, 3), (200, 4), (128, 6), (128, 8)]
SETTINGS = {"W2": (2, None), "A2": (None, 2), "W2A2": (2, 2)}


def measure(seed: int, cache: str | None) -> dict:
    results = {}
    for residual in (False, True):
        for width, depth in MODELS:
            for label, (w_bits, a_bits) in SETTINGS.items():
                row = run_experiment(width, depth, residual, w_bits, a_bits, "qat", seed, cache=cache,
                                     quantize_shortcut=residual)
                results[(width, depth, residual, "float")] = (row["acc_float"], row["roughness_float"])
                results[(width, depth, residual, label)] = (row["acc_quant"], row["roughness_quant"])
                print(f"  {width}-{depth}{' res' if residual else ''} {label}: {row['acc_quant']:.3f} "
                      f"(float {row['acc_float']:.3f})", file=sys.stderr, flush=True)
    return results


def drop(r, width, depth, residual, label):
    return r[(width, depth, residual, "float")][0] - r[(width, depth, residual, label)][0]


def rough(r, width, depth, residual, label):
    return r[(width, depth, residual, label)][1]


def findings(r) -> list[tuple[str, bool, str]]:
    d = lambda w, dp, label, res=False: drop(r, w, dp, res, label)  # noqa: E731
    checks = []
    w_small, w_wide, w_deep = d(128, 3, "W2"), d(256, 3, "W2"), d(128, 8, "W2")
    checks.append(("W2: width and depth both shrink the accuracy lost to 2-bit weights (§3.2)",
                   w_wide < w_small and w_deep < w_small,
                   f"drop 128-3 {w_small:.3f}, 256-3 {w_wide:.3f}, 128-8 {w_deep:.3f}"))
    noisy = sum(rough(r, w, dp, False, "A2") > rough(r, w, dp, False, "W2") for w, dp in MODELS)
    checks.append(("A2 looks like noise, W2 like lost capacity: A2 maps are rougher than W2 maps (§3.2)",
                   noisy >= len(MODELS) - 1, f"A2 rougher in {noisy} of {len(MODELS)} models"))
    a4, a8 = d(128, 4, "A2"), d(128, 8, "A2")
    checks.append(("A2: depth does not help (128-8 loses at least as much as 128-4) (§3.2)", a8 >= a4 - 0.005,
                   f"drop 128-4 {a4:.3f}, 128-8 {a8:.3f}"))
    a_wide, a_small = d(256, 3, "A2"), d(128, 3, "A2")
    checks.append(("A2: width helps (256-3 loses less than 128-3) (§3.2)", a_wide < a_small,
                   f"drop 128-3 {a_small:.3f}, 256-3 {a_wide:.3f}"))
    a200, a6, a8 = d(200, 4, "A2"), d(128, 6, "A2"), d(128, 8, "A2")
    checks.append(("A2: the wide 200-4 is more resilient than the deep 128-6 and 128-8 (App. A)",
                   a200 < a6 and a200 < a8, f"drop 200-4 {a200:.3f}, 128-6 {a6:.3f}, 128-8 {a8:.3f}"))
    w200, w6, w8 = d(200, 4, "W2"), d(128, 6, "W2"), d(128, 8, "W2")
    checks.append(("W2: the deep 128-6 and 128-8 are more robust than the wide 200-4 (App. A)",
                   w6 < w200 and w8 < w200, f"drop 200-4 {w200:.3f}, 128-6 {w6:.3f}, 128-8 {w8:.3f}"))
    res_w = sum(d(w, dp, "W2", True) for w, dp in MODELS) / len(MODELS)
    plain_w = sum(d(w, dp, "W2") for w, dp in MODELS) / len(MODELS)
    checks.append(("Residuals alleviate the W2 distortion (mean drop over the six models) (§3.2)", res_w < plain_w,
                   f"mean W2 drop plain {plain_w:.3f}, residual {res_w:.3f}"))
    ra, pa = d(128, 8, "A2", True), d(128, 8, "A2")
    checks.append(("Residuals make A2 noise worse in the deep 128-8 (§3.2, Fig. 10)", ra > pa,
                   f"A2 drop 128-8 plain {pa:.3f}, residual {ra:.3f}; roughness {rough(r, 128, 8, False, 'A2'):.3f} "
                   f"vs {rough(r, 128, 8, True, 'A2'):.3f}"))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="float-model cache directory (default: the user cache)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}", file=sys.stderr)
    r = measure(args.seed, args.cache)
    rows = []
    for residual in (False, True):
        for width, depth in MODELS:
            cells = [f"{r[(width, depth, residual, k)][0]:.3f} ({r[(width, depth, residual, k)][1]:.3f})"
                     for k in ("float", *SETTINGS)]
            rows.append([f"{width}-{depth}", "yes" if residual else "no", *cells])
    print("correct-answer accuracy on the 200x200 grid (roughness of the map)\n")
    print(table(rows, ["model", "residual", "float", "W2", "A2", "W2A2"]))
    print()
    for claim, agree, numbers in findings(r):
        print(f"- {'agrees' if agree else 'DISAGREES'}: {claim}: {numbers}")


if __name__ == "__main__":
    main()
