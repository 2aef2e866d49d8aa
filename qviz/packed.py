"""Python face of the bit-packed kernels (qviz/_packed.pyx): validation, allocation and readouts.

Every function checks its arguments and raises `TypeError` / `ValueError` naming the argument and what is
allowed before anything reaches compiled code, so no array a caller hands in can crash the process.
Outputs are allocated here; the kernels release the GIL while they run.

Layout: codes of b bits (b in 1, 2, 4, 8) are packed along K into uint64 words, code j of a row at word
j // (64 / b), bit offset (j % (64 / b)) * b, rows padded with zero bits to exactly ceil(K b / 64) words.
Signs (`pack_signs`) use bit 1 for -1 (x < 0) and bit 0 for +1.

Kernels (papers/003_f90b6f8834304304.txt Chapter 5, generalised): binary XOR-popcount matmul, the hybrid
AND-popcount matmul of 003 Table 4.4 / Fig. 4.5, bit-serial low-bit matmul, codebook (LUT) matmul and
packed-index direct convolution (003 Figs. 5.1, 5.2). The fastest code path the CPU supports is chosen at
import (`kernel_path()`), after a self-check against the portable path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import threading
import time
import warnings

import numpy as np
import torch

from qviz import _checks
from qviz import _packed as _kernels
from qviz.engine.metrics import compression_ratio

CODE_BITS = (1, 2, 4, 8)
PATHS = _kernels.PATHS
LATENCY_KINDS = ("binary", "hybrid", "lowbit", "lut")


@dataclasses.dataclass(frozen=True, eq=False)
class PackedMatrix:
    """An [N, K] matrix of `bits`-bit codes packed along K into uint64 words (`words`: [N, ceil(K*bits/64)]).

    `code_sums` holds each row's sum of codes when the matrix was packed from activations by
    `pack_uniform` (the zero-point correction of a low-bit matmul needs it).
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


def words_per_row(k: int, bits: int) -> int:
    """ceil(K * bits / 64): the exact number of uint64 words a packed row of K codes holds."""
    return -(-k * bits // 64)


# --------------------------------------------------------------------------------------------------
# Code paths


def _self_check(path: int) -> bool:
    """Does `path` give the portable path's results on a small random problem? (every kernel family)"""
    rng = np.random.default_rng(1234)
    m, n, k = 3, 5, 333
    x = rng.standard_normal((m, k), dtype=np.float32)
    try:
        for bits in CODE_BITS:
            a = pack(rng.integers(0, 2**bits, (m, k), dtype=np.uint8), bits)
            w = pack(rng.integers(0, 2**bits, (n, k), dtype=np.uint8), bits)
            cb = rng.standard_normal((1, 2**bits), dtype=np.float32)
            want, got = (np.empty((m, n), np.int32) for _ in range(2))
            _kernels.bitserial_matmul(a.words, w.words, bits, want, 0, 1)
            _kernels.bitserial_matmul(a.words, w.words, bits, got, path, 1)
            if not np.array_equal(want, got):
                return False
            want, got = (np.empty((m, n), np.float32) for _ in range(2))
            _kernels.lut_matmul(x, w.words, bits, cb, want, 0, 1)
            _kernels.lut_matmul(x, w.words, bits, cb, got, path, 1)
            if not np.allclose(want, got, rtol=1e-4, atol=1e-3):
                return False
        a, w = pack(rng.integers(0, 2, (m, k), dtype=np.uint8), 1), pack(rng.integers(0, 2, (n, k), dtype=np.uint8), 1)
        want, got = (np.empty((m, n), np.int32) for _ in range(2))
        _kernels.binary_matmul(a.words, w.words, k, want, 0, 1)
        _kernels.binary_matmul(a.words, w.words, k, got, path, 1)
        s0, s1 = (np.empty((m, words_per_row(k, 1)), np.uint64) for _ in range(2))
        _kernels.pack_signs(x, s0, 0)
        _kernels.pack_signs(x, s1, path)
        return bool(np.array_equal(want, got) and np.array_equal(s0, s1))
    except Exception:  # a path that cannot even run is not a path we use
        return False


def _choose_path() -> int:
    forced = os.environ.get("QVIZ_KERNEL_PATH")
    supported = _kernels.supported_paths()
    if forced:
        if forced not in supported:
            raise ValueError(f"QVIZ_KERNEL_PATH={forced!r} is not supported by this CPU; allowed: {supported}")
        return PATHS.index(forced)
    for name in reversed(supported):
        if name == "portable" or _self_check(PATHS.index(name)):
            return PATHS.index(name)
        warnings.warn(f"qviz kernel path {name!r} failed its self-check and is disabled", RuntimeWarning, stacklevel=2)
    return 0


_path = 0  # set below, once pack() exists for the self-check


def available_paths() -> tuple[str, ...]:
    """Code paths this CPU supports (slowest first): portable, popcnt, avx2, avx512."""
    return _kernels.supported_paths()


def kernel_path() -> str:
    """The code path every kernel call uses now."""
    return PATHS[_path]


def set_kernel_path(name: str) -> None:
    """Use another supported code path (tests compare them; users rarely need this)."""
    global _path
    _checks.choice("name", name, available_paths())
    _path = PATHS.index(name)


def openmp_enabled() -> bool:
    """Whether the extension was built with OpenMP (otherwise every kernel runs on one thread)."""
    return _kernels.openmp_enabled()


def _threads(threads: int | None) -> int:
    if threads is None:
        return torch.get_num_threads()
    return _checks.integer("threads", threads, 1, 1024)


# --------------------------------------------------------------------------------------------------
# Argument checks


def _matrix(name: str, a: object, dtype: type | None = None, ndim: int = 2) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        hint = " (use .numpy() on a torch tensor)" if isinstance(a, torch.Tensor) else ""
        raise TypeError(f"{name} must be a numpy.ndarray{hint}, got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {a.ndim}-D with shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); allowed: every dimension at least 1")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass numpy.ascontiguousarray({name})")
    return a


def _packed(name: str, p: object, bits: tuple[int, ...] = CODE_BITS) -> PackedMatrix:
    if not isinstance(p, PackedMatrix):
        raise TypeError(f"{name} must be a PackedMatrix (from qviz.packed.pack / pack_signs), got {type(p).__name__}")
    _checks.choice(f"{name}.bits", p.bits, bits)
    n, k = p.shape
    words = _matrix(f"{name}.words", p.words, np.uint64)
    if words.shape != (n, words_per_row(k, p.bits)):
        raise ValueError(f"{name}.words has shape {words.shape}, but {name}.shape={p.shape} at {p.bits} bits "
                         f"needs {(n, words_per_row(k, p.bits))}")
    return p


def _same_k(a: PackedMatrix, w: PackedMatrix) -> None:
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"a and w must share K (their second dimension), got a.shape={a.shape}, w.shape={w.shape}")


