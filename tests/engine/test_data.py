"""The semicircle data set of 002 eqs. 5-7, its grid and its correct-answer labels."""

import math

import numpy as np
import pytest
import torch

from qviz.engine import correct_labels, evaluation_grid, semicircles


def test_counts_and_balance():
    X, y = semicircles(seed=0)
    assert X.shape == (20000, 2) and X.dtype == torch.float32
    assert y.shape == (20000,) and y.dtype == torch.int64
    assert (y == 0).sum() == 10000 and (y == 1).sum() == 10000


def test_core_points_lie_on_the_radii_of_eqs_5_and_6():
    X, y = semicircles(seed=0, subsamples=0)  # only the 2,000 core points
    assert X.shape == (2000, 2)
    r = 0.1
    upper = X[:, 1] > 0
    centre = torch.where(upper, 0.0, r)
    radius = torch.hypot(X[:, 0].double() - centre, X[:, 1].double()) / r
    ring = torch.round(radius)
    assert torch.allclose(radius, ring, atol=1e-5)
    # label 0: odd rings (2i+1) above, even rings (2i+2) below; label 1 the other way round (eqs. 5, 6)
    odd = ring % 2 == 1
    assert torch.equal(y == 0, upper == odd)
    assert set(ring.long().tolist()) == set(range(1, 11))
    # 100 points per semicircle: 10 semicircles per label
    for label in (0, 1):
        for k in range(1, 11):
            for up in (True, False):
                count = ((y == label) & (ring == k) & (upper == up)).sum()
                assert count in (0, 100)


def test_noise_has_standard_deviation_r_over_3():
    X, _ = semicircles(seed=0)
    cores = X.reshape(2000, 10, 2)[:, :1]
    deviations = (X.reshape(2000, 10, 2)[:, 1:] - cores).reshape(-1, 2)
    assert deviations.std(0).numpy() == pytest.approx([0.1 / 3, 0.1 / 3], rel=0.05)


def test_deterministic_for_a_seed():
    a, b, c = semicircles(seed=3), semicircles(seed=3), semicircles(seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_correct_labels_agree_with_core_points_and_bands():
    X, y = semicircles(seed=0, subsamples=0)
    assert torch.equal(correct_labels(X), y)
    # on the band boundaries halfway between rings the label flips
    r = 0.1
    just_in = torch.tensor([[0.0, 0.149], [0.0, 0.151], [r, -0.149], [r, -0.151]])
    assert correct_labels(just_in).tolist() == [0, 1, 1, 0]
    # numpy input works too, and far points take the outermost ring's label
    assert correct_labels(np.array([[3.0, 3.0]], dtype=np.float32)).tolist() == [1]


def test_evaluation_grid_is_row_major_cell_centres():
    g = evaluation_grid(4)
    assert g.shape == (16, 2)
    assert g[0].tolist() == [0.125, 0.125]
    assert g[1].tolist() == [0.375, 0.125]  # x varies fastest
    assert g[4].tolist() == [0.125, 0.375]
    assert float(g.min()) > 0 and float(g.max()) < 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="resolution=1"):
        evaluation_grid(1)
    with pytest.raises(ValueError, match=r"shape \[n, 2\]"):
        correct_labels(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="seed=-1"):
        semicircles(seed=-1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        correct_labels(torch.tensor([[math.nan, 0.0]]))
