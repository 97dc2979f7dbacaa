"""``xentmem-hostd`` SIGKILLed 20 times at random instants while two guests put and get
persistent pages, against Debian's C xenstored and oxenstored: every page a guest's put
acknowledged reads back exactly at the end, no get ever answers a wrong page, and no
acknowledged page is ever missing (``docs/protocol.md`` §10).

The service is the real process (``python -m xentmem.hostd run``) over a run directory; the
guests are two ``xen`` backends in this process, each on its own emulated ring.  A kill
comes after a random number of the guests' ops (an event, not a sleep); the restart is
waited for on its log line.  An op the outage makes fail (``-ETIMEDOUT``) is allowed, and a
put that failed leaves its page uncertain (the host may or may not have run it) until it is
put again: that is what frontswap does with a failed put (the page goes to the disk).
"""

from __future__ import annotations

import errno
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.xenstore_hosts import XenstoreHost
from xenhost import wait_for_node

from xentmem.guest.backends.xen import XenBackend
from xentmem.roots import Roots
from xentmem.tmem.abi import PAGE_SIZE, POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid

KILLS = 20
GUESTS = (5, 6)
INDEXES = 48
#: Generous waits: the machine may be busy; nothing here is a timed assertion.
START_S = 60.0
OPS_WAIT_S = 120.0
READY = "serving tmem for guests"


