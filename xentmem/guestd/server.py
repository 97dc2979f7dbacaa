"""``xentmemd``'s control socket: one thread per client, on the shared server core.

Threads, because an op may run for minutes (an unload repatriating every swap page) while
other clients still get ``status``.  The socket itself (bound owner-only, ``0660`` with a
group, never taken from a live daemon) is :class:`~xentmem.control.server.ControlSocket`.

Every wait is bounded: the accept loop wakes at least every :data:`ACCEPT_POLL_S`, a client
that sent no request for ``idle_timeout_s`` (seconds, the ``control_idle_timeout`` setting;
blank lines are not requests) is dropped, a request line must arrive whole within
``io_timeout_s`` of its first byte (each receive waits only for what is left, so trickled
bytes cannot stretch it) and a reply be taken within ``io_timeout_s``, and at most
``max_clients`` connections are served (the next one is told ``busy``).  A request line
longer than the protocol's bound gets an error and the connection is closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from pathlib import Path

from xentmem.clock import Clock, SystemClock
from xentmem.control.protocol import BUSY, ControlError, encode_error
from xentmem.control.server import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CLIENTS,
    ControlSocket,
    LineHandler,
    LineReader,
    ServerError,
    busy,
    too_long,
)

log = logging.getLogger(__name__)

ACCEPT_POLL_S = 30.0
#: After an accept that failed unexpectedly, the loop waits this long before the next one
#: (so a failure that repeats does not spin it).
ACCEPT_RETRY_S = 0.5
DEFAULT_IO_TIMEOUT_S = 10.0

__all__ = ["ControlServer", "LineHandler", "ServerError"]


class ControlServer:
    """Serves ``handle`` on a Unix socket at ``path`` until :meth:`stop`."""

    def __init__(
        self,
        path: Path,
        handle: LineHandler,
        *,
        mode: int = 0,
        group: str = "",
        max_clients: int = DEFAULT_MAX_CLIENTS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
        clock: Clock | None = None,
    ) -> None:
        """``clock``: what the idle and per-line limits are counted on (the real clock
        unless a test says otherwise)."""
        self.socket = ControlSocket(path, daemon="xentmemd", mode=mode, group=group)
        self.path = path
        self._handle = handle
        self._max_clients = max_clients
        #: May change while serving (a config reload); each wait reads it anew.
        self.idle_timeout_s = idle_timeout_s
        self._io_timeout_s = io_timeout_s
        self._clock: Clock = clock or SystemClock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._clients_lock = threading.Lock()
        self.served = 0

    # -- set up -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.socket.bind()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="xentmem-control",
                                        daemon=True)
        self._thread.start()
        log.info("control socket %s", self.socket.describe())

    def set_access(self, mode: int, group: str) -> None:
        """Change the socket's mode and group while running (a config reload)."""
        self.socket.set_access(mode, group)
        log.info("control socket now %s", self.socket.describe())

    # -- serving ----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self.socket.listener
        assert listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select(ACCEPT_POLL_S):
                    if key.fileobj is listener:
                        self._accept_guarded()

    def _accept_guarded(self) -> None:
        """:meth:`_accept_all`, whose failure (a bug, or a resource out) is logged and
        ends only this turn: the loop, every later client's way in, goes on."""
        try:
            self._accept_all()
        except Exception:
            log.exception("control socket: accepting a client failed; accepting goes on")
            self._stopping.wait(ACCEPT_RETRY_S)

    def _accept_all(self) -> None:
        """Take every connection waiting, so a burst is not left in the listen queue."""
        while not self._stopping.is_set() and self._accept():
            pass

    def _accept(self) -> bool:
        """Serve (or refuse as busy) one waiting connection; False when none was waiting."""
        try:
            conn = self.socket.accept()
        except OSError as exc:
            if not self._stopping.is_set():
                log.warning("control socket: accept failed: %s", exc)
            return False
        if conn is None:
            return False
        conn.setblocking(True)
        conn.settimeout(self._io_timeout_s)
        with self._clients_lock:
            if len(self._clients) >= self._max_clients:
                with contextlib.suppress(OSError):
                    conn.sendall(busy(self._max_clients))
                conn.close()
                return True
            thread = threading.Thread(target=self._serve, args=(conn,),
                                      name="xentmem-control-client", daemon=True)
            self._clients[conn] = thread
            try:  # under the lock: stop() never sees a thread not yet started
                thread.start()
                return True
            except Exception as exc:  # no thread to be had (a tasks limit, no memory)
                del self._clients[conn]  # the slot is free again
                failure = exc
        log.error("control socket: no thread for a client (%s); it is told busy", failure)
        with contextlib.suppress(OSError):
            conn.sendall(encode_error(None, ControlError(
                BUSY, f"xentmemd could not start a thread for this client ({failure}); "
                      "try again")))
        conn.close()
        return True

    def _serve(self, conn: socket.socket) -> None:
        """Answer ``conn``'s lines until it closes or overstays a limit.

        Both limits are deadlines, not per-receive timeouts: a client trickling a byte at a
        time, or sending blank lines, would otherwise hold its slot for good."""
        reader = LineReader()
        clock = self._clock
        last_request = line_started = clock.monotonic()
        try:
            while not self._stopping.is_set():
                for line in reader.lines():
                    reply = self._handle(line)
                    # The idle time starts with the reply, and so does the time of a line
                    # already begun (the server's own time is not the client's).
                    last_request = line_started = clock.monotonic()
                    conn.settimeout(self._io_timeout_s)
                    conn.sendall(reply)
                    self.served += 1
                    if self._stopping.is_set():
                        return
                if reader.overlong:
                    conn.sendall(too_long())
                    return
                # Blank lines (whitespace) are no request begun: the idle timeout holds.
                if reader.buffer.strip():  # in the middle of a line
                    left = line_started + self._io_timeout_s - clock.monotonic()
                else:
                    left = last_request + self.idle_timeout_s - clock.monotonic()
                if left <= 0:
                    log.debug("control socket: client %s", "took too long over a line"
                              if reader.buffer else "sent no request in time")
                    return
                conn.settimeout(left)
                chunk = conn.recv(65536)
                if not chunk:
                    return
                if not reader.buffer or b"\n" in chunk:  # what is left began in this chunk
                    line_started = clock.monotonic()
                reader.feed(chunk)
        except socket.timeout:
            log.debug("control socket: client timed out")
        except OSError as exc:
            if not self._stopping.is_set():
                log.debug("control socket: client connection failed: %s", exc)
        finally:
            with self._clients_lock:
                self._clients.pop(conn, None)
            conn.close()

    # -- tear down --------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every client, remove the socket file (if still ours)."""
        self._stopping.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._clients_lock:
            clients = list(self._clients.items())
        for conn, _ in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in clients:
            if thread.ident is not None:  # a thread that never started has nothing to end
                thread.join(timeout_s)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self.socket.close()
