"""Argument checks shared by the engine and the kernels' Python face.

Every check raises `TypeError` for a wrong kind of value and `ValueError` for a wrong value, and its
message names the argument and says what is allowed, so a widget can show it to a person as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterable

import numpy as np
import torch

# Whether finite_values looks at tensors. A training loop turns it off for its own steps (it checks the
# loss instead): scanning every activation for NaN on every step would cost more than quantizing it.
_FINITE_CHECKS = contextvars.ContextVar("qviz_finite_checks", default=True)


@contextlib.contextmanager
def no_finite_checks():
    """Skip NaN/Inf scans of tensors inside this block (this thread / context only)."""
    token = _FINITE_CHECKS.set(False)
    try:
        yield
    finally:
        _FINITE_CHECKS.reset(token)


def choice(name: str, value: object, allowed: Iterable[object]):
    allowed = tuple(allowed)
    # Only plain scalars are compared: an array or tensor has no single truth value, and True == 1
    # must not pass for bits=1.
    scalar = isinstance(value, str | numbers.Number) and not isinstance(value, bool)
    # 4.0 == 4, but a float where an integer is expected reaches code that indexes or sizes with it
    integral = isinstance(value, numbers.Integral)
    if not scalar or not any(a == value and (integral or not isinstance(a, numbers.Integral)) for a in allowed
                             if not isinstance(a, bool)):
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {shown}")
    return value.item() if isinstance(value, np.generic) else value  # np.int64(4) -> 4


def integer(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    if type(value) is not int:  # plain ints skip the abstract-class checks: kernels call this per argument
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}={value} is out of range; allowed: {_span(lo, hi)}")
    return value


def real(name: str, value: object, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except (OverflowError, ArithmeticError, ValueError, TypeError) as err:  # 10**400, or a __float__ that fails
        raise ValueError(f"{name} must be a finite real number; {value!r:.60} is not one ({err})") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        raise ValueError(f"{name}={value} is out of range; allowed: {left}{_fmt(lo)}, {_fmt(hi)}]")
    return value


def boolean(name: str, value: object) -> bool:
    # numpy's bool is not a bool subclass, but a value read from an array is as good a flag as any
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def float_tensor(name: str, x: object) -> torch.Tensor:
    """A floating-point torch tensor (numpy arrays are refused so that autograd is never lost silently)."""
    if not isinstance(x, torch.Tensor):
        hint = " (use torch.from_numpy)" if type(x).__module__ == "numpy" else ""
        raise TypeError(f"{name} must be a torch.Tensor{hint}, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout}; use .to_dense()")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float16/32/64, bfloat16), got {x.dtype}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device and holds no values; allowed: a tensor with data")
    fits_memory(name, x.numel(), 16)  # the result and a few float32 temporaries
    return x


def numpy_of(name: str, value: object) -> object:
    """A torch tensor's values as numpy (detached, on the CPU; half precision through float32, as numpy has no
    bfloat16); anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.layout != torch.strided or value.is_nested or value.device.type == "meta":
        raise TypeError(f"{name} must be a dense tensor with values, got layout {value.layout} on {value.device}")
    value = value.detach().cpu()
    return (value.float() if value.dtype in (torch.float16, torch.bfloat16) else value).numpy()


_CHECK_SIZE_FROM = 2**24  # below 16 M elements nothing is checked: the common case costs nothing


def fits_memory(name: str, elements: int, bytes_per_element: int, allowed: str = "smaller inputs") -> None:
    """Refuse work on `elements` values that would need more than qviz._timing.memory_limit() (a stride-0
    view such as torch.ones(1).expand(10**6, 10**6) holds 10^12 of them in 4 bytes)."""
    if elements <= _CHECK_SIZE_FROM:
        return
    from qviz._timing import memory_limit

    need, limit = elements * bytes_per_element, memory_limit()
    if need > limit:
        raise ValueError(f"{name} holds {elements:,} values; working on them would take about {need / 2**30:.1f} GiB, "
                         f"beyond the memory limit of {limit / 2**30:.1f} GiB (2 GiB, or half the available memory "
                         f"if less); allowed: {allowed}")


def transforming() -> bool:
    """Whether a torch.func transform (grad, vmap, ...: per-sample gradients as Opacus computes them) is
    running: its tensors have no storage of their own, and autograd Functions need its own form."""
    return torch._C._are_functorch_transforms_active()


def vmapped(v: torch.Tensor) -> bool:
    """Whether v is one sample of torch.func.vmap's batch (under any other functorch transforms): there a
    tensor's values cannot be read (bool(), float(), .item()) and a batch statistic cannot be kept."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(v):
        if f.is_batchedtensor(v):
            return True
        v = f.get_unwrapped(v)
    return False


def finite_values(name: str, *values: torch.Tensor) -> None:
    """Raise if any tensor holds NaN or Inf; callers pass small statistics (a min, a max) when they can."""
    if not _FINITE_CHECKS.get():
        return
    for v in values:
        if vmapped(v):  # vmap cannot read values: a NaN in one sample gives NaN gradients for it, unchecked
            continue
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} contains NaN or Inf; only finite values can be quantized")


def axis_for(name: str, axis: object, ndim: int) -> int:
    axis = integer(name, axis)
    if ndim == 0 or not -ndim <= axis < ndim:
        allowed = "none (a 0-d tensor has no axes)" if ndim == 0 else f"{-ndim}..{ndim - 1}"
        raise ValueError(f"{name}={axis} is out of range for a tensor with {ndim} dims; allowed: {allowed}")
    return axis % ndim


def _fmt(v: float | None) -> str:
    return "inf" if v is None else f"{v:g}"


def _span(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}" if hi > lo else f"{lo}"
    return f">= {lo}" if lo is not None else f"<= {hi}"
