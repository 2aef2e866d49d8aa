"""The hostile-input suite's two tools: a guarded child process for calls that could crash the interpreter,
and a tally of how qviz answered every input it was handed.

Every input ends in one of four ways:

- ``clear_error``: a ValueError or TypeError whose message names the argument (the tests give the names),
- ``checked_answer``: a result the test compared with a reference and found right,
- ``crash``: the child process died or hung (a segfault, an abort, an infinite loop),
- ``wrong``: an unclear error (another exception type, or a message that names nothing) or a wrong result.

The suite fails on the last two; `pytest_terminal_summary` (conftest.py) prints the counts and writes them to
test-artifacts/hostile-counts.json, which is where the README's figures come from.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

COUNTS: collections.Counter = collections.Counter()
_lock = threading.Lock()
KINDS = ("clear_error", "checked_answer", "crash", "wrong")


def tally(kind: str, n: int = 1) -> None:
    assert kind in KINDS, kind
    with _lock:
        COUNTS[kind] += n


@dataclasses.dataclass
class Outcome:
    """What one call did: returned `value`, raised `error_type` with `message`, or crashed."""

    value: Any = None
    error_type: type | None = None
    error_name: str = ""
    message: str = ""
    crashed: bool = False
    exitcode: int | None = None

    @property
    def raised(self) -> bool:
        return self.error_name != ""


def run(fn: Callable, *args, **kwargs) -> Outcome:
    """Call fn in this process (for calls that cannot reach compiled code) and capture its outcome."""
    try:
        return Outcome(value=fn(*args, **kwargs))
    except Exception as e:  # the outcome is inspected by the caller
        return Outcome(error_type=type(e), error_name=type(e).__name__, message=str(e))


def expect_clear_error(outcome: Outcome, *names: str) -> None:
    """The call must have raised ValueError/TypeError naming at least one of `names` (an argument)."""
    clear = (outcome.error_type is not None and issubclass(outcome.error_type, ValueError | TypeError)
             and any(name in outcome.message for name in names))
    if outcome.crashed:
        tally("crash")
        raise AssertionError(f"the process crashed (exit code {outcome.exitcode}); expected an error naming {names}")
    if not clear:
        tally("wrong")
        got = f"{outcome.error_name}: {outcome.message}" if outcome.raised else f"a result: {outcome.value!r:.200}"
        raise AssertionError(f"expected ValueError/TypeError naming one of {names}, got {got}")
    tally("clear_error")


def expect_answer(outcome: Outcome, check: Callable[[Any], bool] | None = None, what: str = "") -> Any:
    """The call must have returned, and `check(value)` must hold (the caller compares with a reference)."""
    if outcome.crashed:
        tally("crash")
        raise AssertionError(f"the process crashed (exit code {outcome.exitcode}) on {what}")
    if outcome.raised:
        tally("wrong")
        raise AssertionError(f"expected an answer for {what}, got {outcome.error_name}: {outcome.message}")
    if check is not None and not check(outcome.value):
        tally("wrong")
        raise AssertionError(f"wrong answer for {what}: {outcome.value!r:.300}")
    tally("checked_answer")
    return outcome.value


def expect_error_or_answer(outcome: Outcome, names: tuple[str, ...], check: Callable[[Any], bool], what: str = ""):
    """Either a clear error naming one of `names` or a right answer (inputs at the edge of what is allowed)."""
    if outcome.raised and not outcome.crashed:
        return expect_clear_error(outcome, *names)
    return expect_answer(outcome, check, what)


# --------------------------------------------------------------------------------------------------
# A child process that runs calls by name: a segfault there is a counted crash, not a dead test run.


def _resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _serve(conn) -> None:
    import faulthandler

    faulthandler.enable()  # a crash prints the C stack to the child's stderr
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        target, args, kwargs = message
        try:
            conn.send(("ok", _resolve(target)(*args, **kwargs)))
        except Exception as e:  # sent back to the parent, which judges it
            conn.send(("raised", type(e).__module__, type(e).__qualname__, str(e)))


class Guard:
    """One long-lived child process (spawned, so no inherited threads) that runs `call`s one at a time.

    A call that kills or hangs the child returns Outcome(crashed=True); the next call gets a fresh child.
    """

    def __init__(self, timeout: float = 300.0):
        self.timeout = timeout
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def call(self, target: str, *args, **kwargs) -> Outcome:
        """Run `module:function` (or `module:Class.method`) with the arguments in the child process."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send((target, args, kwargs))
            if not self._conn.poll(self.timeout):
                self._proc.kill()
                self._proc.join()
                self._proc = None
                return Outcome(crashed=True, exitcode=None, message=f"no answer within {self.timeout} s")
            reply = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self._proc.join(5)
            code = self._proc.exitcode
            self._proc = None
            return Outcome(crashed=True, exitcode=code)
        if reply[0] == "ok":
            return Outcome(value=reply[1])
        _, module, qualname, message = reply
        try:
            error_type = _resolve(f"{module}:{qualname}")
        except (ImportError, AttributeError):
            error_type = None
        return Outcome(error_type=error_type, error_name=qualname, message=message)

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
        self._proc = None
