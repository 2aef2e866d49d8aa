"""Bit-packed low-bit kernels: packing, matmuls, packed-index convolution and memory reports.

Every function checks its arguments, every field of every object it is handed included, and raises
`TypeError` / `ValueError` naming the argument before anything reaches compiled code: no array or
object a caller builds can crash the process or read memory it does not own. Outputs are allocated
here; the kernels release the GIL while they run.

Layout: codes of b bits (b in 1, 2, 4, 8) are packed along K into uint64 words, code j of a row at word
j // (64 / b), bit offset (j % (64 / b)) * b, rows padded with zero bits to exactly ceil(K b / 64) words
(`PackedMatrix`). Signs (`pack_signs`) use bit 1 for -1 (x < 0) and bit 0 for +1. The matmul kernels
read weights in panels of 16 rows (`prepare` makes a `PreparedMatrix` once, as a deployed layer holds
its weights; a `PackedMatrix` passed as weights is laid out per call).

Kernels, after [Kütükcü 2020, Ch. 5] (paper 003), generalised: binary XOR-popcount matmul, the hybrid
AND-popcount matmul of [Kütükcü 2020, Table 4.4, Fig. 4.5], low-bit integer matmul, codebook (LUT)
matmul and packed-index direct convolution [Kütükcü 2020, Figs. 5.1, 5.2]. The code path (portable,
popcnt, avx2, avx2vnni, avx512, avx512vnni) is chosen at import: see `qviz._dispatch`. Timing lives in
`qviz._timing` (`measure_latency`, `measure_conv_latency`, `roof`, `read_bandwidth`), re-exported here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import mmap
import numbers

import numpy as np
import torch

from qviz import _checks
from qviz import _packed as _kernels
from qviz._dispatch import (
    PATHS,
    available_paths,
    available_threadings,
    kernel_path,
    openmp_enabled,
    pool_enabled,
    set_kernel_path,
    set_threading,
    threading,
)
from qviz._dispatch import current as _path
from qviz.engine.metrics import compression_ratio

CODE_BITS = (1, 2, 4, 8)
PANEL = _kernels.PANEL
INT32_MAX = 2**31 - 1
_MAX_SIDE = 2**40  # any real matrix is smaller; keeps every size product far from int64 overflow

__all__ = [
    "CODE_BITS", "PATHS", "PackedMatrix", "PreparedMatrix", "available_paths", "available_threadings",
    "binary_matmul",
    "codebook_from_affine", "dequantize_matmul", "hybrid_matmul", "kernel_path", "lowbit_matmul",
    "lut_conv2d", "lut_matmul", "measure_conv_latency", "measure_latency", "memory_report", "openmp_enabled",
    "pack", "pack_signs", "pack_uniform", "pool_enabled", "popcount_ceiling", "popcounts", "prepare",
    "read_bandwidth", "roof", "set_kernel_path", "set_threading", "threading", "unpack", "words_per_row",
]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedMatrix:
    """An [N, K] matrix of `bits`-bit codes packed along K into uint64 words (`words`: [N, ceil(K*bits/64)]).

    `code_sums` holds each row's sum of codes when the matrix was packed from activations by
    `pack_uniform`; it is informational: kernels recompute what they need from `words`.
    """

    bits: int
    shape: tuple[int, int]
    words: np.ndarray
    code_sums: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes)

    @property
    def words_per_row(self) -> int:
        return int(self.words.shape[1])


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedMatrix:
    """Weights [N, K] of `bits`-bit codes laid out for the matmul kernels, made by `prepare`.

    `panels` [ceil(N/16), ceil(K*bits/32), 16] uint32: panel p holds 32-bit word k of rows 16p .. 16p+15
    side by side, so one vector load brings one slice of K for 16 outputs. A copy taken at `prepare`
    (read-only): later changes to the PackedMatrix do not reach it. `nbytes` is what it holds, padding
    rows of the last panel included.
    """

    bits: int
    shape: tuple[int, int]
    panels: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.panels.nbytes)

    # pickle and deepcopy give numpy's copy of the panels: writeable, and only 16-byte aligned, so that
    # every vector load would span two cache lines. They come back laid out as `prepare` lays them out.
    def __reduce__(self):
        return _prepared_again, (self.bits, self.shape, self.panels, self._read_only())

    def __deepcopy__(self, memo):
        return _prepared_again(copy.deepcopy(self.bits, memo), copy.deepcopy(self.shape, memo),
                               copy.deepcopy(self.panels, memo), self._read_only())

    def _read_only(self) -> bool:
        return isinstance(self.panels, np.ndarray) and not self.panels.flags.writeable


def _prepared_again(bits, shape, panels, read_only: bool) -> PreparedMatrix:
    """A PreparedMatrix rebuilt from pickle or deepcopy (`panels` a fresh copy): aligned, on huge pages when
    large, read-only if it was. Panels that are not a uint32 array stay as they are: the kernels refuse them."""
    if type(panels) is not np.ndarray or panels.dtype != np.uint32:
        return PreparedMatrix(bits, shape, panels)
    laid = _empty_lasting(panels.shape, panels.dtype)
    laid[...] = panels
    laid.flags.writeable = not read_only
    return PreparedMatrix(bits, shape, laid)


def words_per_row(k: int, bits: int) -> int:
    """ceil(K * bits / 64): the exact number of uint64 words a packed row of K codes holds."""
    k = _checks.integer("k", k, 0, _MAX_SIDE)  # (a plain int: numpy unsigned ints would wrap in -k)
    bits = _bits_field("bits", bits, CODE_BITS)
    return -(-k * bits // 64)


def _words32(k: int, bits: int) -> int:
    return -(-k * bits // 32)


def _threads(threads: int | None) -> int:
    if threads is None:
        return torch.get_num_threads()
    return _checks.integer("threads", threads, 1, 1024)


def _empty_aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte (cache line, AVX-512 vector) boundary."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------------
# Argument checks: every field of every object, before compiled code sees it


_F32, _U32, _U64, _I32 = np.dtype(np.float32), np.dtype(np.uint32), np.dtype(np.uint64), np.dtype(np.int32)


def _plain(a: np.ndarray) -> np.ndarray:
    """The array itself as a plain ndarray: a subclass may override shape, dtype or flags in Python, but
    the kernels see its buffer; checks and kernels must look at the same thing."""
    return a if type(a) is np.ndarray else np.ndarray.view(a, np.ndarray)


def _result(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A new result array, refused (ValueError) beyond qviz._timing.memory_limit(): 100000 one-bit rows
    by 100000 is 1.6 MB of input and 37 GiB of int32 output."""
    _checks.fits_memory("the result", math.prod(shape), dtype.itemsize,
                        "fewer rows of a or w, or an out= array of your own")
    return np.empty(shape, dtype)


