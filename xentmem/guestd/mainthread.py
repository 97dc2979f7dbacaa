"""Work that other threads hand to the daemon's main thread, each with a bounded wait.

A control-socket thread hands a call (``config.reload``) over with
:meth:`MainThreadCalls.call` and waits; the main loop runs what is queued with
:meth:`MainThreadCalls.run_ready`.  An action that cannot run yet raises :class:`NotNow` and
stays queued; a caller whose wait ended first gets :class:`CallNotRun` and the call is
dropped.  Why: ``docs/architecture.md``, "Inside xentmemd".
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable

from xentmem.errors import XentmemError

QUEUED, RUNNING, FINISHED, CANCELLED = "queued", "running", "finished", "cancelled"


class NotNow(Exception):
    """Raised by an action that cannot run yet (a lock is busy); it is tried again later."""


class DaemonBusy(XentmemError):
    """The daemon cannot do this now (``busy`` on the control socket); try again later."""


class CallNotRun(DaemonBusy):
    """The main thread did not get to the call in time; it was dropped and did not run."""


class CallStillRunning(DaemonBusy):
    """The call started but did not finish in time; it goes on, and its result is logged."""


class _Call:
    def __init__(self, action: Callable[[], Any]) -> None:
        self.action = action
        self.state = QUEUED
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class MainThreadCalls:
    """A queue of calls for the main thread; ``wake`` makes the main loop look at it."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._calls: collections.deque[_Call] = collections.deque()

    def pending(self) -> bool:
        with self._lock:
            return bool(self._calls)

    def call(self, action: Callable[[], Any], timeout_s: float, *, what: str = "call") -> Any:
        """Run ``action`` on the main thread; its result, or its exception, here.

        Waits up to ``timeout_s`` for it to start and as long again for it to finish.
        """
        entry = _Call(action)
        with self._lock:
            self._calls.append(entry)
        self._wake()
        if not entry.done.wait(timeout_s):
            with self._lock:
                if entry.state == QUEUED:
                    self._calls.remove(entry)
                    entry.state = CANCELLED
                    raise CallNotRun(f"{what}: the daemon's main thread could not run it within "
                                     f"{timeout_s:g}s (a load, unload or other change holds "
                                     "the configuration); it was not run, try again")
            if not entry.done.wait(timeout_s):
                raise CallStillRunning(f"{what}: still running after {2 * timeout_s:g}s; its "
                                       "outcome goes to the daemon's log")
        if entry.error is not None:
            raise entry.error
        return entry.result

    def run_ready(self) -> None:
        """Main thread: run the queued calls in order, until one says :class:`NotNow`."""
        while True:
            with self._lock:
                if not self._calls:
                    return
                entry = self._calls[0]
                entry.state = RUNNING
            try:
                entry.result = entry.action()
            except NotNow:
                with self._lock:
                    entry.state = QUEUED
                return
            except Exception as exc:  # handed back to the caller, which reports it
                entry.error = exc
            with self._lock:
                self._calls.popleft()
                entry.state = FINISHED
            entry.done.set()
