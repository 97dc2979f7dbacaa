"""The xenstore client of both ends on its own: bounded waits, error names, one message per
write on the xenbus device, posted requests and their refusals, transactions retried on
EAGAIN."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from fakes.xenstore_hosts import XenstoreHost

from xentmem.mock_xenstored.server import Malformation, XsServer
from xentmem.mock_xenstored.store import Limits
from xentmem.xenbus.xs import (
    XS,
    XenbusDevConnection,
    XsConnectionLost,
    XsError,
    XsSession,
    XsTimeout,
)


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        pass


def test_the_xenbus_device_gets_one_message_per_write() -> None:
    """Linux's xenbus_dev_frontend takes one message per write(2); more is EINVAL (seen on a
    real domU when a spilled message's chunks went in one write)."""
    connection = XenbusDevConnection("/dev/xen/xenbus")
    connection.transport = RecordingTransport()
    connection.send_frames([b"first", b"second", b"third"])
    assert connection.transport.writes == [b"first", b"second", b"third"]


class SocketAsDevice:
    """One end of a socket pair, read and written as the xenbus device is."""

    def __init__(self, sock) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_some(self, size: int) -> bytes:
        return self.sock.recv(size)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def test_the_client_on_the_device_sends_one_request_at_a_time() -> None:
    """The device gets each message in its own write(2), the next only after an answer."""
    import socket

    from xentmem.mock_xenstored.wire import Packet, PacketReader

    ours, device = socket.socketpair()
    seen: list[tuple[int, int]] = []  # (messages received in one read, op)

    def fake_device() -> None:
        reader = PacketReader()
        while True:
            data = device.recv(65536)
            if not data:
                return
            packets = [p for p in reader.feed(data) if isinstance(p, Packet)]
            for packet in packets:
                seen.append((len(packets), packet.op))
                device.sendall(Packet(packet.op, packet.req_id, 0, b"OK\0").encode())

    thread = threading.Thread(target=fake_device, daemon=True)
    thread.start()
    conn = XsSession("/dev/xen/xenbus", device=True, timeout=5.0)
    conn._connection.transport = SocketAsDevice(ours)  # as if os.open had given the device
    try:
        conn.post_write("/a", b"1")
        conn.post_write("/b", b"2")
        conn.write("/c", b"3")
        conn.settle()
        assert seen == [(1, XS.WRITE)] * 3
    finally:
        ours.close()  # the fake device reads the end of the stream and returns
        thread.join(5)
        device.close()


def test_waits_are_bounded_and_errors_keep_their_names(
        xenstore_host: XenstoreHost) -> None:
    socket_path = xenstore_host.introduce(5)
    with XsSession(socket_path=socket_path, timeout=5.0) as xs:
        assert xs.read(b"domid") == b"5"
        with pytest.raises(XsError) as denied:
            xs.write(b"/local/domain/0/forbidden", b"x")
        assert denied.value.name == "EACCES"
        assert xs.read_optional(b"data/nothing-here") is None
        events = xs.watch(b"data/w", b"tok")
        assert events.get(5.0) is not None  # the registration event
        xs.write(b"data/w", b"1")
        assert events.get(5.0).path == b"data/w"
        assert events.get(0.05) is None
        xs.unwatch(b"tok")

        calls = []

        xs.write(b"data/t", b"0")

        def body(tx: int) -> int:
            calls.append(tx)
            seen = int(xs.read(b"data/t", tx=tx) == b"outside")  # read, so a change conflicts
            xs.write(b"data/t", str(len(calls) + seen).encode(), tx=tx)
            if len(calls) == 1:  # a write outside the transaction makes the commit EAGAIN
                xenstore_host.dom0.write(b"/local/domain/5/data/t", b"outside")
            return len(calls)

        assert xs.transaction(body) == 2  # tried twice: the first commit got EAGAIN
        assert xs.read(b"data/t") == b"3"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_muted_server_times_out_and_a_broken_protocol_is_noticed(make_xs_server) -> None:
    server: XsServer = make_xs_server()
    guest = server.prepare_domain(5)
    with XsSession(socket_path=guest, timeout=0.3) as xs:
        server.faults.mute(5)
        with pytest.raises(XsTimeout, match="no answer from xenstore"):
            xs.read(b"domid")
        server.faults.unmute(5)
    with XsSession(socket_path=guest, timeout=2.0) as xs:
        server.faults.malform_next(5, Malformation.WRONG_REQ_ID)  # an answer nobody asked for
        with pytest.raises((XsConnectionLost, XsTimeout)):
            xs.read(b"domid")
        with pytest.raises(XsConnectionLost):
            xs.read(b"domid")  # no second wait: the session knows it is dead


