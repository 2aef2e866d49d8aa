"""Sweeps: grids of independent experiments, run locally or on Dask, cached on disk, returned as a table.

    from qviz.engine.sweep import grid, run_sweep
    table = run_sweep(grid(width=[64, 128], depth=[3, 4], w_bits=[2], a_bits=[None, 2]))   # 8 runs
    table = run_sweep(settings, executor=distributed.Client("tcp://scheduler:8786"))        # same code

Every run is one task: a picklable function of one settings dict that returns one result row. Rows are
cached by (task, settings) under the user cache directory, so an interrupted sweep resumes and a repeated
one is free. A run that raises is recorded in its row ("status": "error", "error": the message) and the
sweep goes on; failures are not cached, so a fixed run is tried again.

Tasks: "semicircles" (`run_experiment` on the data of 002 §3), "digits" (scikit-learn's 8x8 digits with
an MLP of LeNet-300-100 shape or a small residual CNN, for the bits x bits heat map of 001 Fig. 5 and the
block-type comparison of 002 Fig. 8) and "echo" (returns its settings: for measuring executors).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from qviz import _checks
from qviz.engine import _cache

CACHE_VERSION = 1
EXECUTORS = ("local", "serial")


# --------------------------------------------------------------------------------------------------
# Declaring a grid


def grid(**axes) -> list[dict]:
    """Every combination of the given settings: grid(width=[64, 128], w_bits=[2, 4]) -> 4 settings dicts.

    An axis is a list, tuple, range, set (sorted), 1-D numpy array or any other iterable of values; a
    string, dict or single number is one setting shared by every combination. numpy scalars become the
    Python numbers they hold (so settings print, compare and cache like the numbers you typed).
    """
    if not axes:
        raise ValueError("grid needs at least one setting, e.g. grid(width=[64, 128])")
    names = list(axes)
    values = [_axis(name, v) for name, v in axes.items()]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def _axis(name: str, value) -> list:
    if isinstance(value, str | bytes | dict) or not isinstance(value, Iterable) or getattr(value, "ndim", 1) == 0:
        options = [value]
    elif isinstance(value, set | frozenset):
        options = sorted(value, key=_order_key)
    else:
        options = list(value)
    if not options:
        raise ValueError(f"{name} has no values; give at least one")
    return [_plain_setting(v) for v in options]


def _plain_setting(value):
    """numpy scalars (np.int64(128), np.True_) as Python values; everything else as it is."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _order_key(value):
    return (value is None, not isinstance(value, int | float), value if isinstance(value, int | float) else str(value))


# --------------------------------------------------------------------------------------------------
# Tasks (module-level functions: they travel to worker processes and Dask workers by reference)