# --------------------------------------------------------------------------------------------------
# Packing


def pack(codes: np.ndarray, bits: int) -> PackedMatrix:
    """Pack uint8 codes [N, K], each < 2**bits, into a PackedMatrix (bits in 1, 2, 4, 8)."""
    _checks.choice("bits", bits, CODE_BITS)
    codes = _matrix("codes", codes, np.uint8)
    if bits < 8 and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < 2**bits = {2**bits} for bits={bits}; found {int(codes.max())}")
    n, k = codes.shape
    words = np.empty((n, words_per_row(k, bits)), dtype=np.uint64)
    _kernels.pack_codes(codes, bits, words)
    return PackedMatrix(bits, (n, k), words)


def unpack(packed: PackedMatrix) -> np.ndarray:
    """The uint8 codes [N, K] a PackedMatrix holds."""
    packed = _packed("packed", packed)
    out = np.empty(packed.shape, dtype=np.uint8)
    _kernels.unpack_codes(packed.words, packed.bits, out)
    return out


def _float_rows(name: str, x: object) -> np.ndarray:
    x = _matrix(name, x, np.float32)
    return x


def pack_signs(x: np.ndarray) -> PackedMatrix:
    """Sign-binarize float32 x [N, K] into a 1-bit PackedMatrix: bit 1 encodes -1 (x < 0), bit 0 encodes +1."""
    x = _float_rows("x", x)
    n, k = x.shape
    words = np.empty((n, words_per_row(k, 1)), dtype=np.uint64)
    if _kernels.pack_signs(x, words, _path):
        raise ValueError("x contains NaN; a sign is defined only for numbers")
    return PackedMatrix(1, (n, k), words)


