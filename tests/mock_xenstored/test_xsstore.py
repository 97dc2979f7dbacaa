"""The store on its own: permission rules, quotas, transactions and the changes they fire.

The numbers (2015-byte values, 425 children, 129 watches...) are what Debian's C
xenstored 4.17 was measured to do; ``test_peers.py`` checks the same rules over sockets.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentmem.mock_xenstored.args import canonical_path, parse_domid, parse_perm, parse_perms
from xentmem.mock_xenstored.perms import Access, Caller, PermEntry, Perms, perm_for
from xentmem.mock_xenstored.store import Change, Limits, Store, StoreError

DOM0 = Caller.dom0()
G5, G6 = Caller(5), Caller(6)


def perms(*entries: str) -> Perms:
    return parse_perms([e.encode() for e in entries])


def error_of(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except StoreError as e:
        return e.name
    return "OK"


@pytest.fixture
def store() -> Store:
    """A store with guests 5 and 6 set up the way a toolstack would."""
    s = Store()
    for domid in (5, 6):
        home = f"/local/domain/{domid}"
        s.mkdir(DOM0, home)
        s.set_perms(DOM0, home, perms("n0", f"r{domid}"))
        s.mkdir(DOM0, f"{home}/data")
        s.set_perms(DOM0, f"{home}/data", perms(f"n{domid}"))
    s.take_changes()
    return s


# -- parsing ---------------------------------------------------------------------------


def test_perm_strings() -> None:
    assert parse_perm(b"b12") == PermEntry(12, Access.BOTH)
    assert perms("n0", "r5", "w6", "b7").encode() == [b"n0", b"r5", b"w6", b"b7"]
    for bad in (b"x5", b"r", b"r-1", b"r5a", b"R5", b"\xff5", b"r99999999999"):
        assert error_of(lambda bad=bad: parse_perm(bad)) == "EINVAL", bad
    assert error_of(lambda: parse_perms([])) == "EINVAL"


@given(st.binary(max_size=12))
def test_perm_parser_accepts_only_what_it_can_write_back(untrusted: bytes) -> None:
    try:
        entry = parse_perm(untrusted)
    except StoreError as e:
        assert e.name == "EINVAL"
    else:
        assert parse_perm(entry.encode()) == entry


def test_domids() -> None:
    assert parse_domid(b"5") == 5
    for bad in (b"", b"-1", b"abc", b"32752", b"5 "):
        assert error_of(lambda bad=bad: parse_domid(bad)) == "EINVAL"


def test_perm_for_follows_c_xenstored() -> None:
    p = perms("n6", "r5", "w7")
    assert perm_for(DOM0, p) == Access.BOTH | Access.OWNER
    assert perm_for(G6, p) == Access.BOTH | Access.OWNER, "the owner"
    assert perm_for(G5, p) == Access.READ
    assert perm_for(Caller(7), p) == Access.WRITE
    assert perm_for(Caller(8), p) == Access.NONE, "the owner's letter is the default"
    assert perm_for(Caller(8, target=6), p) == Access.BOTH | Access.OWNER, "acts as its target"
    assert perm_for(Caller(8, target=5), p) == Access.READ
    assert perm_for(Caller(8), perms("r6")) == Access.READ


def test_paths() -> None:
    limits = Limits()
    assert canonical_path(b"data/x", G5, limits) == "/local/domain/5/data/x"
    assert canonical_path(b"/abs", G5, limits) == "/abs"
    assert canonical_path(b"@releaseDomain", G5, limits) == "@releaseDomain"
    for bad in (b"/a/", b"/a//b", b"/a b", b"/a\n", b"/\xe9", b"", b"data/", b"/a.b"):
        assert error_of(lambda bad=bad: canonical_path(bad, G5, limits)) == "EINVAL", bad
    # The length limit counts what is below /local/domain/<id>/ (C: 2048, oxenstored: 1024).
    assert canonical_path(b"a" * 2048, G5, limits)
    assert error_of(lambda: canonical_path(b"a" * 2049, G5, limits)) == "EINVAL"
    assert canonical_path(b"/" + b"a" * 2047, G5, limits)
    assert error_of(lambda: canonical_path(b"/" + b"a" * 2048, G5, limits)) == "EINVAL"
    assert error_of(lambda: canonical_path(b"a" * 1025, G5, Limits.oxenstored())) == "EINVAL"


# -- permissions -----------------------------------------------------------------------


def test_errors_leak_nothing(store: Store) -> None:
    store.write(DOM0, "/local/domain/6/data/secret", b"s")
    assert error_of(lambda: store.read(G5, "/local/domain/6/data/secret")) == "EACCES"
    assert error_of(lambda: store.read(G5, "/local/domain/6/data/nope")) == "EACCES"
    assert error_of(lambda: store.read(G5, "/local/domain/5/nope")) == "ENOENT"
    assert error_of(lambda: store.rm(G5, "/local/domain/5/nope")) == "EACCES", (
        "removing needs write access on the nearest ancestor too"
    )
    assert error_of(lambda: store.rm(G5, "/local/domain/5/data/nope")) == "OK"
    assert error_of(lambda: store.rm(DOM0, "/no/such/parent")) == "ENOENT"
    assert error_of(lambda: store.rm(DOM0, "/")) == "EINVAL"


def test_creation_and_ownership(store: Store) -> None:
    store.write(G5, "/local/domain/5/data/a/b", b"1")
    assert store.get_perms(DOM0, "/local/domain/5/data/a") == perms("n5")
    store.mkdir(DOM0, "/local/domain/5/drop")
    store.set_perms(DOM0, "/local/domain/5/drop", perms("n0", "w5"))
    store.write(G5, "/local/domain/5/drop/x", b"1")
    assert store.get_perms(DOM0, "/local/domain/5/drop/x") == perms("n5", "w5")
    store.write(DOM0, "/local/domain/5/drop/y", b"1")
    assert store.get_perms(DOM0, "/local/domain/5/drop/y") == perms("n0", "w5")
    assert error_of(lambda: store.write(G5, "/local/domain/5/top", b"1")) == "EACCES"
    assert error_of(lambda: store.set_perms(G5, "/local/domain/5/data/a", perms("n6"))) == ("EPERM")
    assert error_of(lambda: store.set_perms(G6, "/local/domain/5/drop", perms("n0"))) == "EACCES"


def test_value_and_record_limits() -> None:
    c, ox = Store(Limits.c_xenstored()), Store(Limits.oxenstored())
    for s in (c, ox):
        s.mkdir(DOM0, "/d")
        s.set_perms(DOM0, "/d", perms("n5"))
    assert error_of(lambda: c.write(G5, "/d/v", b"x" * 2015)) == "OK"
    assert error_of(lambda: c.write(G5, "/d/v", b"x" * 2016)) == "ENOSPC"
    assert error_of(lambda: c.write(DOM0, "/d/v", b"x" * 4000)) == "OK", "dom0 is exempt"
    assert error_of(lambda: ox.write(G5, "/d/v", b"x" * 2048)) == "OK"
    assert error_of(lambda: ox.write(DOM0, "/d/v", b"x" * 2049)) == "E2BIG", "even for dom0"


def test_child_list_counts_towards_the_record(store: Store) -> None:
    created = 0
    while error_of(lambda n=created: store.write(G5, f"/local/domain/5/data/q/k{n}", b"x")) == "OK":
        created += 1
    assert created == 425, "the number C xenstored 4.17 was measured to allow"


def test_node_quota() -> None:
    s = Store(Limits(max_nodes_per_domain=4))
    s.mkdir(DOM0, "/d")
    s.set_perms(DOM0, "/d", perms("n5"))  # owned by 5: counts
    assert error_of(lambda: s.write(G5, "/d/a/b/c", b"1")) == "OK"
    assert error_of(lambda: s.write(G5, "/d/z", b"1")) == "ENOSPC"
    assert s.get("/d/z") is None, "a refused write changes nothing"
    s.rm(G5, "/d/a/b")
    assert error_of(lambda: s.write(G5, "/d/z/y", b"1")) == "OK"
    assert error_of(lambda: s.write(DOM0, "/d/q", b"1")) == "OK", "dom0 is exempt"
    assert s.owned_count(5) == 5
    ox = Store(Limits.oxenstored())
    assert ox.limits.quota_error == "EQUOTA"


def test_perms_per_node_quota(store: Store) -> None:
    store.write(G5, "/local/domain/5/data/p", b"1")
    many = perms("n5", "r1", "r2", "r3", "r4", "r6")
    assert error_of(lambda: store.set_perms(G5, "/local/domain/5/data/p", many)) == "ENOSPC"
    assert error_of(lambda: store.set_perms(DOM0, "/local/domain/5/data/p", many)) == "OK"


# -- changes ---------------------------------------------------------------------------


def test_changes_say_who_may_see_them(store: Store) -> None:
    store.write(DOM0, "/local/domain/6/data/z", b"1")
    (change,) = store.take_changes()
    assert change.path == "/local/domain/6/data/z" and not change.exact
    assert change.visible_to(G6) and not change.visible_to(G5) and change.visible_to(DOM0)
    assert change.fires("/local/domain/6") and change.fires("/")
    assert not change.fires("/local/domain/6/data/z/deeper")
    store.write(DOM0, "/local/domain/5/data/pc", b"1")
    store.set_perms(DOM0, "/local/domain/5/data/pc", perms("n0"))
    store.take_changes()
    store.write(DOM0, "/local/domain/5/data/pc", b"2")
    assert store.take_changes()[0].visible_to(G5), "the parent is readable: still seen"


def test_removal_fires_for_the_subtree(store: Store) -> None:
    store.write(DOM0, "/w/x/y", b"1")
    store.take_changes()
    store.rm(DOM0, "/w")
    changes = store.take_changes()
    assert [(c.path, c.exact) for c in changes] == [
        ("/w/x/y", True),
        ("/w/x", True),
        ("/w", False),
    ]
    assert changes[0].fires("/w/x/y") and not changes[0].fires("/w")


def test_special_changes() -> None:
    s = Store()
    change = s.special_change("@releaseDomain")
    assert change.fires("@releaseDomain") and not change.fires("/")
    assert change.visible_to(DOM0) and not change.visible_to(G5)
    s.set_special_perms(DOM0, "@releaseDomain", perms("n0", "r5"))
    assert s.special_change("@releaseDomain").visible_to(G5)
    assert error_of(lambda: s.set_special_perms(G5, "@releaseDomain", perms("n5"))) == "EACCES"
    assert error_of(lambda: s.set_special_perms(DOM0, "@other", perms("n0"))) == "EINVAL"
    assert Change("/a").fires("/a") and not Change("/a").fires("@introduceDomain")


_names = st.sampled_from(["a", "b", "ab", "@a", "a-b"])
_paths = st.one_of(st.just("/"), st.lists(_names, min_size=1, max_size=4).map(
    lambda names: "/" + "/".join(names)))


@given(_paths, st.one_of(_paths, st.sampled_from(["@introduceDomain", "@a"])), st.booleans())
def test_a_change_fires_a_watch_at_or_above_it(path: str, watch: str, exact: bool) -> None:
    """What every daemon does (xenstored's ``is_child``), said the plain way."""
    above = watch == path or (not watch.startswith("@")
                              and (watch == "/" or path.startswith(watch + "/")))
    assert Change(path, exact=exact).fires(watch) == (watch == path if exact else above)


def test_remove_domain_nodes(store: Store) -> None:
    store.write(G5, "/local/domain/5/data/a", b"1")
    store.write(DOM0, "/local/domain/5/name", b"guest")
    store.mkdir(DOM0, "/elsewhere/by5")
    store.set_perms(DOM0, "/elsewhere/by5", perms("n5"))
    store.remove_domain_nodes(5)
    assert store.get("/local/domain/5/data") is None
    assert store.get("/elsewhere/by5") is None
    assert store.read(DOM0, "/local/domain/5/name") == b"guest"
    assert store.owned_count(5) == 0
    assert "/local/domain/6/data" in store.paths()


# -- transactions ----------------------------------------------------------------------


def commit_outcome(tx: object) -> str:
    return error_of(tx.commit)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("in_tx", "meanwhile", "expected"),
    [
        # what C xenstored 4.17 answered in the same situations
        (lambda s, t: t.write(DOM0, "/t/a", b"m"), lambda s: None, "OK"),
        (lambda s, t: t.read(DOM0, "/t/a"), lambda s: s.write(DOM0, "/t/a", b"o"), "EAGAIN"),
        (lambda s, t: t.write(DOM0, "/t/a", b"m"), lambda s: s.write(DOM0, "/t/a", b"o"), "EAGAIN"),
        (lambda s, t: t.read(DOM0, "/t/a"), lambda s: s.write(DOM0, "/t/b", b"o"), "OK"),
        (lambda s, t: t.write(DOM0, "/t/c", b"1"), lambda s: s.write(DOM0, "/t/d", b"o"), "EAGAIN"),
        (lambda s, t: t.directory(DOM0, "/t"), lambda s: s.write(DOM0, "/t/e", b"o"), "EAGAIN"),
        (lambda s, t: t.read(DOM0, "/t/a"), lambda s: s.read(DOM0, "/t/a"), "OK"),
        (lambda s, t: t.read(DOM0, "/t/a"), lambda s: s.write(DOM0, "/t/a/k", b"1"), "EAGAIN"),
        (
            lambda s, t: t.read(DOM0, "/t/a"),
            lambda s: s.set_perms(DOM0, "/t/a", perms("n0", "r3")),
            "EAGAIN",
        ),
        (lambda s, t: t.read(DOM0, "/t/a"), lambda s: s.rm(DOM0, "/t/a"), "EAGAIN"),
        (
            lambda s, t: error_of(lambda: t.read(DOM0, "/t/new")),
            lambda s: s.write(DOM0, "/t/new", b"1"),
            "EAGAIN",
        ),
    ],
)
def test_transaction_conflicts(in_tx: object, meanwhile: object, expected: str) -> None:
    s = Store()
    s.write(DOM0, "/t/a", b"0")
    s.write(DOM0, "/t/b", b"0")
    tx = s.begin()
    in_tx(s, tx)  # type: ignore[operator]
    meanwhile(s)  # type: ignore[operator]
    assert commit_outcome(tx) == expected


