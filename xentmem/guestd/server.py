"""The control socket: a Unix stream socket in the run directory, one thread per client.

Access is the file's mode: ``0600`` (owner only) by default, ``0660`` and group-owned when a
group is configured.  The socket is bound inside a private ``0700`` directory, given its mode
and group there, and only then renamed into place, so it is never reachable with looser
permissions, even for an instant.

Every wait is bounded: the accept loop wakes at least every :data:`ACCEPT_POLL_S`, a client
idle for ``idle_timeout_s`` is dropped, a reply that cannot be sent in ``io_timeout_s`` drops
the client, and at most ``max_clients`` connections are served (the next one is told ``busy``).
A request line longer than the protocol's bound gets an error and the connection is closed.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import selectors
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable

from xentmem.control import protocol
from xentmem.control.protocol import MAX_REQUEST_BYTES, ControlError

log = logging.getLogger(__name__)

ACCEPT_POLL_S = 30.0
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_IO_TIMEOUT_S = 10.0
DEFAULT_MAX_CLIENTS = 32
OWNER_ONLY = 0o600
GROUP_ACCESS = 0o660
#: Bits for other users, refused: the socket serves the page API and params.set.
WORLD_BITS = 0o007

LineHandler = Callable[[bytes], bytes]


class ServerError(Exception):
    """The socket could not be set up (another daemon on it, bad group, no permission)."""


def socket_mode(mode: int, group: str) -> int:
    """The mode a configuration asks for: explicit, else 0660 with a group, else 0600."""
    chosen = mode or (GROUP_ACCESS if group else OWNER_ONLY)
    if chosen & WORLD_BITS:
        raise ServerError(f"control socket mode {chosen:04o} opens it to every local user; "
                          "owner and group bits only")
    return chosen


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ServerError(f"control socket group {name!r} does not exist") from None


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
    ) -> None:
        socket_mode(mode, group)  # refuse bits for others before anything exists
        self.path = path
        self._handle = handle
        self._mode = mode
        self._group = group
        self._max_clients = max_clients
        self._idle_timeout_s = idle_timeout_s
        self._io_timeout_s = io_timeout_s
        self._listener: socket.socket | None = None
        #: (st_dev, st_ino) of the socket file this server bound: stop() removes that file
        #: and no other (never the socket of a live daemon it failed to displace).
        self._bound: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._clients_lock = threading.Lock()
        self.served = 0

    # -- set up -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._claim_path()
        private = Path(tempfile.mkdtemp(prefix=".bind-", dir=self.path.parent))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            staging = private / "s"
            listener.bind(str(staging))
            self._set_access(staging)
            listener.listen(16)
            bound = os.stat(staging)
            os.rename(staging, self.path)
            self._bound = (bound.st_dev, bound.st_ino)
        except BaseException:
            listener.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                for leftover in private.iterdir():
                    leftover.unlink()
                private.rmdir()
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="xentmem-control",
                                        daemon=True)
        self._thread.start()
        log.info("control socket %s (mode %04o%s)", self.path,
                 socket_mode(self._mode, self._group),
                 f", group {self._group}" if self._group else "")

    def _claim_path(self) -> None:
        """Remove a stale socket; refuse if a live daemon answers on it."""
        if not (self.path.exists() or self.path.is_symlink()):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except OSError:
            log.info("removing stale control socket %s", self.path)
            self.path.unlink()
        else:
            raise ServerError(f"another xentmemd is listening on {self.path}")
        finally:
            probe.close()

    def _set_access(self, path: Path) -> None:
        if self._group:
            os.chown(path, -1, group_id(self._group))
        os.chmod(path, socket_mode(self._mode, self._group))

    def set_access(self, mode: int, group: str) -> None:
        """Change the socket's mode and group while running (a config reload)."""
        old = (self._mode, self._group)
        self._mode, self._group = mode, group
        try:
            self._set_access(self.path)
        except (OSError, ServerError):
            self._mode, self._group = old
            raise
        log.info("control socket %s now mode %04o%s", self.path, socket_mode(mode, group),
                 f", group {group}" if group else "")

    # -- serving ----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select(ACCEPT_POLL_S):
                    if key.fileobj is self._listener:
                        self._accept()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if not self._stopping.is_set():
                log.warning("control socket: accept failed: %s", exc)
            return
        conn.setblocking(True)
        conn.settimeout(self._io_timeout_s)
        with self._clients_lock:
            if len(self._clients) >= self._max_clients:
                busy = ControlError(protocol.BUSY, f"more than {self._max_clients} clients")
                with contextlib.suppress(OSError):
                    conn.sendall(protocol.encode_error(None, busy))
                conn.close()
                return
            thread = threading.Thread(target=self._serve, args=(conn,),
                                      name="xentmem-control-client", daemon=True)
            self._clients[conn] = thread
        thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while not self._stopping.is_set():
                newline = buffer.find(b"\n")
                if newline < 0:
                    if len(buffer) > MAX_REQUEST_BYTES:
                        too_long = ControlError(protocol.BAD_REQUEST,
                                                f"request longer than {MAX_REQUEST_BYTES} bytes")
                        conn.sendall(protocol.encode_error(None, too_long))
                        return
                    conn.settimeout(self._idle_timeout_s if not buffer else self._io_timeout_s)
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                line, buffer = buffer[:newline], buffer[newline + 1:]
                if not line.strip():
                    continue
                reply = self._handle(line)
                conn.settimeout(self._io_timeout_s)
                conn.sendall(reply)
                self.served += 1
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
        """Stop accepting, close every client, remove the socket file."""
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
            thread.join(timeout_s)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._remove_own_socket()

    def _remove_own_socket(self) -> None:
        """Unlink the socket file if it is still the one this server bound."""
        bound, self._bound = self._bound, None
        if bound is None:
            return
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (now.st_dev, now.st_ino) != bound:
            log.warning("control socket %s was replaced by another; leaving it", self.path)
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
