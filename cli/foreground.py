"""Run ``xentmemd`` as a child in the foreground, the way systemd would, and report on it.

``xentmem run`` is a small service manager for one process: it gives the daemon a
``NOTIFY_SOCKET`` of its own, so it learns of ``READY=1`` (the backend is loaded and the
control socket answers) and of every ``STATUS=`` line exactly as systemd would, without
guessing from log text or polling the socket.

The child gets its own session, so the terminal's Ctrl-C reaches only this process, which
turns it into one SIGTERM: the daemon then stops in order (loops, backend unload with
repatriation, sockets).  A second Ctrl-C kills it outright, after a warning that says what
that loses.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Largest notify datagram we read; systemd itself accepts up to PIPE_BUF-ish messages.
MAX_NOTIFY_BYTES = 4096
#: How often the wait loop looks at the child when no message arrives.
POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram, parsed: ``{"READY": "1", "STATUS": "..."}``."""

    fields: Mapping[str, str]

    @classmethod
    def parse(cls, untrusted_datagram: bytes) -> Notification:
        """``KEY=VALUE`` lines; lines without ``=`` and undecodable bytes are dropped."""
        text = untrusted_datagram.decode("utf-8", errors="replace")
        found: dict[str, str] = {}
        for line in text.split("\n"):
            key, sep, value = line.partition("=")
            if sep and key and key.isascii() and key.replace("_", "").isalnum():
                found[key] = value
        return cls(found)

    @property
    def ready(self) -> bool:
        return self.fields.get("READY") == "1"

    @property
    def stopping(self) -> bool:
        return self.fields.get("STOPPING") == "1"

    @property
    def status(self) -> str | None:
        return self.fields.get("STATUS")


@dataclass
class Event:
    """What :meth:`ForegroundDaemon.events` saw: a notification, the exit, or nothing yet."""

    notification: Notification | None = None
    exit_code: int | None = None


@dataclass
class ForegroundDaemon:
    """The daemon process and the datagram socket it reports on."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    process: subprocess.Popen[bytes] | None = None
    _notify: socket.socket | None = None
    _notify_dir: str | None = None

    def start(self) -> int:
        """Start the child with ``NOTIFY_SOCKET`` pointing at us; its pid."""
        self._notify_dir = tempfile.mkdtemp(prefix="xentmem-notify-")
        path = os.path.join(self._notify_dir, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        self._notify = sock
        env = dict(self.env)
        env["NOTIFY_SOCKET"] = path
        # Not ours to pass on: we are not systemd's watchdog, and a stale one would fire.
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(name, None)
        self.process = subprocess.Popen(list(self.argv), env=env, start_new_session=True)
        return self.process.pid

    def events(self) -> Iterator[Event]:
        """Notifications as they come, an empty event on every idle poll, then the exit.

        The empty events let the caller check its own deadlines; the last event carries the
        exit code, after every datagram the daemon sent before it exited.
        """
        assert self.process is not None and self._notify is not None, "start() first"
        while True:
            readable, _, _ = select.select([self._notify], [], [], POLL_INTERVAL_S)
            if readable:
                for datagram in self._drain():
                    yield Event(notification=Notification.parse(datagram))
                continue
            code = self.process.poll()
            if code is not None:
                for datagram in self._drain():
                    yield Event(notification=Notification.parse(datagram))
                yield Event(exit_code=code)
                return
            yield Event()

    def _drain(self) -> list[bytes]:
        assert self._notify is not None
        datagrams = []
        while True:
            try:
                datagrams.append(self._notify.recv(MAX_NOTIFY_BYTES))
            except (BlockingIOError, InterruptedError):
                return datagrams

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon if it still runs."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited between poll and kill
                self.process.send_signal(signum)

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM, wait up to ``timeout_s``; the exit code, or None if it is still running."""
        assert self.process is not None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int:
        assert self.process is not None
        self.signal(signal.SIGKILL)
        return self.process.wait()

    def close(self) -> None:
        """Forget the notify socket and its directory (the child must be gone)."""
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._notify_dir is not None:
            path = Path(self._notify_dir)
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
            self._notify_dir = None
