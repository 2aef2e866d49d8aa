"""Sweep wall time: a 24-run sweep on 1 vs 2 local workers and on a 2-worker dask LocalCluster, and the
per-task overhead of the Dask path (goal: >= 1.7x from 1 to 2 workers).

The 24 runs are digits MLP retrainings (w_bits x a_bits x seed); the float models are trained before the
clock starts and every timed sweep skips the result cache. Each worker runs torch with cores / workers
threads. Local pools are timed twice: cold (the sweep starts its worker processes) and warm (workers kept
from an earlier sweep, as in a notebook session and as the already running Dask cluster is); the goal
applies to the warm figures. Run: .venv/bin/python benchmarks/sweeps.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import table

from qviz.engine.experiments import digits_float_model
from qviz.engine.sweep import grid, run_sweep, shutdown_pools

ROUNDS = 3


def timed(**kwargs) -> float:
    start = time.perf_counter()
    result = run_sweep(progress=False, use_cache=False, **kwargs)
    assert not result.failures(), result.failures()[:1]
    return time.perf_counter() - start


def main() -> None:
    from dask.distributed import Client, LocalCluster

    with tempfile.TemporaryDirectory() as cache:
        for seed in (0, 1, 2):
            digits_float_model(seed=seed, cache=cache)
        settings = grid(model="mlp", w_bits=[1, 2, 4, 8], a_bits=[2, 4], seed=[0, 1, 2], epochs=6, cache=cache)
        assert len(settings) == 24
        shutdown_pools()
        one_cold = timed(settings=settings, task="digits", workers=1, cache=cache)
        two_cold = timed(settings=settings, task="digits", workers=2, cache=cache)
        # warm pools, interleaved rounds: this machine is shared and a single short sweep is noisy
        ones, twos = [], []
        for _ in range(ROUNDS):
            ones.append(timed(settings=settings, task="digits", workers=1, cache=cache))
            twos.append(timed(settings=settings, task="digits", workers=2, cache=cache))
        one, two = statistics.median(ones), statistics.median(twos)
        shutdown_pools()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            # warm like the local pool: the workers have imported torch and run this kind of task before
            timed(settings=settings[:4], task="digits", executor=client, cache=cache)
            dask_two = statistics.median(timed(settings=settings, task="digits", executor=client, cache=cache)
                                         for _ in range(ROUNDS))
            n = 200
            echo = timed(settings=grid(x=list(range(n))), task="echo", executor=client)
        rows = [["local, 1 worker, cold", f"{one_cold:.1f}", f"{one / one_cold:.2f}"],
                ["local, 1 worker", f"{one:.1f}", "1.00"],
                ["local, 2 workers, cold", f"{two_cold:.1f}", f"{one / two_cold:.2f}"],
                ["local, 2 workers", f"{two:.1f}", f"{one / two:.2f}"],
                ["dask LocalCluster, 2 workers", f"{dask_two:.1f}", f"{one / dask_two:.2f}"]]
    print(f"24-run sweep (digits MLP, QAT 6 epochs per run); warm figures are medians of {ROUNDS} rounds\n")
    print(table(rows, ["executor", "wall s", "speed-up vs 1 warm worker"]))
    print(f"\n1 -> 2 local workers: {one / two:.2f}x warm, {one_cold / two_cold:.2f}x cold (goal >= 1.7x)")
    print(f"\nDask path overhead: {echo / n * 1e3:.1f} ms per task ({n} empty tasks, 2 workers)")


if __name__ == "__main__":
    main()