def semicircle_task(settings: dict) -> dict:
    """One run of `run_experiment` (002 §3); the row also keeps both decision maps at 64x64 for viewing."""
    from qviz.engine.experiments import run_experiment

    s = dict(settings)
    resolution = s.pop("resolution", 120)
    row = run_experiment(**s, resolution=resolution, with_maps=True)
    small = {}
    for key in ("float_map", "quant_map"):
        small[key] = _round_grid(row.pop(key)["probs"][:: max(1, resolution // 64), :: max(1, resolution // 64)])
    return {**row, **small}


def digits_task(settings: dict) -> dict:
    """Train (or load) a float digits model, retrain it quantized, report test accuracies.

    settings: model ("mlp" or "cnn"), block ("basic", "preact", "depthwise"), blocks, channels,
    w_bits / a_bits (None: float), w_scheme (default "ceil", 001 eq. 3), a_scheme (default "ceil_act",
    001 eq. 5), epochs (QAT, default 15), seed.
    """
    from qviz.engine.experiments import digits_experiment

    return digits_experiment(**settings)


def echo_task(settings: dict) -> dict:
    """Returns its settings: a task that costs nothing, to measure what an executor adds per task.
    {"fail": msg} raises, {"crash": True} ends the worker process abruptly (for tests of both)."""
    if settings.get("crash"):
        os._exit(3)
    if settings.get("fail"):
        raise RuntimeError(f"asked to fail: {settings['fail']}")
    return dict(settings)


TASKS: dict[str, Callable[[dict], dict]] = {"semicircles": semicircle_task, "digits": digits_task,
                                            "echo": echo_task}


def check_settings(task: str, settings: dict) -> None:
    """Raise TypeError / ValueError (naming the argument) for a settings dict its task would refuse; nothing
    is trained. run_sweep checks every settings dict this way before it starts any run."""
    if task == "semicircles":
        from qviz.engine.experiments import check_experiment

        s = dict(settings)
        if "resolution" in s:
            _checks.integer("resolution", s.pop("resolution"), 2, 4096)
        check_experiment(**s)
    elif task == "digits":
        from qviz.engine.experiments import check_digits_experiment

        check_digits_experiment(**settings)


def _round_grid(probs) -> list[list[float]]:
    return [[round(float(v), 3) for v in row] for row in probs]


def _run_safely(task: str, settings: dict, threads: int | None) -> dict:
    """Run one task; a failure becomes a row instead of an exception (the sweep goes on)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        row = TASKS[task](settings)
        row.update(status="ok")
    except Exception as e:  # recorded in the row, by design
        row = {**settings, "status": "error", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=5)}
    row["seconds"] = time.perf_counter() - start
    return row


# --------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class SweepResult:
    """The rows of a sweep, in the order of its settings (one dict per run)."""

    rows: list[dict]
    settings: list[dict]
    task: str = "semicircles"
    cached: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for key, value in row.items():
                if not isinstance(value, list | dict):
                    seen[key] = None
        return list(seen)

    def varying(self) -> list[str]:
        """The settings that take more than one value in this sweep."""
        keys = {k for s in self.settings for k in s}
        distinct = {k: {json.dumps(s.get(k), default=str) for s in self.settings} for k in keys}
        return [k for k in self.settings[0] if len(distinct[k]) > 1]

    def failures(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") != "ok"]

    def where(self, **conditions) -> SweepResult:
        """The rows whose settings equal all of `conditions`."""
        keep = [i for i, s in enumerate(self.settings) if all(s.get(k) == v for k, v in conditions.items())]
        return SweepResult([self.rows[i] for i in keep], [self.settings[i] for i in keep], self.task)

    def pivot(self, x: str, y: str, value: str = "acc_quant") -> tuple[list, list, list[list[float | None]]]:
        """(x values, y values, matrix[y][x]) of `value`, averaged over any other varying setting."""
        xs = sorted({json.dumps(r.get(x)) for r in self.rows}, key=_order)
        ys = sorted({json.dumps(r.get(y)) for r in self.rows}, key=_order)
        cells: dict[tuple[str, str], list[float]] = {}
        for r in self.rows:
            v = r.get(value)
            if isinstance(v, int | float) and math.isfinite(v):
                cells.setdefault((json.dumps(r.get(x)), json.dumps(r.get(y))), []).append(float(v))
        matrix = [[(sum(cells[(a, b)]) / len(cells[(a, b)])) if (a, b) in cells else None for a in xs] for b in ys]
        return [json.loads(a) for a in xs], [json.loads(b) for b in ys], matrix

    def to_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns(), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame([{k: r.get(k) for k in self.columns()} for r in self.rows])


def _order(encoded: str):
    """Sort settings values: None (float) last, numbers numerically, the rest as text."""
    v = json.loads(encoded)
    if v is None:
        return (2, 0.0, "")
    if isinstance(v, int | float):
        return (0, float(v), "")
    return (1, 0.0, str(v))


# --------------------------------------------------------------------------------------------------
# Running


def sweep_cache_dir(cache: str | os.PathLike | None = None) -> Path:
    return _cache.folder(cache) / "sweeps"


def _key(task: str, settings: dict) -> str:
    return _cache.key({"task": task, "settings": settings, "version": CACHE_VERSION}, length=24)


class _Progress:
    """A one-line text progress bar on stderr (it works in terminals and in notebooks)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.perf_counter()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and self.total:
            filled = int(30 * self.done / self.total)
            elapsed = time.perf_counter() - self.start
            sys.stderr.write(f"\rsweep [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"{elapsed:5.0f} s")
            sys.stderr.flush()
            if self.done == self.total:
                sys.stderr.write("\n")


# Local pools outlive one sweep: starting a worker (spawn + importing torch) costs a second or two, as
# much as several short runs, and a notebook session typically runs sweep after sweep.
_POOLS: dict[int, cf.ProcessPoolExecutor] = {}


def _local_pool(workers: int) -> cf.ProcessPoolExecutor:
    pool = _POOLS.get(workers)
    if pool is None:
        # spawn, not fork: a forked copy of a process that already runs OpenMP / torch threads can deadlock
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        _POOLS[workers] = pool
    return pool


def shutdown_pools() -> None:
    """Stop the worker processes that local sweeps keep for the next sweep (they stop at exit anyway)."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown(cancel_futures=True)


def _is_dask_client(executor) -> bool:
    return type(executor).__name__ == "Client" and hasattr(executor, "submit") and hasattr(executor, "gather")


def run_sweep(settings: Sequence[dict] | dict, task: str = "semicircles", *, executor=None, workers: int = 2,
              cache: str | os.PathLike | None = None, use_cache: bool = True, progress: bool = True,
              callback: Callable[[int, int, dict], None] | None = None) -> SweepResult:
    """Run every settings dict of `settings` (a list, or one dict of axes for `grid`) as an independent task.

    executor: "local" (default: a pool of `workers` processes, one torch thread each when workers
    fill the cores), "serial" (in this process), a `dask.distributed.Client`, or a scheduler address
    such as "tcp://10.0.0.5:8786". Cached rows are returned without running; `callback(done, total,
    row)` follows the progress.
    """
    _checks.choice("task", task, TASKS)
    settings = _settings_list(settings)
    for i, s in enumerate(settings):
        try:
            check_settings(task, s)
        except (TypeError, ValueError) as err:  # every run is checked before the first one starts
            raise type(err)(f"settings[{i}] {s}: {err}") from None
    workers = _checks.integer("workers", workers, 1, 1024)
    _checks.boolean("use_cache", use_cache)
    folder = sweep_cache_dir(cache) / task
    rows: list[dict | None] = [None] * len(settings)
    todo = []
    for i, s in enumerate(settings):
        row = _cache.read(folder / f"{_key(task, s)}.json", _cached_row, "sweep row") if use_cache else None
        if row is None:
            todo.append(i)
        else:
            rows[i] = row
    cached = len(settings) - len(todo)
    bar = _Progress(len(settings), progress)
    bar.step(cached)

    def finish(i: int, row: dict) -> None:
        rows[i] = row
        if row.get("status") == "ok" and use_cache:
            _cache.write_text(folder / f"{_key(task, settings[i])}.json", json.dumps(row, default=_jsonable))
        bar.step()
        if callback is not None:
            callback(bar.done, bar.total, row)

    if todo:
        for i, row in _execute(executor, workers, task, [settings[i] for i in todo], todo):
            finish(i, row)
    return SweepResult([r for r in rows if r is not None], settings, task, cached)


def _settings_list(settings) -> list[dict]:
    """A list of settings dicts from a list (or other iterable) of dicts, or one dict of axes for `grid`."""
    if isinstance(settings, dict):
        if not settings:
            raise ValueError("settings is an empty dict: give at least one axis, e.g. {'width': [64, 128]}")
        return grid(**settings)
    if isinstance(settings, str | bytes) or not isinstance(settings, Iterable):
        raise TypeError(f"settings must be a list of settings dicts or one dict of axes, got {type(settings).__name__}")
    settings = list(settings)
    if not settings:
        raise ValueError("settings is empty: nothing to run")
    for i, s in enumerate(settings):
        if not isinstance(s, dict):
            raise TypeError(f"settings[{i}] must be a dict of settings, got {type(s).__name__}")
        if not all(isinstance(k, str) for k in s):
            raise TypeError(f"settings[{i}] must have str keys (argument names), got {list(s)!r}")
    return [{k: _plain_setting(v) for k, v in s.items()} for s in settings]


def _cached_row(path: Path) -> dict:
    """A cached row: a dict with status "ok" (anything else is a damaged entry and runs again)."""
    row = json.loads(path.read_text())
    if not isinstance(row, dict) or row.get("status") != "ok":
        raise ValueError(f"the entry holds {type(row).__name__} {str(row)[:60]!r}, not a result row")
    return row


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _execute(executor, workers: int, task: str, items: list[dict], indices: list[int]) -> Iterable[tuple[int, dict]]:
    if executor in (None, "local"):
        yield from _execute_local(workers, task, list(zip(indices, items, strict=True)))
        return
    if executor == "serial":
        for s, i in zip(items, indices, strict=True):
            yield i, _run_safely(task, s, None)
        return
    if isinstance(executor, str):
        if "://" not in executor:
            raise ValueError(f"executor={executor!r} is not allowed; allowed: 'local', 'serial', a "
                             "dask.distributed.Client or a scheduler address such as 'tcp://host:8786'")
        from dask.distributed import Client

        with Client(executor) as client:
            yield from _execute_dask(client, task, items, indices)
        return
    if _is_dask_client(executor):
        yield from _execute_dask(executor, task, items, indices)
        return
    raise TypeError(f"executor must be 'local', 'serial', a dask.distributed.Client or a scheduler address, "
                    f"got {type(executor).__name__}")


def _execute_local(workers: int, task: str, jobs: list[tuple[int, dict]]) -> Iterable[tuple[int, dict]]:
    """Run jobs on the local pool. When a worker process dies (killed, out of memory, a crash in C), every
    unfinished job of the pool fails with it, though only one caused it: those jobs run again on a new
    pool, and a job caught in a second death runs alone, where only the job that kills its worker fails."""
    threads = _threads_per_worker(workers)
    deaths: dict[int, int] = {}
    suspects: list[tuple[int, dict]] = []
    while jobs or suspects:
        alone = not jobs
        batch = jobs if jobs else [suspects.pop(0)]
        size = min(workers, len(batch)) if not alone else 1
        pool = _local_pool(size)
        futures = {pool.submit(_run_safely, task, s, threads): (i, s) for i, s in batch}
        jobs, broken = [], False
        for future in cf.as_completed(futures):
            i, s = futures[future]
            try:
                yield i, future.result()
                continue
            except BrokenProcessPool as e:
                broken, message = True, f"the worker process died while running this task ({e})"
            deaths[i] = deaths.get(i, 0) + 1
            if alone:
                yield i, {**s, "status": "error", "error": message, "seconds": 0.0}
            else:
                (suspects if deaths[i] >= 2 else jobs).append((i, s))
        if broken:
            _POOLS.pop(size, None)


def _execute_dask(client, task: str, items: list[dict], indices: list[int]) -> Iterable[tuple[int, dict]]:
    from dask.distributed import as_completed

    workers = max(1, len(client.scheduler_info().get("workers", {})))
    threads = _threads_per_worker(workers) if workers <= (os.cpu_count() or 1) else 1
    futures = {}
    for s, i in zip(items, indices, strict=True):
        # pure=False: two runs with equal settings are still two runs (the cache deduplicates, not Dask)
        futures[client.submit(_run_safely, task, s, threads, pure=False)] = i
    for future in as_completed(futures):
        yield futures[future], future.result()


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
    except ImportError:
        pass
    return str(value)
