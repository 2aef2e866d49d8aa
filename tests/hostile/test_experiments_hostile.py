"""Experiments, caches and sweeps under careless and hostile use: bad settings fail before any training,
damaged cache entries heal, concurrent sweeps share a cache folder safely, a crashing run fails alone."""

from __future__ import annotations

import json
import threading
import time
import warnings

import hostile
import numpy as np
import pytest
import torch

from qviz.engine import Schedule, float_model, run_experiment
from qviz.engine._cache import CacheWarning
from qviz.engine.sweep import grid, run_sweep, sweep_cache_dir

TINY = Schedule(steps=20, batch_size=64)


# ------------------------------------------------------------------------------------------------ fail fast


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"w_bits": 33}, "w_bits"), ({"w_bits": 0}, "w_bits"), ({"w_bits": [1]}, "w_bits"), ({"w_bits": 2.0}, "w_bits"),
    ({"a_bits": 1.5}, "a_bits"), ({"a_bits": -2}, "a_bits"), ({"w_scheme": "nope"}, "w_scheme"),
    ({"w_scheme": 3}, "w_scheme"), ({"a_scheme": "affine", "a_bits": 40}, "a_bits"), ({"method": "sgd"}, "method"),
    ({"width": 0}, "width"), ({"width": 2.5}, "width"), ({"depth": 1}, "depth"), ({"depth": 10**6}, "depth"),
    ({"width": 60000, "depth": 200}, "parameters"), ({"residual": "no"}, "residual"), ({"seed": -1}, "seed"),
    ({"resolution": 1}, "resolution"), ({"resolution": 10**5}, "resolution"), ({"cache": 3}, "cache"),
    ({"qat_schedule": {"steps": 5}}, "qat_schedule"), ({"callback": "print"}, "callback"),
    ({"cancel": True}, "cancel"), ({"learning_rate": 0.1}, "learning_rate"), ({"lip_weight": -1.0}, "lip_weight"),
    ({"grad_bits": 0}, "grad_bits"), ({"stochastic": True}, "stochastic"), ({"freeze_bn_step": -3}, "freeze_bn_step"),
    ({"bn_fold": "sometimes"}, "bn_fold"), ({"overrides": {9: {"w_spec": None}}}, "overrides"),
    ({"batchnorm": 1}, "batchnorm"), ({"with_maps": None}, "with_maps"),
])
def test_bad_experiment_settings_fail_before_any_training(kwargs, name, tmp_path):
    start = time.perf_counter()
    out = hostile.run(run_experiment, cache=tmp_path, **kwargs) if "cache" not in kwargs else hostile.run(
        run_experiment, **kwargs)
    hostile.expect_clear_error(out, name)
    assert time.perf_counter() - start < 2.0, "the error came after work had started"
    assert not any(tmp_path.rglob("*.pt")), "a float model was trained before the error"


def test_numpy_settings_share_the_cache_entry_of_python_numbers(tmp_path):
    first = float_model(np.int64(16), np.int64(3), np.False_, schedule=TINY, cache=tmp_path)
    files = list(tmp_path.rglob("*.pt"))
    start = time.perf_counter()
    again = float_model(16, 3, False, schedule=TINY, cache=tmp_path)
    hostile.expect_answer(hostile.run(lambda: (len(files), list(tmp_path.rglob("*.pt")) == files)),
                          lambda v: v == (1, True), "one cache entry for numpy and Python settings")
    assert time.perf_counter() - start < 1.0
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------------------ caches heal


def _garbage(path):
    path.write_bytes(b"\x00garbage\xff" * 10)


def _empty(path):
    path.write_bytes(b"")


def _other_architecture(path):
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, path)


def _nan_weights(path):
    state = torch.load(path, weights_only=True)
    state[next(iter(state))].fill_(float("nan"))
    torch.save(state, path)


def _pickled_code(path):
    import pickle

    path.write_bytes(pickle.dumps(print))  # weights_only loading must refuse to run anything


def _directory(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("damage", [_garbage, _empty, _other_architecture, _nan_weights, _pickled_code, _directory])
def test_a_damaged_float_model_cache_entry_is_reported_and_retrained(damage, tmp_path):
    reference = float_model(16, 3, schedule=TINY, cache=tmp_path)
    (path,) = tmp_path.rglob("*.pt")
    damage(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = hostile.run(float_model, 16, 3, schedule=TINY, cache=tmp_path)

    def healed(model):
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                      strict=True))
        return same and any(issubclass(w.category, CacheWarning) for w in caught)

    hostile.expect_answer(out, healed, f"float model after {damage.__name__}")
    if damage is not _directory:  # the entry was rewritten and now loads without a warning
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            float_model(16, 3, schedule=TINY, cache=tmp_path)


def test_an_unwritable_cache_is_a_warning_not_an_error(tmp_path):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    with pytest.warns(CacheWarning, match="could not write"):
        out = hostile.run(float_model, 16, 3, schedule=TINY, cache=blocker)
    hostile.expect_answer(out, lambda m: isinstance(m, torch.nn.Module), "float model with an unwritable cache")


SETTINGS = [{"x": i} for i in range(6)]