def _matrix(name: str, a: object, dtype: type | None = None, ndim: int = 2) -> np.ndarray:
    # the common case first, with exact types (a few attribute reads); anything else takes the checks below
    if type(a) is np.ndarray and a.ndim == ndim and a.dtype == dtype and a.flags.c_contiguous and a.size:
        return a
    if not isinstance(a, np.ndarray):
        hint = " (use .numpy() on a torch tensor)" if isinstance(a, torch.Tensor) else ""
        raise TypeError(f"{name} must be a numpy.ndarray{hint}, got {type(a).__name__}")
    a = _plain(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {a.ndim}-D with shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); allowed: every dimension at least 1")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass numpy.ascontiguousarray({name})")
    return a


def _bits_field(name: str, bits: object, allowed: tuple[int, ...]) -> int:
    if type(bits) is int and bits in allowed:
        return bits
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(bits).__name__} {bits!r}")
    _checks.choice(name, int(bits), allowed)
    return int(bits)


def _shape_field(name: str, shape: object) -> tuple[int, int]:
    if type(shape) is tuple and len(shape) == 2:
        n, k = shape
        if type(n) is int and type(k) is int and 1 <= n <= _MAX_SIDE and 1 <= k <= _MAX_SIDE:
            return shape
    if not isinstance(shape, tuple | list) or len(shape) != 2:
        raise TypeError(f"{name} must be a pair (N, K), got {shape!r}")
    return tuple(_checks.integer(f"{name}[{i}]", v, 1, _MAX_SIDE) for i, v in enumerate(shape))


class _Checked:
    """A matrix whose fields passed the checks: plain ints and a buffer of the exact shape."""

    __slots__ = ("bits", "k", "n", "panels", "words")

    def __init__(self, bits: int, n: int, k: int, words: np.ndarray | None, panels: np.ndarray | None):
        self.bits, self.n, self.k = bits, n, k
        self.words = words  # row layout, or None for a PreparedMatrix
        self.panels = panels


