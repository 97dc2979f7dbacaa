"""The server core both daemons share: the answer to a line, line framing, the listening
socket, and the loop-driven server ``xentmem-hostd`` uses."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xentmem.control import protocol
from xentmem.control.protocol import Arg, ControlError, OpSpec, Request
from xentmem.control.server import (
    ControlSocket,
    LineReader,
    PolledServer,
    ServerError,
    respond,
)

OPS = {spec.name: spec for spec in (
    OpSpec("echo", "say it back", (Arg("text", "str", "what to say"),), returns="{text}"),
    OpSpec("fail", "refuse"), OpSpec("crash", "a bug"), OpSpec("odd", "not JSON"),
)}


def run(request: Request) -> Any:
    if request.op == "fail":
        raise ControlError(protocol.NOT_FOUND, "nothing here")
    if request.op == "crash":
        raise RuntimeError("boom")
    if request.op == "odd":
        loop: list[Any] = []
        loop.append(loop)
        return loop  # a result json cannot encode
    return {"text": request.args["text"]}


def answer(line: bytes) -> dict[str, Any]:
    return json.loads(respond(line, OPS, run))


def test_a_line_becomes_its_answer_and_failures_become_codes() -> None:
    assert answer(b'{"v":1,"id":1,"op":"echo","args":{"text":"hi"}}') == {
        "v": 1, "id": 1, "ok": True, "result": {"text": "hi"}}
    assert answer(b'{"v":1,"id":2,"op":"status"}')["error"]["code"] == protocol.UNKNOWN_OP
    assert answer(b'{"v":1,"id":3,"op":"echo"}')["error"]["code"] == protocol.BAD_ARGS
    assert answer(b'{"v":1,"id":4,"op":"fail"}')["error"] == {
        "code": protocol.NOT_FOUND, "message": "nothing here"}
    crashed = answer(b'{"v":1,"id":5,"op":"crash"}')
    assert crashed["id"] == 5 and crashed["error"]["code"] == protocol.INTERNAL
    assert "crash" in crashed["error"]["message"] and "boom" in crashed["error"]["message"]
    assert answer(b'{"v":1,"id":6,"op":"odd"}')["error"]["code"] == protocol.INTERNAL
    assert answer(b'{"v":9,"id":7,"op":"echo"}')["id"] == 7  # the id of a refused line


def test_lines_are_cut_blank_ones_skipped_and_overlong_ones_seen() -> None:
    reader = LineReader(limit=10)
    reader.feed(b"one\n\n  \ntw")
    assert list(reader.lines()) == [b"one"]
    reader.feed(b"o\nthree")
    assert list(reader.lines()) == [b"two"] and reader.buffer == b"three"
    assert not reader.overlong
    reader.feed(b"x" * 10)
    assert reader.overlong


def test_the_socket_is_owner_only_and_a_live_one_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    first = ControlSocket(path, daemon="testd")
    first.bind()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert [p.name for p in tmp_path.iterdir()] == ["d.sock"]  # no staging dir left
        with pytest.raises(ServerError, match="another testd is listening"):
            ControlSocket(path, daemon="testd").bind()
    finally:
        first.close()
    assert not path.exists()
    with pytest.raises(ServerError, match="every local user"):
        ControlSocket(path, daemon="testd", mode=0o666)


@pytest.fixture
def polled(tmp_path: Path) -> Iterator[PolledServer]:
    """A PolledServer driven by a select loop on a thread, as xentmem-hostd's loop does."""
    server = PolledServer(tmp_path / "p.sock", lambda line: respond(line, OPS, run),
                          daemon="testd").open()
    stop_r, stop_w = os.pipe()

    def loop() -> None:
        while True:
            readable, _, _ = select.select([*server.filenos(), stop_r], [], [], 5.0)
            if stop_r in readable:
                return
            for fd in readable:
                server.ready(fd)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield server
    os.write(stop_w, b"x")
    thread.join(10)
    server.close()
    os.close(stop_r)
    os.close(stop_w)
    assert not server.path.exists()


def exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_a_polled_server_answers_in_order_on_one_connection(polled: PolledServer) -> None:
    replies = exchange(polled.path, b'{"v":1,"id":1,"op":"echo","args":{"text":"a"}}\n\n'
                                    b'garbage\n{"v":1,"id":2,"op":"fail"}\n')
    assert [r.get("result") for r in replies] == [{"text": "a"}, None, None]
    assert [r.get("error", {}).get("code") for r in replies] == [
        None, protocol.BAD_REQUEST, protocol.NOT_FOUND]


def test_a_polled_server_refuses_an_overlong_line_and_closes(polled: PolledServer) -> None:
    replies = exchange(polled.path, b"x" * (protocol.MAX_REQUEST_BYTES + 10))
    assert len(replies) == 1 and replies[0]["error"]["code"] == protocol.BAD_REQUEST
    assert "longer than" in replies[0]["error"]["message"]


DEEP = b"[" * 1_000 + b"]" * 1_000


