"""The balloon loop's publisher: the guest's view, written to its own xenstore area.

The self-balloon actuator hands each decision (goal, target, committed memory, frontswap
pages, mode) to a publisher as relative paths under ``data/selfballoon/``; over a guest's
xenstore connection a relative path resolves under its own ``/local/domain/<domid>``, and
``data/`` is the one part of that home a guest may write (libxl keeps ``memory/``
read-only for it, ``reference/tmem.md`` §7.4).

:class:`XenstorePublisher` opens its session lazily, on the first write, and again after a
failure; every wait is bounded by a short timeout, and after a failed connection it does
not try again for a while (the writes fail at once meanwhile), so a xenstore that is gone
costs a tick nothing but a logged error.  The actuator catches what a write raises: a
failing publisher never fails a tick.

:func:`xenstore_publisher` decides whether there is a xenstore to publish to: a configured
socket (``--xenstore-socket``), or a Xen guest with the xenbus device.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from xentmem.clock import Clock, SystemClock
from xentmem.errors import XenStoreError
from xentmem.roots import Roots
from xentmem.xenbus.xs import XsSession, default_xenstore

log = logging.getLogger(__name__)

#: How long one xenstore request may take before the write fails (the tick goes on).
WRITE_TIMEOUT_S = 1.0
#: After a failed connection, writes fail at once for this long before the next try.
RETRY_AFTER_S = 60.0


class XenstorePublisher:
    """``write(path, value)`` to xenstore over one lazily opened, bounded session."""

    def __init__(self, where: dict[str, Path], *, clock: Clock | None = None,
                 timeout_s: float = WRITE_TIMEOUT_S, retry_after_s: float = RETRY_AFTER_S
                 ) -> None:
        self._where = where
        self._clock = clock or SystemClock()
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._lock = threading.Lock()  # a retired worker and a new one may both publish
        self._session: XsSession | None = None
        self._next_try = 0.0
        self.writes = 0

    @property
    def where(self) -> str:
        return str(next(iter(self._where.values())))

    def write(self, path: str, value: str) -> None:
        """Write one node; XenStoreError (or ValueError for a bad path) if it did not go."""
        with self._lock:
            session = self._open_locked()
            try:
                session.write(path.encode("ascii"), value.encode("ascii"))
            except (XenStoreError, ValueError):
                self._close_locked()
                raise
            self.writes += 1

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _open_locked(self) -> XsSession:
        if self._session is not None and self._session.alive:
            return self._session
        self._close_locked()
        now = self._clock.monotonic()
        if now < self._next_try:
            raise XenStoreError(f"xenstore at {self.where} unreachable; next try in "
                                f"{self._next_try - now:.0f}s")
        # Real time for the session's own waits: the injected clock may be a fake one.
        session = XsSession(timeout=self._timeout_s, **self._where)  # type: ignore[arg-type]
        try:
            session.open()
        except XenStoreError:
            self._next_try = now + self._retry_after_s
            raise
        self._session = session
        return session

    def _close_locked(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()


def xenstore_publisher(roots: Roots, clock: Clock | None = None) -> XenstorePublisher | None:
    """A publisher when this guest has a xenstore to publish to, else None."""
    if roots.xenstore_socket is None:
        from xentmem.xenbus.probe import running_on_xen  # the one Xen probe there is

        evidence = running_on_xen(roots)
        if evidence is None or not roots.xenbus_dev.exists():
            return None
    publisher = XenstorePublisher(default_xenstore(roots.xenstore_socket, roots.xenbus_dev),
                                  clock=clock)
    log.info("selfballoon: the guest's view goes to xenstore data/selfballoon/ (via %s)",
             publisher.where)
    return publisher
