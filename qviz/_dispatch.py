"""Which compiled code path the bit-packed kernels run, chosen once at import.

Paths, slowest first: ``portable`` (plain C, any CPU), ``popcnt`` (x86 POPCNT), ``avx2`` (AVX2 + FMA,
nibble-table popcount, vpmaddubsw dot products), ``avx2vnni`` (the same with AVX-VNNI's 256-bit vpdpbusd
for 2- and 4-bit codes: CPUs with AVX-VNNI but no AVX-512, such as Intel's cores since Alder Lake and its
E-core Xeons), ``avx512`` (AVX-512 F/BW + VPOPCNTDQ) and ``avx512vnni`` (the same with VNNI vpdpbusd
for 2- and 4-bit codes). The extension is built for
baseline x86-64 (never ``-march=native``) with each path compiled per function, so one wheel runs on
every CPU; this module asks the CPU what it supports and uses the fastest path that agrees with
``portable`` on a small problem for every kernel family. ``QVIZ_KERNEL_PATH`` forces a path.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from qviz import _checks
from qviz import _packed as _kernels

PATHS = _kernels.PATHS
PANEL = _kernels.PANEL


def available_paths() -> tuple[str, ...]:
    """Code paths this CPU supports, slowest first (a subset of `PATHS`)."""
    return _kernels.supported_paths()


def kernel_path() -> str:
    """The code path every kernel call uses now."""
    return PATHS[_path]


def current() -> int:
    """Index of the current path, as the compiled functions take it."""
    return _path


def set_kernel_path(name: str) -> None:
    """Use another supported code path (the tests compare them; users rarely need this)."""
    global _path
    _checks.choice("name", name, available_paths())
    _path = PATHS.index(name)


def openmp_enabled() -> bool:
    """Whether the extension was built with OpenMP (the row kernels then use several threads)."""
    return _kernels.openmp_enabled()


def pool_enabled() -> bool:
    """Whether the panel kernels run on their thread pool (POSIX threads); otherwise on the caller alone."""
    return _kernels.pool_enabled()


THREADINGS = ("pool", "openmp")


def openmp_runtimes() -> tuple[str, ...]:
    """The OpenMP runtime libraries mapped into this process (libgomp, libomp, libiomp; Linux only, else ())."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    return tuple(sorted({line.split()[-1] for line in maps.splitlines()
                         if re.search(r"/lib[gi]?omp[^/]*\.so", line)}))


def available_threadings() -> tuple[str, ...]:
    """What `set_threading` accepts here: "pool", and "openmp" when the extension was built with OpenMP."""
    return THREADINGS if openmp_enabled() else THREADINGS[:1]


def threading() -> str:
    """Where the panel kernels' parallel regions run: "openmp" (the OpenMP team, PyTorch's own when
    both use one runtime) or "pool" (qviz's thread pool)."""
    return "openmp" if _kernels.threading_openmp() else "pool"


def set_threading(name: str) -> None:
    """Run parallel regions on the OpenMP team ("openmp") or qviz's thread pool ("pool").

    The default, chosen at import (QVIZ_THREADING forces one): "openmp" when the extension has OpenMP and
    its OpenMP calls reach PyTorch's own runtime (`shares_pytorchs_openmp`), so that qviz's regions run on
    PyTorch's workers, which spin for a while after each PyTorch call and would otherwise hold the cores
    qviz's pool needs (qviz/_packed_pool.h); "pool" otherwise. A forked child always uses the pool.
    """
    _checks.choice("name", name, available_threadings())
    _kernels.set_threading(name == "openmp")


def _choose_threading() -> None:
    forced = os.environ.get("QVIZ_THREADING")
    if forced:
        if forced not in THREADINGS:
            raise ValueError(f"QVIZ_THREADING={forced!r}; allowed: {THREADINGS}")
        set_threading(forced)
    elif openmp_enabled() and pool_enabled() and shares_pytorchs_openmp():
        set_threading("openmp")


