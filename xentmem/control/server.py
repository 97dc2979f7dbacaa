"""The server side both daemons share: the listening socket, line framing, and the answer.

Each daemon drives it its own way: ``xentmemd`` serves each client on a thread of its own
(an op may take minutes, as an unload does), ``xentmem-hostd`` serves them from its one loop
between xenstore events (:class:`PolledServer`).  What they share is here, once: how the
socket is bound (never reachable with looser permissions, a live daemon's socket never
taken over), how lines are cut from the stream (bounded), and how a line becomes its answer.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import select
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from xentmem.control import protocol
from xentmem.control.protocol import MAX_REQUEST_BYTES, ControlError, OpSpec, Request
from xentmem.errors import XentmemError

log = logging.getLogger(__name__)

OWNER_ONLY = 0o600
GROUP_ACCESS = 0o660
#: Bits for other users, refused: a control socket changes what the daemon does.
WORLD_BITS = 0o007

#: One request line in, one answer line out.
LineHandler = Callable[[bytes], bytes]

#: Connections served at once; the next one is answered ``busy`` and closed.
DEFAULT_MAX_CLIENTS = 32
#: Seconds a connection may stay silent between requests before the daemon closes it, so
#: that idle clients cannot hold every slot.  A client reconnects by itself (``client.py``).
DEFAULT_IDLE_TIMEOUT_S = 5
#: Connections the kernel queues before the daemon accepts them: a burst of clients must fit,
#: or their ``connect`` fails with EAGAIN.  The kernel caps it at ``net.core.somaxconn``.
LISTEN_BACKLOG = socket.SOMAXCONN


class ServerError(XentmemError):
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
        if name.isascii() and name.isdigit():  # a gid; other scripts' digits are not one
            return int(name)
        raise ServerError(f"control socket group {name!r} does not exist") from None


def check_group(directory: Path, group: str) -> int:
    """The gid of ``group``, once a file made in ``directory`` (the socket's) has been given
    to it: a throwaway file, removed again, so nothing else changes.  Whether the socket can
    be given to a group depends on the daemon's privileges (CAP_CHOWN, or being a member of
    the group) and the file system, which only trying tells.

    ServerError: no such group, or the file could not be given to it.  OSError: no file
    could be made in ``directory`` (nothing is known about the group then).
    """
    gid = group_id(group)
    fd, name = tempfile.mkstemp(prefix=".group-check-", dir=directory)
    try:
        os.close(fd)
        try:
            os.chown(name, -1, gid)
        except OSError as exc:
            raise ServerError(
                f"the control socket cannot be given to group {group!r} (gid {gid}): "
                f"{exc.strerror}; the daemon needs CAP_CHOWN, or to be a member of the "
                f"group (SupplementaryGroups={group} in a drop-in of the unit)") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
    return gid


# -- the answer ---------------------------------------------------------------------------------

def respond(untrusted_line: bytes, ops: Mapping[str, OpSpec],
            run: Callable[[Request], Any]) -> bytes:
    """One request line in, one answer line out; never raises.

    ``run`` gets a request checked against ``ops`` and raises ControlError to refuse it;
    any other exception is a bug, logged with its traceback and answered ``internal``.
    """
    try:
        request = protocol.decode_request(untrusted_line, ops)
    except ControlError as exc:
        return protocol.encode_error(protocol.request_id_of(untrusted_line), exc)
    except Exception as exc:  # a line the checks missed must not cost the connection
        log.error("control request could not be read", exc_info=exc)
        unread = ControlError(protocol.BAD_REQUEST, f"request could not be read: "
                                                    f"{type(exc).__name__}")
        return protocol.encode_error(None, unread)
    try:
        return protocol.encode_result(request.id, run(request))
    except ControlError as exc:
        log.debug("control op %s refused: %s: %s", request.op, exc.code, exc.message)
        return protocol.encode_error(request.id, exc)
    except Exception as exc:  # a control request must never take the daemon down
        log.error("control op %s failed unexpectedly", request.op, exc_info=exc)
        internal = ControlError(protocol.INTERNAL, f"{request.op}: internal error: "
                                                   f"{type(exc).__name__}: {exc}")
        return protocol.encode_error(request.id, internal)


def busy(max_clients: int) -> bytes:
    """The answer to a connection beyond ``max_clients`` (the connection then closes): it ran
    nothing, so the client may try again."""
    error = ControlError(protocol.BUSY, f"more than {max_clients} clients; try again")
    return protocol.encode_error(None, error)


def too_long() -> bytes:
    """The answer to a line longer than the protocol allows (the connection then closes)."""
    error = ControlError(protocol.BAD_REQUEST, f"request longer than {MAX_REQUEST_BYTES} bytes")
    return protocol.encode_error(None, error)


class LineReader:
    """Cuts one connection's byte stream into request lines (blank lines are skipped: they
    are no request, and a server's idle timeout does not count them as activity)."""

    def __init__(self, limit: int = MAX_REQUEST_BYTES) -> None:
        self.limit = limit
        self.buffer = b""

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def lines(self) -> Iterator[bytes]:
        while True:
            newline = self.buffer.find(b"\n")
            if newline < 0:
                return
            line, self.buffer = self.buffer[:newline], self.buffer[newline + 1:]
            if line.strip():
                yield line

    @property
    def overlong(self) -> bool:
        """The unfinished line is already longer than any request may be."""
        return len(self.buffer) > self.limit


