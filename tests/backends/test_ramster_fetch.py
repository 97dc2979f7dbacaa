"""RAMster's fetcher (fetch.py): concurrent gets coalesced into one call to the tier, each
caller answered exactly as a get of its own would be.

The stand-in tier holds its first call until the test has queued the other callers, so
which gets share a call is decided by events, never by timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from xentmem.errors import BackendError
from xentmem.guest.backends.ramster.fetch import Fetcher
from xentmem.guest.backends.ramster.record import RecordError, RemoteKey
from xentmem.guest.backends.ramster.tier import GetResult, RamsterUnavailable
from xentmem.tmem.abi import Oid

#: Generous: a deadline for events on a busy machine, never a measured time.
DEADLINE_S = 60.0


def key(index: int) -> RemoteKey:
    return RemoteKey("node", 1, Oid(1), index)


class HeldTier:
    """Pages by key; the first call waits for ``release`` (so others queue meanwhile)."""

    def __init__(self) -> None:
        self.pages: dict[RemoteKey, bytes] = {key(i): bytes([i]) * 8 for i in range(16)}
        self.calls: list[list[tuple[RemoteKey, bool]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: BackendError | None = None
        self.damaged: set[RemoteKey] = set()

    def _enter(self, requests: list[tuple[RemoteKey, bool]]) -> None:
        self.calls.append(requests)
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(DEADLINE_S)
        if self.fail is not None:
            raise self.fail

    def _one(self, k: RemoteKey, exclusive: bool) -> bytes | None:
        if k in self.damaged:
            raise RecordError(f"{k.name()}: checksum mismatch")
        return self.pages.pop(k, None) if exclusive else self.pages.get(k)

    def get(self, k: RemoteKey, *, exclusive: bool) -> bytes | None:
        self._enter([(k, exclusive)])
        return self._one(k, exclusive)

    def get_each(self, requests: list[tuple[RemoteKey, bool]]) -> GetResult:
        self._enter(requests)
        assert len({k for k, _e in requests}) == len(requests), "a page twice in one call"
        result = GetResult()
        for k, exclusive in requests:
            try:
                found = self._one(k, exclusive)
            except RecordError as exc:
                result.refused[k] = exc
                continue
            if found is None:
                result.missing.append(k)
            else:
                result.pages[k] = found
        return result


def fetcher_for(tier: HeldTier) -> Fetcher:
    return Fetcher(tier, wait_s=lambda: DEADLINE_S)  # type: ignore[arg-type]


def call(fetcher: Fetcher, k: RemoteKey, exclusive: bool, out: dict[RemoteKey, Any]) -> None:
    try:
        out[k] = fetcher.get(k, exclusive=exclusive)
    except BackendError as exc:
        out[k] = exc


def until(condition: Callable[[], bool]) -> None:
    """Wait for another thread to reach a state it has no event for (its own queue entry)."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "the other callers never queued"
        threading.Event().wait(0.001)


def start_leader_then(fetcher: Fetcher, tier: HeldTier, first: tuple[RemoteKey, bool],
                      others: list[tuple[RemoteKey, bool]]) -> dict[RemoteKey, Any]:
    """``first`` becomes the leader and is held in the tier while ``others`` queue behind
    it; then everything is let go and every answer collected."""
    out: dict[RemoteKey, Any] = {}
    threads = [threading.Thread(target=call, args=(fetcher, *first, out))]
    threads[0].start()
    assert tier.entered.wait(DEADLINE_S)
    for k, exclusive in others:
        threads.append(threading.Thread(target=call, args=(fetcher, k, exclusive, out)))
        threads[-1].start()
    until(lambda: len(fetcher._queue) == len(others))
    tier.release.set()
    for thread in threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
    return out


def test_a_lone_get_is_one_get_of_the_tier() -> None:
    tier = HeldTier()
    tier.release.set()
    fetcher = fetcher_for(tier)
    assert fetcher.get(key(1), exclusive=False) == tier.pages[key(1)]
    assert fetcher.get(key(99), exclusive=False) is None
    assert tier.calls == [[(key(1), False)], [(key(99), False)]]
    assert not fetcher._busy and not fetcher._queue


def test_gets_queued_behind_a_fetch_share_the_next_call() -> None:
    tier = HeldTier()
    fetcher = fetcher_for(tier)
    expected = dict(tier.pages)
    others = [(key(i), i % 2 == 0) for i in range(2, 9)]
    out = start_leader_then(fetcher, tier, (key(1), False), others)
    assert tier.calls[0] == [(key(1), False)]
    assert set(tier.calls[1]) == set(others)  # all seven in one call, each as asked
    assert len(tier.calls) == 2
    assert out == {k: expected[k] for k in [key(1), *(k for k, _e in others)]}
    assert key(2) not in tier.pages and key(3) in tier.pages  # exclusive gets took theirs
    assert not fetcher._busy and not fetcher._queue


def test_the_same_page_twice_is_two_calls_so_an_exclusive_get_is_answered_once() -> None:
    tier = HeldTier()
    fetcher = fetcher_for(tier)
    page = tier.pages[key(2)]
    others = [(key(2), True), (key(3), False)]
    out: dict[RemoteKey, Any] = {}
    first = threading.Thread(target=call, args=(fetcher, key(1), False, out))
    first.start()
    assert tier.entered.wait(DEADLINE_S)
    seconds: list[Any] = []
    threads = [threading.Thread(target=call, args=(fetcher, k, e, out)) for k, e in others]
    threads.append(threading.Thread(
        target=lambda: seconds.append(fetcher.get(key(2), exclusive=True))))
    for thread in threads:
        thread.start()
    until(lambda: len(fetcher._queue) == 3)
    tier.release.set()
    for thread in [first, *threads]:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
    assert len(tier.calls) == 3  # the second get of page 2 waited for a call of its own
    assert sorted([out[key(2)], seconds[0]], key=lambda v: v is None) == [page, None]


