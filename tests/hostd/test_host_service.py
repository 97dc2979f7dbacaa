"""The host service from the outside: a hostile or broken guest, the control socket, the CLI,
the local demo."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import pyxs
from click.testing import CliRunner
from fakes.xenstore_hosts import raw_exchange, raw_request
from xenhost import TIMEOUT_MS, WAIT_S, TmemHost, wait_for_node

from xentmem.control import ControlError
from xentmem.guest.backends.xen import XenBackend
from xentmem.hostd.cli import cli
from xentmem.hostd.control import OPS as HOST_OPS
from xentmem.hostd.control import HostControlClient
from xentmem.hostd.tmemback import UNAUTHENTIC_BURST, TmemBack
from xentmem.mock_xenstored.wire import Packet
from xentmem.roots import Roots
from xentmem.tmem.abi import POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid
from xentmem.xenbus.body import WIRE_VERSION, OpRecord, decode_reply, encode_request
from xentmem.xenbus.framing import (
    Limits,
    Part,
    frame,
    is_part_name,
    parse_name,
    parse_part,
    to_text,
    unframe,
)
from xentmem.xenbus.session_key import TAG_CHARS, SessionKey
from xentmem.xenbus.xs import XS, Event

TEXT = (b"static void tmem_flush(struct pool *pool, struct oid *oid);\n" * 70)[:4096]
LIMITS = Limits()
#: A well-formed MAC that matches nothing.
BAD_MAC = "A" * TAG_CHARS


class HandGuest:
    """A guest that speaks the protocol by hand through raw pyxs calls (hostile on demand)."""

    def __init__(self, host: TmemHost, domid: int) -> None:
        self.roots = host.guest(domid)
        self.c: pyxs.Client = host.client(self.roots)
        self.fe = f"/local/domain/{domid}/device/tmem/0"
        self.be = f"/local/domain/0/backend/tmem/{domid}/0"
        self.monitor = self.c.monitor()
        self.monitor.watch(f"{self.be}/state".encode(), b"state")
        self.monitor.watch(f"{self.be}/rsp".encode(), b"rsp")
        self.key: SessionKey | None = None
        #: Sequence numbers of every reply seen so far.
        self.answered: set[int] = set()

    def state(self, node: str) -> int:
        return int(self.c.read(f"{node}/state".encode()))

    def wait_state(self, wanted: int) -> None:
        for _ in range(100):
            if self.state(self.be) == wanted:
                return
            self.monitor.events.get(timeout=WAIT_S)
        raise AssertionError(f"backend never reached state {wanted}")

    def connect(self) -> None:
        """The documented handshake, step by step."""
        self.c.write(f"{self.fe}/state".encode(), b"1")
        self.wait_state(2)
        assert self.c.read(f"{self.be}/versions".encode()) == str(WIRE_VERSION).encode()
        self.key = SessionKey.parse(self.c.read(f"{self.be}/session-key".encode()))
        self.c.write(f"{self.fe}/version".encode(), str(WIRE_VERSION).encode())
        self.c.write(f"{self.fe}/state".encode(), b"3")
        self.wait_state(4)
        self.c.write(f"{self.fe}/state".encode(), b"4")

    def send(self, name: str, value: bytes = b"-", *, slot: str | None = None) -> None:
        """Write request node ``name`` in its directory (the key's, unless ``slot``)."""
        if slot is None:
            assert self.key is not None
            seq, shape = name.split("@")[:2]
            part = int(shape[1:]) if name.count("@") == 2 else 0
            slot = self.key.slot(int(seq), part, reply=False)
        self.send_raw(f"{slot}/{name}", value)

    def send_raw(self, below_req: str, value: bytes = b"-") -> None:
        self.c.write(f"{self.fe}/req/{below_req}".encode(), value)

    def mac(self, seq: int, shape: str, text: str) -> str:
        assert self.key is not None
        return self.key.mac(seq, shape, text.encode(), reply=False)

    def reply(self, seq: int) -> bytes:
        """The body of the reply to ``seq`` (waits for its event)."""
        prefix = f"{self.be}/rsp/".encode()
        key = self.key
        assert key is not None
        parts: list[Part] = []
        for _ in range(200):
            event = self.monitor.events.get(timeout=WAIT_S)
            if not event.path.startswith(prefix) or event.path.count(b"/") != prefix.count(
                    b"/") + 1:
                continue
            slot, name = event.path[len(prefix):].decode().split("/")
            if is_part_name(name):
                parts.append(parse_part(name, LIMITS, reply=True))
                continue
            envelope = parse_name(name, LIMITS, reply=True)
            assert slot == key.slot(envelope.seq, reply=True)
            self.answered.add(envelope.seq)
            if envelope.seq != seq:
                continue
            value = self.c.read(event.path).decode() if envelope.chunks else None
            chunks = [self.c.read(f"{self.be}/rsp-data/{key.chunk(i, reply=True)}".encode())
                      .decode() for i in range(1, envelope.chunks)]
            mine = [p for p in parts if p.seq == seq]
            return unframe(envelope, value, chunks, LIMITS, reply=True, untrusted_parts=mine,
                           key=key)
        raise AssertionError(f"no reply {seq}")


def status_of(body: bytes) -> int:
    return struct.unpack_from("<BBi", body)[2]


def test_malformed_requests_get_an_error_or_are_dropped_and_the_service_lives_on(
        tmem_host: TmemHost) -> None:
    """Only a message that authenticates (the session key's MAC) is answered: a torn or
    forged one, or one outside its directory, is dropped and counted, never answered."""
    g = HandGuest(tmem_host, 5)
    g.connect()
    g.send(f"1@0@{BAD_MAC}@AQID")  # does not authenticate
    garbage = to_text(b"\x01\x07not a request")
    g.send(f"2@0@{g.mac(2, '0', garbage)}@{garbage}")  # authentic, but no request body
    assert status_of(g.reply(2)) == -22
    g.send(f"3@0@{g.mac(3, '0', 'AQID')}@AQID", slot="x" * TAG_CHARS)  # not its directory
    g.send(f"4@3@{BAD_MAC}@", b"AAAA")  # spilled, but its chunks were never written
    g.send_raw("0/garbage-without-a-seq")  # nothing to answer: dropped
    g.send_raw("1/x/deeper")  # not a message node at all: ignored
    body = encode_request([OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT),
                           OpRecord(99, 0, Oid(0), 0)])  # an op the hypercall does not know
    framed = frame(9, body, LIMITS, reply=False, key=g.key)  # type: ignore[arg-type]
    g.send(framed.envelope.name, framed.value.encode() or b"-")
    results = decode_reply(g.reply(9), decode_request_ops(body))
    assert [r.rc for r in results] == [0, -38]  # the pool, then -ENOSYS
    assert g.answered == {2, 9}
    served = tmem_host.service.devices[5].counters  # type: ignore[union-attr]
    assert (served.malformed, served.unauthentic, served.messages) == (3, 2, 2)