def pack_uniform(x: np.ndarray, bits: int, scale: float, zero_point: int = 0, *,
                 threads: int | None = None) -> PackedMatrix:
    """Quantize float32 x [N, K] to unsigned b-bit codes and pack them in one pass (activation packing).

    code = clamp(round_half_even(x / scale) + zero_point, 0, 2^bits - 1), the affine quantizer of 004
    eqs. 1-2. The result carries each row's sum of codes (`code_sums`).
    """
    _checks.choice("bits", bits, CODE_BITS)
    scale = _checks.real("scale", scale, 0.0, lo_open=True)
    zero_point = _checks.integer("zero_point", zero_point, 0, 2**bits - 1)
    x = _float_rows("x", x)
    n, k = x.shape
    words = np.empty((n, words_per_row(k, bits)), dtype=np.uint64)
    sums = np.empty(n, dtype=np.int64)
    inv_scale = float(np.float32(1.0) / np.float32(scale))
    if _kernels.pack_uniform(x, bits, inv_scale, float(zero_point), words, sums, _path, _threads(threads)):
        raise ValueError("x contains NaN; only numbers can be quantized")
    return PackedMatrix(bits, (n, k), words, sums)


def popcounts(packed: PackedMatrix) -> np.ndarray:
    """Number of set bits per row (for a {0, 1} activation matrix: how many ones)."""
    packed = _packed("packed", packed)
    return np.unpackbits(packed.words.view(np.uint8), axis=1).sum(axis=1, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Matmuls


def _out_int32(a: PackedMatrix, w: PackedMatrix) -> np.ndarray:
    return np.empty((a.shape[0], w.shape[0]), dtype=np.int32)


def binary_matmul(a: PackedMatrix, w: PackedMatrix, *, scale_a=None, scale_w=None,
                  threads: int | None = None) -> np.ndarray:
    """Sign matmul of 1-bit a [M, K] and w [N, K] (bit 1 = -1): int32 [M, N] = K - 2 popcount(a XOR w).

    That is the sum of sign products, the XNOR-popcount of BNN (003 §3.2). With `scale_w` (one α per
    output channel, or one per layer) and/or `scale_a` (one per activation row), the xnor scheme's
    scaling (003 eq. 3-6) is applied afterwards and the result is float32 [M, N]:
    (sign(a) α_a) @ (sign(w) α_w).T.
    """
    a, w = _packed("a", a, (1,)), _packed("w", w, (1,))
    _same_k(a, w)
    out = _out_int32(a, w)
    _kernels.binary_matmul(a.words, w.words, a.shape[1], out, _path, _threads(threads))
    if scale_a is None and scale_w is None:
        return out
    sa = _scales("scale_a", 1.0 if scale_a is None else scale_a, a.shape[0]).reshape(-1, 1)
    sw = _scales("scale_w", 1.0 if scale_w is None else scale_w, w.shape[0]).reshape(1, -1)
    return (out * sa * sw).astype(np.float32)


def _scales(name: str, value, rows: int) -> np.ndarray:
    v = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if not np.issubdtype(v.dtype, np.number):
        raise TypeError(f"{name} must hold numbers, got dtype {v.dtype}")
    v = v.astype(np.float64).reshape(-1)
    if v.size not in (1, rows):
        raise ValueError(f"{name} must hold 1 or {rows} values, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or Inf; allowed: finite values")
    return v


def hybrid_matmul(a: PackedMatrix, w: PackedMatrix, *, threads: int | None = None) -> np.ndarray:
    """Activations in {0, 1} (DoReFa 1-bit; bit 1 = 1) times weights in {+1, -1} (bit 1 = -1).

    int32 [M, N] = popcount(a AND NOT w) - popcount(a AND w) = popcount(a) - 2 popcount(a AND w): the
    "two AND gates" hybrid of 003 Table 4.4 / Fig. 4.5.
    """
    a, w = _packed("a", a, (1,)), _packed("w", w, (1,))
    _same_k(a, w)
    ones = a.code_sums if a.code_sums is not None else popcounts(a)
    out = _out_int32(a, w)
    _kernels.hybrid_matmul(a.words, np.ascontiguousarray(ones, dtype=np.int64), w.words, out, _path,
                           _threads(threads))
    return out


def lowbit_matmul(a: PackedMatrix, w: PackedMatrix, *, threads: int | None = None) -> np.ndarray:
    """Integer matmul of unsigned b-bit codes: int32 [M, N] = sum_k a[m, k] w[n, k] (a.bits == w.bits).

    Bit-serial: a sum over the bit planes of a of the b-bit field sums of (plane AND w), each a
    popcount-like reduction. Turn it into real values with `dequantize_matmul`.
    """
    a, w = _packed("a", a), _packed("w", w)
    _same_k(a, w)
    if a.bits != w.bits:
        raise ValueError(f"a.bits={a.bits} and w.bits={w.bits} must be equal; allowed: both 1, 2, 4 or 8")
    if a.shape[1] * (2**a.bits - 1) ** 2 > 2**31 - 1:
        raise ValueError(f"K={a.shape[1]} at {a.bits} bits could overflow int32; allowed: K <= "
                         f"{(2**31 - 1) // (2**a.bits - 1) ** 2}")
    out = _out_int32(a, w)
    _kernels.bitserial_matmul(a.words, w.words, a.bits, out, _path, _threads(threads))
    return out


def dequantize_matmul(dot: np.ndarray, a: PackedMatrix, w_code_sums: np.ndarray, *, scale_a: float, zero_a: int,
                      scale_w: float | np.ndarray, zero_w: int | np.ndarray) -> np.ndarray:
    """Real-valued result of an affine low-bit matmul from its integer core (004 eqs. 4-6).

    sum_k s_a (a_k - z_a) s_w (w_k - z_w) = s_a s_w (dot - z_w sum a - z_a sum w + K z_a z_w);
    `a` must come from `pack_uniform` (it carries sum a per row); w_code_sums is sum w per weight row.
    """
    if a.code_sums is None:
        raise ValueError("a has no code_sums; pack the activations with pack_uniform")
    k = a.shape[1]
    sa = a.code_sums.astype(np.float64)[:, None]
    sw = np.asarray(w_code_sums, dtype=np.float64)[None, :]
    zw = np.asarray(zero_w, dtype=np.float64).reshape(1, -1)
    core = dot.astype(np.float64) - zw * sa - zero_a * sw + k * zero_a * zw
    return (scale_a * np.asarray(scale_w, dtype=np.float64).reshape(1, -1) * core).astype(np.float32)


def _codebook(codebook: object, bits: int, rows: int) -> np.ndarray:
    cb = codebook.detach().cpu().numpy() if isinstance(codebook, torch.Tensor) else codebook
    if not isinstance(cb, np.ndarray):
        raise TypeError(f"codebook must be a numpy.ndarray or torch.Tensor, got {type(codebook).__name__}")
    if cb.ndim not in (1, 2):
        raise ValueError(f"codebook must be 1-D [2**bits] (per layer) or 2-D [N, 2**bits] (per channel), "
                         f"got {cb.shape}")
    entries = 2**bits
    if cb.shape[-1] != entries or (cb.ndim == 2 and cb.shape[0] != rows):
        allowed = f"({entries},) or ({rows}, {entries})"
        raise ValueError(f"codebook has shape {cb.shape}; for {rows} weight rows at {bits} bits allowed: {allowed} "
                         "(pad unused entries)")
    cb = np.ascontiguousarray(cb, dtype=np.float32).reshape(-1 if cb.ndim == 2 else 1, entries)
    if not np.isfinite(cb).all():
        raise ValueError("codebook contains NaN or Inf; allowed: finite values")
    return cb


def lut_matmul(x: np.ndarray, w: PackedMatrix, codebook: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """Float activations times codebook weights: float32 [M, N] = x @ codebook[w].T (003 Fig. 5.2 as a matmul).

    codebook: [2**bits] for one codebook per layer or [N, 2**bits] for one per output channel. Uniform
    weights use `codebook_from_affine(scale, zero_point, bits)`.
    """
    w = _packed("w", w)
    x = _float_rows("x", x)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x and w must share K, got x.shape={x.shape}, w.shape={w.shape}")
    cb = _codebook(codebook, w.bits, w.shape[0])
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    _kernels.lut_matmul(x, w.words, w.bits, cb, out, _path, _threads(threads))
    return out


def codebook_from_affine(scale, zero_point, bits: int) -> np.ndarray:
    """The codebook of a uniform quantizer: entry c is scale (c - zero_point) (004 eq. 3).

    Scalars give one codebook [2**bits]; arrays of N scales / zero-points give [N, 2**bits].
    """
    _checks.choice("bits", bits, CODE_BITS)
    s = np.asarray(scale, dtype=np.float64)
    z = np.asarray(zero_point, dtype=np.float64)
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("scale must be finite and > 0")
    codes = np.arange(2**bits, dtype=np.float64)
    table = (codes - z.reshape(-1, 1)) * s.reshape(-1, 1)
    return table.astype(np.float32).reshape(-1) if s.ndim == 0 and z.ndim == 0 else table.astype(np.float32)


def lut_conv2d(x: np.ndarray, w: PackedMatrix, codebook: np.ndarray, kernel: tuple[int, int], *,
               padding: int = 0, threads: int | None = None) -> np.ndarray:
    """Packed-index direct convolution (003 Figs. 5.1, 5.2), stride 1, zero padding.

    x: float32 [B, C, H, W]; w: codes [C_out, C * kh * kw] in torch's weight order (ci, i, j);
    returns float32 [B, C_out, H + 2p - kh + 1, W + 2p - kw + 1], equal to
    torch.nn.functional.conv2d(x, codebook[w].reshape(C_out, C, kh, kw), padding=p).
    """
    w = _packed("w", w)
    x = _matrix("x", x, np.float32, ndim=4)
    if not (isinstance(kernel, tuple | list) and len(kernel) == 2):
        raise TypeError(f"kernel must be a pair (kh, kw), got {kernel!r}")
    kh, kw = (_checks.integer(f"kernel[{i}]", v, 1, 64) for i, v in enumerate(kernel))
    padding = _checks.integer("padding", padding, 0, max(kh, kw) - 1)
    b, c, h, wd = x.shape
    if w.shape[1] != c * kh * kw:
        raise ValueError(f"w has K={w.shape[1]}, but C * kh * kw = {c} * {kh} * {kw} = {c * kh * kw}")
    ho, wo = h + 2 * padding - kh + 1, wd + 2 * padding - kw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"the {kh}x{kw} kernel is larger than the padded {h}x{wd} input")
    cb = _codebook(codebook, w.bits, w.shape[0])
    out = np.empty((b, w.shape[0], ho, wo), dtype=np.float32)
    _kernels.lut_conv2d(x, w.words, w.bits, cb, kh, kw, padding, out, _threads(threads))
    return out


# --------------------------------------------------------------------------------------------------
# Readouts


def _layer_report(out_features: int, in_features: int, kernel: tuple[int, int], bits: int, codebook_bits: int,
                  per_channel: bool) -> dict:
    kh, kw = kernel
    row = in_features * kh * kw
    n = out_features * row
    codebooks = out_features if per_channel else 1
    packed_bytes = out_features * words_per_row(row, bits) * 8
    dense_bytes = math.ceil(n * bits / 8)
    codebook_bytes = math.ceil(codebooks * 2**bits * codebook_bits / 8)
    float32_bytes = 4 * n
    formula = n * 32 / (n * bits + codebooks * 2**bits * codebook_bits)  # 003 eq. 2-17, one or N codebooks
    return {
        "weights": n,
        "codebooks": codebooks,
        "packed_bytes": packed_bytes,
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

    packed_bytes: codes as the kernels hold them (rows padded to whole 64-bit words); dense_bytes: the
    same codes back to back (ceil(n b / 8), what a file needs); codebook_bytes: 2**bits entries of
    codebook_bits each, one codebook per layer or per output channel; ratio / ratio_dense: float32
    bytes over packed (or dense) + codebook bytes; ratio_formula: 003 eq. 2-17, n b / (n log2 k + k c)
    with b = 32, k = 2**bits (times the number of codebooks). Linear and Conv2d layers count; a module
    report adds "layers", one such dict per layer with its "name".
    """
    _checks.choice("bits", bits, CODE_BITS)
    codebook_bits = _checks.integer("codebook_bits", codebook_bits, 0, 64)
    _checks.boolean("per_channel", per_channel)
    if isinstance(out_features, torch.nn.Module):
        return _module_report(out_features, bits, codebook_bits, per_channel)
    out_features = _checks.integer("out_features", out_features, 1)
    in_features = _checks.integer("in_features", in_features, 1)
    if not (isinstance(kernel, tuple | list) and len(kernel) == 2):
        raise TypeError(f"kernel must be a pair (kh, kw), got {kernel!r}")
    kernel = tuple(_checks.integer(f"kernel[{i}]", v, 1) for i, v in enumerate(kernel))
    report = _layer_report(out_features, in_features, kernel, bits, codebook_bits, per_channel)
    if not per_channel:
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
        layers.append({"name": name, **_layer_report(*shape, bits, codebook_bits, per_channel)})
    if not layers:
        raise ValueError("module has no Linear or Conv2d layers to report on")
    total = {key: sum(layer[key] for layer in layers)
             for key in ("weights", "codebooks", "packed_bytes", "dense_bytes", "codebook_bytes", "float32_bytes")}
    total["ratio"] = total["float32_bytes"] / (total["packed_bytes"] + total["codebook_bytes"])
    total["ratio_dense"] = total["float32_bytes"] / (total["dense_bytes"] + total["codebook_bytes"])
    codebook_bits_total = sum(layer["codebooks"] for layer in layers) * 2**bits * codebook_bits
    total["ratio_formula"] = total["weights"] * 32 / (total["weights"] * bits + codebook_bits_total)
    total["layers"] = layers
    return total


def _median_interleaved(fns: dict, budget_s: float, min_runs: int = 3) -> tuple[dict, int]:
    """Run the callables in turn until the budget is spent; median seconds of each."""
    for fn in fns.values():
        fn()  # warm-up: first-touch allocation, thread pools, caches
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        runs = len(next(iter(times.values())))
        spent = time.perf_counter() - start
        if spent >= budget_s and (runs >= min_runs or spent >= 2 * budget_s):
            break
    return {name: statistics.median(ts) for name, ts in times.items()}, runs


class _TorchThreads:
    """Run torch with a given thread count, then restore the previous one."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def measure_latency(kind: str = "binary", m: int = 1, k: int = 4096, n: int = 4096, *, bits: int = 1,
                    budget_s: float = 0.25, threads: int | None = None, seed: int = 0,
                    with_int8: bool = False) -> dict:
    """Median latency of a qviz kernel and of torch float32 on the same shapes, same process and threads.

    kind: "binary" (sign-pack float activations + XOR-popcount matmul), "hybrid" (pack {0, 1}
    activations + AND-popcount matmul), "lowbit" (quantize-and-pack b-bit activations + bit-serial
    matmul, bits 2 or 4), "lut" (float activations times b-bit codebook weights). Activation packing is
    inside the timed qviz call; weights are packed beforehand, as a deployed layer holds them. The
    torch side is x @ W.T in float32. Runs alternate until `budget_s` is spent (at least 3 each unless
    one run alone exceeds the budget), so a widget can call this live.

    Returns qviz_s, torch_s, ratio (torch_s / qviz_s: above 1 means qviz is faster), runs, threads,
    path, macs (M N K), qviz_macs_per_s and bit_ops_per_s (M N K b_a b_w / qviz_s; None for lut),
    and torch_int8_s / ratio_int8 (PyTorch's dynamic int8 linear) when with_int8.
    """
    _checks.choice("kind", kind, LATENCY_KINDS)
    m, k, n = (_checks.integer(name, v, 1, 1 << 16) for name, v in (("m", m), ("k", k), ("n", n)))
    budget_s = _checks.real("budget_s", budget_s, 0.0, 60.0, lo_open=True)
    threads = _threads(threads)
    allowed_bits = {"binary": (1,), "hybrid": (1,), "lowbit": (1, 2, 4), "lut": CODE_BITS}[kind]
    _checks.choice("bits", bits, allowed_bits)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w_float = rng.standard_normal((n, k), dtype=np.float32)
    qviz_call, a_bits = _kernel_call(kind, x, w_float, bits, threads, rng)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w_float)
    fns = {"qviz": qviz_call, "torch": lambda: xt @ wt.T}
    if with_int8:
        fns["int8"] = _int8_linear(wt, xt)
    with _TorchThreads(threads):
        medians, runs = _median_interleaved(fns, budget_s)
    macs = m * n * k
    result = {
        "kind": kind, "m": m, "k": k, "n": n, "bits": bits, "threads": threads, "path": kernel_path(),
        "qviz_s": medians["qviz"], "torch_s": medians["torch"], "ratio": medians["torch"] / medians["qviz"],
        "runs": runs, "macs": macs, "qviz_macs_per_s": macs / medians["qviz"],
        "bit_ops_per_s": None if kind == "lut" else macs * a_bits * bits / medians["qviz"],
    }
    if with_int8:
        result["torch_int8_s"] = medians["int8"]
        result["ratio_int8"] = medians["int8"] / medians["qviz"]
    return result


