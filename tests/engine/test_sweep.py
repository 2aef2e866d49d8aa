"""Sweeps: a grid runs locally and on a real dask.distributed LocalCluster with identical results; a run
that raises is recorded, not fatal; a rerun hits the cache."""

import time

import pytest

from qviz.engine.sweep import SweepResult, grid, run_sweep

pytestmark = pytest.mark.slow

GRID = grid(model="mlp", w_bits=[2, 4], a_bits=[None, 2], epochs=2, seed=0)
TIMING = {"seconds", "train_seconds"}


def _comparable(result: SweepResult) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in result.rows]


def test_grid_is_the_cartesian_product():
    g = grid(width=[64, 128], depth=[3, 4, 5], residual=False)
    assert len(g) == 6 and all(s["residual"] is False for s in g)
    assert {(s["width"], s["depth"]) for s in g} == {(w, d) for w in (64, 128) for d in (3, 4, 5)}
    with pytest.raises(ValueError, match="width has no values"):
        grid(width=[])


def test_local_pool_and_dask_local_cluster_give_identical_tables(tmp_path):
    from dask.distributed import Client, LocalCluster

    local = run_sweep([{**s, "cache": str(tmp_path / "a")} for s in GRID], "digits", workers=2,
                      cache=tmp_path / "a", progress=False)
    assert [r["status"] for r in local] == ["ok"] * 4
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 2  # scheduler and workers: separate processes
        remote = run_sweep([{**s, "cache": str(tmp_path / "b")} for s in GRID], "digits", executor=client,
                           cache=tmp_path / "b", progress=False)
        by_address = run_sweep([{**s, "cache": str(tmp_path / "c")} for s in GRID], "digits",
                               executor=cluster.scheduler_address, cache=tmp_path / "c", progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "cache"} for r in rows]  # noqa: E731
    assert strip(_comparable(local)) == strip(_comparable(remote)) == strip(_comparable(by_address))
    assert local.rows[0]["acc_quant"] > 0.5  # it really trained


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    result = run_sweep([{"x": 1}, {"x": 2, "fail": "on purpose"}, {"x": 3}], "echo", executor="serial",
                       cache=tmp_path, progress=False)
    assert [r["status"] for r in result] == ["ok", "error", "ok"]
    assert "asked to fail: on purpose" in result.rows[1]["error"]
    assert result.failures() == [result.rows[1]]
    # the same failure in a process pool
    pooled = run_sweep([{"x": 4, "fail": "again"}, {"x": 5}], "echo", cache=tmp_path, progress=False)
    assert [r["status"] for r in pooled] == ["error", "ok"]


def test_a_dead_worker_is_recorded_and_the_next_sweep_gets_new_ones(tmp_path):
    from qviz.engine.sweep import _POOLS

    first = run_sweep([{"x": 1}, {"x": 2}], "echo", cache=tmp_path, progress=False)
    pool = _POOLS[2]
    again = run_sweep([{"x": 3}, {"x": 4}], "echo", cache=tmp_path, progress=False)
    assert [r["status"] for r in [*first, *again]] == ["ok"] * 4 and _POOLS[2] is pool  # workers are kept
    crashed = run_sweep([{"x": 5, "crash": True}, {"x": 8}], "echo", cache=tmp_path, progress=False)
    assert crashed.rows[0]["status"] == "error" and "worker process died" in crashed.rows[0]["error"]
    after = run_sweep([{"x": 6}, {"x": 7}], "echo", cache=tmp_path, progress=False)
    assert [r["status"] for r in after] == ["ok", "ok"] and _POOLS[2] is not pool


def test_a_rerun_hits_the_cache(tmp_path):
    settings = [{**s, "cache": str(tmp_path)} for s in GRID[:2]]
    first = run_sweep(settings, "digits", executor="serial", cache=tmp_path, progress=False)
    start = time.perf_counter()
    second = run_sweep(settings, "digits", executor="serial", cache=tmp_path, progress=False)
    assert second.cached == 2 and time.perf_counter() - start < 2.0
    assert _comparable(first) == _comparable(second)
    fresh = run_sweep(settings, "digits", executor="serial", cache=tmp_path, progress=False, use_cache=False)
    assert fresh.cached == 0


def test_semicircle_sweep_rows_carry_their_maps(tmp_path):
    from qviz.engine import Schedule

    settings = grid(width=16, depth=2, w_bits=2, a_bits=[None, 2], method="ptq", resolution=32,
                    float_schedule=Schedule(steps=30, batch_size=128), cache=str(tmp_path))
    result = run_sweep(settings, "semicircles", executor="serial", cache=tmp_path, progress=False)
    assert [r["status"] for r in result] == ["ok", "ok"]
    assert len(result.rows[0]["quant_map"]) == 32 and {"acc_float", "acc_quant"} <= set(result.rows[0])
    xs, ys, matrix = result.pivot("a_bits", "w_bits")
    assert xs == [2, None] and ys == [2] and all(v is not None for v in matrix[0])


def test_bad_executor_and_task():
    with pytest.raises(ValueError, match="task='nope'"):
        run_sweep([{}], "nope")
    with pytest.raises(ValueError, match="executor='threads'"):
        run_sweep([{"x": 1}], "echo", executor="threads", use_cache=False, progress=False)
    with pytest.raises(TypeError, match="executor must be"):
        run_sweep([{"x": 1}], "echo", executor=42, use_cache=False, progress=False)
