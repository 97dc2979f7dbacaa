"""A synchronous xenstore connection: one thread, no router, every wait bounded.

It sends, then reads packets until the answer it waits for arrives, keeping the watch events
and the answers to *pipelined* requests it meets on the way.  That saves the two thread
hand-offs per request that a router-based client (pyxs) costs, which is most of a request's
price in Python.  Two users, both on the path every tmem op takes:

* the host service (:mod:`xentmem.hostd.service`), one loop, whose only client this is;
* the guest's message channel (:mod:`xentmem.guest.backends.xenfront`): the sender thread writes a
  request and waits for the reply's watch event itself, while the guest's pyxs session keeps
  everything else (the handshake, the state watch, transactions).

It speaks to a Unix socket (``XENSTORED_PATH``, else ``/var/run/xenstored/socket``) or to the
xenbus device (``/dev/xen/xenbus``), one message per ``write(2)`` and one request in flight
there, as Linux's device wants.  Framing comes from :mod:`xentmem.mock_xenstored.wire`.  Errors
reuse the guest adapter's classes (:class:`~xentmem.xenbus.xs.XsError` with the daemon's error
name, :class:`~xentmem.xenbus.xs.XsTimeout`, :class:`~xentmem.xenbus.xs.XsConnectionLost`).
Everything read is untrusted bytes.
"""

from __future__ import annotations

import logging
import os
import select
import socket
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, TypeVar

from xentmem.clock import SystemClock
from xentmem.mock_xenstored.wire import (
    NUL,
    OversizedPacket,
    Packet,
    PacketReader,
    XsOp,
    split_args,
)
from xentmem.xenbus.xs import XsConnectionLost, XsError, XsTimeout, run_transaction

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/xenstored/socket"
DEFAULT_XENBUS = "/dev/xen/xenbus"

T = TypeVar("T")
#: Called with (what, error name) when a pipelined request was refused.
ErrorSink = Callable[[str, str], None]


def default_xenstore_path() -> tuple[str, str]:
    """``("socket", path)`` or ``("device", path)``: where dom0 finds xenstore."""
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return "socket", env
    rundir = os.environ.get("XENSTORED_RUNDIR")
    if rundir:
        return "socket", os.path.join(rundir, "socket")
    for candidate in (DEFAULT_SOCKET, "/run/xenstored/socket"):
        if Path(candidate).exists():
            return "socket", candidate
    return "device", DEFAULT_XENBUS


