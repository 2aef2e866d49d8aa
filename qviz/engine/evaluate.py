"""Evaluation: what a model answers on the semicircle grid (decision maps, correct-answer accuracy,
roughness) and plain classification accuracy. No training happens here."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from qviz import _checks
from qviz.engine.data import correct_labels, evaluation_grid

_GRID_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _grid(resolution: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    key = (resolution, lo, hi)
    if key not in _GRID_CACHE:
        points = evaluation_grid(resolution, lo, hi)
        _GRID_CACHE[key] = (points, correct_labels(points))
    return _GRID_CACHE[key]


def predict_proba(model: torch.nn.Module, X: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """Class-1 probabilities for the points X [n, 2].

    Batches of 2,048 points keep a 256-wide layer's activations (2 MB) in cache: measured twice as fast
    as one batch of 40,000 for a 200x200 grid.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batch = _checks.integer("batch", batch, 1)
    if not isinstance(X, torch.Tensor) or X.dim() != 2 or len(X) == 0:
        raise ValueError(f"X must be a non-empty [n, 2] tensor of points, got {getattr(X, 'shape', type(X).__name__)}")
    was_training = model.training
    model.eval()
    try:
        # the quantizers' finiteness checks of every activation cost a third of a map; the answers are
        # checked once instead (a NaN or Inf anywhere inside reaches them)
        with torch.inference_mode(), _checks.no_finite_checks():
            probs = torch.cat([F.softmax(model(X[i:i + batch]), dim=1)[:, 1] for i in range(0, len(X), batch)])
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the model's outputs hold NaN or Inf (non-finite weights, inputs or quantizer ranges); "
                         "a decision map needs finite outputs")
    return probs


