"""Signals become flags the main loop reads: SIGTERM/SIGINT stop, SIGHUP reloads the config.

The Python handler does one thing: it adds the signal's number to a set.  The interpreter's
own C handler writes a byte to a non-blocking self-pipe (the wakeup fd), so the main loop's
wait ends at once whichever thread took the signal, and the main loop turns the set into
flags when it drains the pipe.  The handler is that small because the interpreter runs a
handler between two bytecodes of whatever the main thread was doing, *including another
handler*: under a storm of signals a handler that does real work nests in itself until the
interpreter's recursion limit kills the daemon.  It takes no lock for the same reason.
Other threads wake the main loop through the same pipe (:meth:`SignalFlags.wake`).
Why: ``docs/architecture.md``, "Inside xentmemd".
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import weakref
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
        #: Signal numbers the handler saw since the last drain (at most three members).
        self._pending: set[int] = set()
        self._wakeup_installed = False
        #: The last signals received, by name (for logs and tests); appending takes no lock.
        self.received: collections.deque[str] = collections.deque(maxlen=RECEIVED_KEPT)
        # Flags dropped without close() (an application built and never run) give their pipe
        # back; flags that were installed keep it, since the interpreter may still write to it.
        self._pipe = [self._read_fd, self._write_fd]
        weakref.finalize(self, _close_unless_installed, self._pipe)

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
        """Empty the pipe, then turn the signals seen into flags.

        The pipe first: a signal that arrives after the set is taken writes a new byte, so
        it wakes the next wait.  The set is swapped, never cleared, so a handler running in
        between adds to one set or the other and nothing is lost.
        """
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read_fd, 4096):
                pass
        seen, self._pending = self._pending, set()
        for signum in sorted(seen):
            self.received.append(signal.Signals(signum).name)
            if signum == signal.SIGHUP:
                self._reload = True
            else:
                self._terminate = True

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

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """The whole handler; the interpreter's wakeup fd has already woken the main loop."""
        self._pending.add(signum)

    def install(self) -> None:
        """Take SIGTERM, SIGINT and SIGHUP, and make the pipe the wakeup fd (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._wakeup_installed = True
        self._pipe.clear()  # from now on only close() may close it

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
        self._pipe.clear()
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _close_unless_installed(pipe: list[int]) -> None:
    """The finaliser of :class:`SignalFlags`: close a pipe that was never a wakeup fd."""
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)
    pipe.clear()