def _packed(name: str, p: object, bits: tuple[int, ...] = CODE_BITS, prepared: bool = False,
            floats: bool = False) -> _Checked:
    """The checked fields of a PackedMatrix (or, if `prepared`, a PreparedMatrix) passed as `name`.

    The common case is recognised first, with exact types and the same conditions as the full checks
    (`_packed_checked`), which everything else goes through: they raise, or accept what is unusual (numpy
    integers as bits, a list as shape, a subclass).
    """
    t = type(p)
    if t is PackedMatrix or (t is PreparedMatrix and prepared):
        b, shape, buf = p.bits, p.shape, p.words if t is PackedMatrix else p.panels
        if type(b) is int and b in bits and type(shape) is tuple and len(shape) == 2 and type(buf) is np.ndarray \
                and buf.flags.c_contiguous:
            n, k = shape
            if type(n) is int and type(k) is int and 0 < n <= _MAX_SIDE and 0 < k <= _MAX_SIDE:
                if t is PackedMatrix:
                    w64 = -(-k * b // 64)
                    if buf.dtype == _U64 and buf.shape == (n, w64) and (
                            k * b % 64 == 0 or _kernels.padding_clear(buf, k * b - 64 * (w64 - 1)) < 0):
                        return _Checked(b, n, k, buf, None)
                else:
                    k32 = -(-k * b // 32)
                    if buf.dtype == _U32 and buf.shape == (-(-n // PANEL), k32, PANEL) and (
                            k * b % 32 == 0 or _kernels.panels_padding_clear(buf, k * b - 32 * (k32 - 1)) < 0):
                        return _Checked(b, n, k, None, buf)
    return _packed_checked(name, p, bits, prepared, floats)


def _packed_checked(name: str, p: object, bits: tuple[int, ...], prepared: bool, floats: bool = False) -> _Checked:
    kinds = "a PackedMatrix (from qviz.packed.pack / pack_signs / pack_uniform)"
    if prepared:
        kinds += " or a PreparedMatrix (from qviz.packed.prepare)"
    if floats:
        kinds += " or float32 activations (a numpy.ndarray)"
    if isinstance(p, PreparedMatrix) and prepared:
        b = _bits_field(f"{name}.bits", p.bits, bits)
        n, k = _shape_field(f"{name}.shape", p.shape)
        panels = _matrix(f"{name}.panels", p.panels, np.uint32, ndim=3)
        want = (-(-n // PANEL), _words32(k, b), PANEL)
        if panels.shape != want:
            raise ValueError(f"{name}.panels has shape {panels.shape}, but {name}.shape={(n, k)} at {b} bits "
                             f"needs {want}")
        bad = -1 if k * b % 32 == 0 else _kernels.panels_padding_clear(panels, k * b - 32 * (want[1] - 1))
        if bad >= 0:
            raise ValueError(f"{name}.panels has non-zero padding bits after K={k} codes (panel {bad}); "
                             "allowed: zero padding, as qviz.packed.prepare writes it")
        return _Checked(b, n, k, None, panels)
    if not isinstance(p, PackedMatrix):
        raise TypeError(f"{name} must be {kinds}, got {type(p).__name__}")
    b = _bits_field(f"{name}.bits", p.bits, bits)
    n, k = _shape_field(f"{name}.shape", p.shape)
    words = _matrix(f"{name}.words", p.words, np.uint64)
    want = (n, words_per_row(k, b))
    if words.shape != want:
        raise ValueError(f"{name}.words has shape {words.shape}, but {name}.shape={(n, k)} at {b} bits needs {want}")
    bad = -1 if k * b % 64 == 0 else _kernels.padding_clear(words, k * b - 64 * (want[1] - 1))
    if bad >= 0:
        raise ValueError(f"{name}.words has non-zero padding bits after K={k} codes (row {bad}); allowed: "
                         "zero padding, as qviz.packed.pack writes it")
    return _Checked(b, n, k, words, None)


def _same_k(a: _Checked, w: _Checked, wname: str = "w") -> None:
    if a.k != w.k:
        raise ValueError(f"a and {wname} must share K (their second dimension), got a.shape={(a.n, a.k)}, "
                         f"{wname}.shape={(w.n, w.k)}")


def _rows_of(c: _Checked) -> np.ndarray:
    """The row layout (uint64 words) of a checked matrix; a PreparedMatrix is laid back out."""
    if c.words is not None:
        return c.words
    rows = np.empty((c.n, words_per_row(c.k, c.bits)), np.uint64)
    _kernels.panels_to_rows(c.panels, rows)
    return rows


def _panels_of(c: _Checked, *, lasting: bool = False) -> np.ndarray:
    """The panel layout of a checked matrix; a PackedMatrix is laid out now (the cost of not preparing).

    lasting: the layout is kept (`prepare`), so a large one goes on huge pages (`_empty_lasting`)."""
    if c.panels is not None:
        return c.panels
    shape = (-(-c.n // PANEL), _words32(c.k, c.bits), PANEL)
    panels = _empty_lasting(shape, np.uint32) if lasting else _empty_aligned(shape, np.uint32)
    _kernels.make_panels(c.words, panels.shape[1], panels)
    return panels


HUGE_PAGE = 2 << 20


def _empty_lasting(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array for weights that are kept: on huge pages when large (`_empty_huge`), else
    64-byte aligned."""
    huge = _empty_huge(shape, dtype)
    return _empty_aligned(shape, dtype) if huge is None else huge


def _empty_huge(shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """An uninitialised array on transparent huge pages, or None (small, or not Linux).

    A GEMV streams its weights once from DRAM; with 4 KiB pages the TLB misses every 4 KiB and the
    hardware prefetcher stops at every page boundary. On 2 MiB pages a 4096 x 4096 codebook GEMV read
    its weights at 23-29 GB/s instead of 20-24 (2 threads, Xeon). The mapping is anonymous memory that
    the array keeps alive; untouched slack (up to one huge page) is never backed.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        # private: a shared anonymous mapping is shmem, which gets no transparent huge pages by default
        region = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE,
                           flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = np.frombuffer(region, np.uint8)
        start = -raw.ctypes.data % HUGE_PAGE
        region.madvise(mmap.MADV_HUGEPAGE, start, len(region) - start)
    except (OSError, ValueError):
        return None
    return raw[start:start + nbytes].view(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------------
# Packing


def pack(codes: np.ndarray, bits: int) -> PackedMatrix:
    """Pack uint8 codes [N, K], each < 2**bits, into a PackedMatrix (bits in 1, 2, 4, 8)."""
    bits = _bits_field("bits", bits, CODE_BITS)
    codes = _matrix("codes", codes, np.uint8)
    if bits < 8 and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < 2**bits = {2**bits} for bits={bits}; found {int(codes.max())}")
    n, k = codes.shape
    words = np.empty((n, words_per_row(k, bits)), dtype=np.uint64)
    _kernels.pack_codes(codes, bits, words)
    return PackedMatrix(bits, (n, k), words)


def unpack(packed: PackedMatrix | PreparedMatrix) -> np.ndarray:
    """The uint8 codes [N, K] a PackedMatrix (or PreparedMatrix) holds."""
    c = _packed("packed", packed, prepared=True)
    out = np.empty((c.n, c.k), dtype=np.uint8)
    _kernels.unpack_codes(_rows_of(c), c.bits, out)
    return out


def prepare(w: PackedMatrix) -> PreparedMatrix:
    """Lay weights out once in panels of 16 rows for the matmul kernels (what a deployed layer holds).

    A read-only copy: the matmuls accept it wherever they accept weights, and skip the per-call layout
    a PackedMatrix costs (a pass over the weights, as much as a whole GEMV).
    """
    c = _packed("w", w)
    panels = _panels_of(c, lasting=True)
    panels.flags.writeable = False
    return PreparedMatrix(c.bits, (c.n, c.k), panels)


def pack_signs(x: np.ndarray, *, threads: int | None = None) -> PackedMatrix:
    """Sign-binarize float32 x [N, K] into a 1-bit PackedMatrix: bit 1 encodes -1 (x < 0), bit 0 encodes +1."""
    x = _matrix("x", x, np.float32)
    n, k = x.shape
    words = np.empty((n, -(-k // 64)), dtype=np.uint64)
    if _kernels.pack_signs(x, words, _path(), _threads(threads)):
        raise ValueError("x contains NaN; a sign is defined only for numbers")
    return PackedMatrix(1, (n, k), words)


def pack_uniform(x: np.ndarray, bits: int, scale: float, zero_point: int = 0, *,
                 threads: int | None = None) -> PackedMatrix:
    """Quantize float32 x [N, K] to unsigned b-bit codes and pack them in one pass (activation packing).

    code = clamp(round_half_even(x / scale) + zero_point, 0, 2^bits - 1), the affine quantizer of
    [Krishnamoorthi 2018, eqs. 1-2] (paper 004). The result carries each row's sum of codes (`code_sums`).
    """
    bits = _bits_field("bits", bits, CODE_BITS)
    inv_scale, zero_point = _quantizer(bits, scale, zero_point)
    x = _matrix("x", x, np.float32)
    n, k = x.shape
    words = np.empty((n, words_per_row(k, bits)), dtype=np.uint64)
    sums = np.empty(n, dtype=np.int64)
    if _kernels.pack_uniform(x, bits, inv_scale, float(zero_point), words, sums, _path(), _threads(threads)):
        raise ValueError("x contains NaN; only numbers can be quantized")
    return PackedMatrix(bits, (n, k), words, sums)


def _quantizer(bits: int, scale: object, zero_point: object) -> tuple[float, int]:
    """1 / scale as the float32 the kernels multiply by, and the zero point, both checked."""
    scale = _checks.real("scale", scale, 0.0, lo_open=True)
    zero_point = _checks.integer("zero_point", zero_point, 0, 2**bits - 1)
    if 2.0**-125 < scale < 2.0**125:  # 1 / scale in float32 is finite and non-zero: no warning to silence
        return float(np.float32(1.0) / np.float32(scale)), zero_point
    with np.errstate(over="ignore"):
        inv_scale = np.float32(1.0) / np.float32(scale)
    if not np.isfinite(inv_scale) or inv_scale == 0:
        raise ValueError(f"scale={scale} is out of range for float32; allowed: 1/scale finite and non-zero")
    return float(inv_scale), zero_point


def popcounts(packed: PackedMatrix | PreparedMatrix) -> np.ndarray:
    """Number of set bits per row (for a {0, 1} activation matrix: how many ones)."""
    c = _packed("packed", packed, prepared=True)
    out = np.empty(c.n, np.int64)
    _kernels.row_popcounts(_rows_of(c), out)
    return out


def _code_sums(c: _Checked) -> np.ndarray:
    out = np.empty(c.n, np.int64)
    _kernels.code_sums(_rows_of(c), c.bits, c.k, out)
    return out


# --------------------------------------------------------------------------------------------------
# Matmuls


def _out(out: object, shape: tuple[int, ...], dtype: np.dtype, inputs: dict) -> np.ndarray:
    """The array a kernel writes: a new one, or the caller's `out` once it is exactly what the call writes.

    `out` must be a C-contiguous, writeable numpy array of the result's dtype and shape that shares no
    memory with any input (the kernels read the inputs while they write out). `inputs`: name -> array.
    """
    if out is None:
        return _result(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray (or None), got {type(out).__name__}")
    out = _plain(out)
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype.name} (the result's), got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}; this call writes {shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous; allowed: an array such as numpy.empty(shape, dtype)")
    if not out.flags.writeable:
        raise ValueError("out is read-only; allowed: a writeable array")
    for name, a in inputs.items():
        if a is not None and np.may_share_memory(out, a):  # both contiguous: the bounds are the memory
            raise ValueError(f"out shares memory with {name}; allowed: an array of its own (the kernel reads "
                             f"{name} while it writes out)")
    return out


def _panel_matmul(a: _Checked, w: _Checked, op: str, mul: int, offset: int, popcount_offset: bool,
                  threads: int | None, out: object) -> np.ndarray:
    panels = _panels_of(w)
    shape = (a.n, w.n)
    out = _result(shape, _I32) if out is None else _out(out, shape, _I32, {"a.words": a.words, "w": panels})
    _kernels.panel_matmul(a.words, _words32(a.k, a.bits), panels, w.n, _kernels.OPS[op], mul, popcount_offset,
                          offset, out, _path(), _threads(threads))
    return out


def _floats_as_a(a: np.ndarray, w: _Checked) -> np.ndarray:
    """Float32 activations [M, K] passed as `a`, to be packed inside the matmul."""
    x = _matrix("a", a, np.float32)
    if x.shape[1] != w.k:
        raise ValueError(f"a and w must share K (their second dimension), got a.shape={x.shape}, "
                         f"w.shape={(w.n, w.k)}")
    return x


def _fused_matmul(x: np.ndarray, w: _Checked, op: str, mul: int, offset: int, popcount_offset: bool,
                  quantizer: tuple[int, float, int] | None, threads: int | None, out: object) -> np.ndarray:
    """The panel matmul of float activations x, packed inside the kernel: their signs (quantizer None) or
    their codes under (bits, 1 / scale, zero point)."""
    panels = _panels_of(w)
    shape = (x.shape[0], w.n)
    out = _result(shape, _I32) if out is None else _out(out, shape, _I32, {"a": x, "w": panels})
    bits, inv_scale, zero_point = quantizer or (1, 1.0, 0)
    if _kernels.fused_matmul(x, quantizer is None, bits, inv_scale, float(zero_point), panels, w.n,
                             _kernels.OPS[op], mul, popcount_offset, offset, out, _path(), _threads(threads)):
        raise ValueError("a contains NaN; a sign is defined only for numbers" if quantizer is None
                         else "a contains NaN; only numbers can be quantized")
    return out


def _k_fits_int32(a: _Checked, per_code: int) -> None:
    """Every kernel accumulates in int32: refuse K for which sum_k a_k w_k could pass 2^31 - 1."""
    if a.k * per_code > INT32_MAX:
        raise ValueError(f"K={a.k} at {a.bits} bits could overflow int32; allowed: K <= {INT32_MAX // per_code}")


def binary_matmul(a: PackedMatrix | np.ndarray, w: PackedMatrix | PreparedMatrix, *, scale_a=None, scale_w=None,
                  threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Sign matmul of 1-bit a [M, K] and w [N, K] (bit 1 = -1): int32 [M, N] = K - 2 popcount(a XOR w).

    That is the sum of sign products, the XNOR-popcount of BNN [Kütükcü 2020, §3.2]. `a` may also be the
    float32 activations themselves: their signs are packed inside the kernel, as `pack_signs` packs them
    (the same result as binary_matmul(pack_signs(a), w), without a separate pass over a). With `scale_w`
    (one α per output channel, or one per layer) and/or `scale_a` (one per activation row), the xnor
    scheme's scaling [Kütükcü 2020, eq. 3-6] is applied afterwards and the result is float32 [M, N]:
    (sign(a) α_a) @ (sign(w) α_w).T. `out`: an array to write the result into (C-contiguous, writeable,
    the result's dtype and shape, sharing no memory with a or w), returned; by default a new one.
    """
    x = a if isinstance(a, np.ndarray) else None
    a = None if x is not None else _packed("a", a, (1,), floats=True)
    w = _packed("w", w, (1,), prepared=True)
    if x is not None:
        x = _floats_as_a(x, w)
        a = _Checked(1, x.shape[0], x.shape[1], x, None)
    _same_k(a, w)
    _k_fits_int32(a, 1)
    sa = None if scale_a is None else _scales("scale_a", scale_a, a.n).reshape(-1, 1)
    sw = None if scale_w is None else _scales("scale_w", scale_w, w.n).reshape(1, -1)

    def dots(into):
        if x is not None:
            return _fused_matmul(x, w, "xor", -2, a.k, False, None, threads, into)
        return _panel_matmul(a, w, "xor", -2, a.k, False, threads, into)

    if sa is None and sw is None:
        return dots(out)
    out = _out(out, (a.n, w.n), _F32, {"a": a.words, "w": w.words if w.panels is None else w.panels})
    dots = dots(None)
    out[...] = dots * (1.0 if sa is None else sa) * (1.0 if sw is None else sw)
    return out


def _scales(name: str, value, rows: int) -> np.ndarray:
    v = _checks.numpy_of(name, value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real | np.ndarray | list | tuple):
        raise TypeError(f"{name} must be a number or an array of numbers, got {type(value).__name__}")
    v = np.asarray(v)
    if v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
        raise TypeError(f"{name} must hold real numbers, got dtype {v.dtype}")
    v = v.astype(np.float64).reshape(-1)
    if v.size not in (1, rows):
        raise ValueError(f"{name} must hold 1 or {rows} values, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or Inf; allowed: finite values")
    return v


def hybrid_matmul(a: PackedMatrix | np.ndarray, w: PackedMatrix | PreparedMatrix, *, scale: float = 1.0,
                  zero_point: int = 0, threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Activations in {0, 1} (DoReFa 1-bit; bit 1 = 1) times weights in {+1, -1} (bit 1 = -1).

    int32 [M, N] = popcount(a AND NOT w) - popcount(a AND w) = popcount(a) - 2 popcount(a AND w): the
    "two AND gates" hybrid of [Kütükcü 2020, Table 4.4, Fig. 4.5]. popcount(a) is counted from a's words
    (a.code_sums is not trusted). `a` may also be float32 activations, quantized to 1-bit codes inside
    the kernel as pack_uniform(a, 1, scale, zero_point) quantizes them (by default: 1 where a > 0.5).
    `out`: as in `binary_matmul`.
    """
    if isinstance(a, np.ndarray):
        w = _packed("w", w, (1,), prepared=True)
        x = _floats_as_a(a, w)
        inv_scale, zero_point = _quantizer(1, scale, zero_point)
        _k_fits_int32(_Checked(1, x.shape[0], x.shape[1], x, None), 1)
        return _fused_matmul(x, w, "and", -2, 0, True, (1, inv_scale, zero_point), threads, out)
    a, w = _packed("a", a, (1,), floats=True), _packed("w", w, (1,), prepared=True)
    _same_k(a, w)
    _k_fits_int32(a, 1)
    return _panel_matmul(a, w, "and", -2, 0, True, threads, out)


def lowbit_matmul(a: PackedMatrix | np.ndarray, w: PackedMatrix | PreparedMatrix, *, scale: float | None = None,
                  zero_point: int = 0, threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Integer matmul of unsigned b-bit codes: int32 [M, N] = sum_k a[m, k] w[n, k] (a.bits == w.bits).

    1-bit codes: popcount(a AND w); 2- and 4-bit: byte dot products of the codes' fields (vpdpbusd with
    VNNI or AVX-VNNI, vpmaddubsw with AVX2/AVX-512BW); 8-bit: a sum over the bit planes of a (bit-serial). Turn it
    into real values with `dequantize_matmul`. `a` may also be float32 activations with their quantizer
    (`scale`, `zero_point`): they are quantized to w.bits-bit codes inside the kernel, as
    pack_uniform(a, w.bits, scale, zero_point) quantizes them. `out`: as in `binary_matmul`.
    """
    if not isinstance(a, np.ndarray):
        a = _packed("a", a, floats=True)
    w = _packed("w", w, prepared=True)
    if isinstance(a, np.ndarray):
        x = _floats_as_a(a, w)
        if scale is None:
            raise TypeError("scale is required when a holds float activations (the quantizer of pack_uniform)")
        inv_scale, zero_point = _quantizer(w.bits, scale, zero_point)
        _k_fits_int32(_Checked(w.bits, x.shape[0], x.shape[1], x, None), (2**w.bits - 1) ** 2)
        if w.bits < 8:
            op = {1: "and", 2: "dot2", 4: "dot4"}[w.bits]
            return _fused_matmul(x, w, op, 1, 0, False, (w.bits, inv_scale, zero_point), threads, out)
        a = _packed("a", pack_uniform(x, w.bits, scale, zero_point, threads=threads))
    _same_k(a, w)
    if a.bits != w.bits:
        raise ValueError(f"a.bits={a.bits} and w.bits={w.bits} must be equal; allowed: both 1, 2, 4 or 8")
    _k_fits_int32(a, (2**a.bits - 1) ** 2)
    if a.bits < 8:
        return _panel_matmul(a, w, {1: "and", 2: "dot2", 4: "dot4"}[a.bits], 1, 0, False, threads, out)
    rows = _rows_of(w)
    out = _out(out, (a.n, w.n), _I32, {"a.words": a.words, "w": rows})
    _kernels.bitserial_matmul(a.words, rows, a.bits, out, _path(), _threads(threads))
    return out


def _real_values(name: str, value, n: int) -> np.ndarray:
    """A scalar or n finite real numbers (numpy array, list or torch tensor), as float64 [1] or [n]."""
    return _scales(name, value, n)


def dequantize_matmul(dot: np.ndarray, a: PackedMatrix, w_code_sums, *, scale_a: float, zero_a: int,
                      scale_w: float | np.ndarray, zero_w: int | np.ndarray) -> np.ndarray:
    """Real-valued result of an affine low-bit matmul from its integer core [Krishnamoorthi 2018, eqs. 4-6].

    sum_k s_a (a_k - z_a) s_w (w_k - z_w) = s_a s_w (dot - z_w sum a - z_a sum w + K z_a z_w), with
    dot = lowbit_matmul(a, w). sum a is counted from a's words (a.code_sums is not trusted); w_code_sums
    is sum w per weight row: N integers, or the weights themselves (PackedMatrix / PreparedMatrix).
    """
    a = _packed("a", a)
    dot = _matrix("dot", dot)
    if not np.issubdtype(dot.dtype, np.integer):
        raise TypeError(f"dot must hold integers (lowbit_matmul's int32 result), got dtype {dot.dtype}")
    if dot.shape[0] != a.n:
        raise ValueError(f"dot has {dot.shape[0]} rows but a has {a.n}; dot must be lowbit_matmul(a, w)")
    n = dot.shape[1]
    if isinstance(w_code_sums, PackedMatrix | PreparedMatrix):
        wc = _packed("w_code_sums", w_code_sums, prepared=True)
        if wc.k != a.k or wc.n != n:
            raise ValueError(f"w_code_sums has shape {(wc.n, wc.k)}; dot and a need ({n}, {a.k})")
        sw_sum = _code_sums(wc).astype(np.float64)
    else:
        sw_sum = _integers("w_code_sums", w_code_sums, n, 0, a.k * (2**a.bits - 1))
    top = 2**a.bits - 1
    if dot.size and (int(dot.min()) < 0 or int(dot.max()) > a.k * top * top):
        raise ValueError(f"dot holds values outside 0..{a.k * top * top}, impossible for K={a.k} products of "
                         f"{a.bits}-bit codes; dot must be lowbit_matmul(a, w)")
    scale_a = _checks.real("scale_a", scale_a, 0.0, lo_open=True)
    zero_a = _checks.integer("zero_a", zero_a, 0, top)
    s_w = _real_values("scale_w", scale_w, n)
    if not (s_w > 0).all():
        raise ValueError("scale_w must be > 0")
    z_w = _real_values("zero_w", zero_w, n)
    if not ((z_w == np.round(z_w)) & (z_w >= 0) & (z_w <= top)).all():
        raise ValueError(f"zero_w must hold integer codes in 0..{top} (the weights' zero points at {a.bits} bits)")
    sa_sum = _code_sums(a).astype(np.float64)[:, None]
    core = dot.astype(np.float64) - z_w.reshape(1, -1) * sa_sum - zero_a * sw_sum.reshape(1, -1) \
        + a.k * zero_a * z_w.reshape(1, -1)
    with np.errstate(over="ignore"):
        out = (scale_a * s_w.reshape(1, -1) * core).astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("the result overflows float32 with these scale_a and scale_w; allowed: scales whose "
                         "products with the integer sums stay below 3.4e38")
    return out


def _integers(name: str, value, n: int, lo: int, hi: int) -> np.ndarray:
    v = _checks.numpy_of(name, value)
    if not isinstance(v, np.ndarray | list | tuple):
        raise TypeError(f"{name} must be an array of {n} integers, got {type(value).__name__}")
    v = np.asarray(v)
    if v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {v.dtype}")
    v = v.reshape(-1)
    if v.size != n:
        raise ValueError(f"{name} must hold {n} values (one per weight row), got {v.size}")
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"{name} holds values outside {lo}..{hi}, impossible for sums of K codes")
    return v.astype(np.float64)


def _codebook(codebook: object, bits: int, rows: int) -> np.ndarray:
    entries = 2**bits
    if type(codebook) is np.ndarray and codebook.dtype == _F32 and codebook.flags.c_contiguous and (
            codebook.shape == (entries,) or codebook.shape == (rows, entries)):  # the common case, without copies
        return codebook if codebook.ndim == 2 else codebook.reshape(1, entries)  # values: checked in the kernel
    cb = _checks.numpy_of("codebook", codebook)
    if not isinstance(cb, np.ndarray):
        raise TypeError(f"codebook must be a numpy.ndarray or torch.Tensor, got {type(codebook).__name__}")
    cb = _plain(cb)
    if cb.dtype == np.bool_ or not (np.issubdtype(cb.dtype, np.floating) or np.issubdtype(cb.dtype, np.integer)):
        raise TypeError(f"codebook must hold real numbers, got dtype {cb.dtype}")
    if cb.ndim not in (1, 2):
        raise ValueError(f"codebook must be 1-D [2**bits] (per layer) or 2-D [N, 2**bits] (per channel), "
                         f"got {cb.shape}")
    if cb.shape[-1] != entries or (cb.ndim == 2 and cb.shape[0] != rows):
        allowed = f"({entries},) or ({rows}, {entries})"
        raise ValueError(f"codebook has shape {cb.shape}; for {rows} weight rows at {bits} bits allowed: {allowed} "
                         "(pad unused entries)")
    with np.errstate(over="ignore", invalid="ignore"):
        cb = np.ascontiguousarray(cb, dtype=np.float32).reshape(-1 if cb.ndim == 2 else 1, entries)
    if not np.isfinite(cb).all():
        raise ValueError("codebook contains NaN or Inf (or values beyond float32); allowed: finite values")
    return cb


def lut_matmul(x: np.ndarray, w: PackedMatrix | PreparedMatrix, codebook: np.ndarray, *,
               threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Float activations times codebook weights: float32 [M, N] = x @ codebook[w].T.

    The matmul form of the packed-index convolution [Kütükcü 2020, Fig. 5.2]. codebook: [2**bits] for one
    codebook per layer or [N, 2**bits] for one per output channel. Uniform weights use
    `codebook_from_affine(scale, zero_point, bits)`. One codebook and b <= 4 run on panels (the table
    sits in a register); per-channel codebooks and 8-bit codes decode blocks of panels with gathers when
    there are several rows of x (AVX2 and AVX-512), and row by row otherwise. `out`: as in
    `binary_matmul` (float32); after a refused call (NaN, overflow) its contents are unspecified.
    """
    w = _packed("w", w, prepared=True)
    x = _matrix("x", x, np.float32)  # NaN / Inf: the kernel wrapper checks before it computes
    if x.shape[1] != w.k:
        raise ValueError(f"x and w must share K, got x.shape={x.shape}, w.shape={(w.n, w.k)}")
    cb = _codebook(codebook, w.bits, w.n)
    stride = 0 if cb.shape[0] == 1 else 2**w.bits
    panel = _kernels.panel_lut_ok(_path(), x.shape[0], w.n, w.k, w.bits, stride)
    weights = _panels_of(w) if panel else _rows_of(w)
    shape = (x.shape[0], w.n)
    out = _result(shape, _F32) if out is None else _out(out, shape, _F32, {"x": x, "w": weights, "codebook": cb})
    if panel:
        status = _kernels.panel_lut(x, weights, w.n, w.bits, cb.reshape(-1), stride, out, _path(), _threads(threads))
    else:
        status = _kernels.lut_matmul(x, weights, w.bits, cb, out, _path(), _threads(threads))
    return _float_status(status, out)


_FLOAT_ERRORS = {
    1: "x contains NaN or Inf; allowed: finite float32 values",
    2: "codebook contains NaN or Inf (or values beyond float32); allowed: finite values",
    3: "the result overflows float32: x and codebook are finite but their products sum beyond 3.4e38; allowed: "
       "inputs whose sums stay within float32 (scale x or the codebook down)",
}


def _float_status(status: int, out: np.ndarray) -> np.ndarray:
    """The float kernels' wrappers check x and the codebook before, and the result after (finite inputs can
    still sum past float32's range): refuse rather than hand back inf or NaN."""
    if status:
        raise ValueError(_FLOAT_ERRORS[status])
    return out


def codebook_from_affine(scale, zero_point, bits: int) -> np.ndarray:
    """The codebook of a uniform quantizer: entry c is scale (c - zero_point) [Krishnamoorthi 2018, eq. 3].

    Scalars give one codebook [2**bits]; arrays of N scales / zero-points give [N, 2**bits].
    """
    bits = _bits_field("bits", bits, CODE_BITS)
    s = _array_of_reals("scale", scale)
    z = _array_of_reals("zero_point", zero_point)
    if s.ndim > 1 or z.ndim > 1 or (s.ndim == 1 and z.ndim == 1 and s.size != z.size):
        raise ValueError(f"scale and zero_point must be scalars or 1-D arrays of one length, got shapes "
                         f"{s.shape} and {z.shape}")
    if s.size == 0 or z.size == 0:
        raise ValueError("scale and zero_point must not be empty")
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("scale must be finite and > 0")
    if not np.isfinite(z).all():
        raise ValueError("zero_point must be finite")
    codes = np.arange(2**bits, dtype=np.float64)
    table = (codes - z.reshape(-1, 1)) * s.reshape(-1, 1)
    with np.errstate(over="ignore"):
        table = table.astype(np.float32)
    if not np.isfinite(table).all():
        raise ValueError("scale (c - zero_point) overflows float32; allowed: entries within float32 range")
    return table.reshape(-1) if s.ndim == 0 and z.ndim == 0 else table


def _array_of_reals(name: str, value) -> np.ndarray:
    v = _checks.numpy_of(name, value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real | np.ndarray | list | tuple):
        raise TypeError(f"{name} must be a number or an array of numbers, got {type(value).__name__}")
    try:
        v = np.asarray(v)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{name} must be a number or a 1-D array of numbers: {e}") from None
    if v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
        raise TypeError(f"{name} must hold real numbers, got dtype {v.dtype}")
    return v.astype(np.float64)


def lut_conv2d(x: np.ndarray, w: PackedMatrix | PreparedMatrix, codebook: np.ndarray, kernel: tuple[int, int], *,
               padding: int = 0, threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Packed-index direct convolution [Kütükcü 2020, Figs. 5.1, 5.2], stride 1, zero padding.

    x: float32 [B, C, H, W]; w: codes [C_out, C * kh * kw] in torch's weight order (ci, i, j);
    returns float32 [B, C_out, H + 2p - kh + 1, W + 2p - kw + 1], equal to
    torch.nn.functional.conv2d(x, codebook[w].reshape(C_out, C, kh, kw), padding=p). `out`: as in
    `lut_matmul`.
    """
    # A small layer (003's: 42k multiply-adds, about a microsecond of arithmetic) is mostly call overhead:
    # the common case is recognised and run by one compiled call that applies the conditions of the checks
    # below; anything else (and every error) goes through them.
    if out is None and (threads is None or (type(threads) is int and 1 <= threads <= 1024)):
        fast = _kernels.conv2d_fast(x, w, codebook, kernel, padding,
                                    torch.get_num_threads() if threads is None else threads, _path())
        if fast is not None:
            return _float_status(*fast)
    w = _packed("w", w, prepared=True)
    x = _matrix("x", x, np.float32, ndim=4)  # NaN / Inf: the kernel wrapper checks before it computes
    if type(kernel) is tuple and len(kernel) == 2 and type(kernel[0]) is int and type(kernel[1]) is int \
            and 1 <= kernel[0] <= 64 and 1 <= kernel[1] <= 64:
        kh, kw = kernel
    else:
        if not (isinstance(kernel, tuple | list) and len(kernel) == 2):
            raise TypeError(f"kernel must be a pair (kh, kw), got {kernel!r}")
        kh, kw = (_checks.integer(f"kernel[{i}]", v, 1, 64) for i, v in enumerate(kernel))
    if not (type(padding) is int and 0 <= padding < max(kh, kw)):
        padding = _checks.integer("padding", padding, 0, max(kh, kw) - 1)
    b, c, h, wd = x.shape
    if w.k != c * kh * kw:
        raise ValueError(f"w has K={w.k}, but C * kh * kw = {c} * {kh} * {kw} = {c * kh * kw}")
    ho, wo = h + 2 * padding - kh + 1, wd + 2 * padding - kw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"the {kh}x{kw} kernel is larger than the padded {h}x{wd} input (padding={padding})")
    cb = _codebook(codebook, w.bits, w.n)
    panels = _panels_of(w)
    shape = (b, w.n, ho, wo)
    out = _result(shape, _F32) if out is None else _out(out, shape, _F32, {"x": x, "w": panels, "codebook": cb})
    status = _kernels.lut_conv2d(x, panels, w.n, w.bits, cb, kh, kw, padding, out, _path(), _threads(threads))
    return _float_status(status, out)


# --------------------------------------------------------------------------------------------------
# Memory


def _layer_report(out_features: int, in_features: int, kernel: tuple[int, int], bits: int, codebook_bits: int,
                  per_channel: bool) -> dict:
    kh, kw = kernel
    row = in_features * kh * kw
    n = out_features * row
    codebooks = out_features if per_channel else 1
    packed_bytes = out_features * words_per_row(row, bits) * 8
    prepared_bytes = -(-out_features // PANEL) * PANEL * _words32(row, bits) * 4
    dense_bytes = math.ceil(n * bits / 8)
    codebook_bytes = math.ceil(codebooks * 2**bits * codebook_bits / 8)
    float32_bytes = 4 * n
    formula = n * 32 / (n * bits + codebooks * 2**bits * codebook_bits)  # 003 eq. 2-17, one or N codebooks
    return {
        "weights": n,
        "codebooks": codebooks,
        "packed_bytes": packed_bytes,
        "prepared_bytes": prepared_bytes,
        "dense_bytes": dense_bytes,
        "codebook_bytes": codebook_bytes,
        "float32_bytes": float32_bytes,
        "ratio": float32_bytes / (packed_bytes + codebook_bytes),
        "ratio_dense": float32_bytes / (dense_bytes + codebook_bytes),
        "ratio_formula": formula,
    }


def memory_report(out_features, in_features: int | None = None, kernel: tuple[int, int] = (1, 1), bits: int = 1,
                  codebook_bits: int = 32, per_channel: bool = False) -> dict:
    """Bytes of a layer's (or a whole torch.nn.Module's) weights packed at `bits`, against float32.

    packed_bytes: codes as a PackedMatrix holds them (rows padded to whole 64-bit words);
    prepared_bytes: as a PreparedMatrix holds them (panels of 16 rows, rows padded to 32-bit words);
    dense_bytes: the same codes back to back (ceil(n b / 8), what a file needs); codebook_bytes: 2**bits
    entries of codebook_bits each, one codebook per layer or per output channel; ratio / ratio_dense:
    float32 bytes over packed (or dense) + codebook bytes; ratio_formula: [Kütükcü 2020, eq. 2-17],
    n b / (n log2 k + k c) with b = 32, k = 2**bits (times the number of codebooks). Linear and Conv2d
    layers count; a module report adds "layers", one such dict per layer with its "name".
    """
    bits = _bits_field("bits", bits, CODE_BITS)
    codebook_bits = _checks.integer("codebook_bits", codebook_bits, 0, 64)
    _checks.boolean("per_channel", per_channel)
    if isinstance(out_features, torch.nn.Module):
        return _module_report(out_features, bits, codebook_bits, per_channel)
    out_features = _checks.integer("out_features", out_features, 1, _MAX_SIDE)
    in_features = _checks.integer("in_features", in_features, 1, _MAX_SIDE)
    if not (isinstance(kernel, tuple | list) and len(kernel) == 2):
        raise TypeError(f"kernel must be a pair (kh, kw), got {kernel!r}")
    kernel = tuple(_checks.integer(f"kernel[{i}]", v, 1, 2**20) for i, v in enumerate(kernel))
    report = _layer_report(out_features, in_features, kernel, bits, codebook_bits, per_channel)
    if not per_channel and report["weights"] < 2**53:
        assert math.isclose(report["ratio_formula"], compression_ratio(report["weights"], 32, 2**bits, codebook_bits))
    return report


def _module_report(module: torch.nn.Module, bits: int, codebook_bits: int, per_channel: bool) -> dict:
    layers = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            shape = (layer.out_features, layer.in_features, (1, 1))
        elif isinstance(layer, torch.nn.Conv2d):
            shape = (layer.out_channels, layer.in_channels // layer.groups, tuple(layer.kernel_size))
        else:
            continue
        if isinstance(getattr(layer, "weight", None), torch.nn.parameter.UninitializedParameter):
            raise ValueError(f"module's layer {name!r} ({type(layer).__name__}) has no weights yet (a lazy layer); "
                             "allowed: a module after one forward pass")
        if shape[0] * shape[1] == 0:
            raise ValueError(f"module's layer {name!r} has no weights ({shape[0]} outputs x {shape[1]} inputs); "
                             "allowed: layers with at least one weight")
        layers.append({"name": name, **_layer_report(*shape, bits, codebook_bits, per_channel)})
    if not layers:
        raise ValueError("module has no Linear or Conv2d layers to report on")
    keys = ("weights", "codebooks", "packed_bytes", "prepared_bytes", "dense_bytes", "codebook_bytes",
            "float32_bytes")
    total = {key: sum(layer[key] for layer in layers) for key in keys}
    total["ratio"] = total["float32_bytes"] / (total["packed_bytes"] + total["codebook_bytes"])
    total["ratio_dense"] = total["float32_bytes"] / (total["dense_bytes"] + total["codebook_bytes"])
    codebook_bits_total = sum(layer["codebooks"] for layer in layers) * 2**bits * codebook_bits
    total["ratio_formula"] = total["weights"] * 32 / (total["weights"] * bits + codebook_bits_total)
    total["layers"] = layers
    return total


_kernels.set_fast_types(np.ndarray, PreparedMatrix, _F32, np.empty)

# The timing harness is its own module; its public names belong to this API.
from qviz._timing import (  # noqa: E402
    measure_conv_latency,
    measure_latency,
    popcount_ceiling,
    read_bandwidth,
    roof,
)