def _kernel_call(kind: str, x: np.ndarray, w_float: np.ndarray, bits: int, threads: int, rng):
    """The timed qviz call for `kind`, with the weights packed once beforehand; and the activation bits."""
    if kind == "binary":
        w = pack_signs(w_float)
        return (lambda: binary_matmul(pack_signs(x), w, threads=threads)), 1
    if kind == "hybrid":
        w = pack_signs(w_float)
        return (lambda: hybrid_matmul(pack_uniform(x, 1, 1.0, threads=threads), w, threads=threads)), 1
    if kind == "lowbit":
        w = pack(rng.integers(0, 2**bits, w_float.shape, dtype=np.uint8), bits)
        scale = float(np.abs(x).max()) / (2**bits - 1) * 2
        zero = 2 ** (bits - 1)
        return (lambda: lowbit_matmul(pack_uniform(x, bits, scale, zero, threads=threads), w, threads=threads)), bits
    w = pack(rng.integers(0, 2**bits, w_float.shape, dtype=np.uint8), bits)
    cb = rng.standard_normal(2**bits).astype(np.float32)
    return (lambda: lut_matmul(x, w, cb, threads=threads)), 32


def _int8_linear(wt: torch.Tensor, xt: torch.Tensor):
    """PyTorch's own dynamic int8 linear on the same weights: the honest reference for quantized speed."""
    layer = torch.nn.Linear(wt.shape[1], wt.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(wt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qlayer = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear}, torch.qint8)

    def run():
        with torch.no_grad():
            return qlayer(xt)

    return run


