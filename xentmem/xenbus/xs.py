"""The xenstore client of both ends: pyxs's packets and connections, one thread, bounded waits.

Linux has one xenstore client (``xenbus_xs.c``) for its frontends and backends; this is ours.
It sends, then reads until the answer it waits for arrives, keeping the watch events and the
answers to pipelined requests it meets on the way: no router thread, so a request costs no
thread hand-off, and a caller with its own ``select`` loop (the host service) drives it.
Everything it returns is untrusted ``bytes``.  Why it is shaped so (pyxs's traps, the xenbus
device's one-message-per-write rule): ``docs/protocol.md``, "The xenstore client".
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, TypeVar, Union

from pyxs._internal import Event, Packet
from pyxs._internal import Op as XS
from pyxs.connection import PacketConnection
from pyxs.exceptions import PyXSError

from xentmem.clock import Clock, SystemClock
from xentmem.errors import XenStoreError

__all__ = [
    "XS",
    "Event",
    "UnixSocketConnection",
    "Watch",
    "XenbusDevConnection",
    "XsConnectionLost",
    "XsError",
    "XsSession",
    "XsTimeout",
]

log = logging.getLogger(__name__)

NUL = b"\x00"
#: The largest payload of one xenstore message (XENSTORE_PAYLOAD_MAX).
PAYLOAD_MAX = 4096
#: A node path as xenstore allows it (absolute or relative, ``@`` specials for watches).
_PATH_RE = re.compile(rb"@?[A-Za-z0-9/_@-]{1,3072}")
#: Values written here: printable ASCII, no newline (what pyxs accepts too).
_VALUE_RE = re.compile(rb"[\x20-\x7e]*")
#: Errno numbers for the error names xenstore daemons send (C xenstored's xsd_errors).
_ERRNO_BY_NAME = {name: code for code, name in errno.errorcode.items()}
_HEADER: struct.Struct = Packet._struct
#: The message types pyxs knows (an answer of another type breaks the protocol).
_TYPES = frozenset(XS)

T = TypeVar("T")
PathLike = Union[str, bytes]
#: Called with (what, error name) when a posted request was refused.
ErrorSink = Callable[[str, str], None]


class XsError(XenStoreError):
    """xenstore answered a request with an error; ``name`` is what it sent (``EACCES``...)."""

    def __init__(self, name: str, what: str) -> None:
        self.name = name
        self.errno = _ERRNO_BY_NAME.get(name, 0)
        super().__init__(f"{what}: {name}")


class XsTimeout(XenStoreError):
    """No answer within the deadline (xenstore stopped, or the peer is not there)."""


class XsConnectionLost(XenStoreError):
    """The connection is gone or broke the protocol; the session cannot be used again."""


# -- pyxs connections, one message per write ---------------------------------------------------


class _SocketTransport:
    """xenstored's Unix socket, blocking: reads happen only after ``select`` said so."""

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

    def recv_some(self, size: int) -> bytes:
        return self.sock.recv(size)

    def recv(self, size: int) -> bytes:
        """Exactly ``size`` bytes (pyxs's own ``PacketConnection.recv`` uses it)."""
        chunks = []
        while size:
            data = self.sock.recv(size)
            if not data:
                raise OSError(errno.ECONNRESET, "xenstore closed the connection")
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _DeviceTransport:
    """``/dev/xen/xenbus``: one whole message per ``write(2)``, as Linux's device wants."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise XsConnectionLost(f"cannot open {path}: {exc.strerror}") from None

    def fileno(self) -> int:
        return self.fd

    def recv_some(self, size: int) -> bytes:
        return os.read(self.fd, size)

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
        if os.write(self.fd, data) != len(data):
            raise OSError(errno.EIO, f"short write of a {len(data)}-byte message")

    def close(self) -> None:
        os.close(self.fd)


class _OneWriteConnection(PacketConnection):
    """pyxs's connection, plus what it lacks: a packet in one write, and buffered reads.

    pyxs writes a header and its payload apart and reads one packet with two reads; here a
    packet (or, on a socket, several) goes in one write and one read takes whatever arrived.
    """

    #: Whether several packets may go in one write.  The kernel's xenbus device takes one
    #: message per write(2) (more is EINVAL); a socket is a byte stream.
    coalesce = True
    #: Whether a request may be sent before the previous one is answered.  Linux's xenbus
    #: device queues a request pointing into the open file's one message buffer and returns
    #: before it is copied to the ring, so the next write(2) can overwrite a long message in
    #: flight (seen on a real domU).  On the device, one request at a time.
    pipeline = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._buffer = b""

    def connect(self) -> None:
        self._buffer = b""
        super().connect()

    def send(self, packet: Packet) -> None:
        self.send_frames([frame(packet)])

    def send_frames(self, frames: list[bytes]) -> None:
        if not self.is_connected:
            raise XsConnectionLost(f"xenstore connection to {self.path} is closed")
        try:
            if self.coalesce:
                self.transport.send(b"".join(frames))
            else:
                for data in frames:
                    self.transport.send(data)
        except OSError as exc:
            self.close()
            raise XsConnectionLost(f"writing to xenstore at {self.path}: {exc}") from None

    def read_packets(self) -> list[Packet]:
        """One read, split into the whole packets it completes (the rest is kept)."""
        try:
            data = self.transport.recv_some(65536)
        except OSError as exc:
            self.close()
            raise XsConnectionLost(f"reading from xenstore at {self.path}: {exc}") from None
        if not data:
            self.close()
            raise XsConnectionLost(f"xenstore at {self.path} closed the connection")
        buffer = self._buffer + data if self._buffer else data
        packets = []
        pos, end = 0, len(buffer)
        try:
            while end - pos >= _HEADER.size:
                msg_type, rq_id, tx_id, size = _HEADER.unpack_from(buffer, pos)
                if size > PAYLOAD_MAX:
                    raise XsConnectionLost(f"xenstore sent a {size}-byte payload")
                stop = pos + _HEADER.size + size
                if stop > end:
                    break
                if msg_type not in _TYPES:
                    raise XsConnectionLost(f"xenstore sent message type {msg_type}")
                # Checked as pyxs's Packet() checks, without building the packet twice.
                packets.append(Packet._make(
                    (msg_type, rq_id, tx_id, size, buffer[pos + _HEADER.size:stop])))
                pos = stop
        except XsConnectionLost as exc:
            self.close()
            raise XsConnectionLost(f"xenstore at {self.path} broke the protocol: {exc}") \
                from None
        self._buffer = buffer[pos:]
        return packets


class UnixSocketConnection(_OneWriteConnection):
    """xenstored's Unix socket (``XENSTORED_PATH``): dom0, the demo host, tests."""

    def create_transport(self) -> _SocketTransport:
        return _SocketTransport(self.path)