class XsConn:
    """A synchronous xenstore client with pipelining and buffered watch events."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: bool = False,
        timeout: float = 5.0,
        on_error: ErrorSink | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self.path = os.fspath(path)
        self.device = device
        self.timeout = timeout
        self.clock = SystemClock()
        self.events: deque[tuple[bytes, bytes]] = deque()
        self.on_error = on_error or _log_refusal
        self._sock: socket.socket | None = None
        self._fd = -1
        self._reader = PacketReader()
        self._next_id = 0
        self._pipelined: dict[int, str] = {}
        self._out: list[tuple[int, bytes]] = []
        #: Requests written and not yet answered.
        self._unanswered: set[int] = set()
        self._answers: dict[int, Packet] = {}
        self.refused = 0

    # -- life cycle -----------------------------------------------------------------------------

    def open(self) -> XsConn:
        try:
            if self.device:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                self._sock = sock
                self._fd = sock.fileno()
        except OSError as exc:
            raise XsConnectionLost(
                f"cannot connect to xenstore at {self.path}: {exc.strerror or exc}"
            ) from None
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._sock = None
        self._fd = -1

    def __enter__(self) -> XsConn:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    # -- the wire -------------------------------------------------------------------------------

    def _send(self, op: XsOp, payload: bytes, tx: int, *, buffered: bool = False) -> int:
        if self._fd < 0:
            raise XsConnectionLost(f"xenstore connection to {self.path} is closed")
        self._next_id = (self._next_id % 0xFFFFFFFE) + 1
        self._out.append((self._next_id, Packet(int(op), self._next_id, tx, payload).encode()))
        if not buffered:
            self.flush()
        return self._next_id

    def flush(self) -> None:
        """Write every buffered request: in one go on a socket; on the xenbus device one per
        write(2), each after the one before it is answered (the kernel takes one message per
        write and keeps a queued request in the file's single buffer until it is sent)."""
        if not self._out:
            return
        out, self._out = self._out, []
        try:
            if self._sock is not None:
                self._sock.sendall(b"".join(frame for _, frame in out))
                self._unanswered.update(req_id for req_id, _ in out)
                return
            for req_id, frame in out:
                self._wait_answered()
                if os.write(self._fd, frame) != len(frame):
                    raise OSError(f"short write of a {len(frame)}-byte message")
                self._unanswered.add(req_id)
        except OSError as exc:
            self.close()
            raise XsConnectionLost(f"writing to xenstore at {self.path}: {exc}") from None

    def _wait_answered(self) -> None:
        """Device only: wait (bounded) until no request is in flight."""
        deadline = self.clock.monotonic() + self.timeout
        while self._unanswered:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise XsTimeout(f"no answer from xenstore at {self.path} within "
                                f"{self.timeout:g}s")
            self.pump(remaining)

    def pump(self, timeout: float) -> bool:
        """Read what arrives within ``timeout`` and sort it; True if anything came."""
        if self._fd < 0:
            raise XsConnectionLost(f"xenstore connection to {self.path} is closed")
        readable, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
        if not readable:
            return False
        self.receive()
        return True

    def receive(self) -> None:
        """Read once, without waiting to be told the connection is readable (the caller's
        own ``select`` said so), and sort what came."""
        if self._fd < 0:
            raise XsConnectionLost(f"xenstore connection to {self.path} is closed")
        try:
            data = self._sock.recv(65536) if self._sock is not None else os.read(self._fd, 65536)
        except OSError as exc:
            self.close()
            raise XsConnectionLost(f"reading from xenstore at {self.path}: {exc}") from None
        if not data:
            self.close()
            raise XsConnectionLost(f"xenstore at {self.path} closed the connection")
        for item in self._reader.feed(data):
            if isinstance(item, OversizedPacket):
                self.close()
                raise XsConnectionLost(f"xenstore sent an oversized packet: {item}")
            self._sort(item)

    def _sort(self, packet: Packet) -> None:
        if packet.op != XsOp.WATCH_EVENT:
            self._unanswered.discard(packet.req_id)
        if packet.op == XsOp.WATCH_EVENT:
            args = split_args(packet.payload)
            if len(args) >= 2:
                self.events.append((args[0], args[1]))
            else:
                log.warning("malformed watch event %r ignored", packet.payload[:60])
            return
        what = self._pipelined.pop(packet.req_id, None)
        if what is not None:
            if packet.op == XsOp.ERROR:
                self.refused += 1
                self.on_error(what, _error_name(packet))
            return
        self._answers[packet.req_id] = packet

    def call(self, op: XsOp, payload: bytes, *, what: str, tx: int = 0) -> bytes:
        """Send and wait for the answer; XsError for an error reply."""
        req_id = self._send(op, payload, tx)
        deadline = self.clock.monotonic() + self.timeout
        while req_id not in self._answers:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise XsTimeout(
                    f"{what}: no answer from xenstore at {self.path} within {self.timeout:g}s"
                )
            self.pump(remaining)
        packet = self._answers.pop(req_id)
        if packet.op == XsOp.ERROR:
            raise XsError(_error_name(packet), what)
        if packet.op != op:
            raise XsConnectionLost(f"{what}: xenstore answered op {packet.op}")
        return packet.payload

    def post(self, op: XsOp, payload: bytes, *, what: str) -> None:
        """Queue a request without waiting; it leaves with the next :meth:`flush` (or any
        call), and a refusal is reported to ``on_error`` when it arrives."""
        req_id = self._send(op, payload, 0, buffered=True)
        self._pipelined[req_id] = what

    @property
    def outstanding(self) -> int:
        """Pipelined requests whose answers have not been read yet."""
        return len(self._pipelined)

    def drain(self) -> None:
        """Send what is buffered and sort whatever answers have arrived, without waiting."""
        self.flush()
        while self._fd >= 0 and (self._pipelined or self._unanswered) and self.pump(0):
            pass

    def settle(self, timeout: float | None = None) -> None:
        """Wait (bounded) until every pipelined request has been answered."""
        self.flush()
        deadline = self.clock.monotonic() + (self.timeout if timeout is None else timeout)
        while self._pipelined:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise XsTimeout(f"{len(self._pipelined)} pipelined requests unanswered")
            self.pump(remaining)

    # -- node operations ------------------------------------------------------------------------

    def read(self, path: str, *, tx: int = 0) -> bytes:
        return self.call(XsOp.READ, path.encode() + NUL, what=f"read {path}", tx=tx)

    def read_optional(self, path: str, *, tx: int = 0) -> bytes | None:
        try:
            return self.read(path, tx=tx)
        except XsError as exc:
            if exc.name == "ENOENT":
                return None
            raise

    def write(self, path: str, value: bytes, *, tx: int = 0) -> None:
        self._ok(self.call(XsOp.WRITE, path.encode() + NUL + value, what=f"write {path}", tx=tx))

    def post_write(self, path: str, value: bytes) -> None:
        self.post(XsOp.WRITE, path.encode() + NUL + value, what=f"write {path}")

    def post_read(self, path: str) -> int:
        """A pipelined read whose answer :meth:`collect` returns (sent at the next flush)."""
        return self._send(XsOp.READ, path.encode() + NUL, 0, buffered=True)

    def collect(self, req_id: int, *, what: str, deadline: float) -> bytes:
        self.flush()
        while req_id not in self._answers:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise XsTimeout(f"{what}: no answer from xenstore within {self.timeout:g}s")
            self.pump(remaining)
        packet = self._answers.pop(req_id)
        if packet.op == XsOp.ERROR:
            raise XsError(_error_name(packet), what)
        return packet.payload

    def post_rm(self, path: str) -> None:
        self.post(XsOp.RM, path.encode() + NUL, what=f"rm {path}")

    def mkdir(self, path: str, *, tx: int = 0) -> None:
        self._ok(self.call(XsOp.MKDIR, path.encode() + NUL, what=f"mkdir {path}", tx=tx))

    def rm(self, path: str, *, tx: int = 0) -> None:
        self._ok(self.call(XsOp.RM, path.encode() + NUL, what=f"rm {path}", tx=tx))

    def directory(self, path: str, *, tx: int = 0) -> list[bytes]:
        payload = self.call(XsOp.DIRECTORY, path.encode() + NUL, what=f"list {path}", tx=tx)
        return [name for name in payload.split(NUL) if name]

    def get_perms(self, path: str, *, tx: int = 0) -> list[bytes]:
        payload = self.call(XsOp.GET_PERMS, path.encode() + NUL, what=f"get-perms {path}", tx=tx)
        return [perm for perm in payload.split(NUL) if perm]

    def set_perms(self, path: str, perms: Iterable[str], *, tx: int = 0) -> None:
        body = b"".join(p.encode() + NUL for p in perms)
        self._ok(
            self.call(XsOp.SET_PERMS, path.encode() + NUL + body, what=f"set-perms {path}", tx=tx)
        )

    def watch(self, path: str, token: bytes) -> None:
        self._ok(self.call(XsOp.WATCH, path.encode() + NUL + token + NUL, what=f"watch {path}"))

    def unwatch(self, path: str, token: bytes) -> None:
        self._ok(self.call(XsOp.UNWATCH, path.encode() + NUL + token + NUL, what=f"unwatch {path}"))

    def is_domain_introduced(self, domid: int) -> bool:
        payload = self.call(
            XsOp.IS_DOMAIN_INTRODUCED,
            str(domid).encode() + NUL,
            what=f"is-domain-introduced {domid}",
        )
        return payload.rstrip(NUL) == b"T"

    def transaction(self, body: Callable[[int], T], *, attempts: int = 16) -> T:
        """Run ``body(tx)`` in a transaction; again from the start on EAGAIN (bounded)."""
        return run_transaction(
            lambda: self.call(XsOp.TRANSACTION_START, NUL, what="transaction start"),
            lambda tx, commit: self.call(XsOp.TRANSACTION_END, (b"T" if commit else b"F") + NUL,
                                         what="transaction end", tx=tx),
            body,
            attempts=attempts,
        )

    @staticmethod
    def _ok(payload: bytes) -> None:
        if payload.rstrip(NUL) != b"OK":
            raise XsConnectionLost(f"xenstore answered {payload[:20]!r} instead of OK")


def _error_name(packet: Packet) -> str:
    return packet.payload.rstrip(NUL).decode("ascii", "replace")[:32] or "EINVAL"


def _log_refusal(what: str, name: str) -> None:
    level = logging.DEBUG if name == "ENOENT" else logging.WARNING
    log.log(level, "xenstore refused %s: %s", what, name)