def measure_conv_latency(batch: int = 1, in_channels: int = 3, size: int = 16, out_channels: int = 8,
                         kernel: int = 3, *, bits: int = 1, padding: int = 0, budget_s: float = 0.25,
                         threads: int | None = None, seed: int = 0) -> dict:
    """Median latency of `lut_conv2d` and torch float32 conv2d on the same shapes (003 Chapter 5 setting).

    The default is 003's layer: 3 input channels of 16x16, 8 output channels, no padding. Returns
    qviz_s, torch_s, ratio (torch_s / qviz_s), runs, threads, path.
    """
    batch, in_channels, size, out_channels = (
        _checks.integer(name, v, 1, 4096) for name, v in
        (("batch", batch), ("in_channels", in_channels), ("size", size), ("out_channels", out_channels)))
    kernel = _checks.integer("kernel", kernel, 1, size)
    _checks.choice("bits", bits, CODE_BITS)
    budget_s = _checks.real("budget_s", budget_s, 0.0, 60.0, lo_open=True)
    threads = _threads(threads)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, in_channels, size, size), dtype=np.float32)
    codes = rng.integers(0, 2**bits, (out_channels, in_channels * kernel * kernel), dtype=np.uint8)
    cb = rng.standard_normal(2**bits).astype(np.float32)
    w = pack(codes, bits)
    xt = torch.from_numpy(x)
    wt = torch.from_numpy(cb[codes].reshape(out_channels, in_channels, kernel, kernel))
    fns = {"qviz": lambda: lut_conv2d(x, w, cb, (kernel, kernel), padding=padding, threads=threads),
           "torch": lambda: torch.nn.functional.conv2d(xt, wt, padding=padding)}
    with _TorchThreads(threads), torch.no_grad():
        medians, runs = _median_interleaved(fns, budget_s)
    return {"qviz_s": medians["qviz"], "torch_s": medians["torch"], "ratio": medians["torch"] / medians["qviz"],
            "runs": runs, "threads": threads, "path": kernel_path()}


def popcount_ceiling(*, threads: int | None = None, seconds: float = 0.2, path: str | None = None) -> float:
    """The machine's measured popcount ceiling, in bits XOR-popcounted per second with `threads` threads.

    Each thread runs the binary kernel's own inner loop at its largest tile (4 x 2 rows) on an
    L1-resident buffer (6 rows of 512 words, 24 KiB) at the same time as the others.
    """
    threads = _threads(threads)
    seconds = _checks.real("seconds", seconds, 0.0, 60.0, lo_open=True)
    path_index = _path if path is None else PATHS.index(path) if path in available_paths() else None
    if path_index is None:
        _checks.choice("path", path, available_paths())
    words, repeats = 512, 256
    counts = [0] * threads

    def worker(i):
        buf = np.random.default_rng(i).integers(0, 2**63, 6 * words, dtype=np.uint64)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            _kernels.popcount_buffer(buf, words, repeats, path_index)
            counts[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    return sum(counts) * repeats * 8 * words * 64 / elapsed


_path = _choose_path()
