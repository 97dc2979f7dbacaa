"""A xenstore server of our own: the mocked hypervisor's xenstored, on Unix sockets.

It speaks the real wire protocol (:mod:`xentmem.mock_xenstored.wire`) over the store in
:mod:`xentmem.mock_xenstored.store`,
so pyxs's ``Client(unix_socket_path=...)`` and our own code talk
to it exactly as they would to Xen's daemons.  Identity comes from the socket a client
connects to, the way a real guest is identified by its ring:

* ``<dir>/socket`` is dom0's: privileged, every permission check passes.
* When dom0 sends ``INTRODUCE <domid> <mfn> <port>`` (or the test calls
  :meth:`XsServer.introduce_domain`), the server opens ``<dir>/domain-<domid>.sock``.  Every
  connection there *is* that guest domain: unprivileged, with C xenstored's permission
  rules, quotas and watch filtering.  Unlike a ring, several connections may share it.
* ``RELEASE`` (or :meth:`XsServer.destroy_domain`, the domain dying) closes those
  connections, removes the socket, deletes the nodes the domain owned and fires
  ``@releaseDomain``; ``SET_TARGET`` lets one domain act as another (a device model).

One thread runs an epoll loop over all sockets and handles requests one at a time, like
the real daemons, so their order is the order they arrived in.  Methods called from other
threads take the same lock.  Nothing blocks without a timeout.

Fault injection for tests (:class:`Faults`, at ``server.faults``): make the server swallow a
domain's requests (``mute``), hold back its replies and events (``delay``), or mangle its
next replies (``malform_next`` with a :class:`Malformation`).

Run it by hand as a local "Xen host"::

    python -m xentmem.mock_xenstored --dir /tmp/xs --domain 5
    XENSTORED_PATH=/tmp/xs/socket xenstore-ls -p /           # Debian's xenstore-utils
    python -c 'import pyxs; c = pyxs.Client(unix_socket_path="/tmp/xs/domain-5.sock"); \\
        c.connect(); print(c.read(b"name"))'                  # as guest domain 5

It prints ``XENSTORED_PATH=...`` and one ``DOMAIN_<id>_SOCKET=...`` per ``--domain``, then
serves until SIGINT or SIGTERM.  ``--flavour oxenstored`` applies oxenstored's limits
(2048-byte values, ``EQUOTA``, ``E2BIG`` for oversized requests).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import socket
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Callable, NamedTuple, Union

from xentmem.clock import Clock, SystemClock
from xentmem.mock_xenstored.store import (
    INTRODUCE_DOMAIN,
    RELEASE_DOMAIN,
    Access,
    Caller,
    Change,
    Limits,
    PermEntry,
    Perms,
    Store,
    StoreError,
    Transaction,
    canonical_path,
    home_path,
    parse_domid,
    parse_perms,
    parse_unsigned,
)
from xentmem.mock_xenstored.wire import (
    NUL,
    XENSTORE_PAYLOAD_MAX,
    OversizedPacket,
    Packet,
    PacketReader,
    XsOp,
    encode_packet,
    error_reply,
    one_arg,
    op_name,
    split_args,
    split_write,
)

log = logging.getLogger("xentmem.mock_xenstored.server")  # also under python -m

DOM0_SOCKET_NAME = "socket"
#: A peer that stops reading is dropped once this much output waits for it.
MAX_PENDING_OUTPUT = 16 << 20
RECV_CHUNK = 65536
#: Longest poll without anything to do; a stop request wakes the loop at once anyway.
IDLE_POLL_S = 1.0
#: Longest poll while delayed replies are queued.
DELAYED_POLL_S = 0.05


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


class Malformation(enum.Enum):
    """Ways :class:`Faults` can spoil a reply, each a trap a careful client must survive."""

    #: The reply echoes a request id the client never used (pyxs's router thread dies).
    WRONG_REQ_ID = "wrong-req-id"
    #: The reply carries another op code than the request's.
    WRONG_OP = "wrong-op"
    #: An ERROR reply with a name no daemon sends.
    UNKNOWN_ERROR = "unknown-error"
    #: The payload is replaced by bytes that are not ASCII.
    GARBAGE_PAYLOAD = "garbage-payload"
    #: The header announces more payload than follows; the client waits for the rest.
    TRUNCATED = "truncated"
    #: The header announces, and the server sends, 5000 payload bytes (over the limit).
    OVERSIZED = "oversized"
    #: The server closes the connection instead of answering.
    CLOSE = "close"


@dataclass
class Faults:
    """Explicit, per-domain fault injection (domid 0 is dom0's socket).  Thread-safe
    through the server's lock; effective from the next request on."""

    _lock: threading.RLock = field(repr=False)
    _wake: Callable[[], None] = field(repr=False)
    muted: set[int] = field(default_factory=set)
    delays: dict[int, float] = field(default_factory=dict)
    malformed: dict[int, deque[Malformation]] = field(default_factory=dict)

    def mute(self, domid: int) -> None:
        """Swallow every request from ``domid`` unexecuted and send it nothing (a hung
        daemon, from that domain's point of view)."""
        with self._lock:
            self.muted.add(domid)

    def unmute(self, domid: int) -> None:
        with self._lock:
            self.muted.discard(domid)

    def delay(self, domid: int, seconds: float) -> None:
        """Hold back every reply and event to ``domid`` for ``seconds`` (0 to stop)."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        with self._lock:
            if seconds:
                self.delays[domid] = seconds
            else:
                self.delays.pop(domid, None)

    def malform_next(self, domid: int, kind: Malformation, count: int = 1) -> None:
        """Spoil the next ``count`` replies to ``domid`` (the requests still execute)."""
        with self._lock:
            self.malformed.setdefault(domid, deque()).extend([kind] * count)

    def clear(self) -> None:
        with self._lock:
            self.muted.clear()
            self.delays.clear()
            self.malformed.clear()
        self._wake()


@dataclass
class _Domain:
    domid: int
    listener: socket.socket | None = None
    socket_path: Path | None = None
    target: int | None = None


@dataclass
class _Watch:
    path: str  # absolute, or @special
    token: bytes
    relative: bool  # the client gave a relative path: events come back relative
    #: ``path`` is ``@...``: only a change of exactly that path fires it.
    special: bool = field(init=False, repr=False, compare=False)
    #: What a path below ``path`` starts with (``is_under`` without building it per event).
    below: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.special = self.path.startswith("@")
        self.below = "/" if self.path == "/" else self.path + "/"

    def fired_by(self, change: Change) -> bool:
        """``change.fires(self.path)``, with the prefix computed once per watch."""
        if change.exact or change.special or self.special:
            return self.path == change.path
        return change.path == self.path or change.path.startswith(self.below)


class _Request(NamedTuple):
    """What a handler needs: who asks, on which connection, in which transaction."""

    conn: _Connection
    caller: Caller
    tx: Transaction | None
    untrusted: bytes


class _Connection:
    """One client socket and everything xenstored keeps per connection."""

    def __init__(self, sock: socket.socket, domid: int, limits: Limits) -> None:
        self.sock = sock
        self.domid = domid
        self.reader = PacketReader(skip_oversized=limits.oversized == "E2BIG")
        self.out = bytearray()
        self.delayed: deque[tuple[float, bytes]] = deque()
        self.watches: list[_Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.next_tx_id = 1
        self.closing = False  # flush what is queued, then close
        self.closed = False
        #: Who this connection is, built on first use; reset when a domain's target changes.
        self.caller: Caller | None = None
        #: Whether the poller watches this socket for writability (output is waiting).
        self.want_write = False

    def fileno(self) -> int:
        return self.sock.fileno()


# Op codes as plain ints: a request's op stays the int its header holds, as turning it into
# an ``XsOp`` (an enum lookup in Python) would cost more than these checks.
_PRIVILEGED_OPS = frozenset(
    int(op)
    for op in (
        XsOp.CONTROL,
        XsOp.INTRODUCE,
        XsOp.RELEASE,
        XsOp.IS_DOMAIN_INTRODUCED,
        XsOp.RESUME,
        XsOp.SET_TARGET,
    )
)
_NO_TRANSACTION_OPS = frozenset({int(XsOp.WATCH), int(XsOp.UNWATCH)})
_KNOWN_OPS = frozenset(int(op) for op in XsOp)
_WATCH = int(XsOp.WATCH)
_WATCH_EVENT = int(XsOp.WATCH_EVENT)
_ERROR = int(XsOp.ERROR)
_E2BIG_PAYLOAD = b"E2BIG" + NUL
_WAKER = "waker"

#: What a registered socket is polled for.
_POLL_READ = select.EPOLLIN
_POLL_READ_WRITE = select.EPOLLIN | select.EPOLLOUT
#: Events that make a socket worth reading or writing (a hang-up or error makes both
#: calls report it, as ``selectors`` has it).
_READABLE = ~select.EPOLLOUT
_WRITABLE = ~select.EPOLLIN

#: What a socket is registered for: a connection, a domain's listener, or the waker.
_Target = Union[_Connection, _Domain, str]


class _Poller:
    """The loop's sockets on one epoll, each with its :data:`_Target`.

    ``selectors`` does the same, but its ``select()`` builds a key object per ready socket
    in Python: a good part of the loop's own cost per request.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._targets: dict[int, tuple[socket.socket, _Target]] = {}

    def register(self, sock: socket.socket, target: _Target) -> None:
        fd = sock.fileno()
        self._epoll.register(fd, _POLL_READ)
        self._targets[fd] = (sock, target)

    def want_write(self, sock: socket.socket, want: bool) -> None:
        self._epoll.modify(sock.fileno(), _POLL_READ_WRITE if want else _POLL_READ)

    def unregister(self, sock: socket.socket) -> None:
        """Forget ``sock`` (call before closing it)."""
        fd = sock.fileno()
        if self._targets.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[tuple[socket.socket, _Target], int]]:
        """The ready sockets (with their targets) and epoll events.  Targets are looked up
        at once, as ``selectors`` does: a socket handled earlier in the batch may close
        another whose number is then reused.  Runs without the server's lock, so a socket
        another thread has just unregistered is skipped, not an error."""
        ready = []
        for fd, events in self._epoll.poll(timeout):
            entry = self._targets.get(fd)
            if entry is not None:
                ready.append((entry, events))
        return ready

    def close(self) -> None:
        self._epoll.close()
        self._targets.clear()


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
        #: Connections whose output or state changed since the poller last heard of them
        #: (a dict as an ordered set): only these need :meth:`_sync_poller`'s attention.
        self._dirty: dict[_Connection, None] = {}
        #: Connections holding back delayed output (``Faults.delay``).
        self._delaying: dict[_Connection, None] = {}
        #: Threads in :meth:`wait_requests_seen` (the loop notifies only if there are any).
        self._waiters = 0
        self._poller: _Poller | None = None
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
        self._poller = _Poller()
        self._poller.register(self._waker_r, _WAKER)
        self._poller.register(self._dom0_listener, self._domains[0])
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
            if self._poller is not None:
                self._poller.close()
                self._poller = None
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
            self._waiters += 1
            try:
                return self._handled.wait_for(lambda: self._requests_seen >= count, timeout)
            finally:
                self._waiters -= 1

    def watch_count(self, domid: int) -> int:
        """Watches registered by ``domid``'s connections (to check clean-up in tests)."""
        with self._lock:
            return self._watch_count(domid)

    def wait_watch_count(self, domid: int, count: int, timeout: float) -> bool:
        """Wait until ``domid``'s connections hold ``count`` watches (closed connections
        are noticed by the loop, not at once); False on timeout."""
        with self._handled:
            self._waiters += 1
            try:
                return self._handled.wait_for(lambda: self._watch_count(domid) == count,
                                              timeout)
            finally:
                self._waiters -= 1

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
        poller = self._poller
        assert poller is not None
        try:
            while not self._stop.is_set():
                ready = poller.poll(self._next_timeout())
                with self._lock:
                    for (sock, target), events in ready:
                        self._on_ready(sock, target, events)
                    if self._delaying:
                        self._release_due()
                    self._sync_poller()
                    if self._waiters:
                        self._handled.notify_all()
        except Exception:  # the loop must not die silently: log, then stop serving
            log.exception("xenstore server loop crashed")
            self._stop.set()

    def _next_timeout(self) -> float | None:
        if not self._delaying:  # without the lock: whoever delays output wakes the loop
            return IDLE_POLL_S
        with self._lock:
            dues = [c.delayed[0][0] for c in self._delaying]
        if not dues:
            return IDLE_POLL_S
        # Poll often while replies are held back: the clock may be a test's FakeClock,
        # which jumps without waking anybody.
        return max(0.0, min(min(dues) - self.clock.monotonic(), DELAYED_POLL_S))

    def _on_ready(self, sock: socket.socket, target: _Target, events: int) -> None:
        if type(target) is not _Connection:
            if isinstance(target, _Domain):
                self._accept(sock, target)
            else:  # the waker
                with contextlib.suppress(BlockingIOError):
                    while self._waker_r.recv(4096):
                        pass
            return
        conn = target
        if conn.closed:
            return
        if events & _READABLE:
            self._on_readable(conn)
        if not conn.closed and events & _WRITABLE:
            self._flush(conn)
            self._dirty[conn] = None

    def _accept(self, listener: socket.socket, domain: _Domain) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, OSError):
            return
        if domain.domid not in self._domains:
            sock.close()
            return
        sock.setblocking(False)
        conn = _Connection(sock, domain.domid, self.limits)
        self._connections.append(conn)
        assert self._poller is not None
        self._poller.register(sock, conn)

    def _sync_poller(self) -> None:
        """Register new listeners; for each connection whose output or state changed, send
        what waits, close it if it is done closing, and watch it for writability while
        output is left."""
        assert self._poller is not None
        if self._pending_listeners:
            for domain in self._pending_listeners:
                if domain.listener is not None and domain.domid in self._domains:
                    self._poller.register(domain.listener, domain)
            self._pending_listeners.clear()
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        for conn in dirty:
            if conn.closed:
                continue
            if conn.out:
                self._flush(conn)
                if conn.closed:
                    continue
            if conn.closing and not conn.out and not conn.delayed:
                self._close(conn)
                continue
            want_write = bool(conn.out)
            if want_write != conn.want_write:
                conn.want_write = want_write
                self._poller.want_write(conn.sock, want_write)

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
        for item in conn.reader.feed_raw(untrusted_data):
            if conn.closed or conn.closing:
                return
            if isinstance(item, OversizedPacket):
                self._on_oversized(conn, item)
            else:
                self._handle(conn, *item)

    def _on_oversized(self, conn: _Connection, item: OversizedPacket) -> None:
        if self.limits.oversized == "E2BIG":
            self._send_packet(conn, error_reply("E2BIG", item.header.req_id, item.header.tx_id))
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
        self._delaying.pop(conn, None)
        if self._poller is not None:
            with contextlib.suppress(OSError, ValueError):
                self._poller.unregister(conn.sock)
        conn.sock.close()
        with contextlib.suppress(ValueError):
            self._connections.remove(conn)
        for tx in conn.transactions.values():
            tx.abort()

    def _close_listener(self, domain: _Domain) -> None:
        if domain.listener is None:
            return
        if self._poller is not None:
            with contextlib.suppress(OSError, ValueError):
                self._poller.unregister(domain.listener)
        domain.listener.close()
        domain.listener = None
        if domain.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                domain.socket_path.unlink()

    # -- output, with faults -----------------------------------------------------------

    def _send_packet(self, conn: _Connection, packet: Packet) -> None:
        self._send(conn, packet.op, packet.req_id, packet.tx_id, packet.payload)

    def _send(self, conn: _Connection, op: int, req_id: int, tx_id: int, payload: bytes) -> None:
        """Queue one packet for ``conn``, unless faults swallow, spoil or delay it."""
        faults = self.faults
        if conn.domid in faults.muted:
            return
        if op == _WATCH_EVENT and len(payload) > XENSTORE_PAYLOAD_MAX:
            # C xenstored's add_event(): "Don't try to send over-long events."
            log.debug("event of %d bytes for domain %d dropped", len(payload), conn.domid)
            return
        spoil = faults.malformed.get(conn.domid) if faults.malformed else None
        if spoil and op != _WATCH_EVENT:
            data = self._malform(conn, Packet(op, req_id, tx_id, payload), spoil)
            if data is None:
                return
        else:
            data = encode_packet(op, req_id, tx_id, payload)
        delay = faults.delays.get(conn.domid) if faults.delays else None
        if delay:
            conn.delayed.append((self.clock.monotonic() + delay, data))
            if not conn.closed:
                self._delaying[conn] = None
        elif conn.delayed:  # keep order behind what is held back
            conn.delayed.append((conn.delayed[-1][0], data))
        else:
            self._queue(conn, data)

    def _queue(self, conn: _Connection, data: bytes) -> None:
        conn.out += data
        self._dirty[conn] = None
        if len(conn.out) > MAX_PENDING_OUTPUT:
            log.warning("domain %d does not read its replies: dropped", conn.domid)
            self._close(conn)

    def _release_due(self) -> None:
        now = self.clock.monotonic()
        for conn in list(self._delaying):
            while conn.delayed and conn.delayed[0][0] <= now:
                self._queue(conn, conn.delayed.popleft()[1])
            if not conn.delayed:
                self._delaying.pop(conn, None)
                self._dirty[conn] = None  # a closing connection may be done now

    def _malform(
        self, conn: _Connection, packet: Packet, queue: deque[Malformation]
    ) -> bytes | None:
        """Spoil a reply as the next queued :class:`Malformation` says (None: send nothing)."""
        kind = queue.popleft()
        log.info("fault: %s reply to domain %d", kind.value, conn.domid)
        if kind is Malformation.WRONG_REQ_ID:
            return Packet(
                packet.op, (packet.req_id + 1) & 0xFFFFFFFF, packet.tx_id, packet.payload
            ).encode()
        if kind is Malformation.WRONG_OP:
            other = XsOp.DIRECTORY if packet.op != XsOp.DIRECTORY else XsOp.READ
            return Packet(int(other), packet.req_id, packet.tx_id, packet.payload).encode()
        if kind is Malformation.UNKNOWN_ERROR:
            return Packet(int(XsOp.ERROR), packet.req_id, packet.tx_id, b"EWHATEVER\0").encode()
        if kind is Malformation.GARBAGE_PAYLOAD:
            payload = bytes(range(0x80, 0x100)) + b"\n\t"
            return Packet(packet.op, packet.req_id, packet.tx_id, payload).encode()
        if kind is Malformation.TRUNCATED:
            raw = packet.encode()
            header = Packet(packet.op, packet.req_id, packet.tx_id, packet.payload + bytes(64))
            return header.encode()[:16] + raw[16:]
        if kind is Malformation.OVERSIZED:
            payload = b"x" * 5000
            header = Packet(packet.op, packet.req_id, packet.tx_id, b"").encode()[:12]
            return header + len(payload).to_bytes(4, "little") + payload
        conn.closing = True  # Malformation.CLOSE
        self._dirty[conn] = None
        return None

    # -- requests ----------------------------------------------------------------------

    def _caller(self, conn: _Connection) -> Caller:
        caller = conn.caller
        if caller is None:
            domain = self._domains.get(conn.domid)
            target = domain.target if domain is not None else None
            caller = conn.caller = Caller(conn.domid, privileged=conn.domid == 0, target=target)
        return caller

    def _forget_callers(self) -> None:
        """A domain came, went or got a target: rebuild each connection's :class:`Caller`."""
        for conn in self._connections:
            conn.caller = None

    def _handle(
        self, conn: _Connection, op: int, req_id: int, tx_id: int, untrusted: bytes
    ) -> None:
        self._requests_seen += 1
        if conn.domid in self.faults.muted:
            log.debug("fault: swallowed %s from domain %d", op_name(op), conn.domid)
            return
        name = op_name(op)
        self.stats[name] = self.stats.get(name, 0) + 1
        try:
            reply_op, payload = op, self._dispatch(conn, op, tx_id, untrusted)
        except StoreError as e:
            reply_op, payload = _ERROR, error_reply(e.name, req_id, tx_id).payload
        changes = self._store.take_changes()
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            reply_op, payload = _ERROR, _E2BIG_PAYLOAD
        self._send(conn, reply_op, req_id, tx_id, payload)
        if changes:
            self._fire(changes)
        if op == _WATCH and reply_op == _WATCH:
            self._initial_event(conn)

    def _dispatch(self, conn: _Connection, op: int, tx_id: int, untrusted: bytes) -> bytes:
        """The reply's payload, or :class:`StoreError`."""
        handler = self._handlers.get(op)
        if handler is None:
            if op not in _KNOWN_OPS:
                raise StoreError("ENOSYS", f"unknown op {op}")
            raise StoreError("ENOSYS", f"{op_name(op)} is not a request")
        caller = conn.caller or self._caller(conn)
        if op in _PRIVILEGED_OPS and not caller.privileged:
            raise StoreError("EACCES", f"{op_name(op)} is for dom0")
        tx: Transaction | None = None
        if tx_id and op not in _NO_TRANSACTION_OPS:
            tx = conn.transactions.get(tx_id)
            if tx is None:
                raise StoreError("ENOENT", f"no transaction {tx_id}")
        return handler(self, _Request(conn, caller, tx, untrusted))

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
        event_path = self._event_path_for(conn, watch, path)
        self._send(conn, _WATCH_EVENT, 0, 0, event_path + NUL + watch.token + NUL)

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
        self._domains[domid].target = target
        self._forget_callers()
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

    #: The request handlers by plain int op code.
    _handlers: dict[int, Callable[[XsServer, _Request], bytes]] = {
        int(op): handler
        for op, handler in (
            (XsOp.CONTROL, _op_control),
            (XsOp.DIRECTORY, _op_directory),
            (XsOp.READ, _op_read),
            (XsOp.GET_PERMS, _op_get_perms),
            (XsOp.WATCH, _op_watch),
            (XsOp.UNWATCH, _op_unwatch),
            (XsOp.TRANSACTION_START, _op_transaction_start),
            (XsOp.TRANSACTION_END, _op_transaction_end),
            (XsOp.INTRODUCE, _op_introduce),
            (XsOp.RELEASE, _op_release),
            (XsOp.GET_DOMAIN_PATH, _op_get_domain_path),
            (XsOp.WRITE, _op_write),
            (XsOp.MKDIR, _op_mkdir),
            (XsOp.RM, _op_rm),
            (XsOp.SET_PERMS, _op_set_perms),
            (XsOp.IS_DOMAIN_INTRODUCED, _op_is_domain_introduced),
            (XsOp.RESUME, _op_resume),
            (XsOp.SET_TARGET, _op_set_target),
            (XsOp.RESET_WATCHES, _op_reset_watches),
            (XsOp.DIRECTORY_PART, _op_directory_part),
        )
    }

    # -- domains and watches -----------------------------------------------------------

    def _introduce(self, domid: int) -> None:
        if domid in self._domains:
            return  # re-introducing is fine and fires nothing
        domain = _Domain(domid, socket_path=self.guest_socket(domid))
        domain.listener = self._listen(domain.socket_path)  # type: ignore[arg-type]
        self._domains[domid] = domain
        self._forget_callers()
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
            if other.target == domid:
                other.target = None
        self._forget_callers()
        self._store.remove_domain_nodes(domid)
        self._fire(self._store.take_changes())
        self._fire([self._store.special_change(RELEASE_DOMAIN)])

    def _fire(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        for conn in list(self._connections):
            if conn.closed or not conn.watches:
                continue
            caller = conn.caller or self._caller(conn)
            for change in changes:
                # Whether the caller may see the change, judged once a watch matches it.
                visible = True if caller.privileged else None
                for watch in conn.watches:
                    if not watch.fired_by(change):
                        continue
                    if visible is None:
                        visible = change.visible_to(caller)
                    if visible:
                        self._send_event(conn, watch, change.path)

    def _event_path_for(self, conn: _Connection, watch: _Watch, path: str) -> bytes:
        if watch.relative:
            home = home_path(conn.domid)
            if path.startswith(home + "/"):
                path = path[len(home) + 1 :]
        return path.encode("ascii")