def test_blind_write_after_another_write_commits(store: Store) -> None:
    """C xenstored records a node's generation when the transaction first touches it."""
    store.write(DOM0, "/t/a", b"0")
    tx = store.begin()
    store.write(DOM0, "/t/a", b"other")
    tx.write(DOM0, "/t/a", b"mine")
    tx.commit()
    assert store.read(DOM0, "/t/a") == b"mine"


def test_transaction_is_private_until_commit_and_fires_once_per_path(store: Store) -> None:
    tx = store.begin()
    tx.write(G5, "/local/domain/5/data/x", b"1")
    tx.write(G5, "/local/domain/5/data/x", b"2")
    tx.write(G5, "/local/domain/5/data/y/z", b"1")
    assert store.get("/local/domain/5/data/x") is None
    assert tx.read(G5, "/local/domain/5/data/x") == b"2"
    assert store.take_changes() == []
    tx.commit()
    assert [c.path for c in store.take_changes()] == [
        "/local/domain/5/data/x",
        "/local/domain/5/data/y/z",
    ]
    assert store.read(DOM0, "/local/domain/5/data/x") == b"2"
    assert store.owned_count(5) == 4  # data, x, y, y/z


def test_transaction_quota_counts_its_own_nodes() -> None:
    s = Store(Limits(max_nodes_per_domain=3))
    s.mkdir(DOM0, "/d")
    s.set_perms(DOM0, "/d", perms("n0", "w5"))
    tx = s.begin()
    tx.write(G5, "/d/a", b"1")
    tx.write(G5, "/d/b", b"1")
    tx.write(G5, "/d/c", b"1")
    assert error_of(lambda: tx.write(G5, "/d/e", b"1")) == "ENOSPC"


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "mkdir", "rm", "set_perms"]),
        st.sampled_from(["/a", "/a/b", "/a/b/c", "/a/d", "/e"]),
        st.sampled_from([b"", b"1", b"22"]),
    ),
    max_size=12,
)


