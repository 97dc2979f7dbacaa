"""Guest 6 attacks guest 5 through xenstore, on our server and on Debian's real C xenstored and
oxenstored: reads, writes, watches, every permission trick, name probing and sequence tricks.

Guest 5 runs the real ``xen`` backend against ``xentmem-hostd``; guest 6 is a raw xenstore
client (pyxs) on its own ring.  Whatever guest 6 (or a careless guest 5) does, nothing of guest
5's leaks to guest 6, no request guest 6 wrote is ever run as guest 5's, and guest 5's pages
stay intact.  Under ``CI=true`` a missing real daemon fails (``fakes.required``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pyxs
from fakes.xenstore_hosts import guest_watcher, outcome
from xenhost import TIMEOUT_MS, TmemHost

from xentmem.guest.backends.xen import XenBackend
from xentmem.hostd.tmemback import TmemBack
from xentmem.roots import Roots
from xentmem.tmem.abi import PAGE_SIZE, POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid
from xentmem.xenbus.body import OpRecord, encode_request
from xentmem.xenbus.framing import MAX_SEQ, Limits, frame, to_text
from xentmem.xenbus.perms import Access, Caller, Perms, holders, perm_for
from xentmem.xenbus.session_key import TAG_CHARS, SessionKey

FE5 = "/local/domain/5/device/tmem/0"
BE5 = "/local/domain/0/backend/tmem/5/0"
PAGES = {i: (bytes([i]) * 64 + os.urandom(64)) * (PAGE_SIZE // 128) for i in range(1, 9)}
LIMITS = Limits()
#: How long a handshake or unload the host refuses to answer is waited for (ample for our
#: stand-in and the real daemons on one machine; the product's default is 30 s).
REFUSED_CONNECT_MS = 5000


@contextmanager
def connected(roots: Roots, **params: Any) -> Iterator[XenBackend]:
    backend = XenBackend({"timeout_ms": TIMEOUT_MS, "batch": 0, **params}, roots=roots)
    backend.connect()
    try:
        yield backend
    finally:
        backend.remove()


def store_pages(b5: XenBackend) -> int:
    pool = b5.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert pool >= 0
    for index, page in PAGES.items():
        assert b5.put_page(pool, Oid(1), index, page) == 1
    return pool


def assert_intact(host: TmemHost, b5: XenBackend | None, pool: int) -> None:
    """Every page of guest 5 is there, unchanged: in the host's store, and through its device
    when it is still connected."""
    store = host.service.store  # type: ignore[union-attr]
    for index, page in PAGES.items():
        assert store.get_page(5, pool, Oid(1), index) == (1, page)
        if b5 is not None:
            assert b5.get_page(pool, Oid(1), index) == (1, page)


def device5(host: TmemHost) -> TmemBack:
    return host.service.devices[5]  # type: ignore[union-attr]


def forged_request(seq: int, pool: int, *, key: SessionKey | None = None) -> tuple[str, str]:
    """(directory, name) of a request destroying guest 5's pool, as guest 6 would write it:
    without the session key the MAC and the directory are guesses."""
    body = encode_request([OpRecord.destroy_pool(pool)])
    guess = key or SessionKey(os.urandom(32))
    framed = frame(seq, body, LIMITS, reply=False, key=guess)
    return guess.slot(seq, reply=False), framed.envelope.name


def every_node(host: TmemHost) -> list[str]:
    """Every node of guest 5's two areas (dom0 lists them)."""
    dom0 = host.xs.dom0
    found: list[str] = []

    def walk(path: str) -> None:
        found.append(path)
        for child in dom0.list(path.encode()):
            walk(f"{path}/{child.decode()}")

    for area in (FE5, BE5):
        walk(area)
    return found


# -- reads, writes, watches ---------------------------------------------------------------------


