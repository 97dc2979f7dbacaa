"""The balloon loop's publisher: the guest's view, written to its own xenstore area.

Relative paths under ``data/selfballoon/`` resolve under the guest's home, the part of it a
guest may write.  The session opens lazily, every wait is bounded, and a xenstore that could
not be reached or did not answer is not asked again for a while, so a xenstore that is gone
costs a tick only a logged error (docs/selfballoon.md).  A late answer is not an error of the
session, which drops it: the session stays open.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from xentmem.clock import Clock, SystemClock
from xentmem.errors import XenStoreError
from xentmem.roots import Roots
from xentmem.xenbus.xs import XsSession, XsTimeout, default_xenstore

log = logging.getLogger(__name__)

#: How long one xenstore request may take before the write fails (the tick goes on).  dom0's
#: xenstored answers in milliseconds when idle and in seconds when dom0 is loaded; only a
#: hung one should cost a tick this wait, and then once per :data:`RETRY_AFTER_S`.
WRITE_TIMEOUT_S = 10.0
#: After a failed connection or an unanswered write, writes fail at once for this long.
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
            except XsTimeout:
                # Slow or hung: keep the session (it drops the late answer), ask again later.
                self._next_try = self._clock.monotonic() + self._retry_after_s
                raise
            except (XenStoreError, ValueError):
                self._close_locked()
                raise
            self.writes += 1

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _open_locked(self) -> XsSession:
        now = self._clock.monotonic()
        if now < self._next_try:
            why = "did not answer" if self._session is not None else "unreachable"
            raise XenStoreError(f"xenstore at {self.where} {why}; next try in "
                                f"{self._next_try - now:.0f}s")
        if self._session is not None and self._session.alive:
            return self._session
        self._close_locked()
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
