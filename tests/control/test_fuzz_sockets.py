"""Both control sockets against hostile clients: deep nesting, huge and partial lines, junk,
idle connections holding every slot, and a burst of clients, all at once.

A real ``xentmemd`` (a subprocess on a fake root, zcache) and a real ``xentmem-hostd``
service (in process, on the stand-in xenstored) are attacked from many threads with seeded
random input.  Every well-formed request must get its own answer, in order, on its own
connection; the daemon must stay up, log no traceback, and still answer afterwards.  Bounded:
a fixed number of cases, every socket wait with a timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakes.guest_daemon import DaemonProcess, make_root

from xentmem.control import ControlClient, ControlConnection, protocol
from xentmem.control.server import DEFAULT_MAX_CLIENTS
from xentmem.hostd.control import HostControlClient
from xentmem.hostd.service import HostService
from xentmem.hostd.store import HostStore
from xentmem.mock_xenstored.server import XsServer

SEEDS = (1, 2)
WAIT_S = 30.0
#: The idle timeout both daemons get here (seconds): short, so the test is.
IDLE_S = 1
#: Codes a malformed line may get; anything else (internal above all) is a bug.
REFUSALS = {protocol.BAD_REQUEST, protocol.UNSUPPORTED_VERSION, protocol.UNKNOWN_OP,
            protocol.BAD_ARGS}


@dataclass
class Target:
    """One daemon's socket, a read-only op it answers, and how to tell it is still up."""

    name: str
    path: Path
    good_op: str
    client: Callable[[], ControlConnection]
    alive: Callable[[], bool]
    log: Callable[[], str]


@pytest.fixture(scope="module")
def xentmemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    base = tmp_path_factory.mktemp("xentmemd")
    config = base / "xentmem.toml"
    config.write_text(f"[daemon]\ncontrol_idle_timeout = {IDLE_S}\n")
    process = DaemonProcess(base, make_root(base), config)
    process.wait_ready()
    yield Target("xentmemd", process.socket, "frontswap.curr_pages",
                 lambda: ControlClient(process.socket, timeout=WAIT_S),
                 lambda: process.proc.poll() is None, process.log)
    assert process.stop() == 0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + ("\nTraceback" if record.exc_info else ""))


