"""The control socket in process: error replies that change nothing, concurrent clients,
bounded requests, the busy limit, access modes, and the client's own failures."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xentmem.clock import FakeClock
from xentmem.control import ControlClient, ControlError, protocol
from xentmem.guestd import handlers
from xentmem.guestd.core import Daemon
from xentmem.guestd.server import ControlServer, ServerError

PAGE = 4096


@dataclass
class Served:
    daemon: Daemon
    server: ControlServer


@pytest.fixture
def served(tmp_path: Path, make_daemon) -> Any:
    """A daemon core with zcache loaded (loops off), served on a socket in tmp_path."""
    daemon = make_daemon(None, overrides=("selfballooning_at_load=0", "selfshrinking=0"))
    daemon.load("zcache", {"capacity": "16M"})
    daemon.state = "running"
    server = ControlServer(tmp_path / "run" / "control.sock",
                           lambda line: handlers.handle_line(daemon, line), max_clients=4)
    server.start()
    yield Served(daemon, server)
    server.stop()


def raw_exchange(path: Path, payload: bytes, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send raw bytes, read reply lines until the daemon closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line]


def snapshot(client: ControlClient) -> Any:
    status = client.status()
    for volatile in ("uptime_s",):
        status.pop(volatile)
    status["balloon"].pop("history", None)
    return status, client.params_list(), client.stats(), client.pools()


@pytest.mark.parametrize(
    ("op", "args", "code"),
    [
        ("reboot", {}, protocol.UNKNOWN_OP),
        ("params.set", {"name": "capacity", "value": "lots"}, protocol.BAD_VALUE),
        ("params.set", {"name": "capacity", "value": "99T"}, protocol.BAD_VALUE),
        ("params.set", {"name": "max_pools", "value": 2}, protocol.BAD_VALUE),
        ("params.set", {"name": "cleancache", "value": 0}, protocol.BAD_VALUE),
        ("params.set", {"name": "selfballoon_interval", "value": 0}, protocol.BAD_VALUE),
        ("params.set", {"name": "nosuch", "value": 1}, protocol.NOT_FOUND),
        ("params.set", {"name": "bogus.capacity", "value": "1M"}, protocol.NOT_FOUND),
        ("params.get", {"name": "nosuch"}, protocol.NOT_FOUND),
        ("params.set", {"name": "capacity"}, protocol.BAD_ARGS),
        ("backend.load", {"name": "zcache"}, protocol.BACKEND_ERROR),
        ("backend.load", {"name": "nosuch"}, protocol.NOT_FOUND),
        ("cleancache.put_page", {"pool_id": 5, "key": 1, "index": 0,
                                 "data": protocol.encode_bytes(bytes(PAGE))}, protocol.NOT_FOUND),
        ("frontswap.store", {"type": 3, "offset": 0,
                             "data": protocol.encode_bytes(bytes(PAGE))}, protocol.NOT_FOUND),
        ("frontswap.init", {"pages": 0}, protocol.BAD_VALUE),
        ("frontswap.init", {"pages": 1 << 30}, protocol.BAD_VALUE),
        ("frontswap.init", {"pages": 8, "backing": "/etc/passwd"}, protocol.BAD_VALUE),
        ("frontswap.init", {"pages": 8, "type": 99}, protocol.BAD_VALUE),
        ("frontswap.shrink", {"target_pages": "all"}, protocol.BAD_ARGS),
        ("cleancache.init_shared_fs", {"uuid": "not-a-uuid"}, protocol.BAD_VALUE),
    ],
)
def test_refused_requests_change_nothing(served: Any, op: str, args: dict, code: str) -> None:
    server = served.server
    with ControlClient(server.path, timeout=5) as client:
        before = snapshot(client)
        with pytest.raises(ControlError) as caught:
            client.call(op, **args)
        assert caught.value.code == code, caught.value.message
        assert caught.value.message
        assert snapshot(client) == before


def test_page_errors_inside_an_area_change_nothing(served: Any) -> None:
    server = served.server
    with ControlClient(server.path, timeout=5) as client:
        swap = client.frontswap.init(pages=4)
        client.frontswap.store(swap, 1, b"a" * PAGE)
        before = snapshot(client)
        for call in (lambda: client.frontswap.store(swap, 4, b"b" * PAGE),      # past the end
                     lambda: client.frontswap.store(swap, 1, b"short"),         # not a page
                     lambda: client.frontswap.init(pages=4, swap_type=swap)):   # type taken
            with pytest.raises(ControlError) as caught:
                call()
            assert caught.value.code == protocol.BAD_VALUE
        assert snapshot(client) == before
        assert client.frontswap.load(swap, 1) == b"a" * PAGE


def test_malformed_lines_get_error_replies_and_the_connection_goes_on(served: Any) -> None:
    server = served.server
    replies = raw_exchange(server.path, b"garbage\n\n[]\n"
                           b'{"v":1,"id":"x","op":"nope"}\n{"v":7,"id":3,"op":"status"}\n'
                           b'{"v":1,"id":9,"op":"frontswap.curr_pages"}\n')
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert [r.get("error", {}).get("code") for r in replies[:4]] == [
        protocol.BAD_REQUEST, protocol.BAD_REQUEST, protocol.UNKNOWN_OP,
        protocol.UNSUPPORTED_VERSION]
    assert replies[2]["id"] == "x" and replies[3]["id"] == 3
    assert replies[4] == {"v": 1, "id": 9, "ok": True, "result": {"pages": 0}}


def test_an_overlong_line_is_refused_and_the_connection_closed(served: Any) -> None:
    server = served.server
    payload = b'{"v":1,"op":"status","id":"' + b"x" * (protocol.MAX_REQUEST_BYTES + 10)
    replies = raw_exchange(server.path, payload)
    assert len(replies) == 1
    assert replies[0]["error"]["code"] == protocol.BAD_REQUEST
    assert "longer than" in replies[0]["error"]["message"]


def test_concurrent_clients_each_get_their_own_answers(served: Any) -> None:
    daemon, server = served.daemon, served.server
    with ControlClient(server.path, timeout=5) as setup:
        areas = [setup.frontswap.init(pages=64) for _ in range(4)]
    errors: list[BaseException] = []

    def worker(swap_type: int) -> None:
        try:
            with ControlClient(server.path, timeout=10) as client:
                for offset in range(64):
                    data = bytes([swap_type, offset]) * (PAGE // 2)
                    client.frontswap.store(swap_type, offset, data)
                for offset in range(64):
                    assert client.frontswap.load(swap_type, offset) == \
                        bytes([swap_type, offset]) * (PAGE // 2)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in areas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert daemon.shim.frontswap.stats()["succ_stores"] == 4 * 64


def test_one_client_shared_by_threads(served: Any) -> None:
    server = served.server
    results: list[int] = []
    with ControlClient(server.path, timeout=5) as client:
        threads = [threading.Thread(target=lambda: results.append(
            client.frontswap.curr_pages())) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert results == [0] * 8


def test_busy_beyond_max_clients(served: Any) -> None:
    server = served.server
    held = [ControlClient(server.path, timeout=5) for _ in range(4)]
    try:
        for client in held:
            client.hello()
        # The client tries again while its timeout lasts, then says busy (not "unavailable").
        # Long enough for a busy machine's server to say busy at least once.
        with pytest.raises(ControlError) as caught:
            ControlClient(server.path, timeout=2.0).hello()
        assert caught.value.code == protocol.BUSY
        message = caught.value.message
        assert "more than 4 clients" in message and "still busy" in message
    finally:
        for client in held:
            client.close()


def test_socket_is_owner_only_and_can_be_opened_to_a_group(served: Any) -> None:
    server = served.server
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    server.set_access(0, str(os.getgid()))
    info = os.stat(server.path)
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()
    with pytest.raises(ServerError, match="does not exist"):
        server.set_access(0, "no-such-group-xentmem")
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660  # unchanged


def test_a_mode_with_bits_for_others_is_refused(served: Any, tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="every local user"):
        ControlServer(tmp_path / "other.sock", lambda line: b"", mode=0o666)
    assert not (tmp_path / "other.sock").exists()
    server = served.server
    with pytest.raises(ServerError, match="every local user"):
        server.set_access(0o606, "")
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600  # unchanged


def test_a_second_server_on_the_same_path_is_refused(served: Any) -> None:
    server = served.server
    with pytest.raises(ServerError, match="another xentmemd"):
        ControlServer(server.path, lambda line: b"").start()


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    server = ControlServer(path, lambda line: protocol.encode_result(None, "pong"))
    server.start()
    try:
        assert raw_exchange(path, b'{"v":1,"op":"hello"}\n')[0]["result"] == "pong"
    finally:
        server.stop()
    assert not path.exists()


def test_requests_that_change_state_are_refused_while_stopping(served: Any) -> None:
    daemon, server = served.daemon, served.server
    with ControlClient(server.path, timeout=5) as client:
        daemon.state = "stopping"
        with pytest.raises(ControlError) as caught:
            client.frontswap.init(pages=4)
        assert caught.value.code == protocol.SHUTTING_DOWN
        assert client.status()["state"] == "stopping"  # reads still answer
        daemon.state = "running"


def test_client_failures_are_control_errors(tmp_path: Path) -> None:
    with pytest.raises(ControlError) as caught:
        ControlClient(tmp_path / "absent.sock", timeout=1).status()
    assert caught.value.code == protocol.UNAVAILABLE
    assert "is the daemon running" in caught.value.message

    # A daemon that never answers: the client's timeout ends the wait.
    path = tmp_path / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(1)
    try:
        with pytest.raises(ControlError) as caught:
            ControlClient(path, timeout=0.2).status()
        assert caught.value.code == protocol.TIMEOUT
    finally:
        mute.close()
    with pytest.raises(ValueError):
        ControlClient(path, timeout=0)


def test_client_reconnects_after_the_daemon_dropped_an_idle_connection(served: Any) -> None:
    server = served.server
    with ControlClient(server.path, timeout=5) as client:
        client.hello()
        assert client._sock is not None
        client._sock.shutdown(socket.SHUT_RDWR)  # as if the daemon had closed it
        assert client.frontswap.curr_pages() == 0


class HangUpAfter:
    """A fake daemon: answers the first ``answered`` request lines of each connection with
    ``{}`` and closes the connection on the next one, unanswered.  Counts every line."""

    def __init__(self, path: Path, answered: int = 1) -> None:
        self.path = path
        self.answered = answered
        self.lines: list[dict[str, Any]] = []
        self.connections = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._listener.settimeout(5.0)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self._listener.accept()
                self.connections += 1
                with conn:
                    conn.settimeout(5.0)
                    self._connection(conn)
        except OSError:
            return  # closed, or nobody came within the timeout

    def _requests(self, conn: socket.socket) -> Iterator[dict[str, Any]]:
        """The connection's request lines, parsed and counted, until the client closes."""
        buffer = b""
        while True:
            while b"\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\n")
            request = json.loads(line)
            self.lines.append(request)
            yield request

    def _connection(self, conn: socket.socket) -> None:
        for served, request in enumerate(self._requests(conn)):
            if served == self.answered:
                return  # hang up: the request was received whole, no answer
            conn.sendall(protocol.encode_result(request["id"], {}))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self._listener.close()
        self._thread.join(10)


