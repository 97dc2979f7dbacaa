"""Signals become flags the main loop reads: SIGTERM/SIGINT stop, SIGHUP reloads the config.

A handler takes no lock: it sets a plain attribute and writes one byte to a non-blocking
self-pipe, which is also the interpreter's wakeup fd, so the main loop's wait ends at once
whichever thread took the signal.  Other threads wake the main loop the same way
(:meth:`SignalFlags.wake`).  Why: ``docs/architecture.md``, "Inside xentmemd".
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
from types import FrameType

#: How many signal names :attr:`SignalFlags.received` keeps (a SIGHUP storm must not grow it).
RECEIVED_KEPT = 64


class SignalFlags:
    """What the signals (and other threads) asked for since the main loop last looked."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()  # not inherited by children (PEP 446)
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._terminate = False
        self._reload = False
        self._wakeup_installed = False
        #: The last signals received, by name (for logs and tests); appending takes no lock.
        self.received: collections.deque[str] = collections.deque(maxlen=RECEIVED_KEPT)

    # -- what the main loop reads -----------------------------------------------------------------

    def fileno(self) -> int:
        """The descriptor the main loop waits on: readable once something asked for it."""
        return self._read_fd

    @property
    def terminate_requested(self) -> bool:
        return self._terminate

    def take_reload(self) -> bool:
        """True once per reload request (several SIGHUPs before a look count as one)."""
        if self._reload:
            self._reload = False
            return True
        return False

    def drain(self) -> None:
        """Empty the pipe (before reading the flags, so a later request wakes the next wait)."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read_fd, 4096):
                pass

    # -- what asks --------------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the main loop's wait return; safe from a handler and from any thread."""
        # A full pipe (BlockingIOError) is already readable; a closed one has nobody to wake.
        with contextlib.suppress(OSError):
            os.write(self._write_fd, b"\0")

    def request_terminate(self) -> None:
        self._terminate = True
        self.wake()

    def request_reload(self) -> None:
        self._reload = True
        self.wake()

    # -- handlers ---------------------------------------------------------------------------------

    def _on_terminate(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        self.request_terminate()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        self.request_reload()

    def install(self) -> None:
        """Take SIGTERM, SIGINT and SIGHUP, and make the pipe the wakeup fd (main thread only)."""
        signal.signal(signal.SIGTERM, self._on_terminate)
        signal.signal(signal.SIGINT, self._on_terminate)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._wakeup_installed = True

    def ignore_from_now(self) -> None:
        """After the stop: ignore SIGTERM, SIGINT and SIGHUP until the process is gone.

        The interpreter's finalisation puts every signal that has a Python handler back to
        its default action, which for these three is to die: a signal arriving in that
        window would turn a clean stop (exit 0) into a death by signal.  It leaves ignored
        signals ignored, so the stop's status is the one the process exits with.
        """
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)

    def close(self) -> None:
        """Close the pipe (after the main loop ended and the handlers are no longer needed)."""
        # Forget the numbers first: a late handler must never write into a reused descriptor.
        if self._wakeup_installed:
            with contextlib.suppress(ValueError):  # not the main thread: leave it
                previous = signal.set_wakeup_fd(-1)
                if previous not in (-1, self._write_fd):  # someone else's since: theirs
                    signal.set_wakeup_fd(previous)
            self._wakeup_installed = False
        fds = (self._read_fd, self._write_fd)
        self._read_fd = self._write_fd = -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
