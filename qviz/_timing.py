"""Timing harness of the packed kernels: latency against PyTorch, instruction roofs, read bandwidth.

Everything here runs candidates in turn, round after round, in one process and with one thread count,
and reports medians: on a shared machine drift then hits all candidates alike. Functions that allocate
from sizes they are given refuse requests beyond a memory budget (`memory_limit`) with a ValueError
naming the sizes, so a widget or a typo cannot make the process swap or be killed.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import warnings

import numpy as np
import torch

from qviz import _checks, _dispatch
from qviz import _packed as _kernels

LATENCY_KINDS = ("binary", "hybrid", "lowbit", "lut")
ROOF_KINDS = ("pop", "dot", "fma")
MEMORY_CAP = 2 * 2**30
COLD_BYTES = 256 * 2**20  # weight copies cycled through in a cold run: several times any L3 cache
# How long a warm run repeats the qviz call, untimed, before each timed one. Right after a torch
# float32 GEMM a core can run slower for a while: on a 2-core AMD EPYC (Zen 5) a scalar loop ran at
# ~60% of its speed for about 0.5 ms of work after one (a clock effect: idling did not end it,
# working did), and a warm 16x4096x4096 binary call after one identical call took 0.10 ms, not 0.07.
SETTLE_S = 1e-3


def memory_limit() -> int:
    """Bytes a measurement may allocate: 2 GiB, or half the memory available now if that is less.

    A fixed cap keeps an interactive readout predictable (a 65536 x 65536 layer is refused, not
    attempted); the fraction of available memory protects small machines and busy ones.
    """
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        available = 2 * MEMORY_CAP
    return int(min(MEMORY_CAP, available // 2))


def _guard(call: str, nbytes: int) -> None:
    limit = memory_limit()
    if nbytes > limit:
        raise ValueError(f"{call} would allocate about {nbytes / 2**30:.2f} GiB for its buffers; the limit is "
                         f"{limit / 2**30:.2f} GiB (2 GiB, or half the available memory if less)")


def _median_interleaved(fns: dict, budget_s: float, min_runs: int = 3, times: dict | None = None) -> tuple[dict, int]:
    """Run the callables in turn until the budget is spent; median seconds of each.

    A value may be a pair (prepare, fn): prepare runs untimed right before each timed fn. `times`, if
    given, receives each callable's seconds, round by round.
    """
    fns = {name: fn if isinstance(fn, tuple) else (None, fn) for name, fn in fns.items()}
    for _, fn in fns.values():
        fn()  # warm-up: first-touch allocation, thread pools, caches
    times = {} if times is None else times
    times.update({name: [] for name in fns})
    start = time.perf_counter()
    while True:
        for name, (prepare, fn) in fns.items():
            if prepare is not None:
                prepare()
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


def _threads(threads) -> int:
    return torch.get_num_threads() if threads is None else _checks.integer("threads", threads, 1, 1024)


def _loop_threads(threads) -> int:
    """Threads for a loop that runs `seconds` on each of them: more than the CPUs would only queue (1024
    threads on 2 cores ran 512 x seconds), so at most twice the CPUs."""
    most = 2 * (os.cpu_count() or 1)
    return min(torch.get_num_threads(), most) if threads is None else _checks.integer("threads", threads, 1, most)


def _cycle(items: list):
    """A callable returning the items in turn (weight copies of a cold run)."""
    state = {"i": 0}

    def nxt():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return nxt


def measure_latency(kind: str = "binary", m: int = 1, k: int = 4096, n: int = 4096, *, bits: int = 1,
                    budget_s: float = 0.25, threads: int | None = None, seed: int = 0,
                    with_int8: bool = False, cold: bool = False, warm: bool = False) -> dict:
    """Median latency of a qviz kernel and of torch float32 on the same shapes, same process and threads.

    kind: "binary" (sign-pack float activations + XOR-popcount matmul), "hybrid" (pack {0, 1}
    activations + AND-popcount matmul), "lowbit" (quantize-and-pack b-bit activations + integer
    matmul, bits 1, 2 or 4), "lut" (float activations times b-bit codebook weights). Activation packing
    is inside the timed qviz call; weights are packed and prepared (`qviz.packed.prepare`) beforehand, as
    a deployed layer holds them; float activations go into the matmul as they are and are packed inside
    it. The torch side is x @ W.T in float32 (torch.matmul with out=). Each side writes into one result
    array of its own, reused every call (`out=`); the int8 reference (with_int8) allocates its result per
    call, as PyTorch's quantized linear has no out argument. Runs alternate until `budget_s`
    is spent (at least 3 each unless one run alone exceeds the budget), so a widget can call this live.
    Interleaving means each call starts from the caches and the clock the previous one left (torch's
    64 MiB of float weights at 4096 x 4096 flush a 32 MiB L3; after its GEMM some CPUs run slower for
    a while, see SETTLE_S). warm=True runs untimed identical qviz calls for SETTLE_S right before each
    timed one (its weights then come from L2/L3, the core is as a run of qviz calls leaves it);
    cold=True cycles through copies of the weights (about 256 MiB of each side's) so that they come from
    DRAM, after the same lead-in as warm=True, whose calls take the next copies in turn (the timed call's
    copy was last read 256 MiB of copies ago): weights from DRAM, the core as a deployed model's earlier
    layers leave it. Right after torch's GEMM instead, the same GEMVs took 1.1-1.3x as long on a Xeon
    (4096 x 4096 binary 0.113 -> 0.085 ms, 2-bit codebook 0.20 -> 0.18 ms, 4-bit unchanged).

    Returns qviz_s, torch_s, ratio (torch_s / qviz_s: above 1 means qviz is faster), ratio_low and
    ratio_high (the quartiles of the per-round ratios: how much the runs agree), runs, threads,
    path, macs (M N K), weight_bytes (qviz's prepared weights), qviz_macs_per_s and bit_ops_per_s
    (M N K b_a b_w / qviz_s; None for lut), and torch_int8_s / ratio_int8 (PyTorch's dynamic int8
    linear) when with_int8, with int_mm_s / ratio_int_mm: `torch._int_mm` on int8 operands quantized
    beforehand (oneDNN; AMX tiles where the CPU has them), the int8 GEMM alone, without the activation
    quantization that qviz and the dynamic linear count (None where this PyTorch has no CPU `_int_mm`).
    Refuses (ValueError) shapes whose buffers would pass `memory_limit()`.
    """
    _checks.choice("kind", kind, LATENCY_KINDS)
    m, k, n = (_checks.integer(name, v, 1, 1 << 20) for name, v in (("m", m), ("k", k), ("n", n)))
    budget_s = _checks.real("budget_s", budget_s, 0.0, 60.0, lo_open=True)
    threads = _threads(threads)
    _checks.boolean("with_int8", with_int8)
    _checks.boolean("cold", cold)
    _checks.boolean("warm", warm)
    if warm and cold:
        raise ValueError("warm=True and cold=True contradict each other; allowed: at most one of them")
    seed = _checks.integer("seed", seed, 0, 2**63 - 1)
    allowed_bits = {"binary": (1,), "hybrid": (1,), "lowbit": (1, 2, 4), "lut": (1, 2, 4, 8)}[kind]
    _checks.choice("bits", bits, allowed_bits)
    weight_bytes = -(-n // 16) * 16 * -(-k * bits // 32) * 4
    copies = min(64, max(1, math.ceil(COLD_BYTES / weight_bytes))) if cold else 1
    torch_copies = min(64, max(1, math.ceil(COLD_BYTES / (4 * n * k)))) if cold else 1
    need = (4 * m * k * 3 + 4 * n * k * (1 + torch_copies) + 2 * weight_bytes * copies + 12 * m * n
            + (2 * n * k + 5 * m * k + 4 * m * n if with_int8 else 0))
    _guard(f"measure_latency(kind={kind!r}, m={m}, k={k}, n={n}, bits={bits}, cold={cold})", need)
    from qviz import packed  # the kernel API imports this module; import it back only when timing

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w_float = rng.standard_normal((n, k), dtype=np.float32)
    qviz_call, a_bits = _kernel_call(packed, kind, x, w_float, bits, threads, rng, copies)
    xt = torch.from_numpy(x)
    wts = [torch.from_numpy(w_float)] + [torch.from_numpy(w_float.copy()) for _ in range(torch_copies - 1)]
    next_wt = _cycle(wts)
    torch_out = torch.empty(m, n)  # both sides write into one result array of their own, reused every call
    fns = {"qviz": (_settle_with(qviz_call), qviz_call) if warm or cold else qviz_call,
           "torch": lambda: torch.matmul(xt, next_wt().T, out=torch_out)}
    if with_int8:
        fns["int8"] = _int8_linear(wts[0], xt)
        int_mm = _int_mm(rng, m, k, n)
        if int_mm is not None:
            fns["int_mm"] = int_mm
    rounds: dict[str, list[float]] = {}
    with _TorchThreads(threads):
        medians, runs = _median_interleaved(fns, budget_s, times=rounds)
    ratio_low, ratio_high = _ratio_spread(rounds["torch"], rounds["qviz"])
    macs = m * n * k
    result = {
        "kind": kind, "m": m, "k": k, "n": n, "bits": bits, "threads": threads, "path": _dispatch.kernel_path(),
        "qviz_s": medians["qviz"], "torch_s": medians["torch"], "ratio": medians["torch"] / medians["qviz"],
        "ratio_low": ratio_low, "ratio_high": ratio_high, "runs": runs, "macs": macs, "weight_bytes": weight_bytes,
        "cold": cold, "warm": warm,
        "qviz_macs_per_s": macs / medians["qviz"],
        "bit_ops_per_s": None if kind == "lut" else macs * a_bits * bits / medians["qviz"],
    }
    if with_int8:
        result["torch_int8_s"] = medians["int8"]
        result["ratio_int8"] = medians["int8"] / medians["qviz"]
        result["int_mm_s"] = medians.get("int_mm")
        result["ratio_int_mm"] = medians["int_mm"] / medians["qviz"] if "int_mm" in medians else None
    return result


def _ratio_spread(reference: list[float], candidate: list[float]) -> tuple[float, float]:
    """Quartiles of reference / candidate over the rounds, each round's pair timed back to back: the
    spread of the ratio itself. A busy neighbour or a scheduler stall hits one call of a round, so the
    quartiles are far apart when the runs disagree, while slow drift cancels within a round."""
    ratios = sorted(r / max(c, 1e-12) for r, c in zip(reference, candidate, strict=True))
    if len(ratios) < 4:
        return ratios[0], ratios[-1]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def _settle_with(work):
    """A callable that repeats `work` for SETTLE_S seconds (at least once): the untimed lead-in of a
    warm or cold run, so the timed call meets the core as a run of qviz calls leaves it."""
    def settle():
        end = time.perf_counter() + SETTLE_S
        work()
        while time.perf_counter() < end:
            work()
    return settle


def _kernel_call(packed, kind: str, x: np.ndarray, w_float: np.ndarray, bits: int, threads: int, rng, copies: int):
    """The timed qviz call for `kind`, weights prepared beforehand (`copies` of them); and the activation bits.

    The call writes into one result array allocated here (`out=`), as torch's side does: a fresh array per
    call would time the operating system's page faults (about 100 us for 4 MiB) rather than the kernel.
    """
    if kind in ("binary", "hybrid"):
        w = packed.pack_signs(w_float)
    else:
        w = packed.pack(rng.integers(0, 2**bits, w_float.shape, dtype=np.uint8), bits)
    ws = [packed.prepare(w) for _ in range(copies)]  # each copy laid out as a deployed layer's (huge pages)
    nxt = _cycle(ws)
    out = np.empty((x.shape[0], w_float.shape[0]), np.float32 if kind == "lut" else np.int32)
    # float activations go in as they are: the matmuls pack (sign / quantize) them inside the call
    if kind == "binary":
        return (lambda: packed.binary_matmul(x, nxt(), threads=threads, out=out)), 1
    if kind == "hybrid":
        return (lambda: packed.hybrid_matmul(x, nxt(), scale=1.0, threads=threads, out=out)), 1
    if kind == "lowbit":
        scale = float(np.abs(x).max()) / (2**bits - 1) * 2
        zero = 2 ** (bits - 1)
        return (lambda: packed.lowbit_matmul(x, nxt(), scale=scale, zero_point=zero, threads=threads,
                                             out=out)), bits
    cb = rng.standard_normal(2**bits).astype(np.float32)
    return (lambda: packed.lut_matmul(x, nxt(), cb, threads=threads, out=out)), 32


def _int_mm(rng, m: int, k: int, n: int):
    """torch._int_mm on random int8 operands of the shape (weights as a transposed view of an N x K matrix,
    the layout a linear layer keeps), writing into one result array of its own; None if it cannot run."""
    a = torch.from_numpy(rng.integers(-128, 128, (m, k), dtype=np.int8))
    b = torch.from_numpy(rng.integers(-128, 128, (n, k), dtype=np.int8)).T
    out = torch.empty(m, n, dtype=torch.int32)
    try:
        torch._int_mm(a, b, out=out)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return lambda: torch._int_mm(a, b, out=out)


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
    """Median latency of `lut_conv2d` and torch float32 conv2d on the same shapes ([Kütükcü 2020, Ch. 5]).

    The default is 003's layer: 3 input channels of 16x16, 8 output channels, no padding. Both sides
    allocate their result per call (torch's conv2d has no out argument). Returns
    qviz_s, torch_s, ratio (torch_s / qviz_s), runs, threads, path. Refuses (ValueError) shapes whose
    buffers would pass `memory_limit()`.
    """
    batch, in_channels, size, out_channels = (
        _checks.integer(name, v, 1, 4096) for name, v in
        (("batch", batch), ("in_channels", in_channels), ("size", size), ("out_channels", out_channels)))
    kernel = _checks.integer("kernel", kernel, 1, min(size, 64))
    _checks.choice("bits", bits, (1, 2, 4, 8))
    padding = _checks.integer("padding", padding, 0, kernel - 1)
    budget_s = _checks.real("budget_s", budget_s, 0.0, 60.0, lo_open=True)
    threads = _threads(threads)
    seed = _checks.integer("seed", seed, 0, 2**63 - 1)
    out_side = size + 2 * padding - kernel + 1
    need = 4 * batch * in_channels * size**2 + 8 * batch * out_channels * out_side**2 \
        + 6 * out_channels * in_channels * kernel**2
    _guard(f"measure_conv_latency(batch={batch}, in_channels={in_channels}, size={size}, "
           f"out_channels={out_channels}, kernel={kernel})", need)
    from qviz import packed

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, in_channels, size, size), dtype=np.float32)
    codes = rng.integers(0, 2**bits, (out_channels, in_channels * kernel * kernel), dtype=np.uint8)
    cb = rng.standard_normal(2**bits).astype(np.float32)
    w = packed.prepare(packed.pack(codes, bits))
    xt = torch.from_numpy(x)
    wt = torch.from_numpy(cb[codes].reshape(out_channels, in_channels, kernel, kernel))
    fns = {"qviz": lambda: packed.lut_conv2d(x, w, cb, (kernel, kernel), padding=padding, threads=threads),
           "torch": lambda: torch.nn.functional.conv2d(xt, wt, padding=padding)}
    with _TorchThreads(threads), torch.no_grad():
        medians, runs = _median_interleaved(fns, budget_s)
    return {"qviz_s": medians["qviz"], "torch_s": medians["torch"], "ratio": medians["torch"] / medians["qviz"],
            "runs": runs, "threads": threads, "path": _dispatch.kernel_path()}


def _path_index(path) -> int:
    if path is None:
        return _dispatch.current()
    _checks.choice("path", path, _dispatch.available_paths())
    return _dispatch.PATHS.index(path)


def _concurrently(threads: int, work) -> float:
    """Run work(i) on `threads` Python threads at once (the kernels release the GIL); seconds elapsed."""
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - start


def roof(kind: str = "pop", *, path: str | None = None, threads: int | None = None, seconds: float = 0.2) -> float:
    """The instruction roof of a code path: operations per second of its inner loop on register-resident data.

    kind "pop": XOR + popcount + add, in bit-MACs/s (the binary and hybrid kernels' operation: 3 vector
    instructions per 512 bit-MACs with VPOPCNTDQ; XOR of nibbles, 2 table lookups and 2 adds per 256
    with AVX2; one POPCNT per 64 bits on "popcnt"); "dot": byte dot products in MACs/s (vpdpbusd with
    VNNI, vpmaddubsw + add otherwise: the 2- and 4-bit kernels); "fma": float32 multiply-adds in MACs/s
    (the codebook kernels). Each of `threads` threads runs the loop with as many independent
    accumulators as the kernels' largest tile, at the same time, for about `seconds`.
    """
    _checks.choice("kind", kind, ROOF_KINDS)
    index = _path_index(path)
    threads = _loop_threads(threads)
    seconds = _checks.real("seconds", seconds, 0.0, 60.0, lo_open=True)
    code = _kernels.ROOF_KINDS[kind]
    t0 = time.perf_counter()
    _kernels.roof(index, code, 20000)
    per_iter = (time.perf_counter() - t0) / 20000
    iters = max(1000, int(seconds / max(per_iter, 1e-10)))
    done = [0.0] * threads

    def work(i):
        done[i] = _kernels.roof(index, code, iters)[1]

    elapsed = _concurrently(threads, work)
    return sum(done) / elapsed


def popcount_ceiling(*, threads: int | None = None, seconds: float = 0.2, path: str | None = None) -> float:
    """XOR-popcount roof in bits per second: `roof("pop", ...)` (kept for older notebooks)."""
    return roof("pop", path=path, threads=threads, seconds=seconds)


def read_bandwidth(nbytes: int = 256 * 2**20, *, threads: int | None = None, seconds: float = 0.2) -> float:
    """Bytes per second `threads` threads read from a buffer of `nbytes` (median of repeated passes).

    A buffer well beyond the last-level cache measures DRAM; one that fits it measures that cache
    (a 64 MiB buffer still fits the L3 of some server CPUs: pick sizes from the machine's caches).
    """
    nbytes = _checks.integer("nbytes", nbytes, 4096, 1 << 40)
    threads = _threads(threads)
    seconds = _checks.real("seconds", seconds, 0.0, 60.0, lo_open=True)
    _guard(f"read_bandwidth(nbytes={nbytes})", nbytes)
    buf = np.ones(nbytes // 8, np.uint64)
    t0 = time.perf_counter()
    _kernels.read_words(buf, threads)
    # passes per timed call: about a millisecond of reading, so a call's own cost is not what is measured
    passes = max(1, min(1000, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        _kernels.read_words(buf, threads, passes)
        times.append((time.perf_counter() - t0) / passes)
    return buf.nbytes / statistics.median(times)
