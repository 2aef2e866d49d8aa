"""Fused fake-quantize paths: one compiled pass per quantizer where PyTorch ops would take five to ten.

QAT runs a quantizer on every activation and weight of every step, and a decision map runs one on
every activation of 40,000 grid points; a chain of elementwise PyTorch ops (clamp, compare, divide,
add, floor, multiply, select) reads and writes the whole tensor once per op. The kernels in
qviz/_fused.pyx compute the same float32 operations in one pass and leave a byte of STE state per
element for the backward pass.

The schemes in quantizers.py call these functions when a tensor qualifies (`usable`: float32,
contiguous, on the CPU) and fall back to their PyTorch formulation otherwise. Element-wise results
agree bit for bit with that formulation; sums (ternary's E|w|, PACT's dq/dα) are accumulated in
double, so they can differ from PyTorch's float32 sums in the last bits (and are closer to the exact
value). `disabled()` turns the fused paths off, which is how the tests compare the two.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import os

import torch

from qviz import _checks
from qviz import _fused as _kernels

PATHS = _kernels.PATHS
STE_CODES = {None: None, "identity": 0, "clipped": 1, "saturated": 2}
PASS, ABOVE = 1, 2  # the state bits (see _fused.h)

_ENABLED = contextvars.ContextVar("qviz_fused_enabled", default=True)


def available_paths() -> tuple[str, ...]:
    """Code paths this CPU supports for the fused kernels, slowest first (portable, avx2, avx512)."""
    return _kernels.supported_paths()


def _default_path() -> int:
    forced = os.environ.get("QVIZ_FUSED_PATH")
    if forced:
        return PATHS.index(_checks.choice("QVIZ_FUSED_PATH", forced, available_paths()))
    return PATHS.index(available_paths()[-1])


_path = _default_path()


def fused_path() -> str:
    """The code path the fused kernels use now."""
    return PATHS[_path]


def set_fused_path(name: str) -> None:
    """Use another supported code path (the tests run every one)."""
    global _path
    _path = PATHS.index(_checks.choice("name", name, available_paths()))


@contextlib.contextmanager
def disabled():
    """Quantize with the PyTorch formulation inside this block (this thread / context only)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def usable(x: torch.Tensor) -> bool:
    """May `x` take a fused path: float32, dense, contiguous, on the CPU, not empty, and no torch.func
    transform running (grad, vmap: their tensors have no storage, and they refuse the fused paths'
    autograd Function)?"""
    return (_ENABLED.get() and x.dtype == torch.float32 and x.device.type == "cpu" and x.layout == torch.strided
            and x.numel() > 0 and x.is_contiguous() and not x.is_conj() and not x.is_neg()
            and not _checks.transforming())


def _address(name: str, t: torch.Tensor, dtype: torch.dtype = torch.float32, numel: int | None = None) -> int:
    """The address of a tensor's data for a kernel, after checking everything the kernel relies on."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.dtype == dtype and t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()
            and not t.is_conj() and not t.is_neg()):
        raise ValueError(f"{name} must be a contiguous {dtype} tensor on the CPU, got {t.dtype} on {t.device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements; expected {numel}")
    return t.data_ptr()


def _number(name: str, value: object) -> float:
    """A real number for a kernel's float parameter (any value, inf and NaN included, is safe to compute with)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _output(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(x.shape, dtype=dtype)


def clip_round(x: torch.Tensor, alpha: float, step: float, ste: str | None = None):
    """floor(clamp(x, 0, alpha) / step + 1/2) step (relu and PACT), and the STE state when `ste` is given:
    bit PASS where the STE passes the gradient to x, bit ABOVE where x >= alpha."""
    code = 0 if ste is None else STE_CODES[_checks.choice("ste", ste, STE_CODES)]
    address = _address("x", x)
    q, state = _output(x), None if ste is None else _output(x, torch.uint8)
    _kernels.clip_round(_path, address, q.data_ptr(), 0 if state is None else state.data_ptr(), x.numel(),
                        _number("alpha", alpha), _number("step", step), code)
    return q, state


def uniform(x: torch.Tensor, inv_scale: float, zero_point: float, qmin: float, qmax: float, scale: float,
            with_mask: bool):
    """(clamp(round(x inv_scale) + z, qmin, qmax) - z) scale, and the clipped STE's state when asked."""
    address = _address("x", x)
    q, state = _output(x), _output(x, torch.uint8) if with_mask else None
    _kernels.uniform(_path, address, q.data_ptr(), 0 if state is None else state.data_ptr(), x.numel(),
                     _number("inv_scale", inv_scale), _number("zero_point", zero_point), _number("qmin", qmin),
                     _number("qmax", qmax), _number("scale", scale))
    return q, state


def abs_stats(x: torch.Tensor) -> tuple[float, float]:
    """(sum |x| accumulated in double, max |x|)."""
    return _kernels.abs_stats(_path, _address("x", x), x.numel())


def kept(x: torch.Tensor, delta: float) -> tuple[float, int]:
    """(sum of |x| over |x| > delta accumulated in double, how many)."""
    return _kernels.kept(_path, _address("x", x), x.numel(), _number("delta", delta))


def ternary(x: torch.Tensor, delta: float, alpha: float) -> torch.Tensor:
    """alpha where x > delta, -alpha where x < -delta, else 0."""
    address = _address("x", x)
    q = _output(x)
    _kernels.ternary(_path, address, q.data_ptr(), x.numel(), _number("delta", delta), _number("alpha", alpha))
    return q


def masked_backward(grad: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, float]:
    """grad where the state's PASS bit is set (0 elsewhere), and the sum of grad where ABOVE is set."""
    if isinstance(grad, torch.Tensor):
        grad = grad.to(torch.float32).contiguous()
    out = _output(grad) if isinstance(grad, torch.Tensor) else None
    total = _kernels.clip_backward(_path, _address("grad", grad), _address("state", state, torch.uint8, grad.numel()),
                                   out.data_ptr(), grad.numel())
    return out, total


class StraightThrough(torch.autograd.Function):
    """Forward: q computed by a fused kernel. Backward: grad where its state's PASS bit is set."""

    @staticmethod
    def forward(ctx, x, q, state):
        ctx.save_for_backward(state)
        return q

    @staticmethod
    def backward(ctx, grad):
        (state,) = ctx.saved_tensors
        return masked_backward(grad, state)[0], None, None