def test_a_deeply_nested_line_is_answered_and_the_next_ones_too(polled: PolledServer) -> None:
    # Regression: a line nested 1,000 deep closed the connection (RecursionError) and the
    # requests pipelined after it were lost.
    replies = exchange(polled.path, DEEP + b"\n" + b'{"v":1,"id":1,"op":"echo",'
                       b'"args":{"text":' + DEEP + b'}}\n{"v":1,"id":2,"op":"echo",'
                       b'"args":{"text":"after"}}\n')
    assert [r.get("error", {}).get("code") for r in replies] == [
        protocol.BAD_REQUEST, protocol.BAD_REQUEST, None]
    assert replies[2]["result"] == {"text": "after"}


def test_a_line_the_checks_miss_is_still_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    def recursing(*_: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(protocol, "decode_request", recursing)
    assert answer(b'{"v":1,"id":1,"op":"echo"}')["error"]["code"] == protocol.BAD_REQUEST


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pump(server: PolledServer) -> None:
    """Run the loop's turns until nothing is readable (as xentmem-hostd's loop would)."""
    while True:
        readable, _, _ = select.select(server.filenos(), [], [], 0.5)
        if not readable:
            return
        for fd in readable:
            server.ready(fd)


def test_a_polled_server_bounds_its_clients_and_closes_idle_ones(tmp_path: Path) -> None:
    # Regression: xentmem-hostd kept any number of connections, idle or not, for ever.
    clock = FakeClock()
    server = PolledServer(tmp_path / "p.sock", lambda line: respond(line, OPS, run),
                          daemon="testd", max_clients=2, idle_timeout_s=5.0, clock=clock).open()
    socks = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            sock.connect(str(server.path))
            socks.append(sock)
        first, second, third = socks
        pump(server)
        assert server.clients == 2
        refused = json.loads(third.recv(65536))
        assert refused["id"] is None and refused["error"]["code"] == protocol.BUSY
        assert third.recv(1) == b""
        clock.now = 4.0
        second.sendall(b'{"v":1,"id":1,"op":"echo","args":{"text":"still here"}}\n')
        pump(server)
        assert json.loads(second.recv(65536))["result"] == {"text": "still here"}
        clock.now = 5.0  # first has been silent for 5 s, second for 1 s
        pump(server)
        assert first.recv(1) == b"" and server.clients == 1
        second.sendall(b'{"v":1,"id":2,')  # then half a line, and nothing more
        clock.now = 8.9
        pump(server)
        assert server.clients == 1
        clock.now = 13.9
        pump(server)
        assert second.recv(1) == b"" and server.clients == 0
    finally:
        for sock in socks:
            sock.close()
        server.close()


def test_a_polled_server_drops_a_client_trickling_bytes_or_blank_lines(
        tmp_path: Path) -> None:
    """Fails before: any byte restarted the idle timeout, so a client sending a byte of an
    unfinished line, or a blank line, every few seconds held its slot for good; now only
    an answered request does."""
    clock = FakeClock()
    server = PolledServer(tmp_path / "p.sock", lambda line: respond(line, OPS, run),
                          daemon="testd", idle_timeout_s=5.0, clock=clock).open()
    socks = []
    try:
        for _ in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            sock.connect(str(server.path))
            socks.append(sock)
        trickling, blank = socks
        pump(server)
        trickling.sendall(b'{"v":1,')
        for now in (2.0, 4.0, 6.0):
            clock.now = now
            trickling.sendall(b" ")
            blank.sendall(b"\n")
            pump(server)
        assert server.clients == 0
        for sock in socks:  # closed with the last bytes unread: a reset, or an end
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
    finally:
        for sock in socks:
            sock.close()
        server.close()


def test_a_polled_server_takes_a_burst_in_one_turn(tmp_path: Path) -> None:
    server = PolledServer(tmp_path / "p.sock", lambda line: respond(line, OPS, run),
                          daemon="testd", max_clients=300).open()
    socks = []
    try:
        for _ in range(200):  # more than the old backlog of 16, none accepted yet
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect(str(server.path))  # EAGAIN here was "is the daemon running?"
            socks.append(sock)
        listener = server.socket.listener
        assert listener is not None
        server.ready(listener.fileno())
        assert server.clients == 200
    finally:
        for sock in socks:
            sock.close()
        server.close()


def test_a_polled_server_never_waits_on_a_silent_client(tmp_path: Path) -> None:
    # ready() for a descriptor with nothing to read (reused after an expiry) must neither
    # block the loop nor drop the client that now holds it.
    server = PolledServer(tmp_path / "p.sock", lambda line: respond(line, OPS, run),
                          daemon="testd", send_timeout_s=30.0).open()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
        pump(server)
        (fd,) = [fd for fd in server.filenos() if server.socket.listener.fileno() != fd]
        server.ready(fd)  # nothing sent: returns at once
        assert server.clients == 1
        sock.sendall(b'{"v":1,"id":1,"op":"echo","args":{"text":"ok"}}\n')
        pump(server)
        sock.settimeout(5.0)
        assert json.loads(sock.recv(65536))["result"] == {"text": "ok"}
    server.close()