def test_guest_6_reads_writes_lists_and_sets_nothing_of_guest_5(tmem_host: TmemHost) -> None:
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        pool = store_pages(b5)
        g6: pyxs.Client = tmem_host.client(r6)
        nodes = every_node(tmem_host)
        assert f"{BE5}/session-key" in nodes and any("/req/" in n for n in nodes)
        for path in nodes:
            raw = path.encode()
            assert outcome(lambda raw=raw: g6.read(raw)) == "EACCES", path
            assert outcome(lambda raw=raw: g6.list(raw)) == "EACCES", path
            assert outcome(lambda raw=raw: g6.get_perms(raw)) == "EACCES", path
            assert outcome(lambda raw=raw: g6.write(raw, b"x")) == "EACCES", path
            assert outcome(lambda raw=raw: g6.set_perms(raw, [b"b6"])) in ("EACCES", "EPERM")
            assert outcome(lambda raw=raw: g6.write(raw + b"/child", b"x")) == "EACCES", path
        assert outcome(lambda: g6.delete(FE5.encode())) == "EACCES"
        assert set(every_node(tmem_host)) == set(nodes)  # nothing was added or removed
        assert_intact(tmem_host, b5, pool)


def test_watches_on_guest_5s_areas_tell_guest_6_nothing(tmem_host: TmemHost) -> None:
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        g6 = tmem_host.client(r6)
        spy = guest_watcher(g6, tmem_host.xs.dom0, 6)
        for i, path in enumerate((FE5, f"{FE5}/req", f"{FE5}/data", BE5, f"{BE5}/rsp",
                                  "/local/domain/5", "/local/domain/0/backend")):
            # Every daemon fires a new watch once, whatever the permissions; nothing more.
            assert spy.watch(path.encode(), f"spy{i}".encode())[0] == path.encode()
        pool = store_pages(b5)
        b5.flush_page(pool, Oid(1), 1)
        assert b5.put_page(pool, Oid(1), 1, PAGES[1]) == 1
        assert spy.events() == []
        assert_intact(tmem_host, b5, pool)


# -- name probing -------------------------------------------------------------------------------


def probe(g6: pyxs.Client, path: str) -> tuple[str, ...]:
    """What guest 6 hears back for ``path``: every way of asking whether it exists."""
    raw = path.encode()
    return tuple(outcome(call) for call in (lambda: g6.read(raw), lambda: g6.get_perms(raw),
                                             lambda: g6.list(raw), lambda: g6.delete(raw)))


def test_probing_names_confirms_nothing(tmem_host: TmemHost) -> None:
    """oxenstored answers ENOENT for a missing node and EACCES for an existing one, and wire
    version 2's names spelled op, pool, oid and index: guest 6 found guest 5's request by
    enumerating them.  Now every name sits in a directory named by the session key, so each
    candidate answers exactly as a name that surely does not exist."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        pool = store_pages(b5)
        assert b5.get_page(pool, Oid(1), 3) == (1, PAGES[3])  # the op guest 6 hunts for
        g6 = tmem_host.client(r6)
        missing = {where: probe(g6, f"{where}/no-such-node/no-such-name")
                   for where in (f"{FE5}/req", f"{FE5}/data", f"{BE5}/rsp", f"{BE5}/rsp-data")}
        get = encode_request([OpRecord.get_page(pool, Oid(1), 3)])
        candidates: list[tuple[str, str]] = []
        for seq in range(1, 40):
            text = to_text(get)
            for shape in ("0",):
                guess_key = SessionKey(os.urandom(32))
                name = frame(seq, get, LIMITS, reply=False, key=guess_key).envelope.name
                for slot in (str(seq % 8), f"{seq % 8}-1", guess_key.slot(seq, reply=False)):
                    candidates.append((f"{FE5}/req", f"{slot}/{name}"))
                    candidates.append((f"{FE5}/req", f"{slot}/{seq}@{shape}@{text}"))
            candidates.append((f"{BE5}/rsp", f"{seq % 8}/{seq}@0@"))
        for i in range(1, 4):  # chunk names, as version 2 had them
            candidates += [(f"{FE5}/data", f"{i}/x"), (f"{BE5}/rsp-data", f"{i}/x")]
        for where, rest in candidates:
            assert probe(g6, f"{where}/{rest}") == missing[where], rest
        # The exact names of what exists, in a wrong directory, confirm nothing either.
        for path in every_node(tmem_host):
            for where in (f"{FE5}/req", f"{BE5}/rsp"):
                if path.startswith(where + "/") and path.count("/") == where.count("/") + 2:
                    name = path.rsplit("/", 1)[1]
                    assert probe(g6, f"{where}/{'0' * TAG_CHARS}/{name}") == missing[where]
        assert_intact(tmem_host, b5, pool)


def test_the_channel_is_real_so_the_key_is_what_closes_it(tmem_host: TmemHost) -> None:
    """A sanity check on the probe itself: on oxenstored the real directory of a request (which
    only the key gives) does answer differently from a guess."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        store_pages(b5)
        g6 = tmem_host.client(r6)
        key = SessionKey.parse(tmem_host.xs.dom0.read(f"{BE5}/session-key".encode()))
        real = f"{FE5}/req/{key.slot(device5(tmem_host).last_seq, reply=False)}"
        guess = f"{FE5}/req/{'0' * TAG_CHARS}"
        expected_differ = tmem_host.xs.flavour == "oxenstored"
        assert (probe(g6, real) != probe(g6, guess)) == expected_differ


