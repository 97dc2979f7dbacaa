"""The guest's xenstore client: pyxs underneath, with every wait bounded.

pyxs gives the wire protocol, a router thread that dispatches replies and watch events, and a
Unix-socket connection.  Three of its traps matter here (``reference/xenstored.md`` §2, §4,
§6), and this adapter closes them:

* ``RVar.get()`` and ``Monitor.wait()`` wait forever, and the router thread dies on an
  unexpected packet, leaving callers blocked.  Every call here waits on the reply with a
  deadline and checks that the router is alive; a watch delivers into a queue read with a
  timeout.
* pyxs refuses ``Monitor`` over its own ``XenBusConnection`` (a guard from 2016), yet watches
  and transactions work on a Linux 6.1 domU's ``/dev/xen/xenbus``.
  :class:`XenbusDevConnection` is our own connection class for that device, passed as
  ``Client(router=Router(conn))``.
* ``next_rq_id()`` is a global counter bumped without a lock, and unknown error names (such as
  oxenstored's ``EQUOTA``) turn into ``PyXSError(0, 'Success')``.  Requests here take ids from a
  per-session counter under the send lock, and error replies keep their name.

Everything a read returns is untrusted: methods return raw ``bytes`` and the callers name them
``untrusted_...`` until parsed.  Requests can be *pipelined* (:meth:`XsSession.send_many`
returns a :class:`Pending` for each, to collect later).  The ``xen`` backend's messages do not
go through this session: they use connections of their own (:mod:`xentmem.xenbus.xsconn`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import queue
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from pyxs import Client, Router
from pyxs._internal import Event, Op, Packet
from pyxs.client import RVar
from pyxs.connection import PacketConnection
from pyxs.exceptions import ConnectionError as PyXSConnectionError
from pyxs.exceptions import PyXSError

from xentmem.clock import Clock, SystemClock
from xentmem.errors import XenStoreError

log = logging.getLogger(__name__)

NUL = b"\x00"
#: A node path as xenstore allows it (absolute or relative, ``@`` specials for watches).
_PATH_RE = re.compile(rb"@?[A-Za-z0-9/_@-]{1,3072}")
#: Values pyxs would also accept: printable ASCII, no newline.
_VALUE_RE = re.compile(rb"[\x20-\x7e]*")
#: How often a long wait checks that the router thread is still alive.
_LIVENESS_SLICE_S = 0.25
#: Errno numbers for the error names xenstore daemons send (C xenstored's xsd_errors).
_ERRNO_BY_NAME = {name: code for code, name in errno.errorcode.items()}

T = TypeVar("T")


class XsError(XenStoreError):
    """xenstore answered a request with an error; ``name`` is what it sent (``EACCES``...)."""

    def __init__(self, name: str, what: str) -> None:
        self.name = name
        self.errno = _ERRNO_BY_NAME.get(name, 0)
        super().__init__(f"{what}: {name}")


class XsTimeout(XenStoreError):
    """No answer within the deadline (xenstore stopped, or the peer is not there)."""


class XsConnectionLost(XenStoreError):
    """The connection or pyxs's router thread is gone; the session cannot be used again."""


# -- our connection class for the xenbus device -----------------------------------------------


class _DeviceTransport:
    """Reads and writes ``/dev/xen/xenbus`` the way the kernel's xenbus_dev_frontend wants."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise XsConnectionLost(f"cannot open {path}: {exc.strerror}") from None

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int) -> bytes:
        chunks = []
        while size:
            data = os.read(self.fd, size)
            if not data:
                raise OSError(errno.ECONNRESET, "xenbus device closed")
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        os.close(self.fd)


class _SocketTransport:
    """xenstored's Unix socket."""

    def __init__(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise XsConnectionLost(f"cannot connect to xenstore at {path}: "
                                   f"{exc.strerror or exc}") from None
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        view = memoryview(bytearray(size))
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if not n:
                raise OSError(errno.ECONNRESET, "xenstore closed the connection")
            got += n
        return view.tobytes()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _OneWriteConnection(PacketConnection):
    """Sends a whole packet in one write; pyxs writes header and payload apart.

    Half the system calls per request, and the xenbus device is handed whole messages.
    """

    #: Whether several packets may go in one write.  The kernel's xenbus device takes one
    #: message per write(2) (more is EINVAL); a socket is a byte stream.
    coalesce = True
    #: Whether a request may be sent before the previous one is answered.  Linux's xenbus
    #: device queues a request pointing into the open file's one message buffer and returns
    #: before the xenbus thread has copied it to the 1 KiB ring, so the next write(2) can
    #: overwrite a long message in flight (seen on a real domU: the second of three
    #: back-to-back writes answered EINVAL).  On the device, one request at a time.
    pipeline = True

    def send(self, packet: Packet) -> None:
        self.send_frames([_frame(packet)])

    def send_frames(self, frames: list[bytes]) -> None:
        if not self.is_connected:
            raise PyXSConnectionError("not connected")
        try:
            if self.coalesce:
                self.transport.send(b"".join(frames))
            else:
                for data in frames:
                    self.transport.send(data)
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE):
                self.close()
            raise PyXSConnectionError(f"error while writing to {self.path!r}: {exc}") from None