@pytest.mark.parametrize("op", ["frontswap.init", "backend.unload", "cleancache.init_fs"])
def test_a_dropped_state_changing_request_is_never_sent_twice(tmp_path: Path, op: str) -> None:
    fake = HangUpAfter(tmp_path / "d.sock")
    try:
        with ControlClient(fake.path, timeout=5) as client:
            client.call("hello")  # the connection is now a kept-alive one
            args = {"pages": 8} if op == "frontswap.init" else {}
            with pytest.raises(ControlError) as caught:
                client.call(op, **args)
        assert caught.value.code == protocol.UNAVAILABLE
        assert "it may have run" in caught.value.message
        assert [line["op"] for line in fake.lines] == ["hello", op]
        assert fake.connections == 1
    finally:
        fake.close()


def test_a_dropped_read_only_request_is_retried_once(tmp_path: Path) -> None:
    fake = HangUpAfter(tmp_path / "d.sock")
    try:
        with ControlClient(fake.path, timeout=5) as client:
            client.call("hello")
            assert client.call("status") == {}  # dropped once, answered on a fresh connection
        assert [line["op"] for line in fake.lines] == ["hello", "status", "status"]
        assert fake.connections == 2
    finally:
        fake.close()


def test_a_deeply_nested_line_is_answered_and_the_connection_goes_on(served: Any) -> None:
    # Regression: RecursionError closed the connection; pipelined requests were lost.
    deep = b"[" * 1_000 + b"]" * 1_000
    replies = raw_exchange(served.server.path, deep + b"\n"
                           b'{"v":1,"id":9,"op":"frontswap.curr_pages"}\n')
    assert [r["ok"] for r in replies] == [False, True]
    assert replies[0]["error"]["code"] == protocol.BAD_REQUEST


