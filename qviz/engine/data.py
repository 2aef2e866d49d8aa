"""The 2-D semicircle data set of 002 §3.1 (eqs. 5-7), its grid and its answers.

For i in 0..4 and r = 0.1, label 0 owns the upper semicircle of radius (2i+1) r centred at the origin and
the lower semicircle of radius (2i+2) r centred at (r, 0) (eq. 5); label 1 owns the upper semicircle of
radius (2i+2) r and the lower one of radius (2i+1) r (eq. 6). The rings interleave like two spirals.

How we read the paper where it is terse:

- "100 points per semicircle by increasing the angle linearly": angles at the midpoints of 100 equal
  steps, (j + 1/2) π / 100, so that no core point sits on y = 0, where eqs. 5 and 6 switch centre.
- "N(0, r/3 I)": a standard deviation of r/3 per axis. Read as a covariance it would give a standard
  deviation of sqrt(r/3) = 0.18, almost twice the ring spacing r, and no rings would be visible in the
  paper's Fig. 1a; with r/3 nearly every subsample stays within r of its core point.
- "9 subsamples for each core sample ... 10,000 for each label": 1,000 core points per label and 9
  noisy copies of each; 10,000 per label means the core point itself is kept, so every core point
  contributes 10 samples (itself + 9 subsamples).
- The correct answer "dividing the area corresponding to each label by the radius of the semicircle":
  a point takes the label of the nearest ring, measured from the origin when y > 0 and from (r, 0)
  when y <= 0; ring indices are clamped to 1..10 so the centre and the far corners belong to the
  innermost and outermost rings.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qviz import _checks

RADIUS = 0.1
RINGS = 5  # i in 0..4
MAX_SAMPLES = 20_000_000  # 160 MB of float32 points: far beyond any lecture, well within a laptop


def _core_points(r: float, rings: int, points: int) -> tuple[np.ndarray, np.ndarray]:
    theta = (np.arange(points) + 0.5) * math.pi / points
    cores, labels = [], []
    for i in range(rings):
        odd, even = (2 * i + 1) * r, (2 * i + 2) * r
        for label, upper, lower in ((0, odd, even), (1, even, odd)):
            cores.append(np.stack([upper * np.cos(theta), upper * np.sin(theta)], 1))  # y > 0, centre (0, 0)
            cores.append(np.stack([r + lower * np.cos(theta + math.pi), lower * np.sin(theta + math.pi)], 1))
            labels += [label] * (2 * points)
    return np.concatenate(cores), np.array(labels, dtype=np.int64)


def semicircles(seed: int = 0, *, r: float = RADIUS, rings: int = RINGS, points: int = 100,
                subsamples: int = 9, noise: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set of 002 eqs. 5-7: X float32 [2 rings points (1 + subsamples) 2, 2], y int64.

    With the defaults: 2,000 core points, each kept and copied 9 times with Gaussian noise of standard
    deviation `noise` (default r / 3): 20,000 samples, 10,000 per label. Deterministic for a seed
    (numpy's PCG64); the order is label-blocked, so shuffle before minibatching.
    """
    seed = _checks.integer("seed", seed, 0)
    # bounded so that every coordinate stays a finite float32 and the set fits in memory
    r = _checks.real("r", r, 0.0, 1e6, lo_open=True)
    rings = _checks.integer("rings", rings, 1, 50)
    points = _checks.integer("points", points, 1, 100_000)
    subsamples = _checks.integer("subsamples", subsamples, 0, 1000)
    noise = r / 3 if noise is None else _checks.real("noise", noise, 0.0, 1e6)
    samples = 4 * rings * points * (subsamples + 1)
    if samples > MAX_SAMPLES:
        raise ValueError(f"rings={rings}, points={points}, subsamples={subsamples} make {samples:,} samples; "
                         f"allowed: at most {MAX_SAMPLES:,} (4 rings points (subsamples + 1))")
    cores, labels = _core_points(r, rings, points)
    rng = np.random.default_rng(seed)
    copies = cores[:, None, :] + rng.normal(0.0, noise, size=(len(cores), subsamples, 2))
    X = np.concatenate([cores[:, None, :], copies], axis=1).reshape(-1, 2)
    y = np.repeat(labels, subsamples + 1)
    return torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y)


def correct_labels(P, *, r: float = RADIUS, rings: int = RINGS) -> torch.Tensor:
    """int64 label of the band each point of P [n, 2] falls in (the nearest ring's label, see module doc)."""
    if isinstance(P, np.ndarray):
        P = torch.from_numpy(P)
    P = _checks.float_tensor("P", P)
    if P.dim() != 2 or P.shape[1] != 2:
        raise ValueError(f"P must have shape [n, 2], got {tuple(P.shape)}")
    _checks.finite_values("P", P)
    P = P.double()
    upper = P[:, 1] > 0
    centre_x = torch.where(upper, torch.zeros_like(P[:, 0]), torch.full_like(P[:, 0], r))
    distance = torch.hypot(P[:, 0] - centre_x, P[:, 1])
    ring = torch.round(distance / r).clamp(1, 2 * rings).to(torch.int64)  # 1 .. 10: radius ring * r
    odd = ring % 2 == 1
    # label 0: odd rings above (radius (2i+1) r), even rings below (radius (2i+2) r)
    return torch.where(upper == odd, 0, 1).to(torch.int64)


def evaluation_grid(resolution: int = 200, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Cell centres of a resolution x resolution grid over (lo, hi)², float32 [resolution², 2], row-major
    with y varying slowest (row i is y_i), so `.reshape(resolution, resolution)` gives an image."""
    resolution = _checks.integer("resolution", resolution, 2, 4096)
    lo, hi = _checks.real("lo", lo), _checks.real("hi", hi)
    if not lo < hi:
        raise ValueError(f"lo={lo:g}, hi={hi:g}: allowed lo < hi")
    axis = lo + (torch.arange(resolution, dtype=torch.float64) + 0.5) * (hi - lo) / resolution
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).float()


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, bundled with the package: no download),
    scaled to [0, 1] and split with a seeded shuffle: X_train, y_train, X_test, y_test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # an optional extra: say how to get it
        raise ImportError("the digits data set needs scikit-learn: pip install 'qviz[digits]'") from err

    seed = _checks.integer("seed", seed, 0)
    test_fraction = _checks.real("test_fraction", test_fraction, 0.0, 0.9, lo_open=True)
    data = load_digits()
    X = torch.from_numpy((data.data / 16.0).astype(np.float32))
    y = torch.from_numpy(data.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(X)))
    n_test = round(len(X) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]
