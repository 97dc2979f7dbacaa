"""The stand-in xenstored's socket server: the real wire protocol over Unix sockets, one
socket per domain (a client's identity is the socket it connects to), with fault injection
for tests.  One thread serves every socket, one request at a time, like the real daemons.
How to run it and how identities work: docs/mock-xenstored.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Callable, NamedTuple

from xentmem.clock import Clock, SystemClock
from xentmem.mock_xenstored.args import (
    canonical_path,
    parse_domid,
    parse_perms,
    parse_unsigned,
)
from xentmem.mock_xenstored.faults import Faults, Malformation, malformed_bytes
from xentmem.mock_xenstored.perms import Access, Caller, PermEntry, Perms
from xentmem.mock_xenstored.store import (
    INTRODUCE_DOMAIN,
    RELEASE_DOMAIN,
    Change,
    Limits,
    Store,
    StoreError,
    Transaction,
    home_path,
)
from xentmem.mock_xenstored.wire import (
    NUL,
    XENSTORE_PAYLOAD_MAX,
    OversizedPacket,
    Packet,
    PacketReader,
    XsOp,
    error_reply,
    one_arg,
    split_args,
    split_write,
    watch_event,
)

__all__ = ["Faults", "Malformation", "XsServer", "guest_socket_name", "toolstack_nodes"]

log = logging.getLogger("xentmem.mock_xenstored.server")  # also under python -m

DOM0_SOCKET_NAME = "socket"
#: A peer that stops reading is dropped once this much output waits for it.
MAX_PENDING_OUTPUT = 16 << 20
RECV_CHUNK = 65536
#: Longest wait without anything to do; a stop request wakes the loop at once anyway.
IDLE_POLL_S = 1.0
#: Longest wait while delayed replies are queued.
DELAYED_POLL_S = 0.05

_PRIVILEGED_OPS = frozenset(
    {
        XsOp.CONTROL,
        XsOp.INTRODUCE,
        XsOp.RELEASE,
        XsOp.IS_DOMAIN_INTRODUCED,
        XsOp.RESUME,
        XsOp.SET_TARGET,
    }
)
_NO_TRANSACTION_OPS = frozenset({XsOp.WATCH, XsOp.UNWATCH})
#: What the selector holds for the socket that wakes the loop.
_WAKER = "waker"


def guest_socket_name(domid: int) -> str:
    return f"domain-{domid}.sock"


def toolstack_nodes(domid: int, name: str | None = None) -> list[tuple[str, bytes, Perms]]:
    """The part of a guest's home that a toolstack (libxl) creates when it builds a domain,
    as measured in a real PV domU: the home and ``device/``, ``memory/``, ``control/`` are
    dom0's and the guest may only read them; ``data/`` is the guest's own.  Parents come
    before children.  Xenstored itself creates none of this."""
    guest_reads = Perms((PermEntry(0, Access.NONE), PermEntry(domid, Access.READ)))
    home = home_path(domid)
    return [
        (home, b"", guest_reads),
        (f"{home}/name", (name or f"guest-{domid}").encode("ascii"), guest_reads),
        (f"{home}/domid", str(domid).encode("ascii"), guest_reads),
        (f"{home}/device", b"", guest_reads),
        (f"{home}/memory", b"", guest_reads),
        (f"{home}/control", b"", guest_reads),
        (f"{home}/data", b"", Perms.of(domid)),
    ]


@dataclass
class _Domain:
    domid: int
    listener: socket.socket | None = None
    socket_path: Path | None = None
    #: Who this domain's requests come from (made once, not per request; SET_TARGET
    #: replaces it).
    caller: Caller = field(init=False)

    def __post_init__(self) -> None:
        self.set_target(None)

    def set_target(self, target: int | None) -> None:
        self.caller = Caller(self.domid, privileged=self.domid == 0, target=target)


@dataclass
class _Watch:
    path: str  # absolute, or @special
    token: bytes
    relative: bool  # the client gave a relative path: events come back relative


class _Connection:
    """One client socket and everything xenstored keeps per connection."""

    def __init__(self, sock: socket.socket, domid: int, limits: Limits) -> None:
        self.sock = sock
        self.domid = domid
        self.reader = PacketReader(skip_oversized=limits.oversized == "E2BIG")
        self.out = bytearray()
        #: What the selector watches this socket for (kept here: asking it costs more).
        self.events = selectors.EVENT_READ
        self.delayed: deque[tuple[float, bytes]] = deque()
        self.watches: list[_Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.next_tx_id = 1
        self.closing = False  # flush what is queued, then close
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()


class _Request(NamedTuple):
    """What a handler needs: who asks, on which connection, in which transaction."""

    conn: _Connection
    caller: Caller
    tx: Transaction | None
    untrusted: bytes


class XsServer:
    """The server.  ``with XsServer(dir) as server:`` starts it and stops it cleanly."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        limits: Limits | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.limits = limits or Limits.c_xenstored()
        self.clock = clock or SystemClock()
        self.dom0_socket = self.directory / DOM0_SOCKET_NAME
        self._lock = threading.RLock()
        self._handled = threading.Condition(self._lock)
        self._requests_seen = 0
        self._store = Store(self.limits)
        self._domains: dict[int, _Domain] = {0: _Domain(0)}
        self._connections: list[_Connection] = []
        self._selector: selectors.BaseSelector | None = None
        self._pending_listeners: list[_Domain] = []
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dom0_listener: socket.socket | None = None
        self.faults = Faults(self._lock, self._wake)
        #: Requests handled, by op name (for tests and the demo).
        self.stats: dict[str, int] = {}

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> XsServer:
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("a server starts once; make a new one")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dom0_listener = self._listen(self.dom0_socket)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._waker_r, selectors.EVENT_READ, _WAKER)
        self._selector.register(self._dom0_listener, selectors.EVENT_READ, self._domains[0])
        self._thread = threading.Thread(target=self._run, name="xsserver", daemon=True)
        self._thread.start()
        log.info("xenstore server on %s (%s limits)", self.dom0_socket, self.limits.flavour)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every socket and remove the socket files."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"xenstore server did not stop within {timeout} s")
        self._thread = None
        with self._lock:
            for conn in list(self._connections):
                self._close(conn)
            for domain in self._domains.values():
                self._close_listener(domain)
            if self._dom0_listener is not None:
                self._dom0_listener.close()
                self._dom0_listener = None
                with contextlib.suppress(FileNotFoundError):
                    self.dom0_socket.unlink()
            if self._selector is not None:
                self._selector.close()
                self._selector = None
        self._waker_r.close()
        self._waker_w.close()

    def __enter__(self) -> XsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the in-process API (any thread) -----------------------------------------------

    def guest_socket(self, domid: int) -> Path:
        """Where a client is guest ``domid`` (whether or not it is introduced yet)."""
        return self.directory / guest_socket_name(domid)

    def introduce_domain(self, domid: int) -> Path:
        """What dom0's ``INTRODUCE`` does; returns the guest socket."""
        with self._lock:
            self._introduce(domid)
        self._wake()
        return self.guest_socket(domid)

    def release_domain(self, domid: int) -> None:
        """What dom0's ``RELEASE`` does."""
        with self._lock:
            self._release(domid)
        self._wake()

    def destroy_domain(self, domid: int) -> None:
        """The domain dies: xenstored notices (VIRQ_DOM_EXC) and cleans up as for RELEASE."""
        self.release_domain(domid)

    def is_introduced(self, domid: int) -> bool:
        with self._lock:
            return domid in self._domains

    def prepare_domain(self, domid: int, name: str | None = None) -> Path:
        """Create the guest's home as a toolstack would (:func:`toolstack_nodes`), then
        introduce it; returns the guest socket."""
        dom0 = Caller.dom0()
        with self._lock:
            for path, value, perms in toolstack_nodes(domid, name):
                self._store.write(dom0, path, value)
                self._store.set_perms(dom0, path, perms)
            self._fire(self._store.take_changes())
            self._introduce(domid)
        self._wake()
        return self.guest_socket(domid)

    def snapshot(self) -> dict[str, tuple[bytes, str]]:
        """Every node as ``path -> (value, "n0 r5 ...")``: for assertions and debugging."""
        with self._lock:
            out = {}
            for path in self._store.paths():
                node = self._store.get(path)
                assert node is not None
                out[path] = (node.value, str(node.perms))
            return out

    @property
    def requests_seen(self) -> int:
        """Requests read so far, swallowed ones included."""
        with self._lock:
            return self._requests_seen

    def wait_requests_seen(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` requests have been read (a test's sync point, e.g. to know
        that muted requests were swallowed); False on timeout."""
        with self._handled:
            return self._handled.wait_for(lambda: self._requests_seen >= count, timeout)

    def watch_count(self, domid: int) -> int:
        """Watches registered by ``domid``'s connections (to check clean-up in tests)."""
        with self._lock:
            return self._watch_count(domid)

    def wait_watch_count(self, domid: int, count: int, timeout: float) -> bool:
        """Wait until ``domid``'s connections hold ``count`` watches (closed connections
        are noticed by the loop, not at once); False on timeout."""
        with self._handled:
            return self._handled.wait_for(lambda: self._watch_count(domid) == count, timeout)

    def _watch_count(self, domid: int) -> int:
        return sum(len(c.watches) for c in self._connections if c.domid == domid)

    # -- the loop ----------------------------------------------------------------------

    def _listen(self, path: Path) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._waker_w.send(b"x")

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._stop.is_set():
                ready = self._selector.select(self._next_timeout())
                with self._lock:
                    for key, mask in ready:
                        self._on_ready(key, mask)
                    self._release_due()
                    self._sync_selector()
                    self._handled.notify_all()
        except Exception:  # the loop must not die silently: log, then stop serving
            log.exception("xenstore server loop crashed")
            self._stop.set()

    def _next_timeout(self) -> float:
        with self._lock:
            dues = [c.delayed[0][0] for c in self._connections if c.delayed]
        if not dues:
            return IDLE_POLL_S
        # Poll often while replies are held back: the clock may be a test's FakeClock,
        # which jumps without waking anybody.
        return max(0.0, min(min(dues) - self.clock.monotonic(), DELAYED_POLL_S))

    def _on_ready(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == _WAKER:
            with contextlib.suppress(BlockingIOError):
                while self._waker_r.recv(4096):
                    pass
            return
        if isinstance(key.data, _Domain):
            self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
            return
        conn: _Connection = key.data
        if conn.closed:
            return
        if mask & selectors.EVENT_READ:
            self._on_readable(conn)
        if not conn.closed and mask & selectors.EVENT_WRITE:
            self._flush(conn)

    def _accept(self, listener: socket.socket, domain: _Domain) -> None:
        try:
            sock, _ = listener.accept()
        except OSError:  # BlockingIOError, or a listener closed meanwhile
            return
        if domain.domid not in self._domains:
            sock.close()
            return
        sock.setblocking(False)
        conn = _Connection(sock, domain.domid, self.limits)
        self._connections.append(conn)
        assert self._selector is not None
        self._selector.register(sock, conn.events, conn)

    def _sync_selector(self) -> None:
        """Register new listeners; send what waits on each connection, close those done
        closing, and watch the others for writability while output is left."""
        assert self._selector is not None
        for domain in self._pending_listeners:
            if domain.listener is not None and domain.domid in self._domains:
                self._selector.register(domain.listener, selectors.EVENT_READ, domain)
        self._pending_listeners.clear()
        for conn in list(self._connections):
            if conn.closed:
                continue
            if conn.out:
                self._flush(conn)
            if conn.closed:
                continue
            if conn.closing and not conn.out and not conn.delayed:
                self._close(conn)
                continue
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
            if conn.events != want:
                self._selector.modify(conn.sock, want, conn)
                conn.events = want

    def _on_readable(self, conn: _Connection) -> None:
        try:
            untrusted_data = conn.sock.recv(RECV_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not untrusted_data:
            self._close(conn)
            return
        for item in conn.reader.feed(untrusted_data):
            if conn.closed or conn.closing:
                return
            if isinstance(item, OversizedPacket):
                self._on_oversized(conn, item)
            else:
                self._handle(conn, item)

    def _on_oversized(self, conn: _Connection, item: OversizedPacket) -> None:
        if self.limits.oversized == "E2BIG":
            self._send(conn, error_reply("E2BIG", item.header.req_id, item.header.tx_id))
        else:
            log.warning(
                "domain %d tried to feed us %d bytes: dropped", conn.domid, item.header.length
            )
            self._close(conn)

    def _flush(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        conn.sock.close()
        with contextlib.suppress(ValueError):
            self._connections.remove(conn)
        for tx in conn.transactions.values():
            tx.abort()

    def _close_listener(self, domain: _Domain) -> None:
        if domain.listener is None:
            return
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(domain.listener)
        domain.listener.close()
        domain.listener = None
        if domain.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                domain.socket_path.unlink()

    # -- output, with faults -----------------------------------------------------------

    def _send(self, conn: _Connection, packet: Packet) -> None:
        """Queue ``packet`` for ``conn``, unless faults swallow, spoil or delay it."""
        if conn.domid in self.faults.muted:
            return
        if packet.op == XsOp.WATCH_EVENT and len(packet.payload) > XENSTORE_PAYLOAD_MAX:
            # C xenstored's add_event(): "Don't try to send over-long events."
            log.debug("event of %d bytes for domain %d dropped", len(packet.payload), conn.domid)
            return
        kind = None if packet.op == XsOp.WATCH_EVENT else self.faults.next_malformation(conn.domid)
        if kind is None:
            data = packet.encode()
        else:
            log.info("fault: %s reply to domain %d", kind.value, conn.domid)
            data = malformed_bytes(packet, kind)
            if data is None:  # Malformation.CLOSE
                conn.closing = True
                return
        delay = self.faults.delays.get(conn.domid)
        if delay:
            conn.delayed.append((self.clock.monotonic() + delay, data))
        elif conn.delayed:  # keep order behind what is held back
            conn.delayed.append((conn.delayed[-1][0], data))
        else:
            self._queue(conn, data)

    def _queue(self, conn: _Connection, data: bytes) -> None:
        conn.out += data
        if len(conn.out) > MAX_PENDING_OUTPUT:
            log.warning("domain %d does not read its replies: dropped", conn.domid)
            self._close(conn)

    def _release_due(self) -> None:
        now = self.clock.monotonic()
        for conn in list(self._connections):
            while conn.delayed and conn.delayed[0][0] <= now:
                self._queue(conn, conn.delayed.popleft()[1])

    # -- requests ----------------------------------------------------------------------

    def _caller(self, conn: _Connection) -> Caller:
        domain = self._domains.get(conn.domid)
        if domain is None:  # released: its connections are closed with it
            return Caller(conn.domid, privileged=conn.domid == 0)
        return domain.caller

    def _handle(self, conn: _Connection, request: Packet) -> None:
        self._requests_seen += 1
        op_name = request.op_name
        if conn.domid in self.faults.muted:
            log.debug("fault: swallowed %s from domain %d", op_name, conn.domid)
            return
        self.stats[op_name] = self.stats.get(op_name, 0) + 1
        try:
            reply = Packet(request.op, request.req_id, request.tx_id,
                           self._dispatch(conn, request))
        except StoreError as e:
            reply = error_reply(e.name, request.req_id, request.tx_id)
        changes = self._store.take_changes()
        if len(reply.payload) > XENSTORE_PAYLOAD_MAX:
            reply = error_reply("E2BIG", request.req_id, request.tx_id)
        self._send(conn, reply)
        self._fire(changes)
        if request.op == XsOp.WATCH and reply.op == XsOp.WATCH:
            self._initial_event(conn)

    def _dispatch(self, conn: _Connection, request: Packet) -> bytes:
        """The reply's payload, or :class:`StoreError`."""
        # An IntEnum is its int: the tables are looked up with the wire's number as it is.
        handler = self._handlers.get(request.op)
        if handler is None:
            raise StoreError("ENOSYS", f"{request.op_name} is not a request")
        caller = self._caller(conn)
        if request.op in _PRIVILEGED_OPS and not caller.privileged:
            raise StoreError("EACCES", f"{request.op_name} is for dom0")
        tx: Transaction | None = None
        if request.op not in _NO_TRANSACTION_OPS and request.tx_id:
            tx = conn.transactions.get(request.tx_id)
            if tx is None:
                raise StoreError("ENOENT", f"no transaction {request.tx_id}")
        return handler(self, _Request(conn, caller, tx, request.payload))

    def _path(self, caller: Caller, untrusted_arg: bytes | None) -> str:
        if untrusted_arg is None:
            raise StoreError("EINVAL", "expected exactly one argument")
        path = canonical_path(untrusted_arg, caller, self.limits)
        if path.startswith("@"):
            raise StoreError("EINVAL", f"{path} is not a node")
        return path

    def _view(self, tx: Transaction | None) -> Store | Transaction:
        return tx if tx is not None else self._store

    def _op_read(self, req: _Request) -> bytes:
        return self._view(req.tx).read(req.caller, self._path(req.caller, one_arg(req.untrusted)))

    def _op_directory(self, req: _Request) -> bytes:
        names = self._view(req.tx).directory(
            req.caller, self._path(req.caller, one_arg(req.untrusted))
        )
        return b"".join(n.encode("ascii") + NUL for n in names)

    def _op_directory_part(self, req: _Request) -> bytes:
        """C xenstored's DIRECTORY_PART: ``<generation>\\0`` then as many child names from
        ``offset`` (a byte offset into the child list) as fit; a final empty string marks
        the end of the list."""
        args = split_args(req.untrusted)
        if len(args) != 2:
            raise StoreError("EINVAL", "DIRECTORY_PART takes a path and an offset")
        path = self._path(req.caller, args[0])
        offset = parse_unsigned(args[1])
        view = self._view(req.tx)
        node = view.get_node(req.caller, path, Access.READ)
        children = b"".join(n.encode("ascii") + NUL for n in node.children)
        generation = str(node.generation).encode("ascii") + NUL
        if offset >= len(children):
            return generation + NUL
        room = XENSTORE_PAYLOAD_MAX - len(generation) - 1
        chunk_end = offset
        for name_end in range(offset, len(children)):
            if children[name_end] == 0:
                if name_end + 1 - offset > room:
                    break
                chunk_end = name_end + 1
        chunk = children[offset:chunk_end]
        if chunk_end == len(children):
            chunk += NUL
        return generation + chunk

    def _op_get_perms(self, req: _Request) -> bytes:
        perms = self._view(req.tx).get_perms(
            req.caller, self._path(req.caller, one_arg(req.untrusted))
        )
        return b"".join(p + NUL for p in perms.encode())

    def _op_write(self, req: _Request) -> bytes:
        parts = split_write(req.untrusted)
        if parts is None:
            raise StoreError("EINVAL", "WRITE needs path\\0value")
        untrusted_path, untrusted_value = parts
        self._view(req.tx).write(
            req.caller, self._path(req.caller, untrusted_path), untrusted_value
        )
        return b"OK\0"

    def _op_mkdir(self, req: _Request) -> bytes:
        self._view(req.tx).mkdir(req.caller, self._path(req.caller, one_arg(req.untrusted)))
        return b"OK\0"

    def _op_rm(self, req: _Request) -> bytes:
        self._view(req.tx).rm(req.caller, self._path(req.caller, one_arg(req.untrusted)))
        return b"OK\0"

    def _op_set_perms(self, req: _Request) -> bytes:
        args = split_args(req.untrusted)
        if len(args) < 2:
            raise StoreError("EINVAL", "SET_PERMS needs a path and at least one permission")
        perms = parse_perms(args[1:])
        path = canonical_path(args[0], req.caller, self.limits)
        if path.startswith("@"):
            self._store.set_special_perms(req.caller, path, perms)
        else:
            self._view(req.tx).set_perms(req.caller, path, perms)
        return b"OK\0"

    def _watch_args(self, caller: Caller, untrusted: bytes) -> tuple[str, bytes, bool]:
        args = split_args(untrusted)
        if len(args) != 2:
            raise StoreError("EINVAL", "WATCH/UNWATCH take a path and a token")
        path = canonical_path(args[0], caller, self.limits)
        relative = not args[0].startswith((b"/", b"@"))
        return path, args[1], relative

    def _op_watch(self, req: _Request) -> bytes:
        path, token, relative = self._watch_args(req.caller, req.untrusted)
        if any(w.path == path and w.token == token for w in req.conn.watches):
            raise StoreError("EEXIST", "this watch exists")
        limit = self.limits.max_watches_per_domain
        if not req.caller.privileged and limit is not None and len(req.conn.watches) > limit:
            raise StoreError(self.limits.watch_quota_error, f"more than {limit} watches")
        req.conn.watches.append(_Watch(path, token, relative))
        return b"OK\0"

    def _initial_event(self, conn: _Connection) -> None:
        """Every daemon fires a new watch once, on registration, whatever the permissions."""
        watch = conn.watches[-1]
        self._send_event(conn, watch, watch.path)

    def _send_event(self, conn: _Connection, watch: _Watch, path: str) -> None:
        self._send(conn, watch_event(self._event_path_for(conn, watch, path), watch.token))

    def _op_unwatch(self, req: _Request) -> bytes:
        path, token, _ = self._watch_args(req.caller, req.untrusted)
        for watch in req.conn.watches:
            if watch.path == path and watch.token == token:
                req.conn.watches.remove(watch)
                return b"OK\0"
        raise StoreError("ENOENT", "no such watch")

    def _op_reset_watches(self, req: _Request) -> bytes:
        req.conn.watches.clear()
        for open_tx in req.conn.transactions.values():
            open_tx.abort()
        req.conn.transactions.clear()
        return b"OK\0"

    def _op_transaction_start(self, req: _Request) -> bytes:
        if req.tx is not None:
            raise StoreError("EBUSY", "already in a transaction")
        limit = self.limits.max_transactions_per_domain
        if not req.caller.privileged and limit is not None and len(req.conn.transactions) > limit:
            raise StoreError(self.limits.quota_error, f"more than {limit} transactions")
        tx_id = req.conn.next_tx_id
        req.conn.next_tx_id = tx_id + 1 if tx_id < 0xFFFFFFFF else 1
        req.conn.transactions[tx_id] = self._store.begin()
        return str(tx_id).encode("ascii") + NUL

    def _op_transaction_end(self, req: _Request) -> bytes:
        if req.tx is None:
            raise StoreError("ENOENT", "not in a transaction")
        verdict = one_arg(req.untrusted)
        if verdict not in (b"T", b"F"):
            raise StoreError("EINVAL", "TRANSACTION_END takes T or F")
        for tx_id, open_tx in list(req.conn.transactions.items()):
            if open_tx is req.tx:
                del req.conn.transactions[tx_id]
        if verdict == b"T":
            req.tx.commit()
        else:
            req.tx.abort()
        return b"OK\0"

    def _op_get_domain_path(self, req: _Request) -> bytes:
        arg = one_arg(req.untrusted)
        if arg is None:
            raise StoreError("EINVAL", "GET_DOMAIN_PATH takes a domid")
        return home_path(parse_domid(arg)).encode("ascii") + NUL

    def _op_introduce(self, req: _Request) -> bytes:
        args = split_args(req.untrusted)
        if len(args) != 3:
            raise StoreError("EINVAL", "INTRODUCE takes domid, mfn and port")
        domid = parse_domid(args[0])
        parse_unsigned(args[1])
        parse_unsigned(args[2])
        self._introduce(domid)
        return b"OK\0"

    def _op_release(self, req: _Request) -> bytes:
        self._release(self._domid_arg(req.untrusted))
        return b"OK\0"

    def _op_resume(self, req: _Request) -> bytes:
        if self._domid_arg(req.untrusted) not in self._domains:
            raise StoreError("ENOENT", "domain not introduced")
        return b"OK\0"

    def _op_is_domain_introduced(self, req: _Request) -> bytes:
        return b"T\0" if self._domid_arg(req.untrusted) in self._domains else b"F\0"

    def _op_set_target(self, req: _Request) -> bytes:
        args = split_args(req.untrusted)
        if len(args) != 2:
            raise StoreError("EINVAL", "SET_TARGET takes domid and target")
        domid, target = parse_domid(args[0]), parse_domid(args[1])
        if domid not in self._domains or target not in self._domains:
            raise StoreError("ENOENT", "both domains must be introduced")
        self._domains[domid].set_target(target)
        return b"OK\0"

    def _op_control(self, req: _Request) -> bytes:
        args = split_args(req.untrusted)
        if args[:1] == [b"print"] and len(args) == 2:
            log.info("xenstore debug: %s", args[1].decode("ascii", "replace"))
            return b"OK\0"
        if args == [b"check"]:
            return b"OK\0"
        raise StoreError("EINVAL", "CONTROL knows print and check")

    def _domid_arg(self, untrusted: bytes) -> int:
        arg = one_arg(untrusted)
        if arg is None:
            raise StoreError("EINVAL", "expected a domid")
        return parse_domid(arg)

    #: What each request op does.
    _handlers: dict[XsOp, Callable[[XsServer, _Request], bytes]] = {
        XsOp.CONTROL: _op_control,
        XsOp.DIRECTORY: _op_directory,
        XsOp.READ: _op_read,
        XsOp.GET_PERMS: _op_get_perms,
        XsOp.WATCH: _op_watch,
        XsOp.UNWATCH: _op_unwatch,
        XsOp.TRANSACTION_START: _op_transaction_start,
        XsOp.TRANSACTION_END: _op_transaction_end,
        XsOp.INTRODUCE: _op_introduce,
        XsOp.RELEASE: _op_release,
        XsOp.GET_DOMAIN_PATH: _op_get_domain_path,
        XsOp.WRITE: _op_write,
        XsOp.MKDIR: _op_mkdir,
        XsOp.RM: _op_rm,
        XsOp.SET_PERMS: _op_set_perms,
        XsOp.IS_DOMAIN_INTRODUCED: _op_is_domain_introduced,
        XsOp.RESUME: _op_resume,
        XsOp.SET_TARGET: _op_set_target,
        XsOp.RESET_WATCHES: _op_reset_watches,
        XsOp.DIRECTORY_PART: _op_directory_part,
    }

    # -- domains and watches -----------------------------------------------------------

    def _introduce(self, domid: int) -> None:
        if domid in self._domains:
            return  # re-introducing is fine and fires nothing
        domain = _Domain(domid, socket_path=self.guest_socket(domid))
        domain.listener = self._listen(domain.socket_path)  # type: ignore[arg-type]
        self._domains[domid] = domain
        self._pending_listeners.append(domain)
        self._fire([self._store.special_change(INTRODUCE_DOMAIN)])

    def _release(self, domid: int) -> None:
        if domid == 0:
            raise StoreError("EINVAL", "dom0 cannot be released")
        domain = self._domains.pop(domid, None)
        if domain is None:
            raise StoreError("ENOENT", f"domain {domid} is not introduced")
        self._close_listener(domain)
        for conn in [c for c in self._connections if c.domid == domid]:
            self._close(conn)
        for other in self._domains.values():
            if other.caller.target == domid:
                other.set_target(None)
        self._store.remove_domain_nodes(domid)
        self._fire(self._store.take_changes())
        self._fire([self._store.special_change(RELEASE_DOMAIN)])

    def _fire(self, changes: Sequence[Change]) -> None:
        """Send each connection an event per watch a change fires, if it may see it."""
        if not changes:  # a read
            return
        # A removal notes every node below the removed one as an exact change, which fires
        # only a watch on its very path: a connection watching none of those paths is not
        # tried against them (a bulk removal of a few dozen nodes, one watch on the top).
        exact_paths = {change.path for change in changes if change.exact}
        broad = [change for change in changes if not change.exact] if exact_paths else changes
        for conn in list(self._connections):
            if conn.closed or not conn.watches:
                continue
            caller = self._caller(conn)
            watched_exactly = exact_paths and any(
                watch.path in exact_paths for watch in conn.watches)
            for change in changes if watched_exactly else broad:
                for watch in conn.watches:
                    if change.fires(watch.path) and change.visible_to(caller):
                        self._send_event(conn, watch, change.path)

    def _event_path_for(self, conn: _Connection, watch: _Watch, path: str) -> bytes:
        if watch.relative:
            home = home_path(conn.domid)
            if path.startswith(home + "/"):
                path = path[len(home) + 1 :]
        return path.encode("ascii")