def test_idle_connections_time_out_and_a_waiting_client_gets_in(tmp_path: Path,
                                                                 make_daemon: Any) -> None:
    # Regression: 32 idle connections locked every other client out with busy for 300 s.
    daemon = make_daemon(None, overrides=("selfballooning_at_load=0", "selfshrinking=0"))
    server = ControlServer(tmp_path / "control.sock",
                           lambda line: handlers.handle_line(daemon, line), max_clients=4,
                           idle_timeout_s=0.2)
    server.start()
    held = []
    try:
        for _ in range(4):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(server.path))
            held.append(sock)
        with ControlClient(server.path, timeout=10) as client:
            assert client.hello()["protocol"] == protocol.PROTOCOL_VERSION
        assert all(sock.recv(1) == b"" for sock in held)  # closed by the daemon, unasked
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_a_burst_of_clients_is_served_never_told_the_daemon_is_down(served: Any) -> None:
    # Regression: with a listen backlog of 16, 81-112 of 200 client threads got EAGAIN from
    # connect and "unavailable ... (is the daemon running?)" from a live daemon.
    errors: list[ControlError] = []
    answered: list[int] = []
    start = threading.Event()

    def one() -> None:
        start.wait(10)
        try:
            with ControlClient(served.server.path, timeout=30) as client:
                answered.append(client.frontswap.curr_pages())
        except ControlError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(200)]
    for thread in threads:
        thread.start()
    start.set()
    for thread in threads:
        thread.join(60)
    assert errors == [] and answered == [0] * 200