def shares_pytorchs_openmp() -> bool:
    """Whether qviz's OpenMP calls reach the runtime PyTorch ships (torch/lib), so that they run on
    PyTorch's own workers. Other runtimes may be mapped as well (scikit-learn brings its own libgomp)."""
    import torch

    mine = _kernels.openmp_library()
    if not mine:
        return False
    return Path(mine).resolve().parent == (Path(torch.__file__).parent / "lib").resolve()


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    words = np.empty((codes.shape[0], -(-codes.shape[1] * bits // 64)), np.uint64)
    _kernels.pack_codes(codes, bits, words)
    return words


def _panels(words: np.ndarray, k: int, bits: int) -> np.ndarray:
    k32 = -(-k * bits // 32)
    out = np.empty((-(-words.shape[0] // PANEL), k32, PANEL), np.uint32)
    _kernels.make_panels(words, k32, out)
    return out


def _self_check(path: int) -> bool:
    """Does `path` give the portable path's results on a small random problem, for every kernel family?

    Shapes cut every tile edge: 7 rows (tiles of 4 and 6), 37 weight rows (panels of 16, blocks of 4
    panels), K = 333 (a partial last word at every code width).
    """
    rng = np.random.default_rng(1234)
    m, n, k = 7, 37, 333
    x = rng.standard_normal((m, k), dtype=np.float32)

    def same(fn, shape, dtype, exact=True):
        want, got = np.empty(shape, dtype), np.empty(shape, dtype)
        fn(0, want)
        fn(path, got)
        return np.array_equal(want, got) if exact else np.allclose(want, got, rtol=1e-4, atol=1e-3)

    try:
        for bits in (1, 2, 4, 8):
            a = _pack(rng.integers(0, 2**bits, (m, k), dtype=np.uint8), bits)
            w = _pack(rng.integers(0, 2**bits, (n, k), dtype=np.uint8), bits)
            cb = rng.standard_normal((1, 2**bits), dtype=np.float32)
            ok = same(lambda p, o, a=a, w=w, bits=bits: _kernels.bitserial_matmul(a, w, bits, o, p, 2), (m, n),
                      np.int32)
            ok &= same(lambda p, o, w=w, bits=bits, cb=cb: _kernels.lut_matmul(x, w, bits, cb, o, p, 2), (m, n),
                       np.float32, exact=False)
            if bits < 8:
                panels, k32 = _panels(w, k, bits), -(-k * bits // 32)
                ops = {1: ("xor", "and"), 2: ("dot2",), 4: ("dot4",)}[bits]
                for op in ops:
                    ok &= same(lambda p, o, a=a, panels=panels, k32=k32, op=op: _kernels.panel_matmul(
                        a, k32, panels, n, _kernels.OPS[op], 1, False, 0, o, p, 2), (m, n), np.int32)
                if bits > 1:  # 64 rows: enough row tiles for the VNNI paths' weights split once per block
                    tall = _pack(rng.integers(0, 2**bits, (64, k), dtype=np.uint8), bits)
                    ok &= same(lambda p, o, tall=tall, panels=panels, k32=k32, op=ops[0]: _kernels.panel_matmul(
                        tall, k32, panels, n, _kernels.OPS[op], 1, False, 0, o, p, 2), (64, n), np.int32)
                ok &= same(lambda p, o, panels=panels, bits=bits, cb=cb: _kernels.panel_lut(
                    x, panels, n, bits, cb[0], 0, o, p, 2), (m, n), np.float32, exact=False)
                ok &= same(lambda p, o, panels=panels, bits=bits, cb=cb: _kernels.panel_lut(  # a GEMV: tables
                    x[:1], panels, n, bits, cb[0], 0, o, p, 2), (1, n), np.float32, exact=False)
            # per-row codebooks and 8-bit codes: gathers from a decoded block where the path has them
            panels8 = _panels(w, k, bits)
            cbr = rng.standard_normal((n, 2**bits), dtype=np.float32)
            if _kernels.panel_lut_ok(path, m, n, k, bits, 2**bits):
                def per_row(p, o, panels8=panels8, bits=bits, cbr=cbr, w=w):  # portable: the row kernel
                    if p == 0:
                        return _kernels.lut_matmul(x, w, bits, cbr, o, 0, 2)
                    return _kernels.panel_lut(x, panels8, n, bits, cbr.reshape(-1), 2**bits, o, p, 2)
                ok &= same(per_row, (m, n), np.float32, exact=False)
            if not ok:
                return False
        xc = rng.standard_normal((2, 3, 9, 11), dtype=np.float32)
        wc = _pack(rng.integers(0, 4, (11, 27), dtype=np.uint8), 2)
        cbc = rng.standard_normal((11, 4), dtype=np.float32)
        wcp = _panels(wc, 27, 2)
        conv = same(lambda p, o: _kernels.lut_conv2d(xc, wcp, 11, 2, cbc, 3, 3, 1, o, p, 2), (2, 11, 9, 11),
                    np.float32, exact=False)
        signs = conv and same(lambda p, o: _kernels.pack_signs(x, o, p), (m, -(-k // 64)), np.uint64)
        sums = np.empty(m, np.int64)
        uniform = same(lambda p, o: _kernels.pack_uniform(x, 4, 3.0, 7.0, o, sums, p, 2), (m, -(-k * 4 // 64)),
                       np.uint64)
        return bool(signs and uniform)
    except Exception:  # a path that cannot even run is not a path we use
        return False


def _choose_path() -> int:
    forced = os.environ.get("QVIZ_KERNEL_PATH")
    supported = available_paths()
    if forced:
        if forced not in supported:
            raise ValueError(f"QVIZ_KERNEL_PATH={forced!r} is not supported by this CPU; allowed: {supported}")
        return PATHS.index(forced)
    for name in reversed(supported):
        if name == "portable" or _self_check(PATHS.index(name)):
            return PATHS.index(name)
        warnings.warn(f"qviz kernel path {name!r} failed its self-check and is disabled", RuntimeWarning, stacklevel=2)
    return 0


_path = 0
_path = _choose_path()
_choose_threading()
