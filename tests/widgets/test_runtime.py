"""The explorers' background runner: last-write-wins, and close() stopping work that has not started."""

from __future__ import annotations

import threading
import time

from qviz.widgets._runtime import Runner


class _Recorder:
    def __init__(self):
        self.started, self.applied, self.errors = [], [], []

    def compute(self, params, cancel, progress):
        self.started.append(params["n"])
        yield params["n"]

    def apply(self, result, params):
        self.applied.append(result)


def test_close_between_taking_a_job_and_starting_it_stops_it():
    recorder = _Recorder()
    taken = threading.Event()

    class Slow(Runner):
        def _run(self, generation, params):
            taken.set()
            time.sleep(0.2)  # the worker has taken the job; close() lands here
            super()._run(generation, params)

    runner = Slow(recorder.compute, recorder.apply, on_error=recorder.errors.append, debounce_s=0.0)
    runner.request({"n": 1})
    assert taken.wait(5)
    assert runner.close(timeout=5)
    assert recorder.started == [] and recorder.applied == []


def test_the_last_request_wins_and_every_request_before_it_is_dropped_or_superseded():
    recorder = _Recorder()
    runner = Runner(recorder.compute, recorder.apply, on_error=recorder.errors.append, debounce_s=0.02)
    for n in range(20):
        runner.request({"n": n})
    assert runner.wait(10)
    assert recorder.applied[-1] == 19 and recorder.errors == []
    runner.close()
    runner.request({"n": 99})  # a closed runner's controls may still fire: nothing runs
    time.sleep(0.1)
    assert 99 not in recorder.started
