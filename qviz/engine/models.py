"""Models and the operations on them that quantization needs.

Batch-norm folding (004 eqs. 20-21) lives here as a pure function on tensors.
"""

from __future__ import annotations

import torch

from qviz import _checks


def fold_batchnorm(weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                   var: torch.Tensor, eps: float = 1e-5,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a batch norm into the layer before it (004 eqs. 20-21).

    W_inf = γ W / σ and b_inf = β - γ μ / σ with σ = sqrt(var + eps), one value per output channel
    (dim 0 of `weight`: [out, in] for a linear layer, [out, in, kh, kw] for a convolution). A layer bias
    b folds in as β + γ (b - μ) / σ. Returns (W_inf, b_inf); the inputs are not changed.
    """
    weight = _checks.float_tensor("weight", weight)
    if weight.dim() < 1:
        raise ValueError("weight must have at least 1 dim (dim 0 = output channels)")
    out = weight.shape[0]
    named = {"gamma": gamma, "beta": beta, "mean": mean, "var": var}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        _checks.float_tensor(name, t)
        if t.shape != (out,):
            raise ValueError(f"{name} must have shape ({out},) to match weight's {out} output channels, "
                             f"got {tuple(t.shape)}")
    _checks.real("eps", eps, 0.0)
    if bool((var < 0).any()):
        raise ValueError("var must be >= 0 (it is a variance)")
    sigma = torch.sqrt(var + eps)
    if bool((sigma == 0).any()):
        raise ValueError("var + eps is 0 for some channel; give eps > 0")
    gain = gamma / sigma
    shift = (bias if bias is not None else torch.zeros_like(mean)) - mean
    w_fold = weight * gain.reshape(-1, *([1] * (weight.dim() - 1)))
    return w_fold, beta + gain * shift
