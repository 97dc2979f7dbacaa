"""A guest's session across a crash of the host service (``docs/protocol.md`` §10): the
service's store and sessions in a run directory, the service stopped as a kill stops it
(:meth:`TmemHost.crash`: nothing told, nothing dropped) and started again over the same
directory.  Against our xenstored and Debian's two daemons (the ``xenstore_host`` fixture).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.xenstore_hosts import outcome
from xenhost import TIMEOUT_MS, WAIT_S, TmemHost

from xentmem.guest.backends.xen import MAX_PENDING_FLUSHES, XenBackend, _Slot
from xentmem.hostd.control import HostControlClient
from xentmem.hostd.tmemback import TmemBack
from xentmem.tmem.abi import (
    EEMPTY,
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    TMEM_POOL_PERSIST,
    Oid,
    PoolUuid,
)
from xentmem.xenbus.area import REQ_NAMES
from xentmem.xenbus.body import OpRecord, encode_request
from xentmem.xenbus.framing import Limits, frame
from xentmem.xenbus.session_key import SessionKey
from xentmem.xenbus.xs import XsTimeout

TEXT = (b"static int tmem_resume(struct tmem_pool *pool);\n" * 90)[:PAGE_SIZE]


def page(n: int) -> bytes:
    return (b"%06d" % n + TEXT)[:PAGE_SIZE] if n % 4 else random.Random(n).randbytes(PAGE_SIZE)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    made = Path(tempfile.mkdtemp(prefix="hostd-run-", dir="/tmp"))
    yield made
    shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
def host(run_dir: Path, tmem_host: TmemHost) -> TmemHost:
    tmem_host.stop()
    tmem_host.start(run_dir=run_dir)
    return tmem_host


def listing(host: TmemHost, domid: int) -> dict[str, Any]:
    with HostControlClient(host.control_path, timeout=WAIT_S) as control:
        return control.call("list", domid=domid)


def client_of(host: TmemHost, domid: int) -> dict[str, Any]:
    (found,) = [c for c in listing(host, domid)["clients"] if c["domid"] == domid]
    return found


def connect(host: TmemHost, domid: int, **params: Any) -> XenBackend:
    backend = XenBackend({"timeout_ms": TIMEOUT_MS * 4, "batch": False, **params},
                         roots=host.guest(domid))
    backend.connect()
    return backend


def test_a_crashed_host_resumes_every_session_with_its_pages(host: TmemHost,
                                                             run_dir: Path) -> None:
    a, b = connect(host, 5), connect(host, 6)
    try:
        pa = a.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        ea = a.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        pb = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        for n in range(12):
            assert a.put_page(pa, Oid(1), n, page(n)) == 1
            assert b.put_page(pb, Oid(2), n, page(n + 50)) == 1
        assert a.put_page(ea, Oid(3), 0, page(99)) == 1
        host.crash()
        host.start(run_dir=run_dir)
        # No new handshake: the same pool ids, the same pages, exactly.
        for n in range(12):
            assert a.get_page(pa, Oid(1), n) == (1, page(n))
            assert b.get_page(pb, Oid(2), n) == (1, page(n + 50))
        assert a.get_page(ea, Oid(3), 0) == (1, page(99))  # exclusive: taken now
        assert a.get_page(ea, Oid(3), 0) == (-EEMPTY, None)  # the pool holds nothing
        assert a.put_page(pa, Oid(1), 12, page(12)) == 1
        assert client_of(host, 5)["persistent_pages"] == 13
        assert host.service is not None
        assert host.service.devices[5].counters.sessions == 0  # resumed, not reconnected
        assert not a.describe()["broken"] and not b.describe()["broken"]
    finally:
        a.remove()
        b.remove()


def test_a_domain_gone_while_the_host_was_down_is_forgotten_with_its_settings(
        host: TmemHost, run_dir: Path) -> None:
    """A guest's client now outlives its sessions (a reload keeps what the administrator
    set); one whose domain died while the service was down gets no @releaseDomain, so the
    restart forgets it then, settings and all: a domain given its domid later starts afresh.
    A guest still there keeps its client and pages."""
    a, b = connect(host, 5), connect(host, 6)
    try:
        pa = a.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        pb = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert a.put_page(pa, Oid(1), 0, page(1)) == 1
        assert b.put_page(pb, Oid(1), 0, page(2)) == 1
        with HostControlClient(host.control_path, timeout=WAIT_S) as control:
            control.call("set", domid=6, weight=7)
            control.call("freeze", domid=6)
        b.remove()  # the guest's device closes: its pools go, its client stays
        assert client_of(host, 6)["frozen"]
        host.crash()
        host.xs.kill(6)
        host.xs.dom0.delete(b"/local/domain/6")  # as the toolstack does once it is dead
        host.start(run_dir=run_dir)
        with HostControlClient(host.control_path, timeout=WAIT_S) as control:
            assert [c["domid"] for c in control.call("list")["clients"]] == [5]
        assert a.get_page(pa, Oid(1), 0) == (1, page(1))
    finally:
        a.remove()


def _lose_the_next_reply(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The service runs and records the next message, then dies before its reply is
    written: the reply never reaches xenstore."""
    served = threading.Event()

    def lost(self: TmemBack, seq: int, framed: object) -> None:
        served.set()

    monkeypatch.setattr(TmemBack, "_reply", lost)
    return served


