"""Our server only: life cycle, domains, fault injection, oxenstored limits, the demo."""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import pyxs
from fakes.xenstore_hosts import (
    WAIT_S,
    close_client,
    outcome,
    raw_exchange,
    raw_request,
    su_enabled,
)

from xentmem.clock import FakeClock
from xentmem.mock_xenstored.server import Malformation, XsServer
from xentmem.mock_xenstored.store import Limits
from xentmem.mock_xenstored.wire import HEADER, HEADER_SIZE, Packet, PacketReader, XsOp, request

MakeServer = Callable[..., XsServer]


def connect(path: Path) -> pyxs.Client:
    client = pyxs.Client(unix_socket_path=str(path))
    client.connect()
    return client


class RawConnection:
    """One socket kept open across requests (fault injection is per connection's domain)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(str(path))
        self.reader = PacketReader(limit=1 << 20)
        self.ready: list[Packet] = []

    def send(self, packet: Packet) -> None:
        self.sock.sendall(packet.encode())

    def recv_bytes(self, n: int, timeout: float = WAIT_S) -> bytes:
        """Up to ``n`` bytes: fewer if the peer closes or ``timeout`` passes first."""
        self.sock.settimeout(timeout)
        data = b""
        with contextlib.suppress(socket.timeout):  # TimeoutError only from 3.10 on
            while len(data) < n:
                chunk = self.sock.recv(n - len(data))
                if not chunk:
                    break
                data += chunk
        return data

    def next(self, timeout: float = WAIT_S) -> Packet | None:
        self.sock.settimeout(timeout)
        while not self.ready:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.ready += [p for p in self.reader.feed(data) if isinstance(p, Packet)]
        return self.ready.pop(0)

    def close(self) -> None:
        self.sock.close()


def test_context_manager_starts_and_cleans_up() -> None:
    directory = Path(tempfile.mkdtemp(prefix="xs-cm-", dir="/tmp"))
    with XsServer(directory) as server:
        assert server.running and server.dom0_socket.is_socket()
        guest = server.introduce_domain(5)
        assert guest.is_socket()
        client = connect(server.dom0_socket)
        client.write(b"/a", b"1")
        close_client(client)
    assert not server.running
    assert not server.dom0_socket.exists() and not guest.exists()
    with pytest.raises(RuntimeError):
        server.start()
    directory.rmdir()


def test_guest_socket_exists_only_while_introduced(xs_server: XsServer) -> None:
    path = xs_server.guest_socket(5)
    assert not path.exists()
    assert xs_server.prepare_domain(5) == path
    guest = RawConnection(path)
    guest.send(request(XsOp.READ, b"name", req_id=1))
    assert guest.next() == Packet(int(XsOp.READ), 1, 0, b"guest-5")
    xs_server.release_domain(5)
    assert guest.next() is None, "the guest's connection goes with its domain"
    assert not path.exists()
    assert not xs_server.is_introduced(5)
    guest.close()


def test_every_connection_on_a_guest_socket_is_that_guest(xs_server: XsServer) -> None:
    path = xs_server.prepare_domain(5)
    first, second = connect(path), connect(path)
    try:
        first.write(b"data/x", b"1")
        assert second.get_perms(b"data/x") == [b"n5"]
        assert outcome(lambda: second.read(b"/local/domain/0")) in ("EACCES", "ENOENT")
    finally:
        close_client(first)
        close_client(second)


def test_a_target_acts_for_its_domain_until_released(xs_server: XsServer) -> None:
    """A connection's identity follows SET_TARGET and the target's release at once."""
    g7 = connect(xs_server.prepare_domain(7))
    xs_server.prepare_domain(8)
    dom0 = connect(xs_server.dom0_socket)
    try:
        assert outcome(lambda: g7.write(b"/local/domain/8/data/x", b"1")) == "EACCES"
        with su_enabled():
            dom0.set_target(7, 8)
        g7.write(b"/local/domain/8/data/x", b"1")
        xs_server.release_domain(8)
        xs_server.prepare_domain(8)
        assert outcome(lambda: g7.write(b"/local/domain/8/data/x", b"2")) == "EACCES"
    finally:
        close_client(g7)
        close_client(dom0)


def test_prepare_domain_builds_a_toolstack_tree(xs_server: XsServer) -> None:
    xs_server.prepare_domain(7, name="vm7")
    nodes = xs_server.snapshot()
    assert nodes["/local/domain/7"] == (b"", "n0 r7")
    assert nodes["/local/domain/7/name"] == (b"vm7", "n0 r7")
    assert nodes["/local/domain/7/data"] == (b"", "n7")
    assert nodes["/local/domain/7/device"] == (b"", "n0 r7")


def test_destroy_domain_fires_release_domain(xs_server: XsServer) -> None:
    xs_server.prepare_domain(5)
    dom0 = connect(xs_server.dom0_socket)
    try:
        monitor = dom0.monitor()
        monitor.watch(b"@releaseDomain", b"r")
        assert monitor.events.get(timeout=WAIT_S).path == b"@releaseDomain"
        xs_server.destroy_domain(5)
        assert monitor.events.get(timeout=WAIT_S).token == b"r"
        assert dom0.is_domain_introduced(5) is False
        assert not dom0.exists(b"/local/domain/5/data")
    finally:
        close_client(dom0)


def test_watch_and_transaction_quotas(xs_server: XsServer) -> None:
    guest = connect(xs_server.prepare_domain(5))
    try:
        monitor = guest.monitor()
        for i in range(129):  # C xenstored: 128 configured, 129 pass
            monitor.watch(b"data/w%d" % i, b"t")
        assert outcome(lambda: monitor.watch(b"data/one-more", b"t")) == "E2BIG"
        assert xs_server.watch_count(5) == 129
        clients = [copy.copy(guest) for _ in range(12)]
        results = [outcome(c.transaction) for c in clients]
        assert results == ["OK"] * 11 + ["ENOSPC"]
        for c in clients[:11]:
            c.rollback()
    finally:
        close_client(guest)


def test_reset_watches(xs_server: XsServer) -> None:
    conn = RawConnection(xs_server.dom0_socket)
    conn.send(request(XsOp.WATCH, b"/w", b"t", req_id=1))
    assert conn.next() == Packet(int(XsOp.WATCH), 1, 0, b"OK\0")
    assert conn.next() == Packet(int(XsOp.WATCH_EVENT), 0, 0, b"/w\0t\0")
    conn.send(request(XsOp.RESET_WATCHES, req_id=2))
    assert conn.next() == Packet(int(XsOp.RESET_WATCHES), 2, 0, b"OK\0")
    assert xs_server.watch_count(0) == 0
    conn.close()


def test_directory_part_pages_through_a_big_directory(xs_server: XsServer) -> None:
    dom0 = connect(xs_server.dom0_socket)
    try:
        names = [b"child%05d" % i for i in range(700)]
        for name in names:
            dom0.write(b"/big/" + name, b"x")
        assert outcome(lambda: dom0.list(b"/big")) == "E2BIG"
    finally:
        close_client(dom0)
    got: list[bytes] = []
    offset = 0
    while True:
        reply = raw_request(xs_server.dom0_socket, XsOp.DIRECTORY_PART, b"/big\0%d\0" % offset)
        assert reply is not None and reply.op == XsOp.DIRECTORY_PART
        assert len(reply.payload) <= 4096
        _generation, _, chunk = reply.payload.partition(b"\0")
        parts = chunk.split(b"\0")[:-1]
        if parts and parts[-1] == b"":
            got += parts[:-1]
            break
        got += parts
        offset += len(chunk)
    assert got == names


# -- fault injection -------------------------------------------------------------------


def test_mute_swallows_requests_unexecuted(xs_server: XsServer) -> None:
    conn = RawConnection(xs_server.dom0_socket)
    seen = xs_server.requests_seen
    xs_server.faults.mute(0)
    conn.send(request(XsOp.WRITE, b"/muted", value=b"1", req_id=1))
    conn.send(request(XsOp.GET_DOMAIN_PATH, b"0", req_id=2))
    assert xs_server.wait_requests_seen(seen + 2, WAIT_S)
    xs_server.faults.unmute(0)
    conn.send(request(XsOp.READ, b"/muted", req_id=3))
    assert conn.next() == Packet(int(XsOp.ERROR), 3, 0, b"ENOENT\0"), "the first reply is #3"
    conn.close()


def test_a_muted_host_makes_pyxs_callers_wait(xs_server: XsServer) -> None:
    """Why every wait in our own code needs a timeout: pyxs has none."""
    client = connect(xs_server.dom0_socket)
    xs_server.faults.mute(0)
    done = threading.Event()
    caller = threading.Thread(target=lambda: (outcome(lambda: client.read(b"/x")), done.set()))
    caller.daemon = True
    caller.start()
    assert not done.wait(0.3), "pyxs is still waiting for a reply that never comes"
    close_client(client)


def test_delay_holds_replies_back_until_the_clock_says(make_xs_server: MakeServer) -> None:
    clock = FakeClock(100.0)
    server = make_xs_server(clock=clock)
    server.faults.delay(0, 5.0)
    conn = RawConnection(server.dom0_socket)
    conn.send(request(XsOp.GET_DOMAIN_PATH, b"1", req_id=1))
    conn.send(request(XsOp.GET_DOMAIN_PATH, b"2", req_id=2))
    with pytest.raises(socket.timeout):
        conn.next(timeout=0.2)
    clock.advance(5.0)
    assert conn.next() == Packet(int(XsOp.GET_DOMAIN_PATH), 1, 0, b"/local/domain/1\0")
    assert conn.next() == Packet(int(XsOp.GET_DOMAIN_PATH), 2, 0, b"/local/domain/2\0")
    server.faults.delay(0, 0)
    conn.send(request(XsOp.GET_DOMAIN_PATH, b"3", req_id=3))
    assert conn.next() == Packet(int(XsOp.GET_DOMAIN_PATH), 3, 0, b"/local/domain/3\0")
    conn.close()


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        (Malformation.WRONG_REQ_ID, lambda h, p: h[1] == 2 and p == b"/local/domain/1\0"),
        (Malformation.WRONG_OP, lambda h, p: h[0] not in (XsOp.GET_DOMAIN_PATH, XsOp.ERROR)),
        (Malformation.UNKNOWN_ERROR, lambda h, p: h[0] == XsOp.ERROR and p == b"EWHATEVER\0"),
        (Malformation.GARBAGE_PAYLOAD, lambda h, p: h[1] == 1 and any(b >= 0x80 for b in p)),
        (Malformation.TRUNCATED, lambda h, p: h[3] > len(p)),
        (Malformation.OVERSIZED, lambda h, p: h[3] == 5000 and len(p) == 5000),
    ],
)
def test_malformed_replies(
    xs_server: XsServer, kind: Malformation, check: Callable[[tuple, bytes], bool]
) -> None:
    xs_server.prepare_domain(5)
    conn = RawConnection(xs_server.guest_socket(5))
    xs_server.faults.malform_next(5, kind)
    conn.send(request(XsOp.GET_DOMAIN_PATH, b"1", req_id=1))
    header = HEADER.unpack(conn.recv_bytes(HEADER_SIZE))
    short_wait = 0.3 if kind is Malformation.TRUNCATED else WAIT_S  # the rest never comes
    payload = conn.recv_bytes(header[3], timeout=short_wait)
    assert check(header, payload), (header, payload)
    conn.close()
    again = RawConnection(xs_server.guest_socket(5))
    again.send(request(XsOp.GET_DOMAIN_PATH, b"2", req_id=9))
    assert again.next() == Packet(int(XsOp.GET_DOMAIN_PATH), 9, 0, b"/local/domain/2\0")
    again.close()


def test_malformed_close(xs_server: XsServer) -> None:
    conn = RawConnection(xs_server.dom0_socket)
    xs_server.faults.malform_next(0, Malformation.CLOSE)
    conn.send(request(XsOp.GET_DOMAIN_PATH, b"1", req_id=1))
    assert conn.next() is None
    conn.close()


def test_survives_garbage(xs_server: XsServer) -> None:
    for junk in (b"\xff" * 16, b"\x00" * 15, HEADER.pack(2, 1, 0, 1 << 31), b"x" * 70000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(xs_server.dom0_socket))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(junk)
    reply = raw_request(xs_server.dom0_socket, XsOp.GET_DOMAIN_PATH, b"4\0")
    assert reply == Packet(int(XsOp.GET_DOMAIN_PATH), 7, 0, b"/local/domain/4\0")


# -- oxenstored's limits ---------------------------------------------------------------


def test_oxenstored_limits(make_xs_server: MakeServer) -> None:
    server = make_xs_server(limits=Limits.oxenstored())
    dom0 = connect(server.dom0_socket)
    guest = connect(server.prepare_domain(5))
    try:
        assert outcome(lambda: dom0.write(b"/v", b"x" * 2048)) == "OK"
        assert outcome(lambda: dom0.write(b"/v", b"x" * 2049)) == "E2BIG"
        assert outcome(lambda: guest.write(b"data/v", b"x" * 2048)) == "OK"
        created = 0
        while outcome(lambda n=created: guest.write(b"data/q/k%d" % n, b"x")) == "OK":
            created += 1
        assert outcome(lambda: guest.write(b"data/q/last", b"x")) == "EQUOTA"
        assert created > 900
    finally:
        close_client(dom0)
        close_client(guest)
    oversized = Packet(int(XsOp.WRITE), 1, 0, b"/x\0" + b"y" * 4094)
    follow = request(XsOp.GET_DOMAIN_PATH, b"3", req_id=2)
    replies = raw_exchange(server.dom0_socket, [oversized, follow], replies=2)
    assert replies is not None
    assert [(p.req_id, p.payload) for p in replies] == [(1, b"E2BIG\0"), (2, b"/local/domain/3\0")]


# -- interoperability and the demo -----------------------------------------------------


@pytest.mark.skipif(shutil.which("xenstore-write") is None, reason="xenstore-utils missing")
def test_debian_xenstore_utils_talk_to_it(xs_server: XsServer) -> None:
    env = dict(os.environ, XENSTORED_PATH=str(xs_server.dom0_socket))

    def run(*argv: str) -> str:
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=WAIT_S, check=True
        ).stdout

    run("xenstore-write", "/cli/a", "hello")
    run("xenstore-chmod", "/cli/a", "n0", "r5")
    assert run("xenstore-read", "/cli/a") == "hello\n"
    assert "(n0,r5)" in run("xenstore-ls", "-p", "/cli")


def test_demo_main() -> None:
    directory = Path("/tmp") / f"xs-demo-{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xentmem.mock_xenstored", "--dir", str(directory),
         "--domain", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        printed = dict(lines.get(timeout=10 * WAIT_S).strip().split("=", 1) for _ in range(2))
        assert printed["XENSTORED_PATH"] == str(directory / "socket")
        guest = connect(Path(printed["DOMAIN_5_SOCKET"]))
        try:
            assert guest.read(b"name") == b"guest-5"
        finally:
            close_client(guest)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10 * WAIT_S) == 0
        assert not (directory / "socket").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_S)
        shutil.rmtree(directory, ignore_errors=True)


def test_threads_sharing_a_client(xs_server: XsServer) -> None:
    client = connect(xs_server.dom0_socket)
    errors: list[str] = []

    def work(n: int) -> None:
        for i in range(100):
            client.write(b"/t/%d/%d" % (n, i), b"%d" % i)
            if client.read(b"/t/%d/%d" % (n, i)) != b"%d" % i:
                errors.append(f"{n}/{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10 * WAIT_S)
    try:
        assert not errors and not any(t.is_alive() for t in threads)
        assert sorted(client.list(b"/t")) == [b"0", b"1", b"2", b"3"]
    finally:
        close_client(client)
