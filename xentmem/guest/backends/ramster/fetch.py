"""Concurrent gets of remote pages coalesced into one pipeline per master
(``docs/ramster.md``, "Fetch").

A get of a remote page costs a round trip to the cluster, and the tier serves one call at a
time; several callers at once (the kernel's NBD connections each run one) would each wait for
their own.  As the xen backend's sender does, the caller that finds nobody fetching becomes
the *leader*: it takes every get queued so far and fetches them in one call (one pipeline per
master; a lone get is one command, as before) and hands each caller its answer, while the
others wait on their own event.  The leader then hands the queue to the oldest waiting
caller, so a finished caller never waits behind the next batch.

Nothing about a page changes: each caller gets exactly what :meth:`RemoteTier.get` would
have answered it (the page, None, or the error), checked records only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

from xentmem.errors import BackendError

from .record import RecordError, RemoteKey
from .tier import GetResult, RamsterUnavailable

#: Most gets in one call: a batch of compressed pages (at most a page each) stays under 1 MiB.
BATCH_GETS = 256
#: Most CPU yields a leader spends letting callers just answered queue their next get.
GATHER_YIELDS = 8


log = logging.getLogger(__name__)


def _as_is(data: bytes) -> bytes:
    return data


class Tier(Protocol):
    def get(self, key: RemoteKey, *, exclusive: bool) -> bytes | None: ...

    def get_each(self, requests: list[tuple[RemoteKey, bool]]) -> GetResult: ...


class _Request:
    """One caller's get: its answer (page or None) or error, once ``finished``."""

    __slots__ = ("error", "exclusive", "finished", "key", "lead", "page", "wake")

    def __init__(self, key: RemoteKey, exclusive: bool) -> None:
        self.key = key
        self.exclusive = exclusive
        #: Made only for a caller that waits (a leader's own get needs none): a lock taken
        #: at once and released to wake it, once (lighter than an Event).
        self.wake: Any = None
        self.finished = False
        self.page: bytes | None = None
        self.error: BackendError | None = None
        #: Handed the queue by the previous leader: this caller fetches next.
        self.lead = False

    def answer(self) -> bytes | None:
        if self.error is not None:
            raise self.error
        return self.page


