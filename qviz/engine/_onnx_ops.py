"""ONNX forms for two operators that PyTorch's TorchScript exporter gets wrong while models run them.

Hugging Face decoders given no attention mask and no cache look for packed sequences in their position
ids: `(torch.diff(position_ids, prepend=...) != 1).cumsum(-1)`. The exporter has no form for aten::diff
("not supported" at every opset), and it writes aten::cumsum of a bool tensor as an ONNX CumSum of bools,
a graph ONNX Runtime refuses to load (torch sums bools and every integer type as int64). export_onnx
registers the forms below for the length of an export, unless someone registered their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.onnx import symbolic_helper

_LOWEST_OPSET = 13  # export_onnx's lowest; the exporter dispatches an op registered here to every later opset
_OPSETS = range(9, 24)
_TO_THE_END = 2**63 - 1
_SUMMED_AS_INT64 = ("Bool", "Byte", "Char", "Short", "Int")  # torch.cumsum sums these as int64


@symbolic_helper.parse_args("v", "i", "i", "v", "v")
def _diff(g, x, n, dim, prepend, append):
    """torch.diff: x[1:] - x[:-1] along dim, n times, after prepend and append are joined on (Bool tensors
    differ by XOR, as in torch.diff)."""
    parts = [p for p in (prepend, x, append) if not symbolic_helper._is_none(p)]
    y = g.op("Concat", *parts, axis_i=dim) if len(parts) > 1 else x
    axes = g.op("Constant", value_t=torch.tensor([dim]))
    zero, one = g.op("Constant", value_t=torch.tensor([0])), g.op("Constant", value_t=torch.tensor([1]))
    last, end = g.op("Constant", value_t=torch.tensor([-1])), g.op("Constant", value_t=torch.tensor([_TO_THE_END]))
    for _ in range(n):
        later, earlier = g.op("Slice", y, one, end, axes), g.op("Slice", y, zero, last, axes)
        y = g.op("Xor", later, earlier) if symbolic_helper._is_bool(x) else g.op("Sub", later, earlier)
    return y


@symbolic_helper.parse_args("v", "i", "none")
def _cumsum(g, x, dim, dtype=None):
    """torch.cumsum, in the type torch sums in: the dtype asked for, else int64 for bools and integers."""
    asked = None if dtype is None else symbolic_helper._maybe_get_const(dtype, "i")
    scalar = symbolic_helper._try_get_scalar_type(x)
    if isinstance(asked, int):
        x = g.op("Cast", x, to_i=symbolic_helper.scalar_type_to_onnx[asked])
    elif scalar is not None and scalar.scalar_name() in _SUMMED_AS_INT64:
        x = g.op("Cast", x, to_i=torch.onnx.TensorProtoDataType.INT64)
    return g.op("CumSum", x, g.op("Constant", value_t=torch.tensor(dim, dtype=torch.int)))


_SYMBOLICS = {"aten::diff": _diff, "aten::cumsum": _cumsum}


def _users_own(name: str) -> bool:
    """Whether someone registered a form of name (torch.onnx.register_custom_op_symbolic) that ours would
    replace. True when PyTorch's internals cannot tell: then theirs, or the exporter's, stays."""
    try:
        from torch.onnx._internal.torchscript_exporter import registration

        group = registration.registry.get_function_group(name)
        return group is not None and any(group._functions.overridden(v) for v in _OPSETS)
    except (ImportError, AttributeError):
        return True


@contextlib.contextmanager
def exporter_fixes() -> Iterator[None]:
    """Register the forms above where nobody registered their own; unregister them on leaving."""
    added = [name for name in _SYMBOLICS if not _users_own(name)]
    for name in added:
        torch.onnx.register_custom_op_symbolic(name, _SYMBOLICS[name], _LOWEST_OPSET)
    try:
        yield
    finally:
        for name in added:
            torch.onnx.unregister_custom_op_symbolic(name, _LOWEST_OPSET)