def test_requests_in_name_parts_are_assembled_and_torn_ones_refused(
        tmem_host: TmemHost) -> None:
    g = HandGuest(tmem_host, 5)
    g.connect()
    body = encode_request([OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT),
                           OpRecord.put_page(0, Oid(7), 3, TEXT)])
    small = Limits(inline_bytes=60)

    def send_parts(seq: int, skip: int = 0, slot: str | None = None) -> str:
        assert g.key is not None
        framed = frame(seq, body, small, reply=False, key=g.key)
        assert framed.envelope.parts >= 3
        for part in framed.parts:
            if part.k != skip:
                g.send(part.name, slot=slot)  # values unread
        return framed.envelope.name

    g.send(send_parts(1))
    assert [r.rc for r in decode_reply(g.reply(1), decode_request_ops(body))] == [0, 1]
    g.send(send_parts(2, skip=2))  # part 2 never written
    g.send(send_parts(3, slot="y" * TAG_CHARS))  # parts where no part of 3 belongs
    g.send("4@p7@AAAA")  # a part beyond the agreed number of names: refused, not kept
    g.send(f"4@p2@{BAD_MAC}@AAAA")
    g.send(send_parts(5))
    assert [r.rc for r in decode_reply(g.reply(5), decode_request_ops(body))] == [1, 1]
    assert g.answered == {1, 5}  # torn messages are not answered
    served = tmem_host.service.devices[5].counters  # type: ignore[union-attr]
    assert g.key is not None
    pieces = frame(1, body, small, reply=False, key=g.key).envelope.parts
    # Three torn messages, the misplaced parts of message 3 and the extra part of message 4.
    assert (served.parted_requests, served.messages, served.ops) == (5, 2, 4)
    assert served.unauthentic == 3
    assert served.malformed == (pieces - 1) + 1
    assert tmem_host.service.store.get_page(5, 0, Oid(7), 3) == (1, TEXT)  # type: ignore[union-attr]


def test_a_forged_request_in_names_costs_the_host_no_xenstore_request(
        tmem_host: TmemHost) -> None:
    """A message carried in names is authenticated from its names alone, before the host
    asks xenstore anything: before, the host read its nodes' permissions and listed
    ``req/`` first (one round trip per forged name, whose event is all it cost the guest),
    then found the MAC wrong."""
    g = HandGuest(tmem_host, 5)
    g.connect()
    device = tmem_host.service.devices[5]  # type: ignore[union-attr]
    checks = device.counters.perm_checks
    g.send(f"1@0@{BAD_MAC}@AQID")  # inline
    g.send(f"1@p2@{BAD_MAC}@AQID")  # in two names, its part 1 missing
    g.send("1@p1@AQID")
    g.send(f"1@p2@{BAD_MAC}@AQID")  # both names there, the MAC wrong
    body = encode_request([OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)])
    framed = frame(1, body, LIMITS, reply=False, key=g.key)  # type: ignore[arg-type]
    g.send(framed.envelope.name)
    assert status_of(g.reply(1)) == 0
    assert device.counters.unauthentic == 3
    assert device.counters.perm_checks == checks + 1  # the honest message's only


def flood(sock: Path, path: str, writes: int, *, per_connection: int = 250) -> None:
    """``writes`` writes of ``path`` by the guest whose socket is ``sock``, pipelined, every
    answer read (so xenstore has sent every watch event they fire)."""
    packet = Packet(int(XS.WRITE), 1, 0, path.encode() + b"\0")
    for done in range(0, writes, per_connection):
        count = min(per_connection, writes - done)
        answers = raw_exchange(sock, [packet] * count, replies=count)
        assert answers is not None and all(a.op == XS.WRITE for a in answers)


