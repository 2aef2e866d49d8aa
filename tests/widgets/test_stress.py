"""500 rapid control changes per explorer: the display ends on the last value, nothing raises, the
thread count stays bounded and memory grows by less than 100 MB."""

import gc
import itertools
import threading

import psutil
import pytest

from qviz.engine import Schedule, float_model
from qviz.widgets import DecisionMapExplorer, KernelReadout, QuantizerExplorer, WeightExplorer

pytestmark = pytest.mark.slow

CHANGES = 500


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _storm(explorer, control, values, check):
    """Set control.value through `values` cyclically, CHANGES times, as fast as Python can."""
    assert explorer.wait(300)
    cycle = itertools.cycle(values)
    for _ in range(50):  # warm-up: first-time allocations are not growth
        control.value = next(cycle)
    assert explorer.wait(300)
    threads, rss = threading.active_count(), _rss_mb()
    last = None
    for _ in range(CHANGES):
        last = next(cycle)
        control.value = last
        assert threading.active_count() <= threads + 1  # one worker per explorer, no thread per change
    assert explorer.wait(300), "the explorer did not settle"
    assert explorer.runner.errors == 0 and explorer.status.error.value == ""
    assert threading.active_count() <= threads + 1
    assert _rss_mb() - rss < 100
    check(last)


def test_quantizer_storm():
    e = QuantizerExplorer()
    try:
        def check(last):
            assert e.params["bits"] == last
            assert len(e.data["curve"]["levels"]) == 2**last

        _storm(e, e.bits, [2, 3, 4, 5, 6, 7, 8, 3], check)
    finally:
        e.close()


def test_weight_explorer_storm():
    model = float_model(32, 3, batchnorm=True, schedule=Schedule(steps=20, batch_size=128), use_cache=False)
    e = WeightExplorer(model)
    try:
        def check(last):
            assert e.params["bits"] == last
            assert len(e.data["report"]["levels"]) == 2**last - 1  # narrow symmetric

        _storm(e, e.bits, [2, 3, 4, 5, 6, 7, 8, 6], check)
    finally:
        e.close()


def test_decision_map_storm(tmp_path, monkeypatch):
    monkeypatch.setenv("QVIZ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("qviz.widgets.decision.float_model",
                        lambda *a, **k: float_model(*a, schedule=Schedule(steps=20, batch_size=128), **k))
    e = DecisionMapExplorer(width=16, depth=2, resolution=40, points=100)
    try:
        def check(last):
            assert e.params["w_bits"] == (last or None)
            assert (e.data["w_spec"] is None) == (last == 0) and (last == 0 or e.data["w_spec"].bits == last)

        _storm(e, e.w_bits, [2, 3, 4, 6, 8, 0, 1], check)
    finally:
        e.close()


def test_kernel_readout_storm():
    e = KernelReadout()
    e.out_features.value, e.in_features.value, e.budget.value = 128, 256, 0.05
    try:
        def check(last):
            assert e.params["bits"] == last
            assert e.data["memory"]["packed_bytes"] == 128 * 256 * last // 8
            assert e.data["latency"] is not None and e.data["latency"]["bits"] == last

        _storm(e, e.bits, [1, 2, 4, 8, 2], check)
    finally:
        e.close()
