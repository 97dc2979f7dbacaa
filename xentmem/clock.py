"""Time, injected.  Nothing outside this module calls ``time.*``.

Loops are written ``while not clock.wait(stop, interval): tick(clock.monotonic())`` so a test
hands in a :class:`FakeClock` and runs a loop for hours of simulated time in milliseconds.

The daemon's main loop waits on a file descriptor instead (a self-pipe its signal handlers
write to, see :mod:`xentmem.guestd.signals`): :meth:`SystemClock.wait_readable` and
:meth:`FakeClock.wait_readable` are that wait, real and simulated.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Protocol


def readable_within(fd: int, timeout: float) -> bool:
    """Whether ``fd`` is readable within ``timeout`` seconds (0: just look).

    ``poll``, not ``select``: a descriptor number above FD_SETSIZE must still work.  An
    interrupting signal does not end the wait early by itself (PEP 475 retries it); the
    daemon's handlers write to the descriptor waited on, which does.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if ``stop`` was set (the loop should end)."""
        ...


class WakeableClock(Clock, Protocol):
    """A clock that can also wait for a file descriptor (the daemon's main loop)."""

    def wait_readable(self, fd: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``fd`` to be readable; True if it is."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        return stop.wait(timeout)

    def wait_readable(self, fd: int, timeout: float) -> bool:
        return readable_within(fd, timeout)


class FakeClock:
    """A clock that jumps: ``wait`` advances time at once instead of sleeping."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        if stop.is_set():
            return True
        self.waits.append(timeout)
        self.now += timeout
        return stop.is_set()

    def wait_readable(self, fd: int, timeout: float) -> bool:
        """Readable now: True at once; else the whole timeout passes (simulated)."""
        if readable_within(fd, 0):
            return True
        self.waits.append(timeout)
        self.now += timeout
        return readable_within(fd, 0)
