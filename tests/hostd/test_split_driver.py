"""The ``xen`` backend end to end, through the xenstore client, against our xenstore server and
Debian's real C and OCaml xenstored (``xenstore_host``), with the host service in front of each."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lz4.block
import pytest
import pyxs
from fakes.xenstore_hosts import close_client, outcome
from xenhost import TIMEOUT_MS, TmemHost, wait_for_node

from xentmem.clock import FakeClock
from xentmem.errors import BackendUnsupported
from xentmem.guest.backends.xen import XenBackend
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.hostd.control import HostControlClient
from xentmem.hostd.service import HostService
from xentmem.hostd.store import HostStore
from xentmem.roots import Roots
from xentmem.tmem.abi import (
    EEMPTY,
    EFROZEN,
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    Oid,
    PoolUuid,
    TmemOp,
    XenbusState,
)
from xentmem.xenbus.body import (
    WIRE_VERSION,
    OpRecord,
    PageEncoding,
    reply_size_bound,
    request_size,
)
from xentmem.xenbus.framing import DEFAULT_INLINE_BYTES, MAX_NAME_PARTS, MAX_REQUEST_INLINE_BYTES
from xentmem.xenbus.session_key import TAG_CHARS, SessionKey

TEXT = (b"def put_page(pool, oid, index, page):\n    return backend.put(pool, oid, index)\n"
        * 60)[:PAGE_SIZE]
PAGES = {
    "zero": bytes(PAGE_SIZE),
    "one-byte": bytes(PAGE_SIZE - 1) + b"\x01",
    "text": TEXT,
    "half-random": os.urandom(PAGE_SIZE // 2) + bytes(PAGE_SIZE // 2),
    "random": os.urandom(PAGE_SIZE),
    "trailing-nul": b"x" * 100 + bytes(PAGE_SIZE - 100),
}


@contextmanager
def connected(roots: Roots, **params: Any) -> Iterator[XenBackend]:
    backend = XenBackend({"timeout_ms": TIMEOUT_MS, **params}, roots=roots)
    backend.connect()
    try:
        yield backend
    finally:
        backend.remove()


def read(host: TmemHost, path: str) -> bytes:
    return host.xs.dom0.read(path.encode())


def listing(host: TmemHost, domid: int) -> dict[str, Any]:
    with HostControlClient(host.control_path, timeout=10) as control:
        return control.call("list", domid=domid)


# -- the handshake ----------------------------------------------------------------------------


def test_handshake_creates_both_areas_and_steps_through_the_states(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    fe, be = "/local/domain/5/device/tmem/0", "/local/domain/0/backend/tmem/5/0"
    # The host set both areas up before the guest did anything, as a toolstack would.
    assert read(tmem_host, f"{be}/state") == b"%d" % XenbusState.INIT_WAIT
    assert read(tmem_host, f"{fe}/state") == b"%d" % XenbusState.INITIALISING
    assert read(tmem_host, f"{fe}/backend") == be.encode()
    assert read(tmem_host, f"{be}/frontend") == fe.encode()
    assert tmem_host.xs.dom0.get_perms(fe.encode())[0] == b"n5"  # the guest owns it
    assert tmem_host.xs.dom0.get_perms(be.encode()) == [b"n0", b"r5"]  # the guest reads it

    with connected(roots) as backend:
        assert read(tmem_host, f"{fe}/state") == b"%d" % XenbusState.CONNECTED
        assert read(tmem_host, f"{be}/state") == b"%d" % XenbusState.CONNECTED
        assert read(tmem_host, f"{fe}/version") == str(WIRE_VERSION).encode()
        info = backend.describe()
        assert (info["domid"], info["state"], info["otherend_state"]) == (5, "Connected",
                                                                          "Connected")
        assert info["version"] == WIRE_VERSION
    # remove(): Closing -> the host drops the pools and goes Closed -> Closed.
    assert read(tmem_host, f"{fe}/state") == b"%d" % XenbusState.CLOSED
    assert read(tmem_host, f"{be}/state") == b"%d" % XenbusState.CLOSED

    with connected(roots) as again:  # a second load starts a fresh session
        assert again.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == 0


def test_probe_finds_the_host_and_refuses_without_one(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    XenBackend.probe(roots)
    tmem_host.stop()
    tmem_host.xs.dom0.delete(b"/local/domain/0/backend/tmem/5")
    with pytest.raises(BackendUnsupported, match="tmem host"):
        XenBackend.probe(roots)
    tmem_host.xs.dom0.delete(b"/local/domain/5/device/tmem")
    with pytest.raises(BackendUnsupported, match="no tmem device"):
        XenBackend.probe(roots)


# -- the operations ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True], ids=["unbatched", "batched"])
def test_every_op_answers_with_the_hypercalls_values(tmem_host: TmemHost, batch: bool) -> None:
    roots = tmem_host.guest(5)
    with connected(roots, batch=batch) as b:
        pers = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        eph = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        assert (pers, eph) == (0, 1)
        assert b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT | 0x100) == -errno.EPERM
        assert b.new_pool(PRIVATE_UUID, 0x00000000) == -errno.EPERM  # spec version 0

        oid = Oid(42, 7, 9)
        assert b.get_page(pers, oid, 0) == (-EEMPTY, None)  # a pool holding nothing
        assert b.put_page(pers, oid, 0, TEXT) == 1
        assert b.put_page(pers, oid, 1, PAGES["random"]) == 1
        assert b.get_page(pers, oid, 0) == (1, TEXT)
        assert b.get_page(pers, oid, 0) == (1, TEXT)  # persistent gets are not exclusive
        assert b.get_page(pers, oid, 5) == (0, None)
        assert b.flush_page(pers, oid, 0) == 1
        if not batch:  # batched private flushes are posted: 1 means "on its way"
            assert b.flush_page(pers, oid, 0) == 0
        assert b.get_page(pers, oid, 0) == (0, None)
        assert b.flush_object(pers, oid) == 1
        assert b.get_page(pers, oid, 1) == (-EEMPTY, None)

        assert b.put_page(eph, oid, 3, TEXT) == 1
        assert b.get_page(eph, oid, 3) == (1, TEXT)
        assert b.get_page(eph, oid, 3) == (-EEMPTY, None)  # private ephemeral: exclusive

        assert b.put_page(9, oid, 0, TEXT) == -errno.ENODEV
        assert b.get_page(9, oid, 0) == (-errno.ENODEV, None)
        assert b.destroy_pool(9) == 0
        assert b.destroy_pool(eph) == 1
        assert b.destroy_pool(eph) == 0
        more = [b.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL) for _ in range(16)]
        assert more[:15] == list(range(1, 16)) and more[15] == -errno.EPERM  # 16 per domain


def test_freeze_shared_auth_and_weights_through_the_control_socket(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    uuid = PoolUuid.from_uuid("12345678-9abc-def0-1122-334455667788")
    with connected(roots, batch=False) as b, \
            HostControlClient(tmem_host.control_path, timeout=10) as control:
        unauthorised = b.new_pool(uuid, POOL_SHARED_EPHEMERAL)
        control.call("shared-auth", domid=5, uuid=str(uuid), auth=True)
        shared = b.new_pool(uuid, POOL_SHARED_EPHEMERAL)
        pools = {p["pool_id"]: p for p in control.call("list", domid=5)["clients"][0]["pools"]}
        assert pools[unauthorised]["shared"] is False  # silently private without authorisation
        assert pools[shared]["shared"] is True

        assert b.put_page(shared, Oid(1), 0, TEXT) == 1
        control.call("freeze", domid=5)
        assert b.put_page(shared, Oid(1), 1, TEXT) == -EFROZEN  # a new put
        assert b.put_page(shared, Oid(1), 0, TEXT) == 1  # a duplicate put is allowed
        assert b.flush_page(shared, Oid(1), 0) == -EFROZEN  # flushed, but says frozen
        assert b.get_page(shared, Oid(1), 0) == (-EEMPTY, None)
        control.call("thaw", domid="all")
        assert b.put_page(shared, Oid(1), 1, TEXT) == 1
        control.call("set", domid=5, weight=3, compress=False)
        client = control.call("list", domid=5)["clients"][0]
        assert (client["weight"], client["compress"], client["frozen"]) == (3, False, False)
        assert control.call("freeable") == {"freeable_mb": 0}


def test_pools_registered_before_the_backend_are_replayed(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    shim = Shim(roots=roots, boot=BootParams())
    fs = shim.cleancache.init_fs()
    shim.frontswap.init(0, MemoryBacking(64))
    assert shim.cleancache.put_page(fs, 11, 0, TEXT) is False  # no backend yet
    assert shim.frontswap.store(0, 3, PAGES["random"]) == -1  # goes to the backing store

    shim.load("xen", {"timeout_ms": TIMEOUT_MS})
    try:
        pools = listing(tmem_host, 5)["clients"][0]["pools"]
        assert [(p["pool_id"], p["persistent"]) for p in pools] == [(0, True), (1, False)]
        assert shim.frontswap.pool_id == 0 and shim.cleancache.real_pool_id(fs) == 1
        # The guest's own listing has the keys every backend's has (zcache's too).
        mine = shim.backend.pools()  # type: ignore[union-attr]
        assert [(p["pool_id"], p["kind"], p["persistent"], p["shared"]) for p in mine] == [
            (0, "persistent", True, False), (1, "private-ephemeral", False, False)]

        assert shim.cleancache.put_page(fs, 11, 0, TEXT) is True
        assert shim.cleancache.get_page(fs, 11, 0) == TEXT
        assert shim.cleancache.get_page(fs, 11, 0) is None  # exclusive
        assert shim.frontswap.store(0, 40, PAGES["half-random"]) == 0
        assert shim.frontswap.load(0, 40) == PAGES["half-random"]
        assert shim.frontswap.load(0, 3) == PAGES["random"]  # from before the backend
        assert listing(tmem_host, 5)["clients"][0]["persistent_pages"] == 1
    finally:
        shim.unload()
    assert tmem_host.xs.dom0.read(b"/local/domain/0/backend/tmem/5/0/state") == b"6"


@pytest.mark.parametrize("batch", [False, True], ids=["unbatched", "batched"])
def test_pages_of_every_compressibility_round_trip(tmem_host: TmemHost, batch: bool) -> None:
    roots = tmem_host.guest(5)
    # Posted puts wait for company (the next synchronous op) however slow the machine is.
    with connected(roots, batch=batch, batch_delay_ms=1000) as b:
        pers = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        eph = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        for i, page in enumerate(PAGES.values()):
            assert b.put_page(pers, Oid(i), i, page) == 1
            assert b.put_page(eph, Oid(i), i, page) == 1
        for i, (name, page) in enumerate(PAGES.items()):
            assert b.get_page(pers, Oid(i), i) == (1, page), name
            assert b.get_page(eph, Oid(i), i) == (1, page), name
        stats = b.stats()
        # A page alone travels in names (a zero page in one, a compressed one in parts);
        # a batch of them spills into values.  Replies too long for one name spill.
        assert stats["inline_messages"] >= 1
        assert stats["spilled_messages" if batch else "parted_messages"] >= 1
        assert stats["spilled_replies"] >= 1 and stats["parted_replies"] == 0
        assert stats["rejected_replies"] == 0


def test_request_names_are_as_long_as_the_daemon_takes(tmem_host: TmemHost) -> None:
    """C xenstored (and ours) take paths of 2048 bytes below a home, oxenstored 1024: the guest
    tries once, when it connects, and splits its requests over fewer names where it can."""
    long_names = tmem_host.xs.flavour != "oxenstored"
    tmem_host.stop()
    tmem_host.start(split_replies=True)  # replies in parts too, as requests
    roots = tmem_host.guest(5)
    with connected(roots, batch=False) as b:
        limits = b.describe()["limits"]
        assert limits["inline_bytes"] == (MAX_REQUEST_INLINE_BYTES if long_names
                                          else DEFAULT_INLINE_BYTES)
        assert limits["max_parts"] == MAX_NAME_PARTS
        assert not tmem_host.xs.dom0.exists(b"/local/domain/5/device/tmem/0/probe")
        pool = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert b.put_page(pool, Oid(1), 0, PAGES["half-random"]) == 1
        assert b.get_page(pool, Oid(1), 0) == (1, PAGES["half-random"])
        stats = b.stats()
        assert stats["parted_messages"] == 1 and stats["parted_replies"] == 1
        assert stats["spilled_messages"] == stats["spilled_replies"] == 0


def test_a_request_xenstore_refuses_fails_at_once_with_its_reason(tmem_host: TmemHost) -> None:
    fe = b"/local/domain/5/device/tmem/0"
    with connected(tmem_host.guest(5), batch=False, timeout_ms=4000) as b:
        pool = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        dom0 = tmem_host.xs.dom0
        dom0.mkdir(fe + b"/req")
        dom0.set_perms(fe + b"/req", [b"n0"])  # the guest may no longer write requests
        # -EIO, not -ETIMEDOUT: the refusal is noticed long before the timeout.
        assert b.put_page(pool, Oid(1), 0, TEXT) == -errno.EIO
        assert "EACCES" in b.describe()["last_error"]
        assert b.stats()["refused_writes"] >= 1
        dom0.set_perms(fe + b"/req", [b"n5", b"r0"])
        assert b.put_page(pool, Oid(1), 0, TEXT) == 1  # the channel still works


def test_a_batch_carries_posted_ops_with_the_next_synchronous_one(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    with connected(roots, batch=True, batch_delay_ms=1000) as b:
        eph = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        before = b.stats()["messages"]
        for i in range(6):
            assert b.put_page(eph, Oid(1), i, PAGES["text"] if i % 2 else PAGES["zero"]) == 1
        assert b.get_page(eph, Oid(1), 5) == (1, PAGES["text"])
        assert b.stats()["messages"] - before == 1  # six posted puts and the get: one message
        assert b.get_page(eph, Oid(1), 4) == (1, PAGES["zero"])


def test_concurrent_callers_share_messages(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    with connected(roots, batch=True) as b:
        pers = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        for i in range(32):
            assert b.put_page(pers, Oid(2), i, TEXT[i:] + TEXT[:i]) == 1
        errors: list[str] = []

        def reader(first: int) -> None:
            for i in range(first, 32, 4):
                if b.get_page(pers, Oid(2), i) != (1, TEXT[i:] + TEXT[:i]):
                    errors.append(f"page {i}")

        before = b.stats()["messages"]
        threads = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert b.stats()["messages"] - before <= 32


def test_a_caller_that_finds_the_channel_free_makes_no_event(
        tmem_host: TmemHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event (a lock and a condition) is made only for a caller that has to wait: a lone
    caller sends its op itself, every op."""
    import xentmem.guest.backends.xen as xen_module

    made: list[threading.Event] = []

    class CountedEvent(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    with connected(tmem_host.guest(5), batch=False) as b:
        pers = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        monkeypatch.setattr(xen_module.threading, "Event", CountedEvent)
        for i in range(8):
            assert b.put_page(pers, Oid(3), i, TEXT) == 1
            assert b.get_page(pers, Oid(3), i) == (1, TEXT)
        monkeypatch.undo()
        assert made == []


# -- failures ---------------------------------------------------------------------------------


def test_a_host_that_stops_answering_times_out_and_ops_fail_fast(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    clock = FakeClock(100.0)
    backend = XenBackend({"timeout_ms": TIMEOUT_MS, "stall_backoff_ms": 1000, "batch": True},
                         roots=roots, clock=clock)
    backend.connect()
    try:
        pers = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        eph = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        assert backend.put_page(eph, Oid(1), 0, TEXT) == 1  # posted...
        assert backend.get_page(pers, Oid(1), 0) == (-EEMPTY, None)  # ...and sent with this
        tmem_host.halt()
        # Short waits only while nobody answers: a busy machine's host may take 300 ms.
        backend.set_param("timeout_ms", 300)

        assert backend.put_page(pers, Oid(1), 0, TEXT) == -errno.ETIMEDOUT
        assert "no reply from the tmem host" in backend.describe()["last_error"]
        assert backend.stats()["timeouts"] == 1
        # Within the backoff every op fails at once; a flush is kept for later.
        assert backend.get_page(eph, Oid(1), 0) == (-errno.ETIMEDOUT, None)
        assert backend.flush_page(eph, Oid(1), 0) == 1
        assert backend.stats()["failed_fast"] == 1 and backend.stats()["timeouts"] == 1

        clock.advance(1.5)  # the backoff is over: the host is tried (and fails) again
        assert backend.get_page(pers, Oid(1), 0) == (-errno.ETIMEDOUT, None)
        assert backend.stats()["timeouts"] == 2

        # The host comes back: after the (doubled) backoff the kept flush goes first.
        tmem_host.resume()
        backend.set_param("timeout_ms", TIMEOUT_MS)
        clock.advance(2.5)
        assert backend.get_page(eph, Oid(1), 0) in ((0, None), (-EEMPTY, None))
        assert backend.stats()["redelivered_flushes"] >= 1
        assert backend.put_page(pers, Oid(1), 2, TEXT) == 1
    finally:
        backend.remove()


def test_a_restarted_host_closes_the_guest_until_it_reloads(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    with connected(roots) as b:
        pers = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert b.put_page(pers, Oid(1), 0, TEXT) == 1
        tmem_host.stop()  # the service goes away (Closed) and its store with it
        tmem_host.start()  # a new instance: the guest's pools are gone
        # the guest has not looked yet (still Connected): the new instance published the
        # device closed, with why, never InitWait, which a guest reloading at this moment
        # would take for its own handshake's
        host = tmem_host.client(roots)
        be = b"/local/domain/0/backend/tmem/5/0"
        assert host.read(be + b"/state") == str(int(XenbusState.CLOSED)).encode()
        assert host.read(be + b"/error").startswith(b"%d " % errno.ESTALE)
        assert b.get_page(pers, Oid(1), 0) == (-errno.ENODEV, None)
        assert "unload and load" in b.describe()["broken"]
    with connected(roots) as again:
        assert again.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == 0


def test_guests_cannot_touch_each_others_areas(tmem_host: TmemHost) -> None:
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        pool = b5.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert b5.put_page(pool, Oid(1), 0, TEXT) == 1
        g6 = tmem_host.client(r6)
        fe5, be5 = b"/local/domain/5/device/tmem/0", b"/local/domain/0/backend/tmem/5/0"
        assert outcome(lambda: g6.read(fe5 + b"/state")) == "EACCES"
        assert outcome(lambda: g6.write(fe5 + b"/req/1/1@0@00000000@AQ", b"x")) == "EACCES"
        assert outcome(lambda: g6.read(be5 + b"/state")) == "EACCES"
        assert outcome(lambda: g6.list(be5 + b"/rsp")) == "EACCES"
        # Its own backend area is readable but not writable; device/ is not its to write.
        assert outcome(lambda: g6.read(b"/local/domain/0/backend/tmem/6/0/state")) == "OK"
        assert outcome(lambda: g6.write(b"/local/domain/0/backend/tmem/6/0/rsp/x",
                                        b"x")) == "EACCES"
        assert outcome(lambda: g6.write(b"device/vif", b"x")) == "EACCES"
        close_client(g6)  # a real daemon's emulated guest ring takes one connection at a time
        # Through the service, guest 6's pool 0 is its own (none yet), never guest 5's.
        with connected(r6) as b6:
            assert b6.get_page(pool, Oid(1), 0) == (-errno.ENODEV, None)
            mine = b6.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
            assert b6.get_page(mine, Oid(1), 0) == (-EEMPTY, None)
        assert b5.get_page(pool, Oid(1), 0) == (1, TEXT)


def test_released_guests_lose_their_device_and_pages(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    with connected(roots, batch=False) as b:
        assert b.put_page(b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT), Oid(1), 0,
                          TEXT) == 1
    tmem_host.xs.release(5)
    wait_for_node(tmem_host.xs.dom0, b"/local/domain/0/backend/tmem/5", gone=True)
    with HostControlClient(tmem_host.control_path, timeout=10) as control:
        assert control.call("list")["clients"] == []


# -- a host that lies -------------------------------------------------------------------------


class RogueHost:
    """Answers the guest's next request as dom0 with whatever the test wants."""

    def __init__(self, host: TmemHost, domid: int) -> None:
        self.dom0: pyxs.Client = host.xs.client()
        self.monitor = self.dom0.monitor()
        self.req = f"/local/domain/{domid}/device/tmem/0/req".encode()
        self.be = f"/local/domain/0/backend/tmem/{domid}/0"
        self.monitor.watch(self.req, b"rogue")
        self.monitor.events.get(timeout=10)
        self.key = SessionKey.parse(self.dom0.read(f"{self.be}/session-key".encode()))

    def next_seq(self) -> int:
        while True:
            path = self.monitor.events.get(timeout=10).path
            name = path.rsplit(b"/", 1)[-1].decode()
            if name.count("@") == 3 and path.count(b"/") == self.req.count(b"/") + 2:
                return int(name.split("@")[0])

    def reply(self, name: str, value: bytes = b"-", chunks: dict[int, bytes] | None = None) -> None:
        """``name`` goes in the directory the key gives its seq (and part)."""
        for i, chunk in (chunks or {}).items():
            self.dom0.write(f"{self.be}/rsp-data/{self.key.chunk(i, reply=True)}".encode(),
                            chunk)
        seq, shape = name.split("@")[:2]
        part = int(shape[1:]) if name.count("@") == 2 else 0
        slot = self.key.slot(int(seq), part, reply=True)
        self.dom0.write(f"{self.be}/rsp/{slot}/{name}".encode(), value)

    def mac(self, seq: int, shape: str, text: str) -> str:
        return self.key.mac(seq, shape, text.encode(), reply=True)


def _reply_text(body: bytes) -> str:
    from xentmem.xenbus.framing import to_text

    return to_text(body)


BAD_MAC = "A" * TAG_CHARS


@pytest.mark.parametrize("lie", ["garbage-crc", "bad-rc", "wrong-count", "bad-page",
                                 "foreign-chunk", "missing-part", "foreign-part",
                                 "stale-then-garbage"])
def test_malformed_replies_are_rejected_with_a_clear_error(tmem_host: TmemHost, lie: str) -> None:
    import struct

    def head(nops: int) -> bytes:  # a reply's header: version, ops, status 0
        return struct.pack("<BBi", WIRE_VERSION, nops, 0)

    roots = tmem_host.guest(5)
    with connected(roots, batch=False, timeout_ms=4000) as b:
        pool = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        tmem_host.halt()
        rogue = RogueHost(tmem_host, 5)
        result: list[Any] = []
        op = threading.Thread(target=lambda: result.append(
            b.get_page(pool, Oid(1), 0) if lie == "bad-page" else b.put_page(pool, Oid(1), 0,
                                                                             TEXT)))
        op.start()
        seq = rogue.next_seq()
        if lie == "garbage-crc":  # a MAC that does not match
            rogue.reply(f"{seq}@0@{BAD_MAC}@AQID")
        elif lie == "bad-rc":  # PUT_PAGE can return 1, 0 or -errno, never 7
            text = _reply_text(head(1) + struct.pack("<iI", 7, 0))
            rogue.reply(f"{seq}@0@{rogue.mac(seq, '0', text)}@{text}")
        elif lie == "wrong-count":
            text = _reply_text(head(2) + struct.pack("<iI", 1, 0) * 2)
            rogue.reply(f"{seq}@0@{rogue.mac(seq, '0', text)}@{text}")
        elif lie == "bad-page":  # a "found" page that is 100 raw bytes
            text = _reply_text(head(1) + struct.pack("<iI", 1, 100) + b"x" * 100)
            rogue.reply(f"{seq}@0@{rogue.mac(seq, '0', text)}@{text}")
        elif lie == "foreign-chunk":
            text = _reply_text(head(1) + struct.pack("<iI", 1, 0))
            rogue.reply(f"{seq}@2@{rogue.mac(seq, '2', text)}@", text.encode(),
                        {1: f"{seq + 1}@AAAA".encode()})
        elif lie in ("missing-part", "foreign-part"):  # the reply's first name never came
            text = _reply_text(head(1) + struct.pack("<iI", 1, 0))
            if lie == "foreign-part":
                rogue.reply(f"{seq + 1}@p1@{text[:4]}")
            rogue.reply(f"{seq}@p2@{rogue.mac(seq, 'p2', text)}@{text[4:]}")
        else:  # an answer to an old request is ignored; the real answer is garbage
            rogue.reply(f"{seq - 1}@0@{BAD_MAC}@AQID")
            rogue.reply(f"{seq}@0@{BAD_MAC}@AQID")
        op.join(10)
        assert result == ([(-errno.EIO, None)] if lie == "bad-page" else [-errno.EIO])
        error = b.describe()["last_error"]
        assert f"reply {seq}" in error and "rejected" in error
        assert b.stats()["rejected_replies"] == 1
        rogue.monitor.unwatch(rogue.req, b"rogue")
        tmem_host.resume()  # so that remove() gets its Closed at once


def test_a_message_whose_reply_could_not_fit_is_refused_with_nothing_taken(
        tmem_host: TmemHost) -> None:
    """Fails before: the host ran every op of the message and only then found its reply too
    big, answered -E2BIG for all of them, and the pages its exclusive gets had taken were
    gone.  Now a message whose reply could outgrow its limit is refused before any op runs."""
    roots = tmem_host.guest(5)
    with connected(roots, batch=False) as backend:
        eph = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        pers = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert backend._front is not None
        limits = backend._front.limits
        count = min(limits.body_capacity(reply=True) // PAGE_SIZE + 2, limits.max_ops - 1)
        pages = [os.urandom(PAGE_SIZE) for _ in range(count)]  # lz4 cannot shrink them
        for index, data in enumerate(pages):
            assert backend.put_page(eph, Oid(1), index, data) == 1
        gets = [OpRecord.get_page(eph, Oid(1), index) for index in range(len(pages))]
        ops = [OpRecord.put_page(pers, Oid(2), 0, TEXT), *gets]
        assert reply_size_bound(ops) > limits.body_capacity(reply=True) >= request_size(ops)
        results = backend._front.exchange(ops)
        assert {r.rc for r in results} == {-errno.E2BIG}
        assert backend.get_page(pers, Oid(2), 0) == (-EEMPTY, None)  # the put did not run
        for index, data in enumerate(pages):  # and no get took its page
            assert backend.get_page(eph, Oid(1), index) == (1, data), index


def test_a_reply_to_no_request_is_rejected_and_the_op_times_out(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    with connected(roots, batch=False) as b:
        pool = b.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        tmem_host.halt()
        # The op waits long enough for the rogue's answer on a busy machine, then times out.
        b.set_param("timeout_ms", 3000)
        rogue = RogueHost(tmem_host, 5)
        result: list[int] = []
        op = threading.Thread(target=lambda: result.append(b.put_page(pool, Oid(1), 0, TEXT)))
        op.start()
        seq = rogue.next_seq()
        rogue.reply(f"{seq + 3}@0@{BAD_MAC}@AQID")  # answers a request never sent
        op.join(10)
        assert result == [-errno.ETIMEDOUT]
        assert b.stats()["rejected_replies"] == 1
        rogue.monitor.unwatch(rogue.req, b"rogue")
        tmem_host.resume()


def test_a_get_answers_with_the_page_as_it_was_kept(tmp_path: Path) -> None:
    """The host sends a kept lz4 block as it is, rather than decompressing and compressing
    the page again per get (before, the reply carried the host's own lz4 of the page)."""
    service = HostService(xenstore=tmp_path / "no-xenstore", store=HostStore(1 << 20))
    guest = 7
    pool = service.run_op(guest, OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)).rc
    block = lz4.block.compress(TEXT, mode="high_compression", store_size=False)
    assert block != lz4.block.compress(TEXT, store_size=False)  # told apart from a fresh one
    put = OpRecord(TmemOp.PUT_PAGE, pool, Oid(1), 0, encoding=PageEncoding.LZ4, data=block)
    assert service.run_op(guest, put).rc == 1
    result = service.run_op(guest, OpRecord.get_page(pool, Oid(1), 0))
    assert (result.rc, result.encoding, result.data) == (1, PageEncoding.LZ4, block)
    assert result.page() == TEXT
    assert service.store.get_page(guest, pool, Oid(1), 0) == (1, TEXT)