def test_a_full_listen_queue_is_busy_not_unavailable(tmp_path: Path) -> None:
    # A listener that never accepts: once its queue is full, connect fails with EAGAIN.
    path = tmp_path / "full.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    try:
        for _ in range(8):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(path))
            except BlockingIOError:
                sock.close()
                break
            queued.append(sock)
        with pytest.raises(ControlError) as caught:
            ControlClient(path, timeout=0.3).hello()
        assert caught.value.code == protocol.BUSY
        assert "is the daemon running" not in caught.value.message
    finally:
        for sock in queued:
            sock.close()
        listener.close()


class CloseUnread(HangUpAfter):
    """A fake daemon: answers the first request of a connection; when the next one arrives
    it closes the connection without reading it (as a daemon closing an idle connection at
    that very moment does); answers every request on later connections."""

    def _connection(self, conn: socket.socket) -> None:
        hang_up = self.connections == 1
        for request in self._requests(conn):
            conn.sendall(protocol.encode_result(request["id"], {}))
            if hang_up:
                select.select([conn], [], [], 5.0)  # the next request is waiting, unread
                return


def test_a_state_changing_request_the_daemon_never_read_is_sent_again(tmp_path: Path) -> None:
    # The daemon closed a kept-alive connection (idle timeout) with the request unread: the
    # reset says it never ran, so it is sent again rather than reported as "may have run".
    fake = CloseUnread(tmp_path / "d.sock")
    try:
        with ControlClient(fake.path, timeout=5) as client:
            client.call("hello")
            assert client.call("cleancache.init_fs") == {}
        assert [line["op"] for line in fake.lines] == ["hello", "cleancache.init_fs"]
        assert fake.connections == 2
    finally:
        fake.close()


@pytest.fixture
def timed(tmp_path: Path, make_daemon: Any) -> Iterator[tuple[ControlServer, FakeClock]]:
    """A server whose limits run on a FakeClock the test moves: limits far longer than any
    wait here, so only the clock's jumps can end a connection."""
    daemon = make_daemon(None, overrides=("selfballooning_at_load=0", "selfshrinking=0"))
    clock = FakeClock(100.0)
    server = ControlServer(tmp_path / "control.sock",
                           lambda line: handlers.handle_line(daemon, line),
                           idle_timeout_s=60.0, io_timeout_s=120.0, clock=clock)
    server.start()
    yield server, clock
    server.stop()