def apply(view: object, op: str, path: str, value: bytes) -> None:
    try:
        if op == "write":
            view.write(DOM0, path, value)  # type: ignore[attr-defined]
        elif op == "mkdir":
            view.mkdir(DOM0, path)  # type: ignore[attr-defined]
        elif op == "rm":
            view.rm(DOM0, path)  # type: ignore[attr-defined]
        else:
            view.set_perms(DOM0, path, perms("n0", f"r{len(value)}"))  # type: ignore[attr-defined]
    except StoreError:
        pass


def state(s: Store) -> dict[str, tuple[bytes, str, frozenset[str]]]:
    out = {}
    for path in s.paths():
        node = s.get(path)
        assert node is not None
        out[path] = (node.value, str(node.perms), frozenset(node.children))
    return out


@settings(max_examples=200)
@given(ops)
def test_an_undisturbed_transaction_does_what_direct_requests_do(
    sequence: list[tuple[str, str, bytes]],
) -> None:
    direct, via_tx = Store(), Store()
    tx = via_tx.begin()
    for op, path, value in sequence:
        apply(direct, op, path, value)
        apply(tx, op, path, value)
    tx.commit()
    assert state(via_tx) == state(direct)
    assert via_tx.owned_count(0) == direct.owned_count(0) == len(direct)
