"""Builds hostile arguments for qviz.packed inside the guard's child process and calls the function there.

Pickling through the guard's pipe would lose what makes an array hostile (strides, Fortran order, the
read-only flag, a torch tensor's sharing): the parent sends a description, `build` makes the object here.
"""

from __future__ import annotations

import numpy as np
import torch

from qviz import packed

TAG = "__build__"


def desc(kind: str, *fields, transform: str = "") -> tuple:
    """A description of an argument: ("matrix", cls, bits, shape, words, code_sums) or ("array", a)."""
    return (TAG, kind, fields, transform)


def _transform(a, how: str):
    if how == "noncontig":  # same values, every other column of a wider array
        return np.repeat(a, 2, axis=-1)[..., ::2] if a.ndim else a
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "readonly":
        a = a.copy()
        a.flags.writeable = False
        return a
    if how == "tensor":
        return torch.from_numpy(np.ascontiguousarray(a))
    if how == "list":
        return a.tolist()
    if how == "0d":
        return np.asarray(a.reshape(-1)[0]) if a.size else np.asarray(0, a.dtype)
    if how == "1d":
        return a.reshape(-1)
    if how == "3d":
        return a[None]
    if how == "big_endian":
        return a.astype(a.dtype.newbyteorder(">"))
    return a


def build(d):
    if not (isinstance(d, tuple) and d and d[0] == TAG):
        return d
    _, kind, fields, how = d
    if kind == "array":
        return _transform(fields[0], how)
    cls, bits, shape, buf, *rest = fields
    buf = _transform(buf, how) if isinstance(buf, np.ndarray) else buf
    if cls == "packed":
        return packed.PackedMatrix(bits, shape, buf, rest[0] if rest else None)
    return packed.PreparedMatrix(bits, shape, buf)


def call(name: str, *args, **kwargs):
    """qviz.packed.<name>(*args, **kwargs) with every described argument built here."""
    return getattr(packed, name)(*(build(a) for a in args), **{k: build(v) for k, v in kwargs.items()})


def zeros_call(name: str, bits: int, k: int, prepared_w: bool = False, **kwargs):
    """name(a, w) with 1 x K all-zero codes: K near the int32 limits without sending gigabytes down a pipe."""
    words = np.zeros((1, packed.words_per_row(k, bits)), np.uint64)  # calloc: pages appear only when read
    a = packed.PackedMatrix(bits, (1, k), words)
    w = packed.prepare(a) if prepared_w else a
    return getattr(packed, name)(a, w, **kwargs)
