"""Xenstore peers for tests: our own server and Debian's real C and OCaml daemons.

Fixtures (import them into a ``conftest.py``; see :data:`__all__`):

``xenstore_host``
    Parametrized over ``ours``, ``c-xenstored`` and ``oxenstored``; yields a
    :class:`XenstoreHost`.  The real daemons start once per session (:mod:`fakes.xs_peer`
    builds the shim that runs them outside Xen) and each test gets a fresh wrapper that
    releases its domains and removes its nodes afterwards; when the Xen binaries, gcc or
    (oxenstored) root are missing they skip with the reason, or fail under CI
    (:mod:`fakes.required`), and carry the ``xenpeer`` mark.
``xs_server``
    Only our server (:class:`~xentmem.mock_xenstored.server.XsServer`), C xenstored's limits, in a
    temporary directory: the fast path.
``make_xs_server``
    A factory for more servers, e.g. ``make_xs_server(limits=Limits.oxenstored())``.
``pyxs_su``
    ``pyxs.Client.SU = True`` for the test (release/resume/set_target need it), restored after.

The same scenario runs against every peer::

    def test_guest_isolation(xenstore_host):
        g5 = xenstore_host.client(xenstore_host.introduce(5))
        ...

Helpers: :func:`outcome` (``"OK"`` or the error name of a pyxs call), :func:`raw_request` /
:func:`raw_exchange` (bytes pyxs would refuse to send), :class:`Watcher` (watch events
collected up to a fence write, so "no event" is asserted without sleeping).

pyxs traps, handled here: ``Client.SU`` is only set inside :func:`su_enabled`; watch
events are read with ``monitor.events.get(timeout=...)``; :func:`close_client` unblocks a
router stuck on a half-sent reply before joining it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import queue
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pyxs
from fakes.required import unavailable
from fakes.xenbus_mux import XenbusMux
from fakes.xs_peer import RealPeer, unavailable_reason

from xentmem.clock import Clock
from xentmem.mock_xenstored.server import XsServer, toolstack_nodes
from xentmem.mock_xenstored.store import Limits, home_path
from xentmem.mock_xenstored.wire import Packet, PacketReader

__all__ = [
    "FENCE_TOKEN",
    "Watcher",
    "XenstoreHost",
    "c_xenstored_peer",
    "close_client",
    "dom0_watcher",
    "guest_watcher",
    "make_xs_server",
    "outcome",
    "oxenstored_peer",
    "pyxs_su",
    "raw_exchange",
    "raw_request",
    "su_enabled",
    "xenstore_host",
    "xs_server",
]

KINDS = ("ours", "c-xenstored", "oxenstored")
#: How long any helper here waits for a daemon (an event, a domain's death).
WAIT_S = 5.0


@contextlib.contextmanager
def su_enabled() -> Iterator[None]:
    """pyxs decides ``Client.SU`` once, from ``/proc/xen/capabilities``; off Xen it is False
    and ``release_domain``/``resume_domain``/``set_target`` refuse client-side."""
    saved = pyxs.Client.SU
    pyxs.Client.SU = True
    try:
        yield
    finally:
        pyxs.Client.SU = saved


def close_client(client: pyxs.Client) -> None:
    """Close a pyxs client with a bounded wait.  ``Client.close()`` joins the router thread
    without a timeout, which hangs forever if the router is blocked reading a reply that
    never completes; then the socket is shut down under it."""
    router = client.router
    with contextlib.suppress(OSError):
        router.w_terminator.sendall(b"\0")
    if router.thread.is_alive():
        router.thread.join(WAIT_S)
    if router.thread.is_alive():
        transport = router.connection.transport
        if transport is not None:
            with contextlib.suppress(OSError):
                transport.sock.shutdown(socket.SHUT_RDWR)
        router.thread.join(WAIT_S)
    router.connection.close()


FENCE_TOKEN = b"xentmem-fence"


def outcome(call: Callable[[], Any]) -> str:
    """``"OK"`` or the error name a pyxs call ended with (``EQUOTA`` comes through pyxs as
    errno 0, so 0 is reported as ``EQUOTA``)."""
    try:
        call()
    except pyxs.PyXSError as e:
        code = e.args[0] if e.args else 0
        if not isinstance(code, int):
            return f"PyXSError({code!r})"
        return "EQUOTA" if code == 0 else errno.errorcode[code]
    return "OK"


def raw_exchange(sock_path: Path, packets: list[Packet], replies: int = 1) -> list[Packet] | None:
    """Send packets on a fresh connection and read ``replies`` packets back; None if the
    server closed the connection first."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT_S)
        s.connect(str(sock_path))
        try:
            for packet in packets:
                s.sendall(packet.encode(limit=1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            return None
        reader = PacketReader(limit=1 << 20)
        got: list[Packet] = []
        while len(got) < replies:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            got += [p for p in reader.feed(data) if isinstance(p, Packet)]
        return got


def raw_request(sock_path: Path, op: int, payload: bytes, tx_id: int = 0) -> Packet | None:
    replies = raw_exchange(sock_path, [Packet(int(op), 7, tx_id, payload)])
    return replies[0] if replies else None


class Watcher:
    """A pyxs Monitor plus a fence, so a test can say "these events and no others" without
    sleeping: after the action, dom0 writes the fence node, and since a daemon delivers a
    connection's events in order, everything the action caused has arrived before the
    fence's own event."""

    def __init__(self, client: pyxs.Client, dom0: pyxs.Client, fence: bytes, fence_abs: bytes):
        self.monitor = client.monitor()
        self.dom0 = dom0
        self.fence, self.fence_abs = fence, fence_abs
        self.monitor.watch(fence, FENCE_TOKEN)
        self._next()  # the fence watch's own initial event

    def _next(self) -> tuple[bytes, bytes]:
        event = self.monitor.events.get(timeout=WAIT_S)
        return event.path, event.token

    def watch(self, path: bytes, token: bytes) -> tuple[bytes, bytes]:
        """Add a watch; returns the event every daemon fires on registration."""
        self.monitor.watch(path, token)
        return self._next()

    def events(self) -> list[tuple[bytes, bytes]]:
        """Every event since the last call, in order (the fence's own left out)."""
        self.dom0.write(self.fence_abs, b"f")
        seen: list[tuple[bytes, bytes]] = []
        while True:
            path, token = self._next()
            if token == FENCE_TOKEN:
                return seen
            if path not in (self.fence, self.fence_abs):
                seen.append((path, token))


def dom0_watcher(dom0: pyxs.Client, scratch: str) -> Watcher:
    fence = f"{scratch}/fence".encode()
    return Watcher(dom0, dom0, fence, fence)


def guest_watcher(guest: pyxs.Client, dom0: pyxs.Client, domid: int) -> Watcher:
    return Watcher(guest, dom0, b"data/fence", f"/local/domain/{domid}/data/fence".encode())


def _short_tmpdir(prefix: str) -> Path:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class XenstoreHost:
    """One xenstore peer as a test sees it.

    ``dom0_socket`` is privileged.  ``introduce(domid)`` creates the guest's home as a
    toolstack would (unless ``toolstack=False``), introduces the domain and returns a socket
    where a pyxs client *is* that guest.  ``client(socket)`` connects pyxs clients that are
    closed with the host.  ``scratch`` is an absolute path of this test's own, removed
    afterwards.  ``flavour`` says whose semantics apply where the daemons differ
    (``ours`` follows ``c-xenstored``); ``max_value_bytes`` is the value-size limit, if any.
    """

    kind: str
    flavour: str
    dom0_socket: Path
    max_value_bytes: int | None
    scratch: str

    def __init__(self) -> None:
        self._clients: list[tuple[Path, pyxs.Client]] = []
        self._guest_sockets: dict[int, Path] = {}
        self._introduced: list[int] = []
        self._targets: dict[int, int] = {}
        self._dom0: pyxs.Client | None = None

    # -- what tests use ----------------------------------------------------------------

    @property
    def dom0(self) -> pyxs.Client:
        """A privileged client owned by the host (for setting up)."""
        if self._dom0 is None:
            self._dom0 = self.client(self.dom0_socket)
        return self._dom0

    def client(self, path: Path | None = None) -> pyxs.Client:
        """A connected pyxs client on ``path`` (dom0's socket by default)."""
        path = path or self.dom0_socket
        c = pyxs.Client(unix_socket_path=str(path))
        c.connect()
        self._clients.append((path, c))
        return c

    def introduce(self, domid: int, *, toolstack: bool = True) -> Path:
        if toolstack:
            for path, value, perms in toolstack_nodes(domid):
                if value:
                    self.dom0.write(path.encode(), value)
                else:  # PyPI pyxs 0.4.1 refuses to write an empty value
                    self.dom0.mkdir(path.encode())
                self.dom0.set_perms(path.encode(), perms.encode())
        socket_path = self._prepare_guest(domid)
        self._guest_sockets[domid] = socket_path
        self.dom0.introduce_domain(domid, 0, 1)
        self._introduced.append(domid)
        return socket_path

    def release(self, domid: int) -> None:
        """dom0's RELEASE (the guest's clients are closed first: its connection goes)."""
        self._close_guest_clients(domid)
        with su_enabled():
            self.dom0.release_domain(domid)
        self._forget(domid)

    def set_target(self, domid: int, target: int) -> None:
        with su_enabled():
            self.dom0.set_target(domid, target)
        self._targets[domid] = target

    def kill(self, domid: int) -> None:
        """The domain dies; returns once the daemon has noticed (``@releaseDomain``)."""
        monitor = self.dom0.monitor()
        monitor.watch(b"@releaseDomain", b"xenstore-host-kill")
        monitor.events.get(timeout=WAIT_S)  # the event every new watch fires
        self._close_guest_clients(domid)
        self._kill(domid)
        for _ in range(10):
            if not self.dom0.is_domain_introduced(domid):
                break
            with contextlib.suppress(queue.Empty):
                monitor.events.get(timeout=WAIT_S / 10)
        monitor.unwatch(b"@releaseDomain", b"xenstore-host-kill")
        self._forget(domid)

    def close(self) -> None:
        """Release what this test introduced, remove its nodes, close its clients."""
        try:
            if self._introduced or self._dom0 is not None:
                self._clean_up()
        finally:
            for _, c in self._clients:
                close_client(c)
            self._clients.clear()
            self._dom0 = None

    # -- per kind ----------------------------------------------------------------------

    def _prepare_guest(self, domid: int) -> Path:
        raise NotImplementedError

    def _kill(self, domid: int) -> None:
        raise NotImplementedError

    def _close_guest_clients(self, domid: int) -> None:
        path = self._guest_sockets.get(domid)
        for entry in [e for e in self._clients if e[0] == path]:
            close_client(entry[1])
            self._clients.remove(entry)

    def _forget(self, domid: int) -> None:
        if domid in self._introduced:
            self._introduced.remove(domid)

    def _clean_up(self) -> None:
        # C xenstored 4.17 crashes if a SET_TARGET target goes before its domain: release
        # domains that have a target first.
        order = sorted(self._introduced, key=lambda d: d not in self._targets)
        for domid in order:
            self._close_guest_clients(domid)
        with su_enabled():
            for domid in order:
                if self.dom0.is_domain_introduced(domid):
                    self.dom0.release_domain(domid)
        for path in [*(home_path(d) for d in order), self.scratch]:
            if self.dom0.exists(path.encode()):
                self.dom0.delete(path.encode())
        self._introduced.clear()


class OurHost(XenstoreHost):
    kind = "ours"

    def __init__(self, server: XsServer, scratch: str) -> None:
        super().__init__()
        self.server = server
        self.flavour = "c-xenstored" if server.limits.flavour == "c-xenstored" else "oxenstored"
        self.dom0_socket = server.dom0_socket
        self.max_value_bytes = server.limits.max_value_bytes
        self.scratch = scratch

    def _prepare_guest(self, domid: int) -> Path:
        return self.server.guest_socket(domid)

    def _kill(self, domid: int) -> None:
        self.server.destroy_domain(domid)

    def _clean_up(self) -> None:
        """Nothing to restore: the server is this test's own."""


class RealHost(XenstoreHost):
    def __init__(self, peer: RealPeer, scratch: str) -> None:
        super().__init__()
        self.peer = peer
        self.kind = self.flavour = peer.kind
        self.dom0_socket = peer.socket
        self.max_value_bytes = 2048 if peer.kind == "oxenstored" else None
        self.scratch = scratch
        self._proxies: dict[int, tuple[XenbusMux, Any]] = {}
        self._guest_dir = _short_tmpdir("xs-guests-")

    def _prepare_guest(self, domid: int) -> Path:
        """The guest's socket: its ring (one client at a time), behind a multiplexer that
        lets it open several connections, as a domU opens ``/dev/xen/xenbus`` several times."""
        path = self._guest_dir / f"domain-{domid}.sock"
        ring = self._guest_dir / f"domain-{domid}.ring"
        self._stop_proxy(domid)
        proxy = self.peer.ring_proxy(domid, ring)
        try:
            mux = XenbusMux(ring, path).start()
        except OSError:
            proxy.stop()
            raise
        self._proxies[domid] = (mux, proxy)
        return path

    def _kill(self, domid: int) -> None:
        self.peer.kill_domain(domid)

    def _forget(self, domid: int) -> None:
        super()._forget(domid)
        self._stop_proxy(domid)
        self.peer.revive(domid)

    def _stop_proxy(self, domid: int) -> None:
        pair = self._proxies.pop(domid, None)
        if pair is not None:
            mux, proxy = pair
            mux.stop()
            proxy.stop()  # type: ignore[attr-defined]

    def close(self) -> None:
        try:
            super().close()
        finally:
            for domid in list(self._proxies):
                self._stop_proxy(domid)
                self.peer.revive(domid)
            shutil.rmtree(self._guest_dir, ignore_errors=True)


_scratch_ids = itertools.count(1)


def _scratch() -> str:
    return f"/xentmem-test/t{next(_scratch_ids)}"


@pytest.fixture
def pyxs_su() -> Iterator[None]:
    with su_enabled():
        yield


@pytest.fixture
def make_xs_server() -> Iterator[Callable[..., XsServer]]:
    servers: list[XsServer] = []
    dirs: list[Path] = []

    def make(*, limits: Limits | None = None, clock: Clock | None = None) -> XsServer:
        directory = _short_tmpdir("xs-")
        dirs.append(directory)
        server = XsServer(directory, limits=limits, clock=clock).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    for directory in dirs:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


@pytest.fixture
def xs_server(make_xs_server: Callable[..., XsServer]) -> XsServer:
    return make_xs_server()


def _real_peer(kind: str) -> Iterator[RealPeer]:
    reason = unavailable_reason(kind)
    if reason is not None:
        unavailable("PEERS", f"Debian's {kind}", reason)
    peer = RealPeer.start(kind)
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def c_xenstored_peer() -> Iterator[RealPeer]:
    yield from _real_peer("c-xenstored")


@pytest.fixture(scope="session")
def oxenstored_peer() -> Iterator[RealPeer]:
    yield from _real_peer("oxenstored")


@pytest.fixture(
    params=[
        "ours",
        pytest.param("c-xenstored", marks=pytest.mark.xenpeer),
        pytest.param("oxenstored", marks=pytest.mark.xenpeer),
    ]
)
def xenstore_host(request: pytest.FixtureRequest) -> Iterator[XenstoreHost]:
    host: XenstoreHost
    if request.param == "ours":
        host = OurHost(request.getfixturevalue("xs_server"), _scratch())
    else:
        fixture = "c_xenstored_peer" if request.param == "c-xenstored" else "oxenstored_peer"
        peer: RealPeer = request.getfixturevalue(fixture)
        if not peer.alive():
            pytest.fail(f"{peer.kind} (pid {peer.pid}) died in an earlier test")
        host = RealHost(peer, _scratch())
    try:
        yield host
    finally:
        host.close()