@pytest.fixture(scope="module")
def hostd() -> Iterator[Target]:
    short = Path(tempfile.mkdtemp(prefix="fuzz-", dir="/tmp"))  # AF_UNIX paths are short
    records = _Records()
    logging.getLogger("xentmem").addHandler(records)
    try:
        with XsServer(short / "xs") as server:
            control = short / "hostd.sock"
            service = HostService(xenstore=server.dom0_socket, store=HostStore(64 << 20),
                                  control_path=control)
            assert service.control is not None
            service.control.idle_timeout_s = IDLE_S
            service.open()
            thread = threading.Thread(target=service.run, name="hostd", daemon=True)
            thread.start()
            yield Target("xentmem-hostd", control, "freeable",
                         lambda: HostControlClient(control, timeout=WAIT_S),
                         thread.is_alive, lambda: "\n".join(records.lines))
            service.stop()
            thread.join(WAIT_S)
            service.close()
    finally:
        logging.getLogger("xentmem").removeHandler(records)
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(params=["xentmemd", "hostd"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue(request.param)


# -- what the clients send -------------------------------------------------------------------


def good(target: Target, request_id: int) -> bytes:
    return protocol.encode_request(target.good_op, {}, request_id)


def deep(rng: random.Random) -> bytes:
    depth = rng.choice([protocol.MAX_REQUEST_DEPTH + 1, 1_000, rng.randrange(33, 30_000)])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * depth
    if rng.random() < 0.5:  # inside a request that has an id and an op
        return b'{"v":1,"id":7,"op":"hello","args":{"x":' + inner + b"}}"
    return inner[: protocol.MAX_REQUEST_BYTES]


def junk(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(b"\n", b"")
    if kind == 1:
        return b"\xff\xfe" + b"x" * rng.randrange(100)
    if kind == 2:
        return b'{"v":1,"id":3,"op":"' + b"a" * rng.randrange(100)  # cut short
    if kind == 3:
        return json.dumps({"v": 1, "op": "hello", "args": {"x": "[" * 500}}).encode()[:-1]
    if kind == 4:
        return b'"' + b'\\"[' * rng.randrange(1, 5000)  # an endless string
    return json.dumps({"v": rng.choice([0, 2, "1"]), "op": "hello"}).encode()


def read_lines(sock: socket.socket, count: int) -> list[dict]:
    data = b""
    while data.count(b"\n") < count:
        try:
            chunk = sock.recv(65536)
        except OSError:  # a reset after the daemon's last words
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def connect(target: Target) -> socket.socket:
    """A raw connection the daemon took: a busy one is asked again, as the client does."""
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT_S)
        sock.connect(str(target.path))
        with contextlib.suppress(OSError):  # a busy daemon may have closed it already
            sock.sendall(good(target, 0))
        said = read_lines(sock, 1)
        if said and said[0].get("ok"):
            return sock
        sock.close()
        assert said and said[0]["error"]["code"] == protocol.BUSY, said
        threading.Event().wait(0.05)
    raise AssertionError("the daemon stayed busy")


# -- the clients -----------------------------------------------------------------------------


def pipelined(target: Target, rng: random.Random, failures: list[str]) -> None:
    """Good and bad lines on one connection, sent in pieces cut anywhere: one answer per
    line, in order, the good ones answered by id."""
    lines: list[tuple[bytes, int | None]] = []
    for index in range(rng.randrange(5, 25)):
        pick = rng.random()
        if pick < 0.4:
            lines.append((good(target, 1000 + index).rstrip(b"\n"), 1000 + index))
        else:
            bad = deep(rng) if pick < 0.7 else junk(rng)
            lines.append((bad[: protocol.MAX_REQUEST_BYTES - 1], None))
    with connect(target) as sock:
        payload = b"\n".join(line for line, _ in lines) + b"\n"
        position = 0
        while position < len(payload):
            step = rng.randrange(1, 8193)
            sock.sendall(payload[position:position + step])
            position += step
        expected = [(line, request_id) for line, request_id in lines if line.strip()]
        replies = read_lines(sock, len(expected))
    if len(replies) != len(expected):
        failures.append(f"{len(expected)} lines, {len(replies)} answers")
        return
    for (line, request_id), reply in zip(expected, replies):
        if request_id is not None:
            if not (reply.get("ok") and reply.get("id") == request_id):
                failures.append(f"good request {request_id} got {reply}")
        elif reply.get("ok") or reply["error"]["code"] not in REFUSALS:
            failures.append(f"{line[:60]!r} got {reply}")


def huge(target: Target, rng: random.Random, failures: list[str]) -> None:
    """A line past the limit: one bad_request, then the connection is closed."""
    with connect(target) as sock:
        size = protocol.MAX_REQUEST_BYTES + rng.randrange(1, 200_000)
        body = (b"[" if rng.random() < 0.5 else b"x") * size
        with contextlib.suppress(OSError):  # closed while we still send: the answers came
            sock.sendall(good(target, 1) + body + b"\n")
        replies = read_lines(sock, 3)
    if [r.get("ok") for r in replies] != [True, False]:
        failures.append(f"huge line: {replies}")


def partial(target: Target, rng: random.Random, failures: list[str]) -> None:
    """Half a request, then the client goes away."""
    with connect(target) as sock:
        sock.sendall(good(target, 5)[: rng.randrange(1, 20)])


def burst(target: Target, count: int, failures: list[str]) -> None:
    """Many clients at once, each with its own connection: every one is answered."""
    errors: list[str] = []
    start = threading.Event()

    def one() -> None:
        start.wait(WAIT_S)
        try:
            with target.client() as client:
                client.call(target.good_op)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    start.set()
    for thread in threads:
        thread.join(2 * WAIT_S)
    failures.extend(errors)


def guarded(client: Callable[..., None], *args: object) -> threading.Thread:
    """A thread running ``client``; whatever it raises is a failure (the last argument)."""
    failures = args[-1]
    assert isinstance(failures, list)

    def run() -> None:
        try:
            client(*args)
        except Exception as exc:
            failures.append(f"{client.__name__}: {exc!r}")

    return threading.Thread(target=run)


@pytest.mark.parametrize("seed", SEEDS)
def test_hostile_clients_do_not_cost_good_requests_their_answers(target: Target,
                                                                 seed: int) -> None:
    rng = random.Random(seed)
    failures: list[str] = []
    # Idle connections taking every slot (and more): they time out, the others get in.
    idle = []
    for _ in range(DEFAULT_MAX_CLIENTS + 8):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT_S)
        sock.connect(str(target.path))
        idle.append(sock)
    try:
        # Each worker has its own generator, so a seed replays the same input.
        def rngs(count: int) -> list[random.Random]:
            return [random.Random(rng.random()) for _ in range(count)]

        workers = [guarded(pipelined, target, r, failures) for r in rngs(6)]
        workers += [guarded(huge, target, r, failures) for r in rngs(2)]
        workers += [guarded(partial, target, r, failures) for r in rngs(4)]
        workers.append(guarded(burst, target, 60, failures))
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(4 * WAIT_S)
        assert not any(worker.is_alive() for worker in workers)
    finally:
        for sock in idle:
            sock.close()
    assert failures == []
    assert target.alive()
    with target.client() as client:
        client.call(target.good_op)
    assert "Traceback" not in target.log()
