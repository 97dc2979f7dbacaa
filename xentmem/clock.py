"""Time, injected.  Nothing outside this module calls ``time.*``.

Loops are written ``while not clock.wait(stop, interval): tick(clock.monotonic())`` so a test
hands in a :class:`FakeClock` and runs a loop for hours of simulated time in milliseconds.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if ``stop`` was set (the loop should end)."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        return stop.wait(timeout)


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
