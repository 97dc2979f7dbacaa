"""The pages of one NBD request, handed to frontswap side by side.

The kernel writes swap out in requests of up to 32 pages; served one page after another,
each page of a request is a round trip to the backend.  The ``xen`` backend carries every
op its callers have queued in one message to the tmem host (``docs/protocol.md``), so pages
handed over together travel together: a 128 KiB write becomes one or two messages instead of
32.  The threads are made once, before they are needed (they serve swap: see
``resident.py``), and the caller works too, so a request never waits for a free thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: Threads besides the caller: enough for the ``xen`` backend's largest batch (``batch_max``
#: is at most 32 ops a message) with a 32-page request.
WORKERS = 15


class _Request(Generic[T]):
    """One request's pages: whoever is free takes the next index."""

    def __init__(self, fn: Callable[[int], T], count: int) -> None:
        self.fn = fn
        self.count = count
        self.results: list[T | None] = [None] * count
        self.errors: dict[int, BaseException] = {}
        self._next = 0
        self._done = 0
        self._lock = threading.Lock()
        self.finished = threading.Event()

    def work(self) -> None:
        while True:
            with self._lock:
                i = self._next
                if i >= self.count:
                    return
                self._next = i + 1
            try:
                self.results[i] = self.fn(i)
            except BaseException as exc:  # handed to the caller, which re-raises the first
                self.errors[i] = exc
            with self._lock:
                self._done += 1
                if self._done == self.count:
                    self.finished.set()


class PageFanout:
    """A fixed set of threads that run one request's page operations beside its caller."""

    def __init__(self, workers: int = WORKERS,
                 on_start: Callable[[], object] | None = None) -> None:
        """``on_start`` runs first on each thread (the serving threads' I/O-flusher flag)."""
        self.workers = workers
        self._on_start = on_start
        self._jobs: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 60.0) -> None:
        """Make the threads (once; later calls do nothing), each ready (``on_start`` run)
        before this returns."""
        with self._lock:
            if self._threads:
                return
            ready = threading.Semaphore(0)
            for n in range(self.workers):
                thread = threading.Thread(target=self._run, args=(ready,),
                                          name=f"nbd-page-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
            for _ in self._threads:
                ready.acquire(timeout=timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join(timeout_s)

    def map(self, fn: Callable[[int], T], count: int, width: int) -> list[T]:
        """``fn(0) .. fn(count - 1)``, up to ``width`` at a time; the results in order.  If
        any raised, every call still ran and the first (by index) is raised."""
        if count <= 0:
            return []
        request: _Request[T] = _Request(fn, count)
        for _ in range(min(width, count, len(self._threads) + 1) - 1):
            self._jobs.put(request)
        request.work()
        request.finished.wait()
        if request.errors:
            raise request.errors[min(request.errors)]
        return request.results  # type: ignore[return-value]

    def _run(self, ready: threading.Semaphore) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
        finally:
            ready.release()
        while True:
            request = self._jobs.get()
            if request is None:
                return
            request.work()
