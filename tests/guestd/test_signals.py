"""Signal handlers take no lock and wake the main loop through a self-pipe.

A handler runs in the main thread between two bytecodes of whatever it was doing; if it took
a lock the main thread held at that moment (``threading.Event.set`` and the Event's own
Condition lock, held inside ``Event.wait``), the daemon would hang until systemd killed it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from xentmem.clock import FakeClock, SystemClock
from xentmem.guestd.signals import RECEIVED_KEPT, SignalFlags

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


@pytest.fixture
def flags() -> Iterator[SignalFlags]:
    """Installed flags; the test process's own handlers come back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in HANDLED}
    made = SignalFlags()
    made.install()
    try:
        yield made
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        made.close()


def test_the_handlers_take_no_lock(flags: SignalFlags) -> None:
    taken: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), LOCK_TYPES):
            taken.append(f"{type(arg.__self__).__name__}.{arg.__name__}")

    on_hup = signal.getsignal(signal.SIGHUP)
    on_term = signal.getsignal(signal.SIGTERM)
    assert callable(on_hup) and callable(on_term)
    sys.setprofile(profile)
    try:
        on_hup(signal.SIGHUP, None)
        on_term(signal.SIGTERM, None)
    finally:
        sys.setprofile(None)
    assert taken == [], f"a signal handler took a lock: {taken}"
    assert not flags.terminate_requested  # the main loop's drain turns them into flags
    flags.drain()
    assert flags.take_reload() and not flags.take_reload()
    assert flags.terminate_requested
    assert list(flags.received) == ["SIGHUP", "SIGTERM"]


def test_a_real_signal_ends_the_main_loop_wait(flags: SignalFlags) -> None:
    clock = SystemClock()
    assert not clock.wait_readable(flags.fileno(), 0)
    os.kill(os.getpid(), signal.SIGHUP)
    assert clock.wait_readable(flags.fileno(), 10.0)  # returns at once: the handler wrote
    flags.drain()
    assert flags.take_reload()
    assert not clock.wait_readable(flags.fileno(), 0)  # drained


def test_a_signal_taken_by_another_thread_still_ends_the_wait_at_once(
        flags: SignalFlags) -> None:
    """A process-directed signal may land on any thread (a socket client, the balloon
    worker); the main thread's wait must still end then, not at its timeout."""
    parked = threading.Event()
    other = threading.Thread(target=parked.wait, args=(10.0,))
    other.start()
    try:
        assert other.ident is not None
        signal.pthread_kill(other.ident, signal.SIGTERM)
        # True means the fd woke the wait (its timeout gives False): no timing asserted.
        assert SystemClock().wait_readable(flags.fileno(), 10.0), "the wait ran to its timeout"
        flags.drain()
        assert flags.terminate_requested
    finally:
        parked.set()
        other.join(10.0)


def test_another_thread_wakes_the_wait_and_a_storm_stays_bounded() -> None:
    flags = SignalFlags()
    try:
        waker = threading.Thread(target=flags.request_reload)
        waker.start()
        assert SystemClock().wait_readable(flags.fileno(), 10.0)
        waker.join(10.0)
        for n in range(100_000):  # far more than the pipe holds: never blocks, never grows
            flags._on_signal((signal.SIGHUP, signal.SIGINT)[n % 2], None)
            flags.wake()
            if n % 1000 == 0:
                flags.drain()
        assert len(flags.received) == RECEIVED_KEPT
        flags.drain()
        assert flags.take_reload() and not flags.take_reload()
        assert flags.terminate_requested
    finally:
        flags.close()
    flags.wake()  # after close: nothing to wake, and no error


def test_the_fake_clock_passes_time_only_when_nothing_is_readable() -> None:
    flags = SignalFlags()
    clock = FakeClock(10.0)
    try:
        assert not clock.wait_readable(flags.fileno(), 5.0)
        assert clock.now == 15.0
        flags.request_terminate()
        assert clock.wait_readable(flags.fileno(), 5.0)
        assert clock.now == 15.0 and clock.waits == [5.0]
    finally:
        flags.close()


def test_a_sighup_storm_does_not_hang_the_daemon(fake_root: Path, start_daemon: Any) -> None:
    daemon = start_daemon(fake_root)
    for _ in range(3000):
        daemon.send(signal.SIGHUP)
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()


def test_flags_dropped_unused_give_their_pipe_back() -> None:
    """An application built and never run (most tests build many) must not leak two fds."""
    import gc

    gc.collect()  # earlier tests' garbage may hold fds: let it go first, not during the loop
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        SignalFlags()
    gc.collect()
    # Not ==: an earlier test's leftover thread may close an fd meanwhile; a leak is 40 more.
    assert len(os.listdir("/proc/self/fd")) <= before