def test_oxenstored_quota_errors_keep_their_name(make_xs_server) -> None:
    server: XsServer = make_xs_server(limits=Limits.oxenstored())
    guest = server.prepare_domain(5)
    with XsSession(socket_path=guest, timeout=5.0) as xs, pytest.raises(XsError) as big:
        xs.write(b"data/big", b"x" * 2100)
    assert big.value.name in ("E2BIG", "EQUOTA")


def test_posted_requests_are_pipelined_and_refusals_reported(xs_server: XsServer) -> None:
    refused: list[tuple[str, str]] = []
    with XsSession(xs_server.dom0_socket, timeout=5.0,
                on_error=lambda what, name: refused.append((what, name))) as conn:
        conn.post_write("/a", b"1")
        conn.post(XS.RM, b"/no/such/parent/x\x00", what="rm x")
        ids = [conn.post_read("/a")]
        assert conn.collect(ids[0], what="read a", deadline=conn.clock.monotonic() + 5) == b"1"
        conn.settle()
        assert refused == [("rm x", "ENOENT")]
        conn.watch("/a", b"t")
        conn.write("/a", b"2")
        conn.settle()
        while len(conn.events) < 2:
            conn.pump(5.0)
        assert [e[0] for e in conn.events] == [b"/a", b"/a"]
        assert conn.is_domain_introduced(0) in (True, False)


def test_a_silent_server_times_out(tmp_path: Path) -> None:
    import socket

    path = Path(os.path.join("/tmp", f"silent-{os.getpid()}.sock"))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    try:
        with XsSession(path, timeout=0.3) as conn, pytest.raises(XsTimeout):
            conn.read("/x")
    finally:
        listener.close()
        for sock in accepted:
            sock.close()
        path.unlink()


def test_xenbus_state_rules_are_the_kernels(xs_server: XsServer) -> None:
    """switch_state writes only a change, in a transaction that never recreates a vanished
    node; an unreadable state is Unknown; dev_fatal says why, then goes Closing."""
    from xentmem.tmem.abi import XenbusState
    from xentmem.xenbus.device import XenbusDevice, parse_state

    assert parse_state(None) is XenbusState.UNKNOWN
    assert parse_state(b"4") is XenbusState.CONNECTED
    assert parse_state(b"4\x00") is XenbusState.CONNECTED
    for nonsense in (b"", b"9", b"-1", b"4 ", b"x", b"12345678901"):
        assert parse_state(nonsense) is XenbusState.UNKNOWN, nonsense
    with XsSession(xs_server.dom0_socket, timeout=5.0) as xs:
        xs.write("/dev/a/state", b"1")
        xs.write("/dev/b/state", b"2")
        device = XenbusDevice(xs, "/dev/a", "/dev/b")
        assert device.read_state("/dev/a") is XenbusState.INITIALISING
        assert device.read_otherend_state() is XenbusState.INIT_WAIT
        own = xs.watch("/dev/a/state", b"own")
        assert own.get(5.0) is not None  # the registration event
        device.state = XenbusState.INITIALISED
        device.switch_state(XenbusState.INITIALISED)  # unchanged: nothing written
        assert own.get(0.1) is None
        device.switch_state(XenbusState.CONNECTED)
        assert xs.read("/dev/a/state") == b"4"
        device.dev_fatal(71, "protocol error")
        assert xs.read("/dev/a/error") == b"71 protocol error"
        assert device.state is XenbusState.CLOSING
        xs.rm("/dev/a")
        with pytest.raises(XsError, match="vanished"):
            device.switch_state(XenbusState.CLOSED)
        assert xs.read_optional("/dev/a/state") is None