class UnixSocketConnection(_OneWriteConnection):
    """xenstored's Unix socket (``XENSTORED_PATH``): the local demo host, tests, dom0."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def create_transport(self) -> _SocketTransport:
        return _SocketTransport(self.path)


class XenbusDevConnection(_OneWriteConnection):
    """A pyxs connection over the xenbus device that pyxs's watches accept.

    It is deliberately not a ``pyxs.connection.XenBusConnection``: pyxs refuses ``Monitor``
    over that class, while the device itself delivers watch events fine on current kernels.
    """

    coalesce = False
    pipeline = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def create_transport(self) -> _DeviceTransport:
        return _DeviceTransport(self.path)


def _frame(packet: Packet) -> bytes:
    return Packet._struct.pack(packet.op, packet.rq_id, packet.tx_id, packet.size) + \
        packet.payload


# -- pending requests and watches --------------------------------------------------------------


@dataclass
class Pending:
    """A request sent but not yet collected (see :meth:`XsSession.send`)."""

    rvar: object
    op: int
    what: str


class WatchQueue:
    """Where pyxs's router puts the events of one watch token; read with a timeout."""

    def __init__(self, path: bytes, token: bytes) -> None:
        self.path = path
        self.token = token
        self.events: queue.Queue[Event] = queue.Queue()

    def get(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds."""
        try:
            return self.events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def get_nowait(self) -> Event | None:
        try:
            return self.events.get_nowait()
        except queue.Empty:
            return None


# -- the session ------------------------------------------------------------------------------


class XsSession:
    """One connection to xenstore: a socket path or the xenbus device, through pyxs."""

    def __init__(
        self,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        xenbus_path: str | os.PathLike[str] | None = None,
        timeout: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        if socket_path is None and xenbus_path is None:
            raise ValueError("a xenstore socket path or a xenbus device path is needed")
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self.where = os.fspath(socket_path if socket_path is not None else xenbus_path)  # type: ignore[arg-type]
        self.timeout = timeout
        self.clock = clock or SystemClock()
        if socket_path is not None:
            connection: _OneWriteConnection = UnixSocketConnection(socket_path)
        else:
            connection = XenbusDevConnection(xenbus_path)  # type: ignore[arg-type]
        self._connection = connection
        self._pipeline = connection.pipeline
        self._outstanding: Pending | None = None
        self.client = Client(router=Router(connection))
        self._router = self.client.router
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._watches: dict[bytes, WatchQueue] = {}
        self._opened = False

    # -- life cycle ---------------------------------------------------------------------------

    def open(self) -> XsSession:
        try:
            self._router.connection.connect()
        except (PyXSError, OSError) as exc:
            raise XsConnectionLost(f"cannot connect to xenstore at {self.where}: {exc}") from None
        except XsConnectionLost:
            raise
        self._router.thread.start()
        self._opened = True
        return self

    def __enter__(self) -> XsSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> tuple[str, bool]:
        """Where this session connects: the path, and whether it is the xenbus device."""
        return self.where, isinstance(self._connection, XenbusDevConnection)

    @property
    def alive(self) -> bool:
        return self._opened and self._router.thread.is_alive() and self._router.is_connected

    def close(self) -> None:
        """Stop the router within the timeout, even if it is stuck in a read."""
        if not self._opened:
            return
        self._opened = False
        router = self._router
        with contextlib.suppress(OSError):
            router.w_terminator.sendall(NUL)
        router.thread.join(self.timeout)
        if router.thread.is_alive():
            router.connection.close()
            router.thread.join(self.timeout)
            if router.thread.is_alive():  # pragma: no cover - a kernel that never returns
                log.warning("xenstore router thread for %s did not stop", self.where)

    # -- requests -----------------------------------------------------------------------------

    def send(self, op: int, payload: bytes, *, what: str, tx: int = 0) -> Pending:
        """Send one request without waiting for its answer (collect it with :meth:`wait`)."""
        return self.send_many([(op, payload, what)], tx=tx)[0]

    def send_many(self, requests: list[tuple[int, bytes, str]], *, tx: int = 0) -> list[Pending]:
        """Send several requests at once; collect each answer with :meth:`wait`.

        On a socket they go in one write (pipelined).  On the xenbus device each waits until
        the one before it is answered (see ``pipeline``).  Replies are matched by pyxs's
        router as for any request: each reply variable is registered under the router's
        send lock before its bytes go out, exactly as ``Router.send`` does.
        """
        if not self.alive:
            raise XsConnectionLost(f"xenstore connection to {self.where} is closed")
        router = self._router
        pendings: list[Pending] = []
        frames: list[bytes] = []
        with self._send_lock:
            for op, payload, what in requests:
                packet = Packet(op, payload, next(self._ids), tx)
                pending = Pending(RVar(), op, what)
                pendings.append(pending)
                if self._pipeline:
                    frames.append(_frame(packet))
                    with router.send_lock:
                        router.rvars[packet.rq_id] = pending.rvar
                    continue
                if self._outstanding is not None:
                    self._answered(self._outstanding)
                with router.send_lock:
                    router.rvars[packet.rq_id] = pending.rvar
                    self._send_frames([_frame(packet)])
                self._outstanding = pending
            if frames:
                with router.send_lock:
                    self._send_frames(frames)
        return pendings

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            self._connection.send_frames(frames)
        except (PyXSError, OSError) as exc:
            raise XsConnectionLost(f"sending to xenstore at {self.where} failed: {exc}") \
                from None

    def _answered(self, pending: Pending) -> None:
        """Wait (bounded) until ``pending`` has its answer, whatever it says."""
        deadline = self.clock.monotonic() + self.timeout
        condition: threading.Condition = pending.rvar.condition  # type: ignore[attr-defined]
        with condition:
            while pending.rvar.target is None:  # type: ignore[attr-defined]
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    raise XsTimeout(f"{pending.what}: no answer from xenstore at "
                                    f"{self.where} within {self.timeout:g}s")
                if not self._router.thread.is_alive():
                    raise XsConnectionLost(f"the xenstore connection to {self.where} died")
                condition.wait(min(remaining, _LIVENESS_SLICE_S))

    def wait(self, pending: Pending, deadline: float | None = None) -> bytes:
        """The payload answering ``pending``; XsError, XsTimeout or XsConnectionLost."""
        if deadline is None:
            deadline = self.clock.monotonic() + self.timeout
        rvar = pending.rvar
        condition: threading.Condition = rvar.condition  # type: ignore[attr-defined]
        with condition:
            while rvar.target is None:  # type: ignore[attr-defined]
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    raise XsTimeout(f"{pending.what}: no answer from xenstore at {self.where} "
                                    f"within {self.timeout:g}s")
                if not self._router.thread.is_alive():
                    raise XsConnectionLost(f"{pending.what}: the xenstore connection to "
                                           f"{self.where} died")
                condition.wait(min(remaining, _LIVENESS_SLICE_S))
            packet = rvar.target  # type: ignore[attr-defined]
        if packet.op == Op.ERROR:
            name = packet.payload.rstrip(NUL).decode("ascii", "replace")[:32]
            raise XsError(name, pending.what)
        if packet.op != pending.op:
            raise XsConnectionLost(f"{pending.what}: xenstore answered op {packet.op}")
        return packet.payload

    def call(self, op: int, payload: bytes, *, what: str, tx: int = 0,
             deadline: float | None = None) -> bytes:
        return self.wait(self.send(op, payload, what=what, tx=tx), deadline)

    # -- node operations ----------------------------------------------------------------------

    def read(self, path: bytes, *, tx: int = 0) -> bytes:
        """A node's value, untrusted.  Trailing NULs are kept (pyxs strips them)."""
        _check_path(path)
        return self.call(Op.READ, path + NUL, what=f"read {path.decode()}", tx=tx)

    def read_optional(self, path: bytes, *, tx: int = 0) -> bytes | None:
        """Like :meth:`read`, but None when the node does not exist."""
        try:
            return self.read(path, tx=tx)
        except XsError as exc:
            if exc.name == "ENOENT":
                return None
            raise

    def write(self, path: bytes, value: bytes, *, tx: int = 0) -> None:
        _check_path(path)
        _check_value(value)
        self._ack(self.call(Op.WRITE, path + NUL + value, what=f"write {path.decode()}", tx=tx))

    def mkdir(self, path: bytes, *, tx: int = 0) -> None:
        _check_path(path)
        self._ack(self.call(Op.MKDIR, path + NUL, what=f"mkdir {path.decode()}", tx=tx))

    def rm(self, path: bytes, *, tx: int = 0) -> None:
        _check_path(path)
        self._ack(self.call(Op.RM, path + NUL, what=f"rm {path.decode()}", tx=tx))

    def directory(self, path: bytes, *, tx: int = 0) -> list[bytes]:
        """Child names, untrusted."""
        _check_path(path)
        payload = self.call(Op.DIRECTORY, path + NUL, what=f"list {path.decode()}", tx=tx)
        return [name for name in payload.split(NUL) if name]

    def get_perms(self, path: bytes, *, tx: int = 0) -> list[bytes]:
        _check_path(path)
        payload = self.call(Op.GET_PERMS, path + NUL, what=f"get-perms {path.decode()}", tx=tx)
        return [perm for perm in payload.split(NUL) if perm]

    def set_perms(self, path: bytes, perms: Iterable[bytes], *, tx: int = 0) -> None:
        _check_path(path)
        body = b"".join(perm + NUL for perm in perms)
        self._ack(self.call(Op.SET_PERMS, path + NUL + body,
                            what=f"set-perms {path.decode()}", tx=tx))

    # -- watches ------------------------------------------------------------------------------

    def watch(self, path: bytes, token: bytes) -> WatchQueue:
        """Watch ``path`` (and below); events go to the returned queue (first one at once)."""
        _check_path(path)
        if token in self._watches:
            raise ValueError(f"token {token!r} already watched")
        sink = WatchQueue(path, token)
        self._router.subscribe(token, sink)
        try:
            self._ack(self.call(Op.WATCH, path + NUL + token + NUL,
                                what=f"watch {path.decode()}"))
        except XenStoreError:
            self._router.unsubscribe(token, sink)
            raise
        self._watches[token] = sink
        return sink

    def unwatch(self, token: bytes) -> None:
        sink = self._watches.pop(token, None)
        if sink is None:
            return
        try:
            self._ack(self.call(Op.UNWATCH, sink.path + NUL + token + NUL,
                                what=f"unwatch {sink.path.decode()}"))
        finally:
            self._router.unsubscribe(token, sink)

    # -- transactions -------------------------------------------------------------------------

    def transaction(self, body: Callable[[int], T], *, attempts: int = 16) -> T:
        """Run ``body(tx)`` in a transaction, again from the start on EAGAIN (bounded)."""
        return run_transaction(
            lambda: self.call(Op.TRANSACTION_START, NUL, what="transaction start"),
            lambda tx, commit: self.call(Op.TRANSACTION_END, (b"T" if commit else b"F") + NUL,
                                         what="transaction end", tx=tx),
            body,
            attempts=attempts,
        )

    @staticmethod
    def _ack(payload: bytes) -> None:
        if payload.rstrip(NUL) != b"OK":
            raise XenStoreError(f"xenstore answered {payload[:20]!r} instead of OK")


def _check_path(path: bytes) -> None:
    if not _PATH_RE.fullmatch(path) or b"//" in path or (len(path) > 1 and path.endswith(b"/")):
        raise ValueError(f"{path[:60]!r} is not a xenstore path")


def _check_value(value: bytes) -> None:
    if not _VALUE_RE.fullmatch(value):
        raise ValueError("xenstore values written here are printable ASCII without newlines")


def default_xenstore(socket_path: Path | None, xenbus_dev: Path) -> dict[str, Path]:
    """The keyword for :class:`XsSession`: a configured socket wins over the xenbus device."""
    if socket_path is not None:
        return {"socket_path": socket_path}
    return {"xenbus_path": xenbus_dev}


def run_transaction(
    start: Callable[[], bytes],
    end: Callable[[int, bool], object],
    body: Callable[[int], T],
    *,
    attempts: int,
) -> T:
    """xenstore's transaction loop, shared by the guest's and the host's clients.

    ``start()`` sends TRANSACTION_START and returns the untrusted reply; ``end(tx, commit)``
    sends TRANSACTION_END.  ``body`` runs again from the start when the commit answers
    EAGAIN (a conflicting writer), up to ``attempts`` times; an exception in ``body`` aborts
    the transaction (best effort) and propagates.
    """
    for _attempt in range(attempts):
        untrusted_id = start()
        try:
            tx = int(untrusted_id.rstrip(NUL).decode("ascii"), 10)
        except (ValueError, UnicodeDecodeError):
            raise XsConnectionLost(
                f"xenstore gave transaction id {untrusted_id[:20]!r}"
            ) from None
        try:
            result = body(tx)
        except BaseException:
            try:
                end(tx, False)
            except XenStoreError:
                log.debug("abort of transaction %d failed", tx, exc_info=True)
            raise
        try:
            end(tx, True)
        except XsError as exc:
            if exc.name == "EAGAIN":
                continue
            raise
        return result
    raise XsError("EAGAIN", f"transaction still conflicting after {attempts} attempts")
