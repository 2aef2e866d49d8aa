"""Python face of the bit-packed kernels: validation, allocation and readouts.

Every function checks its arguments and raises `TypeError` / `ValueError` naming the argument and what
is allowed before anything reaches compiled code, so no array a caller hands in can crash the process.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qviz import _checks
from qviz import _packed as _kernels

CODE_BITS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    """An [N, K] matrix of `bits`-bit codes packed along K into uint64 words (`words`: [N, ceil(K*bits/64)])."""

    bits: int
    shape: tuple[int, int]
    words: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes)

    @property
    def words_per_row(self) -> int:
        return int(self.words.shape[1])


def words_per_row(k: int, bits: int) -> int:
    """ceil(K * bits / 64): the exact number of uint64 words a packed row of K codes holds."""
    return -(-k * bits // 64)


def _matrix(name: str, a: object) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, K], got {a.ndim}-D with shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); allowed: at least one row and one column")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass numpy.ascontiguousarray({name})")
    return a


def pack(codes: np.ndarray, bits: int) -> PackedMatrix:
    """Pack uint8 codes [N, K], each < 2**bits, into a PackedMatrix (bits in 1, 2, 4, 8)."""
    _checks.choice("bits", bits, CODE_BITS)
    codes = _matrix("codes", codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must have dtype uint8, got {codes.dtype}")
    if bits < 8 and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < 2**bits = {2**bits} for bits={bits}; found {int(codes.max())}")
    n, k = codes.shape
    words = np.empty((n, words_per_row(k, bits)), dtype=np.uint64)
    _kernels.pack_codes(codes, bits, words)
    return PackedMatrix(bits, (n, k), words)


def unpack(packed: PackedMatrix) -> np.ndarray:
    """The uint8 codes [N, K] a PackedMatrix holds."""
    if not isinstance(packed, PackedMatrix):
        raise TypeError(f"packed must be a PackedMatrix, got {type(packed).__name__}")
    n, k = packed.shape
    out = np.empty((n, k), dtype=np.uint8)
    _kernels.unpack_codes(packed.words, packed.bits, out)
    return out