# -- permission tricks --------------------------------------------------------------------------


@pytest.mark.parametrize("perms", [[b"b5"], [b"w5"], [b"n5", b"r0", b"w6"], [b"n5", b"b7"],
                                   [b"r5", b"n6", b"w7"]])
@pytest.mark.parametrize("node", ["", "/state", "/version"])
def test_a_frontend_area_others_may_write_is_refused_at_connect(
        tmem_host: TmemHost, node: str, perms: list[bytes]) -> None:
    """The first entry's letter is what every unlisted domain gets: ``["b5"]`` lets every
    domain write.  (Before, only later entries counted as writers, ``["b5"]`` passed, and
    ``state`` and ``version`` were not looked at.)"""
    r5 = tmem_host.guest(5)
    g5 = tmem_host.client(r5)
    g5.write(f"{FE5}/version".encode(), b"0")
    g5.set_perms(f"{FE5}{node}".encode(), perms)
    # A state others may write is not believed at all, so the host never reaches InitWait:
    # the guest times out, saying what the host said.
    # (A refused handshake waits out connect_timeout_ms: 5 s here, not the product's 30.)
    backend = XenBackend({"timeout_ms": 1500 if node == "/state" else TIMEOUT_MS,
                          "connect_timeout_ms": REFUSED_CONNECT_MS}, roots=r5)
    from xentmem.errors import BackendError

    with pytest.raises(BackendError, match=rf"0{node} is writable by (every domain|domains \[)"):
        backend.connect()
    assert device5(tmem_host).counters.sessions == 0


def test_a_domain_listed_with_no_access_first_may_not_write(tmem_host: TmemHost) -> None:
    """The first entry naming a domain wins: ``["n5", "n6", "w6"]`` keeps domain 6 out, and the
    default (``n``) keeps every other domain out, so the host serves it."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    g5 = tmem_host.client(r5)
    g5.set_perms(FE5.encode(), [b"n5", b"n6", b"w6"])
    with connected(r5) as b5:
        pool = store_pages(b5)
        g6 = tmem_host.client(r6)
        assert outcome(lambda: g6.write(f"{FE5}/req/x".encode(), b"-")) == "EACCES"
        assert_intact(tmem_host, b5, pool)


def test_a_grant_after_connect_refuses_the_next_request_and_runs_nothing(
        tmem_host: TmemHost) -> None:
    """Guest 5 connects, then opens its request directory to everybody; guest 6 writes a
    request destroying guest 5's pool.  Nothing of it runs, guest 5's own next request is
    refused (-EACCES: its nodes are now writable by others) until it closes the door again."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        pool = store_pages(b5)
        g5, g6 = tmem_host.client(r5), tmem_host.client(r6)
        req = f"{FE5}/req".encode()
        g5.set_perms(req, [b"b5"])  # "owner 5" -- and everybody may read and write
        seq = device5(tmem_host).last_seq + 1
        seen = [name.decode() for name in g6.list(req)]  # guest 6 can list now
        assert seen
        slot, name = forged_request(seq, pool)
        for old in seen:  # the directories made before keep their own permissions
            assert outcome(lambda old=old: g6.write(
                f"{FE5}/req/{old}/{name}".encode(), b"-")) == "EACCES"
        assert outcome(lambda: g6.write(f"{FE5}/req/{slot}/{name}".encode(), b"-")) == "OK"
        device = device5(tmem_host)
        # Guest 5's own next request lands in a directory that inherits the open door.
        assert b5.get_page(pool, Oid(1), 2) == (-errno.EACCES, None)
        assert device.counters.foreign == 1
        g5.set_perms(req, [b"n5", b"r0"])
        assert_intact(tmem_host, b5, pool)
        assert device.counters.foreign == 1