# -- the listening socket -----------------------------------------------------------------------

class ControlSocket:
    """The listening socket at ``path``, owned by the daemon ``daemon`` (named in errors).

    It is bound inside a private ``0700`` directory, given its mode and group there, and only
    then renamed into place.  A stale socket file is replaced; a live daemon's is not.  On
    :meth:`close` the file is removed only if it is still the one this socket bound.
    """

    def __init__(self, path: str | os.PathLike[str], *, daemon: str, mode: int = 0,
                 group: str = "") -> None:
        socket_mode(mode, group)  # refuse bits for others before anything exists
        self.path = Path(path)
        self.daemon = daemon
        self.mode = mode
        self.group = group
        self.listener: socket.socket | None = None
        #: (st_dev, st_ino) of the file this socket bound.
        self._bound: tuple[int, int] | None = None

    def bind(self) -> socket.socket:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._claim_path()
        private = Path(tempfile.mkdtemp(prefix=".bind-", dir=self.path.parent))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            staging = private / "s"
            listener.bind(str(staging))
            self._set_access(staging)
            listener.listen(LISTEN_BACKLOG)
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
        self.listener = listener
        return listener

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
            raise ServerError(f"another {self.daemon} is listening on {self.path}")
        finally:
            probe.close()

    def _set_access(self, path: Path) -> None:
        if self.group:
            os.chown(path, -1, group_id(self.group))
        os.chmod(path, socket_mode(self.mode, self.group))

    def set_access(self, mode: int, group: str) -> None:
        """Change the socket's mode and group while it is bound (nothing changes on error)."""
        old = (self.mode, self.group)
        self.mode, self.group = mode, group
        try:
            self._set_access(self.path)
        except (OSError, ServerError):
            self.mode, self.group = old
            raise

    def describe(self) -> str:
        mode = socket_mode(self.mode, self.group)
        return f"{self.path} (mode {mode:04o}{f', group {self.group}' if self.group else ''})"

    def accept(self) -> socket.socket | None:
        """A new connection, or None when none is waiting."""
        if self.listener is None:
            return None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        return conn

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
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


# -- a server for a daemon with one loop ---------------------------------------------------------

@dataclass
class _Peer:
    conn: socket.socket
    reader: LineReader
    #: The clock's reading when the peer's last request was answered (or it connected):
    #: bytes of an unfinished line and blank lines do not count, so trickling them cannot
    #: hold a slot.
    last_heard: float