def connected(server: ControlServer, first: bytes) -> socket.socket:
    """A connection that sent ``first`` (a request line, perhaps more) and read the reply:
    the server has taken that chunk and read its clock for it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.path))
    sock.sendall(first)
    reply = b""
    while not reply.endswith(b"\n"):
        reply += sock.recv(65536)
    assert json.loads(reply)["ok"]
    return sock


HELLO = b'{"v":1,"op":"hello"}\n'


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_line_trickled_a_byte_at_a_time_is_cut_at_its_deadline(timed: Any) -> None:
    """Fails before: the limit (10 s by default) was per receive, so a client sending one
    byte of an unfinished line every few seconds held one of the 32 slots for good; now a
    line must be whole within the limit from its first byte."""
    server, clock = timed
    slow = connected(server, HELLO + b"{")  # the line's first byte came with the reply
    for _ in range(3):
        clock.advance(50.0)  # each byte well within 120 s of the one before
        slow.sendall(b" ")
    assert closed_by_server(slow)
    slow.close()
    prompt = connected(server, HELLO + b'{"v":1,')
    clock.advance(110.0)
    prompt.sendall(b'"op":"hello"}\n')  # whole within its 120 s: answered
    assert json.loads(prompt.recv(65536))["ok"]
    prompt.close()


def test_blank_lines_do_not_keep_an_idle_connection(timed: Any) -> None:
    """Fails before: each blank line restarted the idle timeout, so a client sending only
    blank lines held its slot for good; blank lines are not requests."""
    server, clock = timed
    blank = connected(server, HELLO)
    for _ in range(3):
        clock.advance(25.0)  # 75 s since the last request, 25 s since the last blank line
        blank.sendall(b"\n")
    assert closed_by_server(blank)
    blank.close()
    busy = connected(server, HELLO)
    clock.advance(50.0)
    busy.sendall(HELLO)  # a request within the idle timeout: answered, the clock restarts
    assert json.loads(busy.recv(65536))["ok"]
    clock.advance(50.0)
    busy.sendall(HELLO)
    assert json.loads(busy.recv(65536))["ok"]
    busy.close()



def test_blank_lines_with_a_space_left_behind_do_not_keep_an_idle_connection(
        timed: Any) -> None:
    """Fails before: a buffer holding only a space counted as a line begun, so its line
    limit applied, not the idle timeout, and each chunk ``"\n "`` (a blank line, then a space
    again) restarted that limit: a client that never sent a request held its slot for good."""
    server, clock = timed
    sock = connected(server, HELLO + b" ")
    for _ in range(3):
        clock.advance(25.0)  # 75 s since the last request
        sock.sendall(b"\n ")
    assert closed_by_server(sock)
    sock.close()

def test_the_time_the_server_takes_over_a_request_is_not_the_next_lines(
        tmp_path: Path) -> None:
    """A line begun in the chunk of a request that takes long (an unload: minutes) gets
    its whole limit after that request's reply, not what the request left of it."""
    clock = FakeClock(100.0)

    def slow(line: bytes) -> bytes:
        clock.advance(300.0)  # longer than the line limit and the idle timeout
        return protocol.encode_result(None, "done")
    server = ControlServer(tmp_path / "control.sock", slow, idle_timeout_s=60.0,
                           io_timeout_s=120.0, clock=clock)
    server.start()
    try:
        sock = connected(server, HELLO + b'{"v":1,')
        clock.advance(100.0)
        sock.sendall(b'"op":"hello"}\n')
        assert json.loads(sock.recv(65536))["result"] == "done"
        sock.close()
    finally:
        server.stop()


def ask(path: Path) -> dict[str, Any]:
    """One hello on a connection of its own; the answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(HELLO)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return json.loads(reply)


def test_a_client_thread_that_cannot_start_costs_only_that_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails before: one failed thread start (a tasks limit, no memory) ended the accept
    loop for good (every later client queued, never answered), left its connection in a
    slot, and stop() raised joining the thread that never started.  Now that client is
    told busy, its slot is freed, and the next one is served."""
    server = ControlServer(tmp_path / "control.sock",
                           lambda line: protocol.encode_result(None, "pong"))
    server.start()
    real_start = threading.Thread.start
    failures = [RuntimeError("can't start new thread")]

    def flaky_start(thread: threading.Thread) -> None:
        if thread.name == "xentmem-control-client" and failures:
            raise failures.pop()
        real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", flaky_start)
    try:
        refused = ask(server.path)
        assert refused["error"]["code"] == protocol.BUSY
        assert "could not start a thread" in refused["error"]["message"]
        assert ask(server.path)["result"] == "pong"
        assert server._thread is not None and server._thread.is_alive()
    finally:
        server.stop()  # raised RuntimeError: cannot join thread before it is started
    assert server._clients == {}


def test_an_unexpected_accept_failure_does_not_end_the_accept_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails before: any exception of an accept ended the loop; now it is logged and the
    loop goes on (after ``ACCEPT_RETRY_S``, so a failure that repeats cannot spin it)."""
    server = ControlServer(tmp_path / "control.sock",
                           lambda line: protocol.encode_result(None, "pong"))
    real_accept = server.socket.accept
    failures = [ValueError("a bug")]

    def flaky_accept() -> socket.socket | None:
        if failures:
            raise failures.pop()
        return real_accept()
    monkeypatch.setattr(server.socket, "accept", flaky_accept)
    server.start()
    try:
        assert ask(server.path)["result"] == "pong"  # the turn that failed is retried
        assert failures == []
    finally:
        server.stop()