def test_a_state_node_others_may_write_decides_nothing(tmem_host: TmemHost) -> None:
    """Guest 5 lets domain 6 write its ``state``; guest 6 writes Closed.  Before, the host
    believed it and dropped guest 5's pages; now it ignores that state and closes the device
    without dropping anything."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    # The host leaves the device Closing, so the unload waits out connect_timeout_ms.
    with connected(r5, connect_timeout_ms=REFUSED_CONNECT_MS) as b5:
        pool = store_pages(b5)
        g5, g6 = tmem_host.client(r5), tmem_host.client(r6)
        g5.set_perms(f"{FE5}/state".encode(), [b"n5", b"r0", b"w6"])
        g6.write(f"{FE5}/state".encode(), b"6")
        device = device5(tmem_host)
        b5_state = tmem_host.xs.dom0.read(f"{BE5}/state".encode())
        for _ in range(100):
            if b5_state == b"5":
                break
            watch = tmem_host.xs.dom0.monitor()
            watch.watch(f"{BE5}/state".encode(), b"w")
            watch.events.get(timeout=10)
            b5_state = tmem_host.xs.dom0.read(f"{BE5}/state".encode())
            watch.unwatch(f"{BE5}/state".encode(), b"w")
        assert b5_state == b"5"  # Closing, with the reason in error
        assert b"writable by domains [6]" in tmem_host.xs.dom0.read(f"{BE5}/error".encode())
        assert device.state.name == "CLOSING"
        assert_intact(tmem_host, None, pool)


@pytest.mark.parametrize("forged", [b"1", b"5", b"6"])
def test_a_state_written_while_the_door_was_open_ends_nothing(tmem_host: TmemHost,
                                                              forged: bytes) -> None:
    """The race on ``state``: guest 5 lets domain 6 write it, domain 6 writes Initialising,
    Closing or Closed, guest 5 takes the grant back, all before the host reads.  The host then
    sees clean permissions, but a state that would end the session (and drop the pages) must
    be signed with the session key (``state-mac``), which domain 6 cannot: ignored.  (Before,
    the host believed it and dropped guest 5's pages.)"""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        pool = store_pages(b5)
        g5, g6 = tmem_host.client(r5), tmem_host.client(r6)
        state = f"{FE5}/state".encode()
        tmem_host.halt()
        g5.set_perms(state, [b"n5", b"r0", b"w6"])
        g6.write(state, forged)
        g5.set_perms(state, [b"n5", b"r0"])
        tmem_host.resume()
        assert_intact(tmem_host, b5, pool)  # served after the forged state: still connected
        assert device5(tmem_host).state.name == "CONNECTED"


def test_guest_5_cannot_give_its_area_away(tmem_host: TmemHost) -> None:
    """Only dom0 changes an owner: ``set_perms(["b6"])`` on guest 5's own node is refused by
    every daemon, so "owned by 6" never hides a writer."""
    r5 = tmem_host.guest(5)
    with connected(r5):
        g5 = tmem_host.client(r5)
        assert outcome(lambda: g5.set_perms(FE5.encode(), [b"b6"])) in ("EPERM", "EACCES")
        assert tmem_host.xs.dom0.get_perms(FE5.encode())[0] == b"n5"


def test_a_forged_request_written_while_the_door_was_open_never_runs(
        tmem_host: TmemHost) -> None:
    """The race a permission check alone loses: guest 5 opens ``req/``, guest 6 writes, guest
    5 closes it again, all before the host reads.  The host then sees clean permissions on
    ``req/``, but the request has no valid MAC (guest 6 cannot read the key), so it is dropped;
    even in the right directory (as if the name had leaked) it does not authenticate."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        pool = store_pages(b5)
        g5, g6 = tmem_host.client(r5), tmem_host.client(r6)
        key = SessionKey.parse(tmem_host.xs.dom0.read(f"{BE5}/session-key".encode()))
        device = device5(tmem_host)
        before = device.counters.malformed + device.counters.unauthentic
        tmem_host.halt()
        req = f"{FE5}/req".encode()
        g5.set_perms(req, [b"b5"])
        seq = device.last_seq + 1
        slot, name = forged_request(seq, pool)
        leaked_slot = key.slot(seq, reply=False)  # the name leaked; the MAC is still a guess
        written = [f"{FE5}/req/{slot}/{name}", f"{FE5}/req/{leaked_slot}/{name}"]
        for path in written:
            g6.write(path.encode(), b"-")
        g5.set_perms(req, [b"n5", b"r0"])
        for path in written:  # oxenstored: guest 5 owns them and can close them too
            outcome(lambda path=path: g5.set_perms(path.encode(), [b"n5", b"r0"]))
        tmem_host.resume()
        # Guest 6 made the directory of guest 5's next request (its name leaked), so that
        # request is refused as writable by others; the ones after it are served.
        assert b5.get_page(pool, Oid(1), 1) in ((1, PAGES[1]), (-errno.EACCES, None))
        assert_intact(tmem_host, b5, pool)
        # (on oxenstored, guest 5 closing the forged nodes fires their watches once more)
        assert device.counters.malformed + device.counters.unauthentic - before >= 2
        assert device.last_seq > seq  # the forged seq did not move the host's sequence


# -- sequence tricks ----------------------------------------------------------------------------


def test_a_huge_sequence_number_cannot_lock_guest_5_out(tmem_host: TmemHost) -> None:
    """A request named with seq 2^63 - 1 (or beyond) by someone without the key moves nothing:
    before, any name with a seq up to 10^19 set the host's last sequence, and every later
    request of guest 5 was ignored as a replay until it reconnected."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        pool = store_pages(b5)
        g5, g6 = tmem_host.client(r5), tmem_host.client(r6)
        req = f"{FE5}/req".encode()
        key = SessionKey.parse(tmem_host.xs.dom0.read(f"{BE5}/session-key".encode()))
        device = device5(tmem_host)
        last = device.last_seq
        tmem_host.halt()
        g5.set_perms(req, [b"b5"])
        for seq in (MAX_SEQ, MAX_SEQ + 1, 10**19 - 1):
            slot = key.slot(seq, reply=False) if seq <= MAX_SEQ else "0"
            g6.write(f"{FE5}/req/{slot}/{seq}@0@{'A' * TAG_CHARS}@AQID".encode(), b"-")
        g5.set_perms(req, [b"n5", b"r0"])
        tmem_host.resume()
        assert_intact(tmem_host, b5, pool)
        assert last < device.last_seq < MAX_SEQ


# -- the rule itself, against the real daemons --------------------------------------------------


PERM_CASES = [[b"n5"], [b"r5"], [b"w5"], [b"b5"], [b"n5", b"r6"], [b"n5", b"w6"],
              [b"n5", b"b6"], [b"b5", b"n6"], [b"r5", b"w6", b"r6"], [b"n5", b"n6", b"b6"],
              [b"n5", b"b7"], [b"w5", b"r7"], [b"n5", b"r0"]]


@pytest.mark.parametrize("perms", PERM_CASES, ids=lambda p: "-".join(e.decode() for e in p))
def test_the_permission_rule_is_each_daemons(tmem_host: TmemHost, perms: list[bytes]) -> None:
    """What :mod:`xentmem.xenbus.perms` predicts for domain 6 (reads, writes) is what each
    daemon does, and :func:`holders` agrees with it."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    g5, g6 = tmem_host.client(r5), tmem_host.client(r6)
    node = b"/local/domain/5/data/probe"
    g5.write(node, b"v")
    g5.set_perms(node, perms)
    parsed = Perms.parse(perms)
    access = perm_for(Caller(6), parsed)
    assert (outcome(lambda: g6.read(node)) == "OK") == bool(access & Access.READ)
    assert (outcome(lambda: g6.write(node, b"w")) == "OK") == bool(access & Access.WRITE)
    assert (6 in holders(parsed, Access.WRITE)) == bool(access & Access.WRITE)
    assert (6 in holders(parsed, Access.READ)) == bool(access & Access.READ)
