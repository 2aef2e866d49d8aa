"""How an explorer turns control changes into pictures without freezing the notebook.

One `Runner` per explorer owns one worker thread. A control change calls `request(params)`; a single
change (a key press, a click) runs at once, while a burst (a dragged slider sends dozens of values)
waits until the controls have been quiet for `debounce_s`, then computes with the latest params only.
Computations are generators: each value they yield is an
intermediate result (a PTQ map, then QAT refinements) that is applied only if no newer request has
arrived since: last write wins, and a stale result never overwrites a newer one. A newer request also
sets the running job's cancel event so long work (training) stops early. Errors go to `on_error` and
the runner keeps serving later requests.
"""

from __future__ import annotations

import atexit
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as W

Compute = Callable[[dict, threading.Event, Callable[[float, str], None]], Iterator[Any]]

# How long close() waits for a running computation to notice its cancel event. Training checks it
# between steps (milliseconds), so this bounds only work that cannot be interrupted (one latency measurement).
CLOSE_TIMEOUT_S = 10.0

_RUNNERS: weakref.WeakSet[Runner] = weakref.WeakSet()


@atexit.register
def _close_all_runners() -> None:
    # A worker thread still inside PyTorch when the interpreter tears down aborts the process
    # ("terminate called without an active exception"): a script that ends while an explorer trains
    # must exit cleanly, so stop every worker before finalization.
    for runner in list(_RUNNERS):
        runner.close()


class Runner:
    """Debounced, background, last-write-wins execution of an explorer's updates.

    compute(params, cancel, progress) yields results; apply(result, params) shows one; progress(fraction,
    text) may be called from compute; on_error(exception) shows a failure. With background=False every
    request runs at once in the caller's thread (scripts, tests and benchmarks that want no threads).
    """

    def __init__(self, compute: Compute, apply: Callable[[Any, dict], None], *,
                 on_error: Callable[[BaseException], None], on_progress: Callable[[float, str], None] | None = None,
                 on_done: Callable[[], None] | None = None, debounce_s: float = 0.04, background: bool = True):
        self._compute, self._apply, self._on_error = compute, apply, on_error
        self._on_progress = on_progress or (lambda fraction, text: None)
        self._on_done = on_done or (lambda: None)
        self.debounce_s = debounce_s
        self.background = background
        self._cond = threading.Condition()
        self._generation = 0  # bumped by every request
        self._pending: tuple[int, dict] | None = None
        self._last_request = 0.0
        self._burst = False  # did this request follow the previous one within debounce_s?
        self._cancel = threading.Event()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.applied_generation = 0
        self.errors = 0
        _RUNNERS.add(self)

    # ---------------------------------------------------------------- requests

    def request(self, params: dict) -> None:
        with self._cond:
            if self._closed:
                return  # a closed explorer's controls may still fire; nothing is shown any more
            self._generation += 1
            self._pending = (self._generation, dict(params))
            now = time.monotonic()
            self._burst = now - self._last_request < self.debounce_s
            self._last_request = now
            self._cancel.set()  # the running job, if any, is stale now
            if not self.background:
                job = self._pending
                self._pending = None
            else:
                self._ensure_thread()
                self._cond.notify_all()
                return
        self._run(*job)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="qviz-runner", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                # debounce a burst: wait until no request has come for debounce_s
                while self._burst:
                    quiet = time.monotonic() - self._last_request
                    if quiet >= self.debounce_s or self._closed:
                        break
                    self._cond.wait(self.debounce_s - quiet)
                job, self._pending = self._pending, None
                self._busy = True
            try:
                self._run(*job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _current(self, generation: int) -> bool:
        return generation == self._generation

    def _run(self, generation: int, params: dict) -> None:
        cancel = threading.Event()
        with self._cond:
            self._cancel = cancel
            # close() may have come after the worker took this job and before its event was installed
            if self._closed or not self._current(generation):
                return

        def progress(fraction: float, text: str = "") -> None:
            if self._current(generation):
                self._on_progress(fraction, text)

        try:
            for result in self._compute(params, cancel, progress):
                if not self._current(generation) or self._closed:
                    return  # a newer request exists (or the explorer closed): drop the stale work
                self._apply(result, params)
                self.applied_generation = generation
        except Exception as e:  # shown inside the widget; the runner keeps working
            if self._current(generation) and not cancel.is_set():
                self.errors += 1
                self._on_error(e)
            return
        if self._current(generation):
            self._on_done()

    # ---------------------------------------------------------------- control

    def idle(self) -> bool:
        with self._cond:
            return self._pending is None and not self._busy

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until every request so far has been served (or `timeout` passes); True if idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Stop serving requests, cancel the running computation and wait up to `timeout` seconds for
        the worker thread to finish it; True if no worker is left running."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cancel.set()
            self._cond.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()


class StatusPanel(W.VBox):
    """Progress bar, a status line and an error box, all inside the explorer."""

    def __init__(self):
        self.bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, layout=W.Layout(width="220px", visibility="hidden"))
        self.text = W.HTML(value="")
        self.error = W.HTML(value="", layout=W.Layout(display="none"))
        self.error.add_class("qviz-error")
        super().__init__([W.HBox([self.bar, self.text]), self.error])

    def progress(self, fraction: float, text: str = "") -> None:
        self.bar.layout.visibility = "visible" if fraction < 1.0 else "hidden"
        self.bar.value = max(0.0, min(1.0, fraction))
        if text:
            self.text.value = _escape(text)

    def done(self) -> None:
        self.bar.layout.visibility = "hidden"

    def show_error(self, error: BaseException) -> None:
        kind = type(error).__name__
        where = "".join(traceback.format_exception_only(type(error), error)).strip()
        self.error.value = (f"<div style='color:#9b1c1c;background:#fdecec;border:1px solid #f5b5b5;"
                            f"padding:6px 8px;border-radius:4px'><b>{_escape(kind)}</b>: "
                            f"{_escape(where.split(': ', 1)[-1])}</div>")
        self.error.layout.display = "flex"
        self.text.value = ""  # the summary described the last good result, not the settings that failed
        self.done()

    def clear_error(self) -> None:
        if self.error.value:
            self.error.value = ""
            self.error.layout.display = "none"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