class XenbusDevConnection(_OneWriteConnection):
    """The xenbus device of a domU.  Not pyxs's ``XenBusConnection``: pyxs refuses watches
    over that class, while the device delivers watch events fine on current kernels."""

    coalesce = False
    pipeline = False

    def create_transport(self) -> _DeviceTransport:
        return _DeviceTransport(self.path)


def frame(packet: Packet) -> bytes:
    """A packet's bytes on the wire: header and payload together."""
    return _HEADER.pack(packet.op, packet.rq_id, packet.tx_id, packet.size) + packet.payload


# -- watches ------------------------------------------------------------------------------------


class Watch:
    """The events of one watch token, taken from the session's event queue in order."""

    def __init__(self, session: XsSession, path: bytes, token: bytes) -> None:
        self.session = session
        self.path = path
        self.token = token

    def get(self, timeout: float) -> Event | None:
        """The next event of this watch, or None after ``timeout`` seconds."""
        return self.session._next_event(self.token, timeout)

    def get_nowait(self) -> Event | None:
        """An event already received, or None (reads nothing from the connection)."""
        return self.session._take_event(self.token)


# -- the session --------------------------------------------------------------------------------


class XsSession:
    """One connection to xenstore, a socket or the xenbus device.

    ``XsSession(path, device=...)``, or the keywords :func:`default_xenstore` gives
    (``socket_path=`` / ``xenbus_path=``).  Calls from several threads are serialized.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        device: bool = False,
        socket_path: str | os.PathLike[str] | None = None,
        xenbus_path: str | os.PathLike[str] | None = None,
        timeout: float = 2.0,
        clock: Clock | None = None,
        on_error: ErrorSink | None = None,
    ) -> None:
        if xenbus_path is not None:
            path, device = xenbus_path, True
        elif socket_path is not None:
            path, device = socket_path, False
        if path is None:
            raise ValueError("a xenstore socket path or a xenbus device path is needed")
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self.where = os.fspath(path)
        self.device = device
        self.timeout = timeout
        self.clock = clock or SystemClock()
        self.on_error = on_error or _log_refusal
        self._connection: _OneWriteConnection = (
            XenbusDevConnection(self.where) if device else UnixSocketConnection(self.where))
        #: Watch events received and not yet taken, in order: (path, token).
        self.events: deque[Event] = deque()
        self.refused = 0
        self._lock = threading.RLock()
        self._next_id = 0
        self._out: list[tuple[int, bytes]] = []
        #: Requests written and not yet answered.
        self._unanswered: set[int] = set()
        self._answers: dict[int, Packet] = {}
        #: Posted requests (nobody waits for them): what each is, for a refusal's report.
        self._posted: dict[int, str] = {}
        #: Requests whose caller gave up waiting: their answers are dropped.
        self._abandoned: set[int] = set()
        self._watches: dict[bytes, Watch] = {}

    # -- life cycle ---------------------------------------------------------------------------

    def open(self) -> XsSession:
        try:
            self._connection.connect()
        except PyXSError as exc:
            raise XsConnectionLost(f"cannot connect to xenstore at {self.where}: {exc}") from None
        return self

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> XsSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._connection.is_connected

    @property
    def endpoint(self) -> tuple[str, bool]:
        """Where this session connects: the path, and whether it is the xenbus device."""
        return self.where, self.device

    def fileno(self) -> int:
        return self._connection.fileno() if self.alive else -1

    # -- the wire -----------------------------------------------------------------------------

    def _send(self, msg_type: int, payload: bytes, tx: int, *, buffered: bool = False) -> int:
        if not self.alive:
            raise XsConnectionLost(f"xenstore connection to {self.where} is closed")
        if len(payload) > PAYLOAD_MAX or msg_type not in _TYPES:
            raise ValueError(f"not a xenstore request: type {msg_type}, {len(payload)} bytes")
        self._next_id = req_id = (self._next_id % 0xFFFFFFFE) + 1
        self._out.append((req_id, _HEADER.pack(msg_type, req_id, tx, len(payload)) + payload))
        if not buffered:
            self.flush()
        return req_id

    def flush(self) -> None:
        """Write every buffered request: in one write on a socket; on the xenbus device one
        per write(2), each after the one before it is answered (see ``pipeline``)."""
        with self._lock:
            if not self._out:
                return
            out, self._out = self._out, []
            if self._connection.pipeline:
                self._connection.send_frames([data for _, data in out])
                self._unanswered.update(req_id for req_id, _ in out)
                return
            for req_id, data in out:
                self._wait_answered()
                self._connection.send_frames([data])
                self._unanswered.add(req_id)

    def _wait_answered(self) -> None:
        """Device only: wait (bounded) until no request is in flight."""
        deadline = self.clock.monotonic() + self.timeout
        while self._unanswered:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise XsTimeout(f"no answer from xenstore at {self.where} within "
                                f"{self.timeout:g}s")
            self.pump(remaining)

    def pump(self, timeout: float) -> bool:
        """Read what arrives within ``timeout`` and sort it; True if anything came."""
        with self._lock:
            if not self.alive:
                raise XsConnectionLost(f"xenstore connection to {self.where} is closed")
            readable, _, _ = select.select([self._connection.fileno()], [], [],
                                           max(timeout, 0.0))
            if not readable:
                return False
            self.receive()
            return True

    def receive(self) -> None:
        """Read once without waiting (the caller's own ``select`` said there is something),
        and sort what came: answers by request id, watch events into :attr:`events`."""
        with self._lock:
            if not self.alive:
                raise XsConnectionLost(f"xenstore connection to {self.where} is closed")
            for packet in self._connection.read_packets():
                self._sort(packet)

    def _sort(self, packet: Packet) -> None:
        if packet.op == XS.WATCH_EVENT:
            path, _, rest = packet.payload.partition(NUL)
            token, sep, _ = rest.partition(NUL)
            if sep:
                self.events.append(Event(path, token))
            else:
                log.warning("malformed watch event %r ignored", packet.payload[:60])
            return
        req_id = packet.rq_id
        if req_id not in self._unanswered:
            self._connection.close()
            raise XsConnectionLost(f"xenstore at {self.where} answered request {req_id}, "
                                   "which was not asked")
        self._unanswered.discard(req_id)
        what = self._posted.pop(req_id, None)
        if what is not None:
            if packet.op == XS.ERROR:
                self.refused += 1
                self.on_error(what, _error_name(packet))
            return
        if req_id in self._abandoned:
            self._abandoned.discard(req_id)
            return
        self._answers[req_id] = packet

    def wait(self, req_id: int, *, msg_type: int, what: str,
             deadline: float | None = None) -> bytes:
        """The payload answering request ``req_id``; XsError, XsTimeout or XsConnectionLost."""
        with self._lock:
            self.flush()
            if deadline is None:
                deadline = self.clock.monotonic() + self.timeout
            while req_id not in self._answers:
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    self._abandoned.add(req_id)
                    raise XsTimeout(f"{what}: no answer from xenstore at {self.where} "
                                    f"within {self.timeout:g}s")
                self.pump(remaining)
            packet = self._answers.pop(req_id)
        if packet.op == XS.ERROR:
            raise XsError(_error_name(packet), what)
        if packet.op != msg_type:
            raise XsConnectionLost(f"{what}: xenstore answered message type {packet.op}")
        return packet.payload

    def call(self, msg_type: int, payload: bytes, *, what: str, tx: int = 0) -> bytes:
        """Send one request and wait (bounded) for its answer."""
        with self._lock:
            return self.wait(self._send(msg_type, payload, tx), msg_type=msg_type, what=what)

    def post(self, msg_type: int, payload: bytes, *, what: str) -> None:
        """Queue a request nobody waits for; it leaves with the next :meth:`flush` (or any
        call), and a refusal goes to ``on_error`` when its answer is read."""
        with self._lock:
            self._posted[self._send(msg_type, payload, 0, buffered=True)] = what

    @property
    def outstanding(self) -> int:
        """Posted requests whose answers have not been read yet."""
        return len(self._posted)

    def drain(self) -> None:
        """Send what is buffered and sort whatever answers have arrived, without waiting."""
        with self._lock:
            self.flush()
            while self.alive and (self._posted or self._unanswered) and self.pump(0):
                pass

    def settle(self, timeout: float | None = None) -> None:
        """Wait (bounded) until every posted request has been answered."""
        with self._lock:
            self.flush()
            deadline = self.clock.monotonic() + (self.timeout if timeout is None else timeout)
            while self._posted:
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    raise XsTimeout(f"{len(self._posted)} posted requests unanswered")
                self.pump(remaining)

    # -- node operations ----------------------------------------------------------------------

    def read(self, path: PathLike, *, tx: int = 0) -> bytes:
        """A node's value, untrusted (trailing NULs are kept; pyxs strips them)."""
        raw = _path(path)
        return self.call(XS.READ, raw + NUL, what=f"read {raw.decode()}", tx=tx)

    def read_optional(self, path: PathLike, *, tx: int = 0) -> bytes | None:
        """Like :meth:`read`, but None when the node does not exist."""
        try:
            return self.read(path, tx=tx)
        except XsError as exc:
            if exc.name == "ENOENT":
                return None
            raise

    def write(self, path: PathLike, value: bytes, *, tx: int = 0) -> None:
        raw = _path(path)
        _check_value(value)
        _ack(self.call(XS.WRITE, raw + NUL + value, what=f"write {raw.decode()}", tx=tx))

    def mkdir(self, path: PathLike, *, tx: int = 0) -> None:
        raw = _path(path)
        _ack(self.call(XS.MKDIR, raw + NUL, what=f"mkdir {raw.decode()}", tx=tx))

    def rm(self, path: PathLike, *, tx: int = 0) -> None:
        raw = _path(path)
        _ack(self.call(XS.RM, raw + NUL, what=f"rm {raw.decode()}", tx=tx))

    def directory(self, path: PathLike, *, tx: int = 0) -> list[bytes]:
        """Child names, untrusted."""
        raw = _path(path)
        payload = self.call(XS.DIRECTORY, raw + NUL, what=f"list {raw.decode()}", tx=tx)
        return [name for name in payload.split(NUL) if name]

    def get_perms(self, path: PathLike, *, tx: int = 0) -> list[bytes]:
        raw = _path(path)
        payload = self.call(XS.GET_PERMS, raw + NUL, what=f"get-perms {raw.decode()}", tx=tx)
        return [perm for perm in payload.split(NUL) if perm]

    def set_perms(self, path: PathLike, perms: Iterable[PathLike], *, tx: int = 0) -> None:
        raw = _path(path)
        body = b"".join(_bytes(perm) + NUL for perm in perms)
        _ack(self.call(XS.SET_PERMS, raw + NUL + body, what=f"set-perms {raw.decode()}",
                       tx=tx))

    def is_domain_introduced(self, domid: int) -> bool:
        payload = self.call(XS.IS_DOMAIN_INTRODUCED, str(domid).encode() + NUL,
                            what=f"is-domain-introduced {domid}")
        return payload.rstrip(NUL) == b"T"

    # -- pipelined requests -------------------------------------------------------------------

    def post_write(self, path: PathLike, value: bytes) -> None:
        raw = _bytes(path)
        self.post(XS.WRITE, raw + NUL + value, what=f"write {raw.decode()}")

    def post_rm(self, path: PathLike) -> None:
        raw = _bytes(path)
        self.post(XS.RM, raw + NUL, what=f"rm {raw.decode()}")

    def post_read(self, path: PathLike) -> int:
        """A read sent with the next flush; its answer is what :meth:`collect` returns."""
        with self._lock:
            return self._send(XS.READ, _bytes(path) + NUL, 0, buffered=True)

    def collect(self, req_id: int, *, what: str, deadline: float) -> bytes:
        return self.wait(req_id, msg_type=XS.READ, what=what, deadline=deadline)

    def post_get_perms(self, path: PathLike) -> int:
        """A permission read sent with the next flush; :meth:`collect_perms` has its answer."""
        with self._lock:
            return self._send(XS.GET_PERMS, _bytes(path) + NUL, 0, buffered=True)

    def collect_perms(self, req_id: int, *, what: str, deadline: float) -> list[bytes]:
        payload = self.wait(req_id, msg_type=XS.GET_PERMS, what=what, deadline=deadline)
        return [perm for perm in payload.split(NUL) if perm]

    def post_directory(self, path: PathLike) -> int:
        """A listing sent with the next flush; :meth:`collect_directory` has its answer."""
        with self._lock:
            return self._send(XS.DIRECTORY, _bytes(path) + NUL, 0, buffered=True)

    def collect_directory(self, req_id: int, *, what: str, deadline: float) -> list[bytes]:
        """Child names, untrusted."""
        payload = self.wait(req_id, msg_type=XS.DIRECTORY, what=what, deadline=deadline)
        return [name for name in payload.split(NUL) if name]

    # -- watches ------------------------------------------------------------------------------

    def watch(self, path: PathLike, token: bytes) -> Watch:
        """Watch ``path`` (and below); its events, the first one at once, are in
        :attr:`events` and in the returned :class:`Watch`."""
        raw = _path(path)
        if token in self._watches:
            raise ValueError(f"token {token!r} already watched")
        _ack(self.call(XS.WATCH, raw + NUL + token + NUL, what=f"watch {raw.decode()}"))
        watch = self._watches[token] = Watch(self, raw, token)
        return watch

    def watching(self, token: bytes) -> bool:
        """Whether ``token`` is watched (by :meth:`watch`, not :meth:`unwatch` since)."""
        return token in self._watches

    def unwatch(self, token: bytes, path: PathLike | None = None) -> None:
        """Stop watching ``token``.  With ``path``, xenstore is asked even if this session
        does not know the watch: one whose watch (or unwatch) call timed out may still be
        registered there, and would refuse the next watch of that token (EEXIST)."""
        watch = self._watches.pop(token, None)
        if watch is not None:
            raw = watch.path
        elif path is not None:
            raw = _path(path)
        else:
            return
        with self._lock:
            _ack(self.call(XS.UNWATCH, raw + NUL + token + NUL, what=f"unwatch {raw.decode()}"))
            self._take_event(token, every=True)

    def _take_event(self, token: bytes, *, every: bool = False) -> Event | None:
        """The oldest event of ``token`` already received (or, with ``every``, drop them all)."""
        with self._lock:
            if every:
                self.events = deque(e for e in self.events if e.token != token)
                return None
            for i, event in enumerate(self.events):
                if event.token == token:
                    del self.events[i]
                    return event
            return None

    def _next_event(self, token: bytes, timeout: float) -> Event | None:
        """The oldest event of ``token``, waiting up to ``timeout``; what has already arrived
        on the socket is read even with no time to wait (a caller polling with 0, as the
        xen backend's flusher looks for the host's return, would see nothing else)."""
        with self._lock:
            deadline = self.clock.monotonic() + timeout
            polled = False
            while True:
                event = self._take_event(token)
                if event is not None:
                    return event
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0 and polled:
                    return None
                polled = True
                self.pump(max(remaining, 0.0))

    # -- transactions -------------------------------------------------------------------------

    def transaction(self, body: Callable[[int], T], *, attempts: int = 16) -> T:
        """Run ``body(tx)`` in a transaction, again from the start on EAGAIN (bounded); an
        exception in ``body`` aborts it (best effort) and propagates."""
        with self._lock:
            for _attempt in range(attempts):
                untrusted_id = self.call(XS.TRANSACTION_START, NUL, what="transaction start")
                try:
                    tx = int(untrusted_id.rstrip(NUL).decode("ascii"), 10)
                except (ValueError, UnicodeDecodeError):
                    raise XsConnectionLost(
                        f"xenstore gave transaction id {untrusted_id[:20]!r}") from None
                try:
                    result = body(tx)
                except BaseException:
                    try:
                        self._end(tx, commit=False)
                    except XenStoreError:
                        log.debug("abort of transaction %d failed", tx, exc_info=True)
                    raise
                try:
                    self._end(tx, commit=True)
                except XsError as exc:
                    if exc.name == "EAGAIN":
                        continue
                    raise
                return result
        raise XsError("EAGAIN", f"transaction still conflicting after {attempts} attempts")

    def _end(self, tx: int, *, commit: bool) -> None:
        self.call(XS.TRANSACTION_END, (b"T" if commit else b"F") + NUL,
                  what="transaction end", tx=tx)


def _bytes(path: PathLike) -> bytes:
    return path if isinstance(path, bytes) else path.encode()


def _path(path: PathLike) -> bytes:
    raw = _bytes(path)
    if not _PATH_RE.fullmatch(raw) or b"//" in raw or (len(raw) > 1 and raw.endswith(b"/")):
        raise ValueError(f"{raw[:60]!r} is not a xenstore path")
    return raw


def _check_value(value: bytes) -> None:
    if not _VALUE_RE.fullmatch(value):
        raise ValueError("xenstore values written here are printable ASCII without newlines")


def _ack(payload: bytes) -> None:
    if payload.rstrip(NUL) != b"OK":
        raise XsConnectionLost(f"xenstore answered {payload[:20]!r} instead of OK")


def _error_name(packet: Packet) -> str:
    return packet.payload.rstrip(NUL).decode("ascii", "replace")[:32] or "EINVAL"


def _log_refusal(what: str, name: str) -> None:
    level = logging.DEBUG if name == "ENOENT" else logging.WARNING
    log.log(level, "xenstore refused %s: %s", what, name)


def default_xenstore(socket_path: Path | None, xenbus_dev: Path) -> dict[str, Path]:
    """The guest's keyword for :class:`XsSession`: a configured socket wins over the device."""
    if socket_path is not None:
        return {"socket_path": socket_path}
    return {"xenbus_path": xenbus_dev}