#: Writes of one forged node by guest 5: before, its host spent 67 requests on each (reads of
#: 32 chunks and 34 permissions, a listing), about 1.5 ms here, behind which guest 6 waited.
FLOOD = 20_000


def test_a_guest_flooding_its_req_starves_neither_the_loop_nor_another_guest(
        ours: TmemHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest 5 rewrites one node of its ``req/``, a message name of 32 spilled chunks in its
    right directory with a wrong MAC: each write fires one event and is "new" again, since
    the seq of a message that does not authenticate does not move.  Before, the host served
    every event (67 requests each) in one inner loop that never returned while events kept
    coming: no ``on_idle`` (the watchdog's ping), no control socket, no drain, and guest 6's
    ops, queued behind the flood, timed out.  Now guest 5's ``req/`` goes unwatched past
    ``UNAUTHENTIC_BURST`` such messages (its queued events dropped with the watch), and one
    turn of the loop serves only the events queued when it began."""
    service = ours.service
    assert service is not None
    ours.halt()
    dispatched = [0]  # guest 5's request events served
    turns: list[tuple[float, int]] = []  # (when, dispatched) at each on_idle
    serve = service._dispatch

    def counting(untrusted_path: bytes, token: bytes) -> None:
        dispatched[0] += token == b"xentmem-hostd-fe-req-5"
        serve(untrusted_path, token)

    monkeypatch.setattr(service, "_dispatch", counting)
    ours.resume(on_idle=lambda: turns.append((time.monotonic(), dispatched[0])))
    g = HandGuest(ours, 5)
    g.connect()
    other = XenBackend({"timeout_ms": TIMEOUT_MS, "batch": False}, roots=ours.guest(6))
    other.connect()
    try:
        pool = other.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert other.put_page(pool, Oid(1), 0, TEXT) == 1
        device = service.devices[5]
        assert g.key is not None
        seq = device.last_seq + 1
        started = time.monotonic()
        flood(g.roots.xenstore_socket,
              f"{g.fe}/req/{g.key.slot(seq, reply=False)}/{seq}@32@{BAD_MAC}@", FLOOD)
        # Guest 6's request comes after every event of the flood, within its timeout.
        assert other.get_page(pool, Oid(1), 0) == (1, TEXT)
        ended = time.monotonic()
        assert device.counters.pauses >= 1
        assert device.last_seq == seq - 1
        assert device.counters.unauthentic < FLOOD // 100
        during = [t for t in turns if started <= t[0] <= ended]
        assert during, "on_idle was never called during the flood"
        per_turn = [b[1] - a[1] for a, b in zip(turns, turns[1:], strict=False)]
        assert max(per_turn) <= 4 * UNAUTHENTIC_BURST
        # The watchdog (WatchdogSec=30, pinged every 15 s) would have been pinged in time.
        moments = [started, *(t for t, _ in during), ended]
        assert max(b - a for a, b in zip(moments, moments[1:], strict=False)) < 15
    finally:
        other.remove()


def test_one_turn_of_the_loop_serves_only_the_events_queued_when_it_began(
        ours: TmemHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events that arrive while a turn serves events wait for the next turn, after
    ``on_idle``: before, the loop served events until none was left, so events arriving as
    fast as they were served kept ``on_idle`` (the watchdog's ping) from ever being called."""
    service = ours.service
    assert service is not None
    ours.halt()
    served = [0]
    first_idle: list[int] = []

    def endless(untrusted_path: bytes, token: bytes) -> None:
        if token != b"flood":
            return  # the service's own (none is expected)
        served[0] += 1
        if served[0] < 10_000:  # each event served, another has arrived (bounded here)
            service.conn.events.append(Event(b"/flood", b"flood"))

    monkeypatch.setattr(service, "_dispatch", endless)
    for _ in range(100):
        service.conn.events.append(Event(b"/flood", b"flood"))
    ours.resume(on_idle=lambda: first_idle.append(served[0]))
    deadline = time.monotonic() + WAIT_S
    while not first_idle:
        assert time.monotonic() < deadline, "on_idle was never called"
        threading.Event().wait(0.01)
    assert first_idle[0] <= 100


def forge_until_paused(g: HandGuest, device: TmemBack) -> None:
    """One forged message more than ``UNAUTHENTIC_BURST``: the host pauses the guest's req/."""
    for n in range(UNAUTHENTIC_BURST + 1):
        g.send(f"{n + 1}@0@{BAD_MAC}@AQID")
    deadline = time.monotonic() + WAIT_S
    while device.paused_until is None:
        assert time.monotonic() < deadline, "the host never paused the guest's req/"
        threading.Event().wait(0.01)


def test_a_paused_req_is_served_again_with_what_the_guest_wrote_meanwhile(
        tmem_host: TmemHost) -> None:
    """Past ``UNAUTHENTIC_BURST`` forged messages at once the host stops watching the guest's
    ``req/``; when the pause ends it watches again and serves the message the guest wrote
    meanwhile (no event will announce it again), as after a restart."""
    g = HandGuest(tmem_host, 5)
    g.connect()
    assert g.key is not None
    device = tmem_host.service.devices[5]  # type: ignore[union-attr]
    device.pause_s = 3.0
    forge_until_paused(g, device)
    paused_until = device.paused_until
    body = encode_request([OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)])
    seq = UNAUTHENTIC_BURST + 2
    framed = frame(seq, body, LIMITS, reply=False, key=g.key)
    g.send(framed.envelope.name)
    assert device.paused_until == paused_until  # written while paused (3 s is ample)
    assert status_of(g.reply(seq)) == 0
    assert device.counters.pauses == 1 and device.last_seq == seq
    assert g.answered == {seq}


def test_a_paused_req_whose_watch_fails_again_is_tried_at_the_next_tick(
        tmem_host: TmemHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the pause ends, watching ``req/`` again may fail (xenstore busy, EAGAIN): the
    guest stays paused and the next tick tries again.  The pause was once cleared before
    the watch, so a failed one left the guest unserved until its next session."""
    from xentmem.xenbus.xs import XsError

    g = HandGuest(tmem_host, 5)
    g.connect()
    assert g.key is not None
    service = tmem_host.service
    assert service is not None
    device = service.devices[5]
    device.pause_s = 2.0
    real_watch = service.conn.watch
    failed: list[bytes] = []

    def watch_fails_once(path: str, token: bytes) -> None:
        if token == device.req_token and not failed:
            failed.append(token)
            raise XsError("EAGAIN", f"watch {path}")
        real_watch(path, token)
    monkeypatch.setattr(service.conn, "watch", watch_fails_once)
    forge_until_paused(g, device)
    seq = UNAUTHENTIC_BURST + 2
    body = encode_request([OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)])
    g.send(frame(seq, body, LIMITS, reply=False, key=g.key).envelope.name)
    assert status_of(g.reply(seq)) == 0  # served once a later tick watched again
    assert failed and device.paused_until is None


def test_a_part_left_from_a_message_that_never_came_does_not_tear_the_next(
        tmem_host: TmemHost) -> None:
    """Before, every kept part joined the next message: a part 3 of an abandoned message 6
    tore message 7 (split over two names)."""
    g = HandGuest(tmem_host, 5)
    g.connect()
    assert g.key is not None
    small = Limits(inline_bytes=60)
    big = encode_request([OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT),
                          OpRecord.put_page(0, Oid(7), 3, TEXT)])
    abandoned = frame(6, big, small, reply=False, key=g.key)
    g.send(abandoned.parts[2].name)  # its part 3 only: the message never comes
    body = encode_request([OpRecord.flush_page(0, Oid(7), 3), OpRecord.flush_page(0, Oid(7), 4)])
    framed = frame(7, body, small, reply=False, key=g.key)
    assert framed.envelope.parts == 2
    g.send(framed.parts[0].name)
    g.send(framed.envelope.name)
    assert status_of(g.reply(7)) == 0


def decode_request_ops(body: bytes) -> list[OpRecord]:
    from xentmem.xenbus.body import decode_request

    return decode_request(body)


def test_a_sequence_number_of_2_63_or_more_is_refused_and_moves_nothing(
        tmem_host: TmemHost) -> None:
    """Before, a name with 19 digits parsed whatever their value: seq 2^63 was served and the
    host's last sequence went out of the guest's reach (every later request was a "replay")."""
    g = HandGuest(tmem_host, 5)
    g.connect()
    assert g.key is not None
    body = encode_request([OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)])
    text = to_text(body)
    for seq in (1 << 63, 10**19 - 1):
        mac = g.key.mac(seq, "0", text.encode(), reply=False)  # even with the right key
        g.send_raw(f"{g.key.slot(seq, reply=False)}/{seq}@0@{mac}@{text}")
    framed = frame(1, body, LIMITS, reply=False, key=g.key)
    g.send(framed.envelope.name)
    assert [r.rc for r in decode_reply(g.reply(1), decode_request_ops(body))] == [0]
    assert g.answered == {1}
    device = tmem_host.service.devices[5]  # type: ignore[union-attr]
    assert device.last_seq == 1 and device.counters.malformed == 2


def test_a_spilled_request_whose_chunk_another_domain_may_write_is_refused(
        tmem_host: TmemHost) -> None:
    """``data/`` is read too: a chunk node domain 6 may write makes its message refused
    (-EACCES, nothing run), the same message with the chunk closed again is served."""
    g = HandGuest(tmem_host, 5)
    g.connect()
    key = g.key
    assert key is not None
    ops = [OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT),
           *(OpRecord.put_page(0, Oid(1), i, os.urandom(4096)) for i in range(2))]
    body = encode_request(ops)
    spilled = Limits(max_parts=1)
    for seq, grant in ((1, True), (2, False)):
        framed = frame(seq, body, spilled, reply=False, key=key)
        assert framed.envelope.chunks >= 2
        for i, value in framed.chunks:
            chunk = f"{g.fe}/data/{key.chunk(i, reply=False)}".encode()
            g.c.write(chunk, value.encode())
            g.c.set_perms(chunk, [b"n5", b"r0", b"w6"] if grant else [b"n5", b"r0"])
        g.send(framed.envelope.name, framed.value.encode())
        reply = g.reply(seq)
        if grant:
            assert status_of(reply) == -13
        else:
            assert [r.rc for r in decode_reply(reply, decode_request_ops(body))] == [0, 1, 1]
    device = tmem_host.service.devices[5]  # type: ignore[union-attr]
    assert (device.counters.foreign, device.counters.ops) == (1, 3)


def test_a_foreign_chunk_is_refused_while_the_request_nodes_permissions_are_known(
        tmem_host: TmemHost) -> None:
    """The host knows the permissions of nodes below ``req/`` from its watch between bulk
    removals (docs/protocol.md §9), but ``data/`` is not watched: a chunk's are read every
    time, also when the request nodes' are not."""
    from xentmem.xenbus.area import REQ_NAMES

    g = HandGuest(tmem_host, 5)
    g.connect()
    key = g.key
    assert key is not None
    device = tmem_host.service.devices[5]  # type: ignore[union-attr]
    pool = encode_request([OpRecord.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)])
    flush = encode_request([OpRecord.flush_page(0, Oid(1), 0)])
    # One name each: the bulk removal after the 61st (a next one of four names would pass
    # REQ_NAMES), the 62nd checked, then known from the 63rd on.
    for seq in range(1, REQ_NAMES):
        g.send(frame(seq, pool if seq == 1 else flush, LIMITS, reply=False, key=key)
               .envelope.name)
        assert status_of(g.reply(seq)) == 0
    checks = device.counters.perm_checks
    body = encode_request([OpRecord.put_page(0, Oid(1), i, os.urandom(4096)) for i in range(2)])
    seq = REQ_NAMES
    framed = frame(seq, body, Limits(max_parts=1), reply=False, key=key)
    for i, value in framed.chunks:
        chunk = f"{g.fe}/data/{key.chunk(i, reply=False)}".encode()
        g.c.write(chunk, value.encode())
        g.c.set_perms(chunk, [b"n5", b"r0", b"w6"])
    g.send(framed.envelope.name, framed.value.encode())
    assert status_of(g.reply(seq)) == -errno.EACCES
    assert device.counters.perm_checks == checks  # the request nodes' were known
    assert device.counters.foreign == 1


def test_a_guest_whose_area_another_domain_may_write_is_refused(tmem_host: TmemHost) -> None:
    roots = tmem_host.guest(5)
    guest = tmem_host.client(roots)
    fe = b"/local/domain/5/device/tmem/0"
    guest.set_perms(fe, [b"n5", b"r0", b"w6"])  # the guest lets domain 6 write its requests
    from fakes.xenstore_hosts import close_client

    close_client(guest)
    backend = XenBackend({"timeout_ms": 5000}, roots=roots)
    from xentmem.errors import BackendError

    with pytest.raises(BackendError, match="writable by domains \\[6\\]"):
        backend.connect()


@pytest.fixture
def ours(make_xs_server, tmp_path: Path):
    """The host service over our own server only: for what does not depend on the daemon."""
    from fakes.xenstore_hosts import OurHost

    host = TmemHost(OurHost(make_xs_server(), "/xentmem-test/cli"), tmp_path, 64 << 20)
    host.start()
    try:
        yield host
    finally:
        host.clean()
        host.xs.close()


def test_a_refused_guest_keeps_no_connection_open(ours: TmemHost) -> None:
    """The message channel opens its own connections; a failed connect closes them."""
    from fakes.xenstore_hosts import close_client

    from xentmem.errors import BackendError

    roots = ours.guest(5)
    guest = ours.client(roots)
    guest.set_perms(b"/local/domain/5/device/tmem/0", [b"n5", b"r0", b"w6"])
    close_client(guest)
    with pytest.raises(BackendError, match="writable by domains"):
        XenBackend({"timeout_ms": 5000}, roots=roots).connect()
    assert ours.xs.server.wait_watch_count(5, 0, timeout=10)  # type: ignore[attr-defined]


def test_control_commands_mirror_xl_tmem(ours: TmemHost) -> None:
    roots = ours.guest(5)
    backend = XenBackend({"timeout_ms": 5000, "batch": False}, roots=roots)
    backend.connect()
    try:
        pool = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert backend.put_page(pool, Oid(1), 0, TEXT) == 1
        runner = CliRunner()
        base = ["--control", str(ours.control_path)]

        result = runner.invoke(cli, [*base, "list", "--json"])
        assert result.exit_code == 0, result.output
        assert result.output.count("\n") == 1, "--json prints one compact line"
        listing = json.loads(result.output)
        assert listing["clients"][0]["domid"] == 5
        assert listing["clients"][0]["pools"][0]["pages"] == 1
        assert listing["devices"][0]["state"] == "Connected"

        result = runner.invoke(cli, [*base, "list"])
        assert result.exit_code == 0 and "domain 5: weight=0 compress=1 frozen=0" in result.output
        assert "pool 0: persistent pages=1" in result.output

        result = runner.invoke(cli, [*base, "freeze", "5"])
        assert result.exit_code == 0 and result.output.startswith(
            "frozen: 5\ndomain 5: weight=0 compress=1 frozen=1 device=Connected")
        assert backend.put_page(pool, Oid(1), 1, TEXT) == -1000
        assert runner.invoke(cli, [*base, "thaw", "all"]).exit_code == 0
        # Results are text unless --json asks for the one compact document.
        result = runner.invoke(cli, [*base, "set", "5", "-w", "4", "--no-compress", "--json"])
        assert json.loads(result.output) == {"domids": [5], "weight": 4, "cap_mb": None,
                                             "compress": False}
        result = runner.invoke(cli, [*base, "set", "5", "-w", "4"])
        assert result.output == "domain 5: weight=4\n"
        result = runner.invoke(cli, [*base, "set", "5", "-c", "32"])
        assert result.output == "domain 5: cap=32M\n"
        result = runner.invoke(cli, [*base, "shared-auth", "5", "-u",
                                     "12345678-9abc-def0-1122-334455667788", "-A", "1"])
        assert result.exit_code == 0, result.output
        assert runner.invoke(cli, [*base, "shared-auth", "all", "-A", "0"]).exit_code == 0
        result = runner.invoke(cli, [*base, "freeable"])
        assert result.exit_code == 0 and result.output.strip() == "0"
        result = runner.invoke(cli, [*base, "freeable", "--json"])
        assert result.output == '{"freeable_mb":0}\n'
        client = json.loads(runner.invoke(cli, [*base, "list", "5", "--json"]).output)
        assert client["clients"][0]["auth"] == ["12345678-9abc-def0-1122-334455667788"]
        assert client["shared_auth"] is False

        bad = runner.invoke(cli, [*base, "set", "5"])
        assert bad.exit_code == 2 and "weight" in bad.output
        bad = runner.invoke(cli, [*base, "list", "77"])
        assert bad.exit_code == 1
        assert bad.output == ("xentmem-hostd: error: domain 77 is not a guest of this service "
                              "(guests: 5); see `xentmem-hostd list` [not_found]\n")
    finally:
        backend.remove()


def test_the_control_socket_refuses_bad_requests(ours: TmemHost) -> None:
    with HostControlClient(ours.control_path, timeout=5) as control:
        for op, args, code in (("nope", {}, "unknown_op"),
                               ("set", {"domid": 5}, "bad_args"),
                               ("set", {"domid": -1, "weight": 1}, "bad_args"),
                               ("freeze", {"domid": 5, "extra": 1}, "bad_args"),
                               ("shared-auth", {"domid": 5, "auth": True, "uuid": "x"},
                                "bad_args")):
            with pytest.raises(ControlError) as caught:
                control.call(op, **args)
            assert caught.value.code == code
        hello = control.hello()
        assert hello["service"] == "xentmem-hostd" and hello["protocol"] == 1
        assert set(hello["ops"]) == set(HOST_OPS)
    import socket

    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(5)
        raw.connect(str(ours.control_path))
        # The envelope is xentmemd's: a version it does not speak and an unknown field are
        # refused as there (both were bad_request, or ignored, before the two were one).
        raw.sendall(b'this is not json\n{"v":2,"id":1,"op":"freeable"}\n'
                    b'{"v":1,"id":2,"op":"freeable","extra":1}\n'
                    b'{"v":1,"id":3,"op":"freeable"}\n')
        replies = raw.makefile()
        answers = [json.loads(replies.readline()) for _ in range(4)]
        assert [a.get("error", {}).get("code") for a in answers] == [
            "bad_request", "unsupported_version", "bad_request", None]
        assert answers[3] == {"v": 1, "id": 3, "ok": True, "result": {"freeable_mb": 0}}


def test_control_clients_come_and_go_while_the_loop_runs(ours: TmemHost) -> None:
    """The loop registers the control socket's descriptors once, and again only after control
    activity: a client that leaves frees its descriptor, the next one (likely given the same
    number) is served, and a client that stayed throughout is still served."""
    with HostControlClient(ours.control_path, timeout=5) as stayed:
        for _ in range(5):
            with HostControlClient(ours.control_path, timeout=5) as passing:
                assert passing.hello()["service"] == "xentmem-hostd"
        assert stayed.hello()["service"] == "xentmem-hostd"


def test_the_cli_says_when_the_service_is_not_there(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--control", str(tmp_path / "none.sock"), "freeable"])
    assert result.exit_code == 3  # the exit-code table of every console script
    assert result.output.startswith("xentmem-hostd: error: cannot reach xentmem-hostd at ")


def test_the_demo_is_a_mocked_xen_host_a_guest_can_use() -> None:
    directory = Path(tempfile.mkdtemp(prefix="demo-", dir="/tmp"))
    demo = subprocess.Popen(
        [sys.executable, "-m", "xentmem.hostd", "demo", "--dir", str(directory),
         "--guest", "3", "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert demo.stdout is not None
        lines = [demo.stdout.readline() for _ in range(3)]
        sockets = dict(re.findall(r"guest (\d+): XENSTORED_PATH=(\S+)", "".join(lines)))
        assert list(sockets) == ["3"], lines
        with pyxs.Client(unix_socket_path=str(directory / "socket")) as dom0:
            wait_for_node(dom0, b"/local/domain/0/backend/tmem/3/0/state")
        roots = Roots(root=directory, xenstore_socket=Path(sockets["3"]))
        XenBackend.probe(roots)
        backend = XenBackend({"timeout_ms": 5000}, roots=roots)
        backend.connect()
        try:
            pool = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
            assert backend.put_page(pool, Oid(1), 0, TEXT) == 1
            assert backend.get_page(pool, Oid(1), 0) == (1, TEXT)
        finally:
            backend.remove()
        listed = subprocess.run(
            [sys.executable, "-m", "xentmem.hostd", "list", "--json"],
            env={**os.environ, "XENTMEM_HOSTD_SOCKET": str(directory / "hostd.sock")},
            capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["devices"][0]["domid"] == 3
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(WAIT_S) == 0
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


def test_a_guest_of_wire_version_2_is_refused_cleanly(tmem_host: TmemHost) -> None:
    """Version 3 (the session key) speaks to no version 2 guest: the host says so."""
    g = HandGuest(tmem_host, 5)
    g.c.write(f"{g.fe}/state".encode(), b"1")
    g.wait_state(2)
    g.c.write(f"{g.fe}/version".encode(), b"2")
    g.c.write(f"{g.fe}/state".encode(), b"3")
    g.wait_state(5)
    assert g.c.read(f"{g.be}/error".encode()) == (
        f"{errno.EPROTONOSUPPORT} frontend asks for version 2; this host speaks "
        f"[{WIRE_VERSION}]").encode()


def test_a_version_that_is_not_ascii_closes_the_device_saying_why(tmem_host: TmemHost) -> None:
    """Before, the error message quoted the version with repr(), which kept the U+FFFD its
    decoding made of the byte 0xff; the write of the ``error`` node refused that
    (ValueError), so there was no ``error`` node and the backend stayed in InitWait."""
    g = HandGuest(tmem_host, 5)
    g.c.write(f"{g.fe}/state".encode(), b"1")
    g.wait_state(2)
    # pyxs refuses such a value: the guest writes it by hand.
    written = raw_request(g.roots.xenstore_socket, XS.WRITE,
                          f"{g.fe}/version".encode() + b"\0\xff3")
    assert written is not None and written.payload == b"OK\0"
    g.c.write(f"{g.fe}/state".encode(), b"3")
    g.wait_state(5)
    assert g.c.read(f"{g.be}/error".encode()) == (
        f"{errno.EPROTO} frontend version unusable: version: '\\ufffd3' is not an integer "
        "in 0..255").encode()


def test_an_error_message_is_written_as_printable_ascii_whatever_it_quotes(
        ours: TmemHost) -> None:
    """``dev_error`` itself: a message with characters a value may not hold (non-ASCII, a
    newline) is still written, each such character as ``?``."""
    ours.guest(5)
    ours.halt()  # its turn done (the device registered); its session is used from here
    device = ours.service.devices[5]  # type: ignore[union-attr]
    try:
        device.dev_error(errno.EPROTO, "caf\u00e9\nline \ufffd")
    finally:
        ours.resume()
    assert ours.xs.dom0.read(f"{device.nodename}/error".encode()) == (
        f"{errno.EPROTO} caf??line ?").encode()


def test_a_host_of_wire_version_2_is_refused_cleanly(tmem_host: TmemHost) -> None:
    """... and a version 3 guest says so to a version 2 host."""
    from xentmem.errors import BackendError

    roots = tmem_host.guest(5)
    tmem_host.xs.dom0.write(b"/local/domain/0/backend/tmem/5/0/versions", b"2")
    with pytest.raises(BackendError, match=r"tmem host speaks versions \[2\]; this guest "
                                           rf"speaks \[{WIRE_VERSION}\]"):
        XenBackend({"timeout_ms": 5000}, roots=roots).connect()


def test_an_op_that_waited_its_turn_fails_within_its_own_timeout(ours: TmemHost) -> None:
    """A caller queued behind a slow message sends when its turn comes, but waits for the
    reply only for what is left of its timeout: -ETIMEDOUT then, not a success after about
    twice the timeout; and the host is not taken for silent (the next op goes through)."""
    import threading
    import time

    timeout_s = 4.0  # the slow host's 0.7 of it leaves the first op room on a busy machine
    backend = XenBackend({"timeout_ms": int(timeout_s * 1000), "batch": False},
                         roots=ours.guest(5))
    backend.connect()
    try:
        pool = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        store = ours.service.store  # type: ignore[union-attr]
        real_put = store.put_page
        slow = threading.Event()
        in_put = threading.Event()

        def slow_put(*args, **kw):  # type: ignore[no-untyped-def]
            if slow.is_set():
                in_put.set()
                time.sleep(0.7 * timeout_s)  # the host is slow, not gone
            return real_put(*args, **kw)

        store.put_page = slow_put
        slow.set()
        first: list[int] = []
        sender = threading.Thread(target=lambda: first.append(
            backend.put_page(pool, Oid(1), 0, TEXT)))
        sender.start()
        assert in_put.wait(WAIT_S)  # the first message is at the host: the next op queues
        started = time.monotonic()
        rc = backend.put_page(pool, Oid(1), 1, TEXT)
        took = time.monotonic() - started
        sender.join(WAIT_S)
        assert first == [1]
        assert rc == -errno.ETIMEDOUT and took < timeout_s + 1.0, (rc, took)
        slow.clear()
        assert backend.put_page(pool, Oid(1), 2, TEXT) == 1  # not failed fast: no stall
        rc, data = backend.get_page(pool, Oid(1), 1)
        assert (rc, data) in ((1, TEXT), (0, None))  # the timed-out put: its page or a miss
    finally:
        backend.remove()


def test_a_guest_keeps_what_the_administrator_set_across_a_reload(ours: TmemHost) -> None:
    """Unloading and loading the backend (a new session) drops the guest's pools, not its
    client: freeze, cap, weight and authorised uuids stay, as Xen's client lives as long as
    its domain (a frozen guest once thawed itself by reloading)."""
    uuid = "12345678-9abc-def0-1122-334455667788"
    roots = ours.guest(5)
    backend = XenBackend({"timeout_ms": 5000, "batch": False}, roots=roots)
    backend.connect()
    pool = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert backend.put_page(pool, Oid(1), 0, TEXT) == 1
    with HostControlClient(ours.control_path, timeout=WAIT_S) as control:
        control.call("set", domid=5, weight=7, cap_mb=1)
        control.call("shared-auth", domid=5, uuid=uuid, auth=True)
        control.call("freeze", domid=5)
        backend.remove()
        backend = XenBackend({"timeout_ms": 5000, "batch": False}, roots=roots)
        backend.connect()
        try:
            pool = backend.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
            assert backend.get_page(pool, Oid(1), 0)[1] is None  # the old pools are gone
            assert backend.put_page(pool, Oid(1), 0, TEXT) == -1000  # -EFROZEN: still frozen
            (client,) = control.call("list", domid=5)["clients"]
            assert (client["frozen"], client["weight"], client["cap_bytes"]) == (True, 7, 1 << 20)
            assert len(client["auth"]) == 1
        finally:
            backend.remove()


def served_once_set_up_again(host: TmemHost, domid: int) -> None:
    """A guest of ``domid`` connects, served once a later tick set its device up again
    (its areas are made first), and puts a page."""
    roots = host.guest(domid)
    guest = XenBackend({"timeout_ms": TIMEOUT_MS, "connect_timeout_ms": int(WAIT_S * 1000),
                        "batch": False}, roots=roots)
    guest.connect()
    try:
        assert host.service is not None and domid in host.service.devices
        pool = guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert guest.put_page(pool, Oid(1), 0, TEXT) == 1
    finally:
        guest.remove()


def test_a_set_up_whose_watch_times_out_is_tried_again_and_serves_the_guest(
        tmem_host: TmemHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set-up watches the guest's ``state``, then its ``req/``; the second watch may time
    out (xenstore busy).  Before, the first watch stayed registered and the domain was tried
    again only at the next @introduceDomain, where set-up failed for good ("already
    watched"): the guest could never load.  Now set-up removes what it watched, and a later
    tick tries again."""
    from xentmem.xenbus.xs import XsTimeout

    service = tmem_host.service
    assert service is not None
    real_watch = service.conn.watch
    failed: list[bytes] = []

    def watch_times_out_once(path: str, token: bytes) -> object:
        if token == b"xentmem-hostd-fe-req-7" and not failed:
            failed.append(token)
            raise XsTimeout(f"watch {path}: no answer")
        return real_watch(path, token)
    monkeypatch.setattr(service.conn, "watch", watch_times_out_once)
    served_once_set_up_again(tmem_host, 7)
    assert failed


def test_a_domain_whose_set_up_fails_keeps_no_other_from_being_served(
        tmem_host: TmemHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan sets up every new domain in turn; an unexpected error in one domain's set-up
    ended the scan there, so domains listed after it were never set up.  Now it is logged
    and the scan goes on."""
    real_setup = TmemBack.setup

    def setup_fails_for_7(self: TmemBack) -> None:
        if self.domid == 7:
            raise RuntimeError("a bug in domain 7's set-up")
        real_setup(self)
    monkeypatch.setattr(TmemBack, "setup", setup_fails_for_7)
    tmem_host.xs.introduce(7)
    roots = tmem_host.guest(8)  # waits for domain 8's device
    guest = XenBackend({"timeout_ms": TIMEOUT_MS, "batch": False}, roots=roots)
    guest.connect()
    try:
        assert 7 not in tmem_host.service.devices  # type: ignore[union-attr]
        assert guest.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) >= 0
    finally:
        guest.remove()


def test_a_watch_whose_answer_timed_out_is_not_refused_at_the_next_try(
        tmem_host: TmemHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch call that times out may still have been registered by xenstored (the
    answer was only late).  The session does not know the watch, so the next set-up's watch
    of that token was refused (EEXIST) at every try, and the guest never served.  Now a
    refused watch is removed from xenstored and made again."""
    from xentmem.xenbus.xs import XsTimeout

    service = tmem_host.service
    assert service is not None
    real_watch = service.conn.watch
    late: list[bytes] = []

    def watch_answered_late_once(path: str, token: bytes) -> object:
        watched = real_watch(path, token)
        if token == b"xentmem-hostd-fe-req-7" and not late:
            late.append(token)
            service.conn._watches.pop(token)  # as if its answer never came
            raise XsTimeout(f"watch {path}: no answer")
        return watched
    monkeypatch.setattr(service.conn, "watch", watch_answered_late_once)
    served_once_set_up_again(tmem_host, 7)
    assert late