def content(domid: int, index: int, version: int) -> bytes:
    if version % 5 == 0:
        return random.Random(domid * 1_000_003 + index * 1009 + version).randbytes(PAGE_SIZE)
    head = b"domain %d index %d version %d " % (domid, index, version)
    return (head * (PAGE_SIZE // len(head) + 1))[:PAGE_SIZE]


class Hostd:
    """The real service process, restarted over the same run directory."""

    def __init__(self, xenstore: str, tmp: Path) -> None:
        self.xenstore = xenstore
        self.dir = tmp
        self.log = tmp / "hostd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "xentmem.hostd", "--control", str(self.dir / "c.sock"),
                "run", "--xenstore", self.xenstore, "--run-dir", str(self.dir / "run"),
                "--capacity", "256M", "--domain", "5", "--domain", "6"]
        with open(self.log, "ab") as log:
            log.write(b"--- start\n")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until the service logs that it serves (its devices set up or resumed)."""
        assert self.proc is not None and self.proc.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + START_S
        seen = b""
        with open(self.log, "ab") as log:
            while time.monotonic() < deadline:
                if not selector.select(deadline - time.monotonic()):
                    break
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                seen += chunk
                if READY.encode() in seen:
                    threading.Thread(target=self._copy_log, daemon=True).start()
                    return
        raise AssertionError(f"xentmem-hostd did not start: {self.log.read_text()[-3000:]}")

    def _copy_log(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stderr is not None
        with open(self.log, "ab") as log:
            for line in proc.stderr:
                log.write(line)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(START_S) == -signal.SIGKILL

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(START_S)

    def ensure_gone(self) -> None:
        """Whatever the test did: no service left serving the shared xenstored."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_S)


class Guest:
    """One guest: puts and gets persistent pages, keeping what was acknowledged."""

    def __init__(self, domid: int, roots: Roots, rng: random.Random,
                 host_up: threading.Event) -> None:
        self.domid = domid
        #: Set while the service runs: after a failed op the guest waits for it rather than
        #: spinning through ops that fail at once (the machine is shared).
        self.host_up = host_up
        self.backend = XenBackend({"timeout_ms": 2000, "stall_backoff_ms": 200,
                                   "batch": False}, roots=roots)
        self.backend.connect()
        self.pool = self.backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert self.pool == 0
        self.rng = rng
        #: index -> (version, page) a put acknowledged; uncertain: a put failed since.
        self.acked: dict[int, bytes] = {}
        self.uncertain: set[int] = set()
        self.version = 0
        self.errors: list[str] = []
        self.failed_ops = 0
        self.ops = 0

    def step(self) -> None:
        index = self.rng.randrange(INDEXES)
        if self.rng.random() < 0.5 or not self.acked:
            self.version += 1
            data = content(self.domid, index, self.version)
            rc = self.backend.put_page(self.pool, Oid(1), index, data)
            if rc == 1:
                self.acked[index] = data
                self.uncertain.discard(index)
            elif rc == -errno.ETIMEDOUT:
                self.failed_ops += 1
                self.uncertain.add(index)
                self.host_up.wait(OPS_WAIT_S)
            else:
                self.errors.append(f"put {index}: rc {rc}")
        else:
            index = self.rng.choice(sorted(self.acked))
            rc, data = self.backend.get_page(self.pool, Oid(1), index)
            if rc == -errno.ETIMEDOUT:
                self.failed_ops += 1
                self.host_up.wait(OPS_WAIT_S)
            elif index in self.uncertain:
                pass  # a failed put may or may not have replaced it
            elif rc != 1:
                self.errors.append(f"get {index}: acknowledged page missing (rc {rc})")
            elif data != self.acked[index]:
                self.errors.append(f"get {index}: wrong page")
        self.ops += 1

    def settle(self) -> None:
        """Put every uncertain page again, now that the host stays up: then every page the
        guest holds is acknowledged, and all of them are verified."""
        deadline = time.monotonic() + OPS_WAIT_S
        for index in sorted(self.uncertain):
            self.version += 1
            data = content(self.domid, index, self.version)
            while (rc := self.backend.put_page(self.pool, Oid(1), index, data)) != 1:
                # Still stalled from the last outage: wait for the host's sign (bounded).
                assert rc == -errno.ETIMEDOUT and time.monotonic() < deadline, (index, rc)
                self.backend._probe_host(wait=1.0)
            self.acked[index] = data
        self.uncertain.clear()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    made = Path(tempfile.mkdtemp(prefix="hostd-kill-", dir="/tmp"))
    yield made
    shutil.rmtree(made, ignore_errors=True)


@pytest.mark.parametrize("xenstore_host", [
    pytest.param("c-xenstored", marks=pytest.mark.xenpeer),
    pytest.param("oxenstored", marks=pytest.mark.xenpeer),
], indirect=True)
def test_sigkill_20_times_while_two_guests_put_and_get(xenstore_host: XenstoreHost,
                                                       short_tmp: Path) -> None:
    rng = random.Random(20261203)
    hostd = Hostd(str(xenstore_host.dom0_socket), short_tmp)
    guests: list[Guest] = []
    try:
        hostd.start()
        run_rounds(xenstore_host, hostd, guests, short_tmp, rng)
        for guest in guests:
            guest.backend.remove()
        guests.clear()
        assert hostd.stop() == 0, hostd.log.read_text()[-3000:]
        assert sorted(os.listdir(short_tmp / "run")) == []  # a clean stop leaves nothing
    finally:
        for guest in guests:
            guest.backend.remove()
        hostd.ensure_gone()
        dom0 = xenstore_host.dom0
        if dom0.exists(b"/local/domain/0/backend/tmem"):
            dom0.delete(b"/local/domain/0/backend/tmem")


def run_rounds(xenstore_host: XenstoreHost, hostd: Hostd, guests: list[Guest], tmp: Path,
               rng: random.Random) -> None:
    host_up = threading.Event()
    host_up.set()
    for domid in GUESTS:
        socket_path = xenstore_host.introduce(domid)
        wait_for_node(xenstore_host.dom0,
                      f"/local/domain/0/backend/tmem/{domid}/0/state".encode())
        root = tmp / f"guest{domid}"
        root.mkdir()
        guests.append(Guest(domid, Roots(root=root, xenstore_socket=socket_path),
                            random.Random(rng.random()), host_up))
    progress = threading.Condition()
    stop = threading.Event()
    crashed: list[BaseException] = []

    def work(guest: Guest) -> None:
        try:
            while not stop.is_set():
                guest.step()
                with progress:
                    progress.notify_all()
        except BaseException as exc:
            crashed.append(exc)
            with progress:
                progress.notify_all()

    def total_ops() -> int:
        return sum(g.ops for g in guests)

    threads = [threading.Thread(target=work, args=(g,), daemon=True) for g in guests]
    for thread in threads:
        thread.start()
    try:
        for _ in range(KILLS):
            target = total_ops() + rng.randrange(5, 60)  # a random instant, in ops
            with progress:
                assert progress.wait_for(lambda t=target: total_ops() >= t or crashed,
                                         OPS_WAIT_S), "the guests stopped making progress"
            assert not crashed, crashed
            host_up.clear()
            hostd.kill()
            hostd.start()
            host_up.set()
        target = total_ops() + 40
        with progress:
            assert progress.wait_for(lambda: total_ops() >= target or crashed, OPS_WAIT_S)
    finally:
        stop.set()
        host_up.set()
        for thread in threads:
            thread.join(OPS_WAIT_S)
    assert not crashed, crashed
    verified = 0
    for guest in guests:
        assert not guest.errors, (guest.domid, guest.errors[:5])
        uncertain = len(guest.uncertain)
        guest.settle()
        for index, data in sorted(guest.acked.items()):
            assert guest.backend.get_page(guest.pool, Oid(1), index) == (1, data), (
                guest.domid, index)
            verified += 1
        stats = guest.backend.stats()
        assert not guest.backend.describe()["broken"], guest.backend.describe()
        print(f"domain {guest.domid}: {guest.ops} ops, {guest.failed_ops} failed during "
              f"outages ({stats['timeouts']} timed out), {stats['host_outages']} outages "
              f"seen, {stats['host_returns']} returns, {uncertain} pages put again, "
              f"{len(guest.acked)} pages verified")
    print(f"{KILLS} kills, {verified} acknowledged pages verified")
    assert verified == sum(len(g.acked) for g in guests)
    log = hostd.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("resumed after a restart of the service") >= KILLS * len(GUESTS) // 2