def test_an_outage_fails_the_call_and_the_gets_queued_meanwhile_then_gets_resume() -> None:
    tier = HeldTier()
    fetcher = fetcher_for(tier)
    tier.fail = RamsterUnavailable("ramster: get of 1 page failed: connection refused")
    out = start_leader_then(fetcher, tier, (key(1), False), [(key(2), False), (key(3), True)])
    assert set(out) == {key(1), key(2), key(3)}
    assert all(isinstance(v, RamsterUnavailable) for v in out.values())
    assert len(tier.calls) == 1  # the queued gets did not wait for a second timeout
    assert key(3) in tier.pages  # nothing happened to them
    tier.fail = None
    assert fetcher.get(key(3), exclusive=True) == bytes([3]) * 8
    assert not fetcher._busy and not fetcher._queue


def test_a_damaged_value_fails_only_its_own_get() -> None:
    tier = HeldTier()
    fetcher = fetcher_for(tier)
    tier.damaged.add(key(3))
    out = start_leader_then(fetcher, tier, (key(1), False),
                            [(key(2), False), (key(3), False), (key(4), False)])
    assert isinstance(out[key(3)], RecordError)
    assert out[key(2)] == bytes([2]) * 8 and out[key(4)] == bytes([4]) * 8


def test_a_get_that_never_gets_its_turn_fails_and_leaves_the_queue() -> None:
    tier = HeldTier()
    fetcher = Fetcher(tier, wait_s=lambda: 0.0)  # type: ignore[arg-type]
    out: dict[RemoteKey, Any] = {}
    leader = threading.Thread(target=call, args=(fetcher, key(1), False, out))
    leader.start()
    assert tier.entered.wait(DEADLINE_S)
    with pytest.raises(RamsterUnavailable, match="behind other gets"):
        fetcher.get(key(2), exclusive=True)
    assert not fetcher._queue
    tier.release.set()
    leader.join(DEADLINE_S)
    assert out[key(1)] == bytes([1]) * 8 and key(2) in tier.pages
    assert not fetcher._busy


def test_the_leader_hands_each_caller_its_page_ready_and_a_page_that_fails_is_refused() -> None:
    """``ready`` (zcache: lz4) runs in the leader for the whole batch; a page it cannot make
    fails only its own get, as a refused record, and is never served."""
    tier = HeldTier()
    tier.pages[key(3)] = b"not lz4"

    def ready(data: bytes) -> bytes:
        if data == b"not lz4":
            raise ValueError("corrupt input")
        return data.upper() + b"!"

    fetcher = Fetcher(tier, wait_s=lambda: DEADLINE_S, ready=ready)  # type: ignore[arg-type]
    out = start_leader_then(fetcher, tier, (key(1), False), [(key(2), False), (key(3), False)])
    assert out[key(1)] == bytes([1]) * 8 + b"!" and out[key(2)] == bytes([2]) * 8 + b"!"
    assert isinstance(out[key(3)], RecordError) and "does not unpack" in str(out[key(3)])
    assert fetcher.get(key(99), exclusive=False) is None  # a miss is not made ready


class _GatedLock:
    """The fetcher's lock, where thread B's second entry (after its first wait timed out)
    waits until ``opened``: the order a slow cluster makes, without sleeping."""

    def __init__(self, opened: threading.Event) -> None:
        self._lock = threading.Lock()
        self._opened = opened
        self.b_entries = 0

    def __enter__(self) -> None:
        if threading.current_thread().name == "B":
            self.b_entries += 1
            if self.b_entries == 2:
                assert self._opened.wait(DEADLINE_S)
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_caller_handed_the_queue_after_its_wait_timed_out_answers_its_whole_batch() -> None:
    """B's first wait times out just as the leader hands it the queue: B leads with its
    wake already released, and must still answer itself and C (its own release once
    raised RuntimeError, and C waited out its deadline)."""
    tier = HeldTier()
    handed = threading.Event()

    class Handing(Fetcher):
        def _hand_over(self) -> None:
            super()._hand_over()
            if threading.current_thread().name == "A":
                handed.set()

    fetcher = Handing(tier, wait_s=lambda: 0.0 if threading.current_thread().name == "B"
                      else DEADLINE_S)  # type: ignore[arg-type]
    lock = fetcher._lock = _GatedLock(handed)  # type: ignore[assignment]
    out: dict[RemoteKey, Any] = {}
    threads = [threading.Thread(target=call, args=(fetcher, key(n), False, out), name=name)
               for n, name in ((1, "A"), (2, "B"), (3, "C"))]
    threads[0].start()
    assert tier.entered.wait(DEADLINE_S)
    threads[1].start()
    until(lambda: lock.b_entries == 2)  # B's first wait timed out: it waits at the lock
    threads[2].start()
    until(lambda: len(fetcher._queue) == 2)
    tier.release.set()
    for thread in threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
    assert out == {key(n): bytes([n]) * 8 for n in (1, 2, 3)}
    assert [len(c) for c in tier.calls] == [1, 2]