class PolledServer:
    """Clients served by the daemon's own loop: it waits on :meth:`filenos` among its other
    file descriptors and calls :meth:`ready` for each readable one.  No threads.

    The same bounds as ``xentmemd``'s server: at most ``max_clients`` connections (the next
    is told ``busy``), a connection with no request answered for ``idle_timeout_s`` (a line
    still coming or blank lines do not count) is closed (checked each
    time the loop asks for :meth:`filenos`, so the loop must wake at least every second or
    so, as ``xentmem-hostd``'s does), an answer not taken within ``send_timeout_s`` drops the
    client.  ``clock`` is injectable for tests.
    """

    def __init__(self, path: str | os.PathLike[str], handle: LineHandler, *, daemon: str,
                 send_timeout_s: float = 2.0, max_clients: int = DEFAULT_MAX_CLIENTS,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.socket = ControlSocket(path, daemon=daemon)
        self.handle = handle
        #: How long one answer may take to send before a client that does not read is dropped.
        self.send_timeout_s = send_timeout_s
        self.max_clients = max_clients
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._peers: dict[int, _Peer] = {}

    @property
    def path(self) -> Path:
        return self.socket.path

    @property
    def clients(self) -> int:
        return len(self._peers)

    def open(self) -> PolledServer:
        self.socket.bind()
        return self

    def close(self) -> None:
        for peer in list(self._peers.values()):
            peer.conn.close()
        self._peers.clear()
        self.socket.close()

    def filenos(self) -> list[int]:
        """The descriptors to wait on; connections idle too long are closed first."""
        self.expire()
        listener = self.socket.listener
        return ([] if listener is None else [listener.fileno()]) + list(self._peers)

    def expire(self) -> None:
        """Close the connections silent for ``idle_timeout_s`` or more."""
        now = self._clock()
        for fd, peer in list(self._peers.items()):
            if now - peer.last_heard >= self.idle_timeout_s:
                log.debug("control socket: closing a connection idle for %.0fs",
                          now - peer.last_heard)
                self._drop(fd)

    def ready(self, fd: int) -> None:
        """``fd`` (one of :meth:`filenos`) is readable: accept, or read and answer lines."""
        listener = self.socket.listener
        if listener is not None and fd == listener.fileno():
            self._accept_all()
            return
        peer = self._peers.get(fd)
        if peer is None:
            return
        # Never wait here: the loop may call this for a descriptor that was readable for the
        # connection it just expired and that a new connection now holds.  (The socket has a
        # timeout for sending, so recv itself would wait for data.)
        if not select.select([peer.conn], [], [], 0)[0]:
            return
        try:
            data = peer.conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        peer.reader.feed(data)
        for line in peer.reader.lines():
            if not self._send(peer.conn, self.handle(line)):
                self._drop(fd)
                return
            peer.last_heard = self._clock()
        if peer.reader.overlong:
            self._send(peer.conn, too_long())
            self._drop(fd)

    def _accept_all(self) -> None:
        """Take every connection waiting (a burst is answered in one turn of the loop)."""
        while True:
            try:
                conn = self.socket.accept()
            except OSError as exc:  # out of descriptors: those waiting stay queued
                log.warning("control socket: accept failed: %s", exc)
                return
            if conn is None:
                return
            conn.settimeout(self.send_timeout_s)
            if len(self._peers) >= self.max_clients:
                self._send(conn, busy(self.max_clients))
                conn.close()
                continue
            self._peers[conn.fileno()] = _Peer(conn, LineReader(), self._clock())

    @staticmethod
    def _send(conn: socket.socket, data: bytes) -> bool:
        try:
            conn.sendall(data)
        except OSError:
            return False
        return True

    def _drop(self, fd: int) -> None:
        peer = self._peers.pop(fd, None)
        if peer is not None:
            peer.conn.close()
