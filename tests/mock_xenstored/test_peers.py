"""The same xenstore scenarios against our server, C xenstored and oxenstored.

Every test takes ``xenstore_host`` and so runs three times.  Where Xen's two daemons were
measured to differ, the expectation depends on ``host.flavour`` (our server follows C
xenstored), so a difference shows up as a failure on exactly one peer.
"""

from __future__ import annotations

import copy

import pytest
import pyxs
from fakes.xenstore_hosts import (
    XenstoreHost,
    dom0_watcher,
    guest_watcher,
    outcome,
    raw_exchange,
    raw_request,
)

from xentmem.mock_xenstored.wire import Packet, XsOp, request

C, OX = "c-xenstored", "oxenstored"


def by_flavour(host: XenstoreHost, *, c: str, ox: str) -> str:
    return c if host.flavour == C else ox


# -- basic operations ------------------------------------------------------------------


def test_read_write_list_delete(xenstore_host: XenstoreHost) -> None:
    d, s = xenstore_host.dom0, xenstore_host.scratch.encode()
    d.write(s + b"/a", b"1")
    d.mkdir(s + b"/dir/sub")
    assert d.read(s + b"/a") == b"1"
    assert d.read(s + b"/dir") == b""  # created on the way, empty
    assert sorted(d.list(s)) == [b"a", b"dir"]
    assert d.get_perms(s + b"/a") == [b"n0"]
    d.write(s + b"/a", b"with\x00inner NUL")
    assert d.read(s + b"/a") == b"with\x00inner NUL"
    d.mkdir(s + b"/a")
    assert d.read(s + b"/a") == b"with\x00inner NUL", "mkdir leaves an existing value alone"
    d.delete(s + b"/dir")
    assert not d.exists(s + b"/dir/sub")
    assert outcome(lambda: d.read(s + b"/dir")) == "ENOENT"
    assert outcome(lambda: d.delete(s + b"/gone")) == "OK", "removing a missing leaf is fine"
    assert outcome(lambda: d.delete(s + b"/gone/deeper")) == "ENOENT", "...not a missing parent"
    assert d.get_domain_path(7) == b"/local/domain/7"


def test_dom0_relative_paths_resolve_under_its_home(xenstore_host: XenstoreHost) -> None:
    d = xenstore_host.dom0
    name = ("xentmem-rel-" + xenstore_host.scratch.rsplit("/", 1)[-1]).encode()
    d.write(name, b"r")
    try:
        assert d.read(b"/local/domain/0/" + name) == b"r"
    finally:
        d.delete(b"/local/domain/0/" + name)


def test_unknown_op_is_enosys(xenstore_host: XenstoreHost) -> None:
    reply = raw_request(xenstore_host.dom0_socket, 99, b"x\0")
    assert reply is not None
    assert (reply.op, reply.payload) == (XsOp.ERROR, b"ENOSYS\0")


# -- permissions -----------------------------------------------------------------------