@pytest.mark.parametrize("content", ["null", "[]", "42", '"row"', "{}", '{"status": "error", "x": 1}', "{not json",
                                     ""])
def test_a_damaged_sweep_cache_entry_runs_again_and_the_table_stays_aligned(content, tmp_path):
    run_sweep(SETTINGS, "echo", executor="serial", cache=tmp_path, progress=False)
    entries = sorted((sweep_cache_dir(tmp_path) / "echo").glob("*.json"))
    assert len(entries) == len(SETTINGS)
    for path in entries[::2]:
        path.write_text(content)
    with pytest.warns(CacheWarning):
        out = hostile.run(run_sweep, SETTINGS, "echo", executor="serial", cache=tmp_path, progress=False)

    def aligned(table):
        return ([r["x"] for r in table.rows] == [s["x"] for s in SETTINGS] and table.cached == len(SETTINGS) - 3
                and all(r["status"] == "ok" for r in table.rows))

    hostile.expect_answer(out, aligned, f"sweep with cache entries {content!r}")
    assert all(json.loads(p.read_text())["status"] == "ok" for p in entries)


def test_two_threads_sweeping_into_one_cache_folder_both_succeed(tmp_path):
    settings = [{"x": i, "pad": "y" * 2000} for i in range(60)]
    results, errors = [], []

    def sweep():
        try:
            results.append(run_sweep(settings, "echo", executor="serial", cache=tmp_path, progress=False))
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = sweep_cache_dir(tmp_path) / "echo"
    out = hostile.run(lambda: (errors, [len(r.rows) for r in results], sorted(p.name for p in folder.iterdir())))

    def clean(v):
        errs, sizes, names = v
        return errs == [] and sizes == [60] * 4 and len(names) == 60 and all(n.endswith(".json") for n in names)

    hostile.expect_answer(out, clean, "four threads sweeping into one folder")


def test_a_crashing_run_fails_alone_and_the_rest_of_the_pool_succeeds(tmp_path):
    settings = [{"x": i} for i in range(7)]
    settings[3] = {"x": 3, "crash": True}
    out = hostile.run(run_sweep, settings, "echo", workers=2, cache=tmp_path, progress=False)

    def only_the_crash_failed(table):
        status = [r["status"] for r in table.rows]
        return status == ["ok"] * 3 + ["error"] + ["ok"] * 3 and "died" in table.rows[3]["error"]

    hostile.expect_answer(out, only_the_crash_failed, "a sweep with one crashing run")


# ------------------------------------------------------------------------------------------------ grids


@pytest.mark.parametrize(("axes", "want"), [
    ({"width": range(2, 5)}, [{"width": 2}, {"width": 3}, {"width": 4}]),
    ({"width": np.array([64, 128])}, [{"width": 64}, {"width": 128}]),
    ({"width": {128, 64}}, [{"width": 64}, {"width": 128}]),
    ({"w_bits": [np.int64(2), None]}, [{"w_bits": 2}, {"w_bits": None}]),
    ({"method": "qat", "seed": np.int32(3)}, [{"method": "qat", "seed": 3}]),
    ({"data": {"noise": 0.1}}, [{"data": {"noise": 0.1}}]),
    ({"width": (x for x in (8, 16))}, [{"width": 8}, {"width": 16}]),
])
def test_grid_axes_of_any_iterable_expand_to_one_setting_per_value(axes, want):
    out = hostile.run(grid, **axes)
    hostile.expect_answer(out, lambda got: got == want and all(type(v) in (int, str, type(None), dict)
                                                               for s in got for v in s.values()), f"grid({axes})")


@pytest.mark.parametrize(("call", "name"), [
    (lambda p: grid(), "grid"), (lambda p: grid(width=[]), "width"), (lambda p: run_sweep({}, cache=p), "settings"),
    (lambda p: run_sweep([], cache=p), "settings"), (lambda p: run_sweep("width", cache=p), "settings"),
    (lambda p: run_sweep([1, 2], cache=p), "settings[0]"),
    (lambda p: run_sweep([{1: 2}], "echo", cache=p), "settings[0]"),
    (lambda p: run_sweep({"width": [64]}, "mnist", cache=p), "task"),
    (lambda p: run_sweep({"width": [64], "w_bits": [2, 33]}, cache=p), "w_bits"),
    (lambda p: run_sweep({"width": [64], "colour": ["red"]}, cache=p), "colour"),
    (lambda p: run_sweep({"model": ["mlp", "rnn"]}, "digits", cache=p), "model"),
    (lambda p: run_sweep({"x": [1]}, "echo", workers=0, cache=p), "workers"),
    (lambda p: run_sweep({"x": [1]}, "echo", executor="threads", cache=p), "executor"),
    (lambda p: run_sweep({"x": [1]}, "echo", executor=3, cache=p), "executor"),
    (lambda p: run_sweep({"x": [1]}, "echo", cache=p, use_cache="yes"), "use_cache"),
])
def test_bad_sweeps_are_refused_by_name_before_any_run(call, name, tmp_path):
    start = time.perf_counter()
    hostile.expect_clear_error(hostile.run(call, tmp_path), name)
    assert time.perf_counter() - start < 2.0
    assert not any(tmp_path.rglob("*.pt"))