class Fetcher:
    """Gets of remote pages, coalesced across concurrent callers."""

    def __init__(self, tier: Tier, *, wait_s: Callable[[], float],
                 ready: Callable[[bytes], bytes] | None = None,
                 batch: int = BATCH_GETS) -> None:
        self._tier = tier
        #: What a caller gets of a fetched record's data (zcache: the page decompressed).
        #: The leader applies it to the whole batch while the others wait, so a woken caller
        #: only returns: one hand-over of the interpreter per get, not one per step.
        self._ready = ready or _as_is
        #: How long a caller waits for its turn before it gives up with -EIO: a safety net
        #: only (every fetch is bounded by the tier's socket timeouts).
        self.wait_s = wait_s
        self._batch = batch
        self._lock = threading.Lock()
        self._queue: list[_Request] = []
        #: A leader is fetching (or the queue was handed to a waiting caller).
        self._busy = False
        self.calls = 0
        self.gets = 0
        #: Gets in the last call: more than one means other callers are about.
        self._last_batch = 1

    def get(self, key: RemoteKey, *, exclusive: bool) -> bytes | None:
        """As :meth:`RemoteTier.get`, then ``ready``: the page, None when the cluster has
        none, or the tier's error (RecordError for a value that is not this page's)."""
        request = _Request(key, exclusive)
        with self._lock:
            self._queue.append(request)
            leading = not self._busy
            if not leading:
                request.wake = threading.Lock()
                request.wake.acquire()
            self._busy = True
        if not leading and not self._wait_turn(request):
            return request.answer()
        try:
            self._fetch_next()
        finally:
            self._hand_over()
        return request.answer()

    def _wait_turn(self, request: _Request) -> bool:
        """Wait until answered (False) or handed the queue (True); RamsterUnavailable when
        the turn did not come within the wait (a safety net: every fetch is bounded by the
        tier's socket timeouts)."""
        wait_s = self.wait_s()
        request.wake.acquire(timeout=wait_s)
        with self._lock:
            if request.finished:
                return False
            if request.lead:
                return True
            if request in self._queue:  # never taken: nothing happened to the page
                self._queue.remove(request)
                raise RamsterUnavailable(f"ramster: get of {request.key.name()} waited "
                                         f"{wait_s:g} s behind other gets")
        # taken by a leader whose call is bounded by the tier's timeouts: wait for it
        if request.wake.acquire(timeout=wait_s):
            with self._lock:
                if request.finished:
                    return False
        raise RamsterUnavailable(f"ramster: get of {request.key.name()} was not answered "
                                 f"within {2 * wait_s:g} s")

    def _take(self) -> list[_Request]:
        """The oldest queued gets, distinct pages only (a second get of the same page waits
        for the next call: an exclusive get must not be answered twice)."""
        with self._lock:
            batch: list[_Request] = []
            keys: set[RemoteKey] = set()
            rest: list[_Request] = []
            for request in self._queue:
                if len(batch) < self._batch and request.key not in keys:
                    keys.add(request.key)
                    batch.append(request)
                else:
                    rest.append(request)
            self._queue = rest
            return batch

    def _gather(self) -> None:
        """Yield the CPU while the queue still grows: callers just answered queue their next
        get before the batch is taken.  Only when the last call carried several gets: a
        single caller would only give its CPU away (a yield on a busy machine costs more than
        a get's own Python)."""
        if self._last_batch <= 1:
            return
        queued = len(self._queue)
        for _ in range(GATHER_YIELDS):
            os.sched_yield()
            now = len(self._queue)
            if now == queued or now >= self._batch:
                return
            queued = now

    def _fetch_next(self) -> None:
        """One call to the tier for the queued gets; each request answered."""
        self._gather()
        batch = self._take()
        if not batch:
            return
        self.calls += 1
        self.gets += len(batch)
        self._last_batch = len(batch)
        try:
            if len(batch) == 1:
                only = batch[0]
                only.page = self._tier.get(only.key, exclusive=only.exclusive)
            else:
                found = self._tier.get_each([(r.key, r.exclusive) for r in batch])
                for request in batch:
                    request.error = found.refused.get(request.key) or \
                        found.denied.get(request.key)
                    request.page = found.pages.get(request.key)
            for request in batch:
                if request.page is not None:
                    self._make_ready(request)
        except BackendError as exc:
            failed = [request for request in batch if request.error is None]
            for request in failed:
                request.error = exc
            if isinstance(exc, RamsterUnavailable):  # gets queued meanwhile: same outage
                with self._lock:
                    failed, self._queue = self._queue, []
                for request in failed:
                    request.error = exc
                batch.extend(failed)
        with self._lock:
            for request in batch:
                request.finished = True
                # A caller handed the queue after its first wait timed out leads with its
                # wake already released (and nobody waits on it): release only a held one.
                if request.wake is not None and request.wake.locked():
                    request.wake.release()

    def _make_ready(self, request: _Request) -> None:
        """The caller's form of its page; one that cannot be made is refused, never served."""
        assert request.page is not None
        try:
            request.page = self._ready(request.page)
        except Exception as exc:  # lz4's errors and any other: the page is not served
            request.page = None
            request.error = RecordError(f"{request.key.name()}: the page does not unpack: "
                                        f"{exc}")
            log.error("%s (not served)", request.error)

    def _hand_over(self) -> None:
        """The leader is done: the oldest waiting caller fetches next, or nobody is busy."""
        with self._lock:
            if self._queue:
                first = self._queue[0]
                first.lead = True
                if first.wake is not None:
                    first.wake.release()
            else:
                self._busy = False


__all__ = ["BATCH_GETS", "Fetcher"]