def test_guests_cannot_touch_each_others_areas(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g5 = host.client(host.introduce(5))
    g6 = host.client(host.introduce(6))
    d.write(b"/local/domain/6/data/secret", b"s6")
    assert d.get_perms(b"/local/domain/6/data/secret") == [b"n6"], "dom0 copies the parent's"
    assert g6.read(b"data/secret") == b"s6"
    assert g5.read(b"name") == b"guest-5"
    assert outcome(lambda: g5.read(b"/local/domain/6/data/secret")) == "EACCES"
    assert outcome(lambda: g5.write(b"/local/domain/6/data/x", b"1")) == "EACCES"
    assert outcome(lambda: g5.list(b"/local/domain/6")) == "EACCES"
    assert outcome(lambda: g5.get_perms(b"/local/domain/6/data")) == "EACCES"
    assert outcome(lambda: g5.delete(b"/local/domain/6/data")) == "EACCES"
    assert outcome(lambda: g5.read(b"/local/domain/6/data/missing")) == by_flavour(
        host, c="EACCES", ox="ENOENT"
    ), "C hides whether a node exists from those who cannot read its parent"
    assert outcome(lambda: g5.list(b"/")) == "EACCES"
    g5.write(b"data/mine", b"5")
    assert g5.get_perms(b"data/mine") == [b"n5"], "the creator owns what it creates"
    assert outcome(lambda: g6.read(b"/local/domain/5/data/mine")) == "EACCES"
    assert d.read(b"/local/domain/5/data/mine") == b"5"


def test_guest_writes_data_not_device_until_it_owns_the_frontend(
    xenstore_host: XenstoreHost,
) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g5 = host.client(host.introduce(5))
    assert outcome(lambda: g5.write(b"data/tmem", b"1")) == "OK"
    assert outcome(lambda: g5.mkdir(b"device/tmem")) == "EACCES"
    assert outcome(lambda: g5.write(b"device/tmem/0/state", b"1")) == "EACCES"
    assert outcome(lambda: g5.write(b"memory/target", b"1")) == "EACCES"
    assert outcome(lambda: g5.read(b"device/tmem")) == "ENOENT", "device/ itself is readable"
    # What a toolstack does to attach a device: the frontend is the guest's, the backend
    # dom0's and readable by the guest.
    d.mkdir(b"/local/domain/5/device/tmem/0")
    d.set_perms(b"/local/domain/5/device/tmem/0", [b"n5", b"r0"])
    d.write(b"/local/domain/0/backend/tmem/5/0/state", b"1")
    d.set_perms(b"/local/domain/0/backend/tmem/5/0", [b"n0", b"r5"])
    d.set_perms(b"/local/domain/0/backend/tmem/5/0/state", [b"n0", b"r5"])
    try:
        assert outcome(lambda: g5.write(b"device/tmem/0/state", b"1")) == "OK"
        assert g5.get_perms(b"device/tmem/0/state") == [b"n5", b"r0"]
        assert outcome(lambda: g5.write(b"device/other", b"1")) == "EACCES"
        assert g5.read(b"/local/domain/0/backend/tmem/5/0/state") == b"1"
        assert outcome(lambda: g5.write(b"/local/domain/0/backend/tmem/5/0/state", b"4")) == (
            "EACCES"
        )
    finally:
        d.delete(b"/local/domain/0/backend/tmem/5")


def test_permission_changes(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g5 = host.client(host.introduce(5))
    g6 = host.client(host.introduce(6))
    g5.write(b"data/shared", b"v")
    g5.set_perms(b"data/shared", [b"n5", b"r6"])
    assert g6.read(b"/local/domain/5/data/shared") == b"v"
    assert outcome(lambda: g6.write(b"/local/domain/5/data/shared", b"w")) == "EACCES"
    assert outcome(lambda: g6.set_perms(b"/local/domain/5/data/shared", [b"b6"])) == "EACCES"
    assert outcome(lambda: g5.set_perms(b"data/shared", [b"n6"])) == by_flavour(
        host, c="EPERM", ox="EACCES"
    ), "only dom0 may give a node away"
    assert outcome(lambda: g5.set_perms(b"device", [b"n0", b"b5"])) == "EACCES"
    d.set_perms(b"/local/domain/5/data/shared", [b"n6"])
    assert g6.read(b"/local/domain/5/data/shared") == b"v"
    assert outcome(lambda: g5.read(b"data/shared")) == "EACCES", "no longer the owner"


def test_first_entry_is_the_default_for_everybody_else(xenstore_host: XenstoreHost) -> None:
    host, d, s = xenstore_host, xenstore_host.dom0, xenstore_host.scratch.encode()
    g5 = host.client(host.introduce(5))
    d.write(s + b"/public", b"p")
    d.set_perms(s, [b"r0"])
    d.set_perms(s + b"/public", [b"r0"])
    d.write(s + b"/listed", b"l")
    d.set_perms(s + b"/listed", [b"b0", b"n5"])
    assert g5.read(s + b"/public") == b"p"
    assert outcome(lambda: g5.write(s + b"/public", b"x")) == "EACCES"
    assert outcome(lambda: g5.read(s + b"/listed")) == "EACCES", "an entry for 5 beats the default"


def test_new_nodes_inherit_the_parents_permissions(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g5 = host.client(host.introduce(5))
    d.mkdir(b"/local/domain/5/data/drop")
    d.set_perms(b"/local/domain/5/data/drop", [b"n0", b"w5"])
    assert outcome(lambda: g5.read(b"data/drop")) == "EACCES"
    g5.write(b"data/drop/letter", b"x")
    assert d.get_perms(b"/local/domain/5/data/drop/letter") == by_flavour(
        host, c=[b"n5", b"w5"], ox=[b"n0", b"w5"]
    ), "C makes the creating guest the owner; oxenstored keeps the parent's owner"


def test_privileged_requests_are_refused_to_guests(
    xenstore_host: XenstoreHost, pyxs_su: None
) -> None:
    g5 = xenstore_host.client(xenstore_host.introduce(5))
    assert outcome(lambda: g5.introduce_domain(9, 0, 1)) == "EACCES"
    assert outcome(lambda: g5.is_domain_introduced(5)) == "EACCES"
    assert outcome(lambda: g5.release_domain(5)) == "EACCES"
    assert outcome(lambda: g5.set_target(5, 6)) == "EACCES"
    assert g5.get_domain_path(5) == b"/local/domain/5"


def test_set_target_lets_a_domain_act_as_its_target(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g7 = host.client(host.introduce(7))
    host.introduce(8)
    d.write(b"/local/domain/8/data/secret", b"s8")
    assert outcome(lambda: g7.read(b"/local/domain/8/data/secret")) == "EACCES"
    host.set_target(7, 8)
    assert g7.read(b"/local/domain/8/data/secret") == b"s8"
    assert outcome(lambda: g7.write(b"/local/domain/8/data/by7", b"x")) == "OK"


# -- transactions ----------------------------------------------------------------------


def test_transaction_commit_and_rollback(xenstore_host: XenstoreHost) -> None:
    d, s = xenstore_host.dom0, xenstore_host.scratch.encode()
    other = xenstore_host.client()
    d.write(s + b"/a", b"0")
    d.transaction()
    d.write(s + b"/a", b"1")
    d.write(s + b"/b", b"1")
    assert d.read(s + b"/a") == b"1", "a transaction sees its own writes"
    assert other.read(s + b"/a") == b"0", "nobody else does before the commit"
    assert d.commit() is True
    assert other.read(s + b"/b") == b"1"
    d.transaction()
    d.write(s + b"/c", b"1")
    d.rollback()
    assert outcome(lambda: other.read(s + b"/c")) == "ENOENT"


def test_conflicting_transaction_fails_with_eagain(xenstore_host: XenstoreHost) -> None:
    d, s = xenstore_host.dom0, xenstore_host.scratch.encode()
    other = xenstore_host.client()
    d.write(s + b"/counter", b"1")
    d.write(s + b"/copy", b"0")
    d.transaction()
    seen = d.read(s + b"/counter")
    other.write(s + b"/counter", b"2")
    d.write(s + b"/copy", seen)
    assert d.commit() is False
    assert d.read(s + b"/copy") == b"0", "nothing of a failed transaction is applied"
    # Two transactions on one connection (pyxs: copies of a client share its router).
    t1, t2 = copy.copy(d), copy.copy(d)
    t1.transaction()
    t2.transaction()
    t1.write(s + b"/counter", t1.read(s + b"/counter") + b"a")
    t2.write(s + b"/counter", t2.read(s + b"/counter") + b"b")
    assert t1.commit() is True
    assert t2.commit() is False
    assert d.read(s + b"/counter") == b"2a"


def test_guest_transaction(xenstore_host: XenstoreHost) -> None:
    g5 = xenstore_host.client(xenstore_host.introduce(5))
    g5.transaction()
    g5.write(b"data/tx/a", b"1")
    assert outcome(lambda: g5.write(b"device/tx", b"1")) == "EACCES"
    assert g5.commit() is True
    assert xenstore_host.dom0.read(b"/local/domain/5/data/tx/a") == b"1"


# -- watches ---------------------------------------------------------------------------


def test_watch_fires_on_registration_and_on_changes(xenstore_host: XenstoreHost) -> None:
    d, s = xenstore_host.dom0, xenstore_host.scratch
    w = dom0_watcher(xenstore_host.client(), s)  # its own connection: d opens a transaction
    assert w.watch(f"{s}/w".encode(), b"t") == (f"{s}/w".encode(), b"t")
    d.write(f"{s}/w/x/y".encode(), b"1")
    d.write(f"{s}/other".encode(), b"1")
    assert w.events() == [(f"{s}/w/x/y".encode(), b"t")]
    d.mkdir(f"{s}/w/x".encode())
    assert w.events() == [], "mkdir of an existing node changes nothing"
    d.set_perms(f"{s}/w".encode(), [b"n0", b"r5"])
    assert w.events() == [(f"{s}/w".encode(), b"t")]
    d.transaction()
    d.write(f"{s}/w/x".encode(), b"2")
    d.write(f"{s}/w/x".encode(), b"3")
    assert w.events() == [], "nothing before the commit"
    assert d.commit() is True
    writes_seen = 1 if xenstore_host.flavour == C else 2  # C: one event per path
    assert w.events() == [(f"{s}/w/x".encode(), b"t")] * writes_seen
    w.watch(f"{s}/w/x/y".encode(), b"deep")
    d.delete(f"{s}/w".encode())
    assert sorted(w.events()) == [(f"{s}/w".encode(), b"t"), (f"{s}/w/x/y".encode(), b"deep")]


def test_watch_events_are_filtered_by_read_permission(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g5 = host.client(host.introduce(5))
    host.introduce(6)
    w = guest_watcher(g5, d, 5)
    assert w.watch(b"/local/domain/6/data", b"spy") == (b"/local/domain/6/data", b"spy"), (
        "the registration event comes whatever the permissions"
    )
    assert w.watch(b"data", b"mine") == (b"data", b"mine"), "relative watch, relative event"
    d.write(b"/local/domain/6/data/z", b"1")
    d.write(b"/local/domain/5/data/z", b"1")
    assert w.events() == [(b"data/z", b"mine")]


def test_release_domain_cleans_up_and_fires_release_domain(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    w = dom0_watcher(d, host.scratch)
    w.watch(b"@releaseDomain", b"rel")
    w.watch(b"@introduceDomain", b"intro")
    g5 = host.client(host.introduce(5))
    assert w.events() == [(b"@introduceDomain", b"intro")]
    g5.write(b"data/x", b"1")
    assert d.is_domain_introduced(5) is True
    host.release(5)
    assert w.events() == [(b"@releaseDomain", b"rel")]
    assert d.is_domain_introduced(5) is False
    assert not d.exists(b"/local/domain/5/data"), "the nodes the domain owned are gone"
    assert d.read(b"/local/domain/5/name") == b"guest-5", "dom0's nodes stay"


def test_domain_death_is_noticed(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g6 = host.client(host.introduce(6))
    g6.write(b"data/x", b"1")
    host.kill(6)
    assert d.is_domain_introduced(6) is False
    assert not d.exists(b"/local/domain/6/data")


def test_guests_do_not_see_other_domains_come_and_go(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g5 = host.client(host.introduce(5))
    w = guest_watcher(g5, d, 5)
    w.watch(b"@introduceDomain", b"intro")
    w.watch(b"@releaseDomain", b"rel")
    host.introduce(6)
    host.release(6)
    assert w.events() == []


# -- limits ----------------------------------------------------------------------------


def test_value_size_limits(xenstore_host: XenstoreHost) -> None:
    host, d, s = xenstore_host, xenstore_host.dom0, xenstore_host.scratch.encode()
    path = s + b"/v"
    assert outcome(lambda: d.write(path, b"x" * 2048)) == "OK"
    if host.max_value_bytes is not None:
        assert outcome(lambda: d.write(path, b"x" * (host.max_value_bytes + 1))) == "E2BIG"
    else:
        fills_packet = 4096 - len(path) - 1
        assert outcome(lambda: d.write(path, b"x" * fills_packet)) == "OK"
        assert len(d.read(path)) == fills_packet
    with pytest.raises(pyxs.InvalidPayload):  # pyxs refuses it before sending
        d.write(path, b"x" * 4096)
    g5 = host.client(host.introduce(5))
    assert outcome(lambda: g5.write(b"data/v", b"x" * 2000)) == "OK"
    assert outcome(lambda: g5.write(b"data/v", b"x" * 2100)) == by_flavour(
        host, c="ENOSPC", ox="E2BIG"
    ), "C limits a guest's whole node record to 2048 bytes; oxenstored any value"


def test_oversized_request(xenstore_host: XenstoreHost) -> None:
    oversized = Packet(int(XsOp.WRITE), 1, 0, b"/x\0" + b"y" * 4094)
    replies = raw_exchange(xenstore_host.dom0_socket, [oversized])
    if xenstore_host.flavour == C:
        assert replies is None, "C xenstored drops a client that announces > 4096 bytes"
    else:  # (and then reads on from byte 4096 of the payload: the connection is garbage)
        assert replies is not None
        assert [(p.op, p.req_id, p.payload) for p in replies] == [(XsOp.ERROR, 1, b"E2BIG\0")]


@pytest.mark.parametrize("bad", [b"x\n", b"x y", b"x.y", b"x//y", b"x/"])
def test_paths_with_what_xenstore_refuses_are_einval(xenstore_host: XenstoreHost,
                                                     bad: bytes) -> None:
    path = f"{xenstore_host.scratch}/".encode() + bad
    reply = raw_request(xenstore_host.dom0_socket, XsOp.WRITE, path + b"\0v")
    assert reply is not None and (reply.op, reply.payload) == (XsOp.ERROR, b"EINVAL\0")
    if bad in (b"x\n", b"x/"):  # and the node without the bad character was not made
        assert not xenstore_host.dom0.exists(path[:-1])


# On oxenstored the watcher's pyxs router thread dies (expected, see the test).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_event_too_long_to_send_is_dropped(xenstore_host: XenstoreHost) -> None:
    """Path plus token may exceed one message: C xenstored drops that event, and only it
    (``add_event``: "Don't try to send over-long events"); so does our server."""
    s = xenstore_host.scratch
    w = dom0_watcher(xenstore_host.client(), s)
    token = b"t" * 3300
    assert w.watch(f"{s}/long".encode(), token) == (f"{s}/long".encode(), token)
    deep = f"{s}/long/{'d' * 900}".encode()  # the event would be about 4250 bytes
    xenstore_host.dom0.write(deep, b"1")
    xenstore_host.dom0.write(f"{s}/long/short".encode(), b"1")
    if xenstore_host.flavour == OX:  # oxenstored sends it anyway; pyxs refuses a payload
        # over 4096 bytes (InvalidPayload) and its router thread dies with the connection
        with pytest.raises(pyxs.ConnectionError):
            w.events()
        return
    assert w.events() == [(f"{s}/long/short".encode(), token)]


def test_directory_reply_over_the_limit(xenstore_host: XenstoreHost) -> None:
    d, s = xenstore_host.dom0, xenstore_host.scratch
    for i in range(400):  # 400 names of 11 bytes with their NULs: 4400 bytes
        d.write(f"{s}/big/child{i:05d}".encode(), b"x")
    reply = raw_request(xenstore_host.dom0_socket, XsOp.DIRECTORY, f"{s}/big\0".encode())
    assert reply is not None
    if xenstore_host.flavour == C:
        assert (reply.op, reply.payload) == (XsOp.ERROR, b"E2BIG\0")
    else:  # oxenstored sends it anyway, which pyxs cannot read (its router would die)
        assert reply.op == XsOp.DIRECTORY and len(reply.payload) == 4400


def test_guest_node_quota(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g5 = host.client(host.introduce(5))
    created, error = 0, "OK"
    for i in range(1200):
        error = outcome(lambda i=i: g5.write(f"data/q/k{i}".encode(), b"x"))
        if error != "OK":
            break
        created += 1
    assert error == by_flavour(host, c="ENOSPC", ox="EQUOTA")
    assert 100 < created < 1000
    assert outcome(lambda: d.write(b"/local/domain/5/data/q/by-dom0", b"x")) == "OK"


def test_guest_relative_paths(xenstore_host: XenstoreHost) -> None:
    host, d = xenstore_host, xenstore_host.dom0
    g5 = host.client(host.introduce(5))
    g5.write(b"data/rel/a", b"1")
    assert d.read(b"/local/domain/5/data/rel/a") == b"1"
    assert g5.list(b"data/rel") == [b"a"]
    assert g5.read(b"domid") == b"5"


def test_request_ids_and_transaction_ids_are_echoed(xenstore_host: XenstoreHost) -> None:
    reply = raw_request(xenstore_host.dom0_socket, XsOp.READ, b"/nope\0", tx_id=999)
    assert reply is not None
    assert (reply.req_id, reply.tx_id, reply.op) == (7, 999, XsOp.ERROR)
    ok = raw_exchange(xenstore_host.dom0_socket, [request(XsOp.GET_DOMAIN_PATH, b"4", req_id=41)])
    assert ok is not None and (ok[0].req_id, ok[0].payload) == (41, b"/local/domain/4\0")
