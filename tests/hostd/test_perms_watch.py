"""The host's cache of request nodes' permissions, and what it relies on, on our server and on
Debian's C xenstored and oxenstored: every change that can give another domain write access to
a node below a watched directory fires that directory's watch, in order with the writes around
it, and a node a guest creates takes its directory's permissions (``docs/protocol.md`` §9).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import pyxs
from fakes.xenstore_hosts import XenstoreHost, dom0_watcher
from xenhost import TIMEOUT_MS, TmemHost

from xentmem.guest.backends.xen import XenBackend
from xentmem.roots import Roots
from xentmem.tmem.abi import PAGE_SIZE, POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid
from xentmem.xenbus.area import REQ_NAMES
from xentmem.xenbus.session_key import SessionKey

TOKEN = b"perms-watch"
FE5 = "/local/domain/5/device/tmem/0"
BE5 = "/local/domain/0/backend/tmem/5/0"
PAGE = bytes(range(256)) * (PAGE_SIZE // 256)


@pytest.fixture
def guest5_dir(xenstore_host: XenstoreHost) -> tuple[XenstoreHost, str, pyxs.Client]:
    """``/local/domain/5/device/t``, made by dom0 for guest 5 as the host makes its area, and
    a client that is guest 5."""
    g5 = xenstore_host.client(xenstore_host.introduce(5))
    d = "/local/domain/5/device/t"
    xenstore_host.dom0.mkdir(d.encode())
    xenstore_host.dom0.set_perms(d.encode(), [b"n5", b"r0"])
    return xenstore_host, d, g5


def test_set_perms_below_a_watched_node_fires_its_watch(
        guest5_dir: tuple[XenstoreHost, str, pyxs.Client]) -> None:
    xs, d, g5 = guest5_dir
    g5.write(f"{d}/a/b".encode(), b"v")
    watcher = dom0_watcher(xs.dom0, xs.scratch)
    assert watcher.watch(d.encode(), TOKEN) == (d.encode(), TOKEN)
    assert watcher.events() == []
    for path in (d, f"{d}/a", f"{d}/a/b"):
        g5.set_perms(path.encode(), [b"n5", b"r0", b"w6"])
        assert watcher.events() == [(path.encode(), TOKEN)], path
    # A grant taken back fires too (the host must notice either way), and so does a removal.
    g5.set_perms(f"{d}/a".encode(), [b"n5", b"r0"])
    assert watcher.events() == [(f"{d}/a".encode(), TOKEN)]
    xs.dom0.delete(d.encode())
    assert (d.encode(), TOKEN) in watcher.events()


def test_a_new_node_takes_its_directorys_permissions(
        guest5_dir: tuple[XenstoreHost, str, pyxs.Client]) -> None:
    """So a request node the guest creates in a fresh directory below ``req/`` may be written
    by exactly the domains that may write ``req/`` when it is created."""
    xs, d, g5 = guest5_dir
    g5.write(f"{d}/x/y".encode(), b"v")
    assert xs.dom0.get_perms(f"{d}/x/y".encode()) == [b"n5", b"r0"]
    g5.set_perms(d.encode(), [b"n5", b"r0", b"w6"])
    g5.write(f"{d}/p/q".encode(), b"v")
    for path in (f"{d}/p", f"{d}/p/q"):
        assert xs.dom0.get_perms(path.encode()) == [b"n5", b"r0", b"w6"], path


# -- the host's cache of them --------------------------------------------------------------------


@contextmanager
def connected(roots: Roots) -> Iterator[XenBackend]:
    backend = XenBackend({"timeout_ms": TIMEOUT_MS, "batch": 0}, roots=roots)
    backend.connect()
    try:
        yield backend
    finally:
        backend.remove()


def test_a_steady_guest_costs_one_permission_read_per_bulk_removal(tmem_host: TmemHost) -> None:
    """``req/`` is removed before it could hold more than REQ_NAMES names (at least every 16
    messages of four names); the first message after that is checked (it lands in a new
    ``req/``), the rest are known from it."""
    with connected(tmem_host.guest(5)) as b5:
        pool = b5.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        device = tmem_host.service.devices[5]  # type: ignore[union-attr]
        before = device.counters.perm_checks
        every = REQ_NAMES // 4  # messages per removal, at the least
        ops = 4 * every
        for i in range(ops):
            assert b5.put_page(pool, Oid(1), i, PAGE) == 1
            assert b5.get_page(pool, Oid(1), i) == (1, PAGE)
        checks = device.counters.perm_checks - before
        # 2 * ops messages: one check after each bulk removal (and one at the start).
        assert checks <= 2 * ops // every + 2, checks


def test_a_steady_guest_costs_the_host_about_one_request_per_message(
        tmem_host: TmemHost) -> None:
    """The host's requests beyond each reply's write: a bulk removal of ``req/`` and the
    permission read after it once per 16 messages, a removal of ``rsp/`` once per 32.  (Once
    per 8 messages cost about a fifth more requests per unbatched op.)"""
    with connected(tmem_host.guest(5)) as b5:
        pool = b5.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        service = tmem_host.service
        assert service is not None
        sent: list[int] = []
        for conn in (service.conn, service.writer):
            def counted(msg_type: int, *args: object, _send=conn._send, **kw: object) -> int:
                sent.append(msg_type)
                return _send(msg_type, *args, **kw)
            conn._send = counted  # type: ignore[method-assign]
        before = service.devices[5].counters.messages  # type: ignore[union-attr]
        for i in range(64):
            assert b5.put_page(pool, Oid(1), i, PAGE) == 1
            assert b5.get_page(pool, Oid(1), i) == (1, PAGE)
        messages = service.devices[5].counters.messages - before  # type: ignore[union-attr]
        # Each message: its reply; per 16: the removal of req/ and, after it, the permissions
        # of req/ and of the message node and a listing of req/; per 32: the removal of rsp/.
        assert messages == 128
        assert len(sent) <= messages * (1 + 4 / 16 + 1 / 32) + 8, len(sent)


def test_a_directory_made_while_the_door_was_open_is_caught_after_it_closed(
        tmem_host: TmemHost) -> None:
    """Guest 5 opens ``req/`` to everybody; guest 6 makes the directories of guest 5's 2nd and
    3rd next requests (as if their names had leaked); guest 5 closes ``req/`` again.  Its next
    request lands in a clean new directory, but that must not make the host take the next two
    as clean: their nodes inherit the open door, and are refused, each of them."""
    r5, r6 = tmem_host.guest(5), tmem_host.guest(6)
    with connected(r5) as b5:
        pool = b5.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        for i in range(3):
            assert b5.put_page(pool, Oid(1), i, PAGE) == 1
        g5, g6 = tmem_host.client(r5), tmem_host.client(r6)
        key = SessionKey.parse(tmem_host.xs.dom0.read(f"{BE5}/session-key".encode()))
        device = tmem_host.service.devices[5]  # type: ignore[union-attr]
        req = f"{FE5}/req".encode()
        g5.set_perms(req, [b"b5"])
        seq = device.last_seq + 1
        for ahead in (1, 2):
            g6.mkdir(f"{FE5}/req/{key.slot(seq + ahead, reply=False)}".encode())
        g5.set_perms(req, [b"n5", b"r0"])
        assert b5.get_page(pool, Oid(1), 0) == (1, PAGE)
        assert b5.get_page(pool, Oid(1), 1) == (-errno.EACCES, None)
        assert b5.get_page(pool, Oid(1), 2) == (-errno.EACCES, None)
        assert device.counters.foreign == 2
        for i in range(3):
            assert b5.get_page(pool, Oid(1), i) == (1, PAGE)


def test_a_grant_on_a_served_request_is_noticed(tmem_host: TmemHost) -> None:
    """A permission change anywhere below ``req/`` ends the cache: the next message is
    checked (here it is clean, and served)."""
    r5 = tmem_host.guest(5)
    with connected(r5) as b5:
        pool = b5.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert b5.put_page(pool, Oid(1), 0, PAGE) == 1
        assert b5.put_page(pool, Oid(1), 1, PAGE) == 1
        g5 = tmem_host.client(r5)
        device = tmem_host.service.devices[5]  # type: ignore[union-attr]
        old = g5.list(f"{FE5}/req".encode())[0].decode()
        before = device.counters.perm_checks
        g5.set_perms(f"{FE5}/req/{old}".encode(), [b"n5", b"r0", b"w6"])
        assert b5.get_page(pool, Oid(1), 0) == (1, PAGE)
        assert device.counters.perm_checks == before + 1