@pytest.mark.parametrize("kind", ["exclusive get", "persistent put"])
def test_a_reply_lost_with_the_host_is_answered_from_the_record_never_run_twice(
        host: TmemHost, run_dir: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    guest = connect(host, 5)
    try:
        eph = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        pers = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert guest.put_page(eph, Oid(1), 0, page(1)) == 1
        served = _lose_the_next_reply(monkeypatch)
        outcome: list[Any] = []
        if kind == "exclusive get":
            op = threading.Thread(target=lambda: outcome.append(guest.get_page(eph, Oid(1), 0)))
        else:
            op = threading.Thread(
                target=lambda: outcome.append(guest.put_page(pers, Oid(2), 0, page(2))))
        op.start()
        assert served.wait(WAIT_S)
        host.crash()
        monkeypatch.undo()
        host.start(run_dir=run_dir)  # sends the recorded reply again
        op.join(WAIT_S * 2)
        assert not op.is_alive()
        if kind == "exclusive get":
            assert outcome == [(1, page(1))]
            assert guest.get_page(eph, Oid(1), 0) == (-EEMPTY, None)  # taken once
        else:
            assert outcome == [1]
            client = client_of(host, 5)
            assert client["persistent_pages"] == 1
            assert client["stats"]["puts"] == 0  # this instance never ran it again
            assert guest.get_page(pers, Oid(2), 0) == (1, page(2))
    finally:
        guest.remove()


def test_the_guest_sees_the_outage_and_the_return(host: TmemHost, run_dir: Path) -> None:
    guest = connect(host, 5, stall_backoff_ms=60_000)
    try:
        pers = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert guest.put_page(pers, Oid(1), 0, page(1)) == 1
        host.crash()
        guest.set_param("timeout_ms", 300)  # short only while nobody can answer
        assert guest.put_page(pers, Oid(1), 1, page(2)) == -errno.ETIMEDOUT
        assert guest.get_page(pers, Oid(1), 0) == (-errno.ETIMEDOUT, None)  # fails fast
        described = guest.describe()
        assert described["stalled"] and described["outage"] is not None
        assert "no reply from the tmem host" in described["outage"]["why"]
        host.start(run_dir=run_dir)
        guest.set_param("timeout_ms", TIMEOUT_MS * 4)
        for _ in range(int(WAIT_S * 2)):  # the state watch fires when the host resumed us
            if guest.stats()["host_returns"]:
                break
            guest._probe_host(wait=1.0)
        assert guest.stats()["host_returns"] == 1 and guest.stats()["host_outages"] == 1
        assert guest.describe()["outage"] is None and not guest.describe()["stalled"]
        assert guest.get_page(pers, Oid(1), 0) == (1, page(1))  # nothing lost
        assert guest.put_page(pers, Oid(1), 1, page(2)) == 1
    finally:
        guest.remove()


def test_a_clean_stop_still_closes_the_guests(host: TmemHost, run_dir: Path) -> None:
    guest = connect(host, 5)
    try:
        pers = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert guest.put_page(pers, Oid(1), 0, page(1)) == 1
        host.stop()
        assert sorted(os.listdir(run_dir)) == []
        host.start(run_dir=run_dir)
        assert guest.get_page(pers, Oid(1), 0) == (-errno.ENODEV, None)
        assert "unload and load" in guest.describe()["broken"]
    finally:
        guest.remove()


def test_a_host_that_dies_in_a_guest_s_handshake_connects_it_with_the_key_it_read(
        host: TmemHost, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after it published its key and InitWait, before it answered the guest's
    Initialised: the next instance goes on with that key, the one the guest read (it once
    published a fresh one, and every message of the guest was refused as not its own)."""
    roots = host.guest(5)
    reached = threading.Event()
    monkeypatch.setattr(TmemBack, "_connect", lambda self: reached.set())  # dies here
    backend = XenBackend({"timeout_ms": TIMEOUT_MS, "connect_timeout_ms": 60000,
                          "batch": False}, roots=roots)
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            backend.connect()
        except BaseException as exc:  # reported below
            errors.append(exc)

    guest = threading.Thread(target=connect)
    guest.start()
    assert reached.wait(WAIT_S)
    host.crash()
    monkeypatch.undo()
    host.start(run_dir=run_dir)
    guest.join(WAIT_S)
    assert not guest.is_alive() and errors == []
    try:
        pool = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert pool >= 0
        assert backend.put_page(pool, Oid(1), 0, page(1)) == 1
        assert backend.get_page(pool, Oid(1), 0) == (1, page(1))
    finally:
        backend.remove()


def back_again(host: TmemHost, guest: XenBackend, run_dir: Path) -> None:
    """The crashed host started again, and the stalled guest told so by the state watch
    (polled with no wait, as the flusher polls: what came on the socket is read)."""
    host.start(run_dir=run_dir)
    guest.set_param("timeout_ms", TIMEOUT_MS * 4)
    deadline = time.monotonic() + WAIT_S
    while not guest.stats()["host_returns"]:
        assert time.monotonic() < deadline, "the guest never saw the host come back"
        guest._probe_host()
        threading.Event().wait(0.01)


@pytest.mark.parametrize("batch", [False, True])
def test_a_flush_or_a_put_that_failed_in_an_outage_leaves_no_older_page_behind(
        host: TmemHost, run_dir: Path, batch: bool) -> None:
    """While the guest stalls (the host crashed), a flush fails at once and a put is
    refused or dropped: each still removes the host's older copy before any later get
    (a flush was once forgotten, and a refused put left the old page to be read)."""
    guest = connect(host, 5, stall_backoff_ms=60_000, batch=batch)
    try:
        pers = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        eph = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        assert guest.put_page(pers, Oid(1), 0, page(1)) == 1
        assert guest.put_page(eph, Oid(1), 0, page(2)) == 1
        guest.flush_object(eph, Oid(9))  # a sync op: the posted put above goes with it
        host.crash()
        guest.set_param("timeout_ms", 300)  # short only while nobody can answer
        assert guest.get_page(pers, Oid(9), 9) == (-errno.ETIMEDOUT, None)  # the stall
        guest.flush_page(pers, Oid(1), 0)  # fails at once (batch off) or is posted
        assert guest.put_page(eph, Oid(1), 0, page(3)) in (1, -errno.ETIMEDOUT)
        back_again(host, guest, run_dir)
        gone = ((0, None), (-EEMPTY, None))  # a miss, or a pool holding nothing now
        assert guest.get_page(pers, Oid(1), 0) in gone
        assert guest.get_page(eph, Oid(1), 0) in gone
        assert guest.stats()["redelivered_flushes"] >= 1
    finally:
        guest.remove()


def test_a_persistent_pool_s_flushes_past_the_bound_are_kept_not_dropped(
        host: TmemHost, run_dir: Path) -> None:
    """Past ``MAX_PENDING_FLUSHES`` kept flushes, an ephemeral pool is poisoned (its gets
    miss), but a persistent pool's pages cannot be given up: its flushes were dropped, so a
    swap slot whose newer put was refused in the outage answered with its older page."""
    guest = connect(host, 5, stall_backoff_ms=60_000)
    try:
        pers = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        eph = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        assert guest.put_page(pers, Oid(1), 0, page(1)) == 1
        assert guest.put_page(pers, Oid(1), 1, page(2)) == 1
        assert guest.put_page(eph, Oid(3), 0, page(4)) == 1
        host.crash()
        guest.set_param("timeout_ms", 300)  # short only while nobody can answer
        assert guest.get_page(pers, Oid(9), 9) == (-errno.ETIMEDOUT, None)  # the stall
        # The slot reused: its newer page refused, so the older one must go.
        assert guest.put_page(pers, Oid(1), 0, page(3)) == -errno.ETIMEDOUT
        assert guest.flush_page(eph, Oid(3), 0) == -errno.ETIMEDOUT
        for index in range(MAX_PENDING_FLUSHES + 1):
            assert guest.flush_page(pers, Oid(2), index) == -errno.ETIMEDOUT
        assert [p["poisoned"] for p in guest.pools()] == [False, True]  # eph's flush given up
        kept = guest.stats()["queued"]
        assert kept == MAX_PENDING_FLUSHES + 2
        for _ in range(3):  # a page flushed again and again is kept about once
            for index in range(MAX_PENDING_FLUSHES + 1):
                guest.flush_page(pers, Oid(2), index)
        assert guest.stats()["queued"] <= 2 * kept
        back_again(host, guest, run_dir)
        gone = ((0, None), (-EEMPTY, None))
        assert guest.get_page(pers, Oid(1), 0) in gone
        assert guest.get_page(pers, Oid(1), 1) == (1, page(2))  # the rest is kept
        assert guest.get_page(eph, Oid(3), 0) == (0, None)  # poisoned: a miss
    finally:
        guest.remove()




def test_the_kept_flushes_bound_starts_again_once_the_queue_has_drained() -> None:
    """An outage's persistent flushes raise the bound (the next look at twice what was
    kept); it stayed raised for the rest of the connection, so in the next outage a private
    ephemeral pool was poisoned only past that, not past ``MAX_PENDING_FLUSHES``."""
    backend = XenBackend({})
    backend._pool_flags = {0: TMEM_POOL_PERSIST, 1: 0}
    for index in range(4 * MAX_PENDING_FLUSHES):  # an outage: every one kept
        backend._queue.append(_Slot(OpRecord.flush_page(0, Oid(1), index), posted=True))
        backend._bound_pending()
    assert len(backend._queue) == 4 * MAX_PENDING_FLUSHES and not backend._poisoned
    backend._queue.clear()  # delivered, the host back
    for index in range(MAX_PENDING_FLUSHES + 1):  # the next outage
        backend._queue.append(_Slot(OpRecord.flush_page(1, Oid(2), index), posted=True))
        backend._bound_pending()
    assert backend._poisoned == {1}

def test_a_shared_pool_s_flushes_past_the_bound_are_kept_for_the_other_guests(
        host: TmemHost, run_dir: Path) -> None:
    """Poisoning a shared pool makes only this guest's gets miss: the guests sharing it
    read on.  Its flushes were given up past ``MAX_PENDING_FLUSHES`` as a private ephemeral
    pool's, so another guest read, after the outage, the page this one had invalidated."""
    uuid = "a1b2c3d4-0000-1111-2222-333344445555"
    a, b = connect(host, 5, stall_backoff_ms=60_000), connect(host, 6)
    try:
        with HostControlClient(host.control_path, timeout=WAIT_S) as control:
            for domid in (5, 6):
                control.call("shared-auth", domid=domid, uuid=uuid, auth=True)
        pa = a.new_pool(PoolUuid.from_uuid(uuid), POOL_SHARED_EPHEMERAL)
        pb = b.new_pool(PoolUuid.from_uuid(uuid), POOL_SHARED_EPHEMERAL)
        assert a.put_page(pa, Oid(1), 0, page(1)) == 1
        assert b.get_page(pb, Oid(1), 0) == (1, page(1))
        host.crash()
        a.set_param("timeout_ms", 300)  # short only while nobody can answer
        assert a.flush_page(pa, Oid(1), 0) == -errno.ETIMEDOUT  # the file page changed
        for index in range(MAX_PENDING_FLUSHES + 1):
            assert a.flush_page(pa, Oid(2), index) == -errno.ETIMEDOUT
        back_again(host, a, run_dir)
        assert a.flush_page(pa, Oid(8), 8) in (0, 1)  # after the kept flushes
        assert b.get_page(pb, Oid(1), 0) in ((0, None), (-EEMPTY, None))  # gone
    finally:
        a.remove()
        b.remove()

def test_a_resumed_session_clears_req_before_the_guest_s_quota_is_reached(
        host: TmemHost, run_dir: Path) -> None:
    """The host removes ``req/`` before the next message could take it past ``REQ_NAMES``
    names, and the crashed instance may leave it holding ``REQ_NAMES - 4`` (15 messages of
    four names).  Before, the resumed host counted from 0 again, so ``req/`` held up to 31
    messages before its next removal: with messages of four names each, 124 directory
    names, past C xenstored's 2048-byte record quota for ``req/`` (our xenstored keeps the
    same), and a part's write was refused (ENOSPC), the message torn and lost.  Now the
    first message served after resuming clears ``req/``."""
    roots = host.guest(5)
    backend = XenBackend({"timeout_ms": TIMEOUT_MS * 4, "batch": False}, roots=roots)
    backend.connect()
    fe = "/local/domain/5/device/tmem/0"
    try:
        guest = host.client(roots)  # the guest again, writing its messages by hand
        key = SessionKey.parse(host.xs.dom0.read(b"/local/domain/0/backend/tmem/5/0/session-key"))
        # Four names a message, however short its names: it is names that fill req/.
        body = encode_request([OpRecord.flush_page(0, Oid(1), n) for n in range(4)])
        small = Limits(inline_bytes=60)

        def send_and_wait(seq: int) -> None:
            framed = frame(seq, body, small, reply=False, key=key)
            assert framed.envelope.parts == 4
            names = [(p.name, key.slot(seq, p.k, reply=False)) for p in framed.parts]
            names.append((framed.envelope.name, key.slot(seq, reply=False)))
            written = [outcome(lambda n=n, s=s: guest.write(f"{fe}/req/{s}/{n}".encode(), b"-"))
                       for n, s in names]
            assert written == ["OK"] * 4, f"message {seq}: {written}"
            # Its reply, as the guest waits for it (the removal of req/ comes before it).
            reply = f"/local/domain/0/backend/tmem/5/0/rsp/{key.slot(seq, reply=True)}"
            deadline = time.monotonic() + WAIT_S
            while not guest.exists(reply.encode()):
                assert time.monotonic() < deadline, f"message {seq} was never answered"
                threading.Event().wait(0.01)

        device = host.service.devices[5]  # type: ignore[union-attr]
        seq = device.last_seq + 1
        while device._req_names != REQ_NAMES - 4:  # the most a crash can find unremoved
            send_and_wait(seq)
            seq += 1
        host.crash()
        host.start(run_dir=run_dir)
        assert host.service.devices[5].last_seq == seq - 1  # type: ignore[union-attr]
        for _ in range(REQ_NAMES // 4 + 1):
            send_and_wait(seq)
            seq += 1
            req = f"{fe}/req".encode()
            assert not guest.exists(req) or len(guest.list(req)) <= REQ_NAMES + 4
    finally:
        backend.remove()


def test_a_resume_cut_short_by_a_timeout_keeps_the_pages_and_is_tried_again(
        host: TmemHost, run_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """One xenstore timeout while resuming (here the writer's settle, after the recorded
    reply and the waiting requests went out) made the scan give the device up: the first
    scan then dropped every pool of the guest and its session file, and the two watches
    resume had registered stayed, so every later set-up of the domain failed ("already
    watched").  Now the watches are removed, the session waits and a later tick resumes it."""
    guest = connect(host, 5)
    try:
        pers = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        for i in range(8):
            assert guest.put_page(pers, Oid(1), i, page(i)) == 1
        host.crash()
        real_resume = TmemBack.resume
        failed: list[int] = []

        def resume_slow_once(self: TmemBack, *args: Any, **kw: Any) -> str:
            real_settle = self.writer.settle

            def settle_then_time_out(timeout: float | None = None) -> None:
                self.writer.settle = real_settle  # type: ignore[method-assign]
                real_settle(timeout)
                failed.append(self.domid)
                raise XsTimeout("1 posted requests unanswered")  # xenstored slow, once

            if not failed:
                self.writer.settle = settle_then_time_out  # type: ignore[method-assign]
            return real_resume(self, *args, **kw)

        monkeypatch.setattr(TmemBack, "resume", resume_slow_once)
        service = host.start(run_dir=run_dir)
        assert failed == [5]
        assert (run_dir / "session-5").exists()  # the session still waits for its guest
        deadline = time.monotonic() + WAIT_S
        while 5 not in service.devices:  # a later tick of the loop resumes it
            assert time.monotonic() < deadline, "the session was never resumed"
            threading.Event().wait(0.01)
        assert service.devices[5].counters.sessions == 0  # resumed, not reconnected
        assert "already watched" not in caplog.text  # the first try left no watch behind
        for i in range(8):
            assert guest.get_page(pers, Oid(1), i) == (1, page(i))
        assert not guest.describe()["broken"]
    finally:
        guest.remove()
