"""PageFanout: one request's pages side by side, results in order, every error seen."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from xentmem.guestd.nbd.fanout import PageFanout

#: Every wait: an event, bounded generously (a busy CI machine).
WAIT_S = 60.0


@pytest.fixture
def fanout() -> Iterator[PageFanout]:
    f = PageFanout(workers=7)
    f.start()
    yield f
    f.stop(WAIT_S)


def test_results_come_back_in_order(fanout: PageFanout) -> None:
    assert fanout.map(lambda i: i * i, 32, 8) == [i * i for i in range(32)]
    assert fanout.map(lambda i: i, 0, 8) == []


def test_width_callers_run_at_once(fanout: PageFanout) -> None:
    """Four calls meet at a barrier of four: they only pass it if they run side by side."""
    barrier = threading.Barrier(4, timeout=WAIT_S)
    assert fanout.map(lambda i: barrier.wait() >= 0, 4, 4) == [True] * 4


def test_width_one_runs_on_the_caller_alone(fanout: PageFanout) -> None:
    threads = fanout.map(lambda i: threading.get_ident(), 16, 1)
    assert set(threads) == {threading.get_ident()}


def test_every_call_runs_and_the_first_error_is_raised(fanout: PageFanout) -> None:
    ran: list[int] = []
    lock = threading.Lock()

    def call(i: int) -> int:
        with lock:
            ran.append(i)
        if i in (5, 9):
            raise ValueError(f"page {i}")
        return i

    with pytest.raises(ValueError, match="page 5"):
        fanout.map(call, 16, 8)
    assert sorted(ran) == list(range(16))
    assert fanout.map(lambda i: i, 4, 4) == [0, 1, 2, 3]  # the threads serve on


def test_each_thread_runs_on_start_and_stop_ends_them() -> None:
    started: list[str] = []
    lock = threading.Lock()

    def on_start() -> None:
        with lock:
            started.append(threading.current_thread().name)

    f = PageFanout(workers=3, on_start=on_start)
    f.start()
    f.start()  # once only
    barrier = threading.Barrier(4, timeout=WAIT_S)
    f.map(lambda i: barrier.wait(), 4, 4)  # every thread took a call: each ran on_start first
    assert sorted(started) == ["nbd-page-0", "nbd-page-1", "nbd-page-2"]
    f.stop(WAIT_S)
    assert not [t for t in threading.enumerate() if t.name.startswith("nbd-page-")]
    assert f.map(lambda i: i, 3, 4) == [0, 1, 2]  # stopped: the caller does it all
