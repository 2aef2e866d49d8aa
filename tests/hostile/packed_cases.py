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


OUT_FNS = ("binary_matmul", "binary_scaled", "hybrid_matmul", "lowbit_matmul", "lut_matmul", "lut_conv2d")


def out_problem(fn: str, m: int, n: int, k: int, bits: int, seed: int):
    """The arguments of `fn` (prepared weights), the result's shape and dtype, and the reference result."""
    rng = np.random.default_rng(seed)
    if fn in ("lut_matmul", "lut_conv2d"):
        codes = rng.integers(0, 2**bits, (n, k), dtype=np.uint8)
        cb = rng.standard_normal(2**bits).astype(np.float32)
        if fn == "lut_matmul":
            x = rng.standard_normal((m, k), dtype=np.float32)
            ref = x.astype(np.float64) @ cb[codes].T.astype(np.float64)
        else:  # a 1x1 convolution: K input channels of 1 x m pixels
            x = rng.standard_normal((1, k, 1, m), dtype=np.float32)
            ref = np.einsum("bchw,oc->bohw", x.astype(np.float64), cb[codes].astype(np.float64))
        return {"x": x, "codes": codes, "cb": cb}, ref.shape, np.float32, ref
    b = 1 if fn != "lowbit_matmul" else bits
    ca, cw = (rng.integers(0, 2**b, (r, k), dtype=np.uint8) for r in (m, n))
    a, w = ca.astype(np.int64), cw.astype(np.int64)
    if fn in ("binary_matmul", "binary_scaled"):
        ref = k - 2 * (ca[:, None, :] != cw[None, :, :]).sum(-1)
    elif fn == "hybrid_matmul":
        ref = a @ (1 - 2 * w).T
    else:
        ref = a @ w.T
    scale = rng.uniform(0.5, 2.0, n)
    if fn == "binary_scaled":
        return {"ca": ca, "cw": cw, "bits": b, "scale": scale}, ref.shape, np.float32, ref * scale
    return {"ca": ca, "cw": cw, "bits": b}, ref.shape, np.int32, ref


def _out_array(change: str, shape: tuple, dtype, inputs: dict):
    """The `out` argument for `change`; aliasing outs are views of an input's own buffer."""
    if change == "none":
        return None
    if change.startswith("alias_"):
        src = inputs[change[len("alias_"):]]
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize  # callers leave room for it after the input
        return src.reshape(-1).view(np.uint8)[:need].view(dtype).reshape(shape)
    base = {"ok": (shape, dtype), "dtype_f64": (shape, np.float64), "dtype_i64": (shape, np.int64),
            "dtype_other": (shape, np.float32 if dtype == np.int32 else np.int32),
            "shape_t": (shape[::-1], dtype), "shape_more": ((*shape[:-1], shape[-1] + 1), dtype),
            "shape_flat": ((int(np.prod(shape)),), dtype)}.get(change)
    if base is not None:
        return np.zeros(*base)
    out = np.zeros(shape, dtype)
    if change == "noncontig":
        return np.zeros((*shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
    if change == "fortran":
        return np.asfortranarray(out)
    if change == "readonly":
        out.flags.writeable = False
        return out
    if change == "tensor":
        return torch.from_numpy(out)
    if change == "list":
        return out.tolist()
    if change == "big_endian":
        return out.astype(out.dtype.newbyteorder(">"))
    raise AssertionError(change)


def out_call(fn: str, change: str, m: int, n: int, k: int, bits: int, seed: int):
    """fn(..., out=<change>) built here (aliasing survives no pipe); returns (result, result is out)."""
    args, shape, dtype, _ = out_problem(fn, m, n, k, bits, seed)
    if fn in ("lut_matmul", "lut_conv2d"):
        w = packed.prepare(packed.pack(args["codes"], bits))
        x, cb = args["x"].copy(), args["cb"].copy()
        if change == "alias_w":
            panels = np.zeros(w.panels.size + 4 * int(np.prod(shape)), np.uint32)
            panels[:w.panels.size] = w.panels.reshape(-1)
            w = packed.PreparedMatrix(bits, w.shape, panels[:w.panels.size].reshape(w.panels.shape))
            inputs = {"w": panels}
        else:
            big = {"x": np.concatenate([x.reshape(-1), np.zeros(int(np.prod(shape)), np.float32)]),
                   "codebook": np.concatenate([cb, np.zeros(int(np.prod(shape)), np.float32)])}
            x = big["x"][:x.size].reshape(x.shape)
            cb = big["codebook"][:cb.size]
            inputs = big
        out = _out_array(change, shape, dtype, inputs)
        if fn == "lut_matmul":
            result = packed.lut_matmul(x, w, cb, out=out)
        else:
            result = packed.lut_conv2d(x, w, cb, (1, 1), out=out)
        return result, result is out
    b = args["bits"]
    a = packed.pack(args["ca"], b)
    w = packed.prepare(packed.pack(args["cw"], b))
    room = int(np.prod(shape)) * 8
    words = np.zeros(a.words.size + room, np.uint64)
    words[:a.words.size] = a.words.reshape(-1)
    a = packed.PackedMatrix(b, a.shape, words[:a.words.size].reshape(a.words.shape))
    panels = np.zeros(w.panels.size + room, np.uint32)
    panels[:w.panels.size] = w.panels.reshape(-1)
    w = packed.PreparedMatrix(b, w.shape, panels[:w.panels.size].reshape(w.panels.shape))
    out = _out_array(change, shape, dtype, {"a": words, "w": panels})
    call = {"binary_matmul": packed.binary_matmul, "binary_scaled": packed.binary_matmul,
            "hybrid_matmul": packed.hybrid_matmul, "lowbit_matmul": packed.lowbit_matmul}[fn]
    kwargs = {"scale_w": args["scale"]} if fn == "binary_scaled" else {}
    result = call(a, w, out=out, **kwargs)
    return result, result is out


# ndarray subclasses whose Python-level shape lies about the buffer the kernels see


class ClaimsTwoColumns(np.ndarray):
    shape = property(lambda self: (1, 2))


class ClaimsTwoByFour(np.ndarray):
    shape = property(lambda self: (2, 4))


class ClaimsManyRows(np.ndarray):
    shape = property(lambda self: (100000, 1))


def lying_words():
    """binary_matmul with a.words of 4000 rows claiming 1: the kernel would write 4000 result rows into 1."""
    a = packed.PackedMatrix(1, (1, 128), np.zeros((4000, 2), np.uint64).view(ClaimsTwoColumns))
    return packed.binary_matmul(a, packed.prepare(packed.pack(np.zeros((16, 128), np.uint8), 1)))


def lying_out():
    a = packed.pack(np.zeros((2, 64), np.uint8), 1)
    w = packed.prepare(packed.pack(np.zeros((4, 64), np.uint8), 1))
    return packed.binary_matmul(a, w, out=np.zeros((1, 1), np.int32).view(ClaimsTwoByFour))


def lying_rows():
    return packed.unpack(packed.PackedMatrix(8, (100000, 8), np.zeros((1, 1), np.uint64).view(ClaimsManyRows)))


def huge_result():
    """1.6 MB of one-bit inputs whose int32 result would be 37 GiB."""
    a = packed.pack_signs(np.ones((100000, 1), np.float32))
    return packed.binary_matmul(a, packed.prepare(a))