def decision_map(model: torch.nn.Module, lo: float = 0.0, hi: float = 1.0, resolution: int = 200) -> dict:
    """Class-1 probabilities of `model` on the resolution² grid over (lo, hi)², and its accuracy.

    Returns probs (float32 [resolution, resolution], row i at y_i, column j at x_j), predicted
    (int64, argmax), correct (the correct-answer labels), accuracy (fraction of the grid where the
    prediction equals the correct answer, 002 §3.1), lo, hi and resolution.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lo, hi = _checks.real("lo", lo), _checks.real("hi", hi)
    points, labels = _grid(_checks.integer("resolution", resolution, 2, 4096), lo, hi)
    return _map_of(predict_proba(model, points), labels, resolution, lo, hi)


def decision_map_stages(model: torch.nn.Module, lo: float = 0.0, hi: float = 1.0, resolution: int = 200,
                        preview_stride: int = 2) -> Iterator[dict]:
    """`decision_map` in two stages, for a picture that must come before the whole map can: first a preview
    from one grid point per `preview_stride` x `preview_stride` block (1/stride² of the work; each block
    shows its point's answer, `preview` is True and `accuracy` is measured on those points), then the
    full map, which evaluates only the points the preview skipped, so both stages together cost one
    map. With preview_stride=1 only the full map comes. The full map holds the answers `decision_map`
    gives (batches of other sizes may round probabilities differently in the last bit).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    resolution = _checks.integer("resolution", resolution, 2, 4096)
    stride = _checks.integer("preview_stride", preview_stride, 1, resolution)
    lo, hi = _checks.real("lo", lo), _checks.real("hi", hi)
    _grid(resolution, lo, hi)  # checks lo and hi now, not at the first next()
    return _stages(model, lo, hi, resolution, stride)


def _stages(model: torch.nn.Module, lo: float, hi: float, resolution: int, stride: int) -> Iterator[dict]:
    points, labels = _grid(resolution, lo, hi)
    if stride == 1:
        yield decision_map(model, lo, hi, resolution)
        return
    # each block's point: its centre row/column, or the grid's last one for a block cut by the edge
    block_of = torch.arange(resolution) // stride
    rep = torch.clamp(block_of * stride + stride // 2, max=resolution - 1)
    shown = torch.unique(rep)
    index = (shown[:, None] * resolution + shown[None, :]).reshape(-1)
    probs = torch.empty(resolution * resolution)
    probs[index] = predict_proba(model, points[index])
    preview = probs.reshape(resolution, resolution)[rep][:, rep].reshape(-1)
    yield _map_of(preview, labels, resolution, lo, hi, accuracy_at=index) | {"preview": True}
    rest = torch.ones(resolution * resolution, dtype=torch.bool)
    rest[index] = False
    probs[rest] = predict_proba(model, points[rest])
    yield _map_of(probs, labels, resolution, lo, hi)


def _map_of(probs: torch.Tensor, labels: torch.Tensor, resolution: int, lo: float, hi: float,
            accuracy_at: torch.Tensor | None = None) -> dict:
    predicted = (probs > 0.5).to(torch.int64)
    right = predicted == labels if accuracy_at is None else predicted[accuracy_at] == labels[accuracy_at]
    shape = (resolution, resolution)
    return {
        "probs": probs.reshape(shape).numpy(),
        "predicted": predicted.reshape(shape).numpy(),
        "correct": labels.reshape(shape).numpy(),
        "accuracy": float(right.float().mean()),
        "lo": float(lo), "hi": float(hi), "resolution": resolution,
    }


def grid_accuracy(model: torch.nn.Module, resolution: int = 200) -> float:
    """Correct-answer accuracy on the resolution² grid over (0, 1)²."""
    return decision_map(model, resolution=resolution)["accuracy"]


def heldout_accuracy(model: torch.nn.Module, X: torch.Tensor) -> float:
    """Accuracy against the correct-answer labels on held-out points X (e.g. semicircles(seed=1)[0])."""
    return float(((predict_proba(model, X) > 0.5).long() == correct_labels(X)).float().mean())


def roughness(predicted: np.ndarray) -> float:
    """Fraction of neighbouring grid cells whose predicted classes differ: how ragged a decision map is.

    A smooth but misplaced boundary (weight quantization, "lost capacity") scores low; salt-and-pepper
    noise (activation quantization) scores high (002 §3.2).
    """
    p = np.asarray(_checks.numpy_of("predicted", predicted))
    if p.ndim != 2 or min(p.shape) < 2:
        raise ValueError(f"predicted must be a 2-D map of at least 2 x 2 cells (a decision map's classes), got shape "
                         f"{p.shape}")
    return float((np.count_nonzero(p[1:] != p[:-1]) + np.count_nonzero(p[:, 1:] != p[:, :-1]))
                 / (p[1:].size + p[:, 1:].size))


def accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of X whose predicted class is y (one class index per sample of X)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(y, torch.Tensor) or not isinstance(X, torch.Tensor):
        raise TypeError(f"X and y must be torch tensors, got {type(X).__name__} and {type(y).__name__}")
    if y.dim() != 1 or len(y) != len(X) or y.is_floating_point() or y.is_complex():
        # a [N, 1] or [1] y would broadcast against the N predictions and give a meaningless fraction
        raise ValueError(f"y must hold one integer class index per sample of X: shape ({len(X)},), got "
                         f"{tuple(y.shape)} {y.dtype}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return float((model(X).argmax(1) == y).float().mean())
    finally:
        model.train(was_training)


def semicircle_evaluation(map_every: int = 0, resolution: int = 64):
    """An `evaluate` for train_iter on the semicircles: correct-answer accuracy on a resolution² grid at
    every report and, every `map_every` steps (0: never) and at the end, the decision map itself."""
    map_every = _checks.integer("map_every", map_every, 0)
    resolution = _checks.integer("resolution", resolution, 2, 4096)

    def evaluate(model: torch.nn.Module, step: int, last: bool) -> dict:
        dm = decision_map(model, resolution=resolution)
        progress = {"accuracy": dm["accuracy"]}
        if map_every and (step % map_every == 0 or last):
            progress["map"] = dm
        return progress

    return evaluate
