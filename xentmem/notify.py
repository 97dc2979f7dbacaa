"""sd_notify: tell systemd we are ready, what we are doing, that we are alive, that we stop.

The protocol is one datagram of ``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace).  Without that variable every call is a
no-op, so the daemon runs the same under systemd, in a terminal and in tests.  The watchdog
interval comes from ``$WATCHDOG_USEC`` (honoured only if ``$WATCHDOG_PID`` is unset or ours);
the main loop pings at half of it, as sd_watchdog_enabled(3) recommends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _is_decimal(untrusted: str) -> bool:
    """systemd's numbers in the environment: ASCII digits only (``isdigit`` takes others)."""
    return untrusted.isascii() and untrusted.isdigit()


class Notifier:
    """Sends sd_notify datagrams; failures are logged once and never stop the daemon."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False
        #: The main loop pings from its thread, the STATUS line comes from another.  A send
        #: waits at most the socket's 1 s timeout, so this lock is never held for long.
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = None
        untrusted_usec = env.get("WATCHDOG_USEC", "")
        untrusted_pid = env.get("WATCHDOG_PID", "")
        ours = not untrusted_pid or (_is_decimal(untrusted_pid) and int(untrusted_pid) == pid)
        if _is_decimal(untrusted_usec) and int(untrusted_usec) > 0 and ours:
            watchdog = int(untrusted_usec)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the watchdog timeout, or None if there is none."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000

    def _target(self) -> str | bytes:
        assert self._address is not None
        if self._address.startswith("@"):
            return b"\0" + self._address[1:].encode("utf-8")
        return self._address

    def send(self, *lines: str) -> bool:
        """Send one datagram; True if it went (False when disabled or on failure)."""
        if self._address is None:
            return False
        payload = "\n".join(lines).encode("utf-8")
        with self._lock:
            if self._closed:  # a STATUS line from a task still running at exit
                return False
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(1.0)
                self._sock.sendto(payload, self._target())
                return True
            except OSError as exc:
                if not self._warned:
                    log.warning("sd_notify to %s failed: %s", self._address, exc)
                    self._warned = True
                return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", "STATUS=reloading the configuration")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None
