"""RAMster's remote tier against a real Redis Cluster (3 masters + 3 replicas on loopback).

Each node has its own ACL user limited to its own key prefix; a shared pool's namespace is
granted by pattern.  Fault tests get a cluster of their own, since they kill nodes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fakes import redis_cluster

from xentmem.errors import BackendError
from xentmem.guest.backends.ramster import record
from xentmem.guest.backends.ramster.record import RecordError, RemoteKey
from xentmem.guest.backends.ramster.tier import (
    RamsterRefused,
    RamsterUnavailable,
    RemoteTier,
    TierConfig,
)
from xentmem.guest.backends.zcache import ZcacheBackend
from xentmem.roots import Roots
from xentmem.tmem.abi import Oid

SHARED_UUID = "0123456789abcdef0123456789abcdef"
OTHER_UUID = "fedcba9876543210fedcba9876543210"
#: Each node's user: its own prefix and the shared pools granted to it.
acl = redis_cluster.node_acl


USERS = {
    "node-a": acl([record.key_pattern("node-a"),
                   record.key_pattern(record.owner_of_shared(SHARED_UUID))], "pw-a"),
    "node-b": acl([record.key_pattern("node-b"),
                   record.key_pattern(record.owner_of_shared(SHARED_UUID))], "pw-b"),
    "node-c": acl([record.key_pattern("node-c")], "pw-c"),
    # an operator's slip: everything but WAIT
    "node-w": acl([record.key_pattern("node-w")], "pw-w").replace(" +wait ", " "),
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[redis_cluster.RedisClusterFixture]:
    with redis_cluster.running(USERS) as made:
        yield made


@pytest.fixture
def own_cluster() -> Iterator[redis_cluster.RedisClusterFixture]:
    """A cluster of this test's own: it kills nodes."""
    with redis_cluster.running(USERS) as made:
        yield made


def tier_for(cluster: redis_cluster.RedisClusterFixture, node_id: str, tmp_path: Path,
             **overrides: object) -> RemoteTier:
    password = tmp_path / f"{node_id}.password"
    password.write_text(f"pw-{node_id[-1]}\n")
    # A replica on a busy machine may take a while to acknowledge; a put it does not
    # acknowledge in time is refused (correctly), which these tests do not mean to check.
    overrides.setdefault("timeout_ms", 15_000)
    config = TierConfig(
        nodes=tuple(("127.0.0.1", n.port) for n in cluster.nodes[:2]),
        node_id=node_id, user=node_id, password_file=str(password), **overrides)  # type: ignore[arg-type]
    tier = RemoteTier(config)
    tier.connect()
    return tier


DEFAULT_OID = Oid(7, 0, 0)


def key(owner: str, index: int, pool: int = 1, oid: Oid = DEFAULT_OID) -> RemoteKey:
    return RemoteKey(owner, pool, oid, index)


def page(n: int) -> bytes:
    return (n.to_bytes(4, "little") * 200)[:700]


@pytest.fixture
def admin(cluster: redis_cluster.RedisClusterFixture) -> Iterator[redis.cluster.RedisCluster]:
    """The harness's own user, to look at and damage values (closed afterwards)."""
    client = cluster.admin_cluster()
    try:
        yield client
    finally:
        client.close()


def test_persistent_and_ephemeral_pages_go_and_come_back(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    tier = tier_for(cluster, "node-a", tmp_path)
    try:
        tier.put(key("node-a", 1), page(1), persistent=True)
        tier.put(key("node-a", 2), page(2), persistent=False)
        assert admin.ttl(key("node-a", 1).name()) == -1  # never evictable under volatile-lru
        assert 0 < admin.ttl(key("node-a", 2).name()) <= tier.config.ephemeral_ttl_s
        assert tier.get(key("node-a", 1), exclusive=False) == page(1)
        assert tier.get(key("node-a", 2), exclusive=False) == page(2)
        assert tier.stats()["remote_pages"] == 2
        assert tier.get(key("node-a", 1), exclusive=True) == page(1)
        assert admin.exists(key("node-a", 1).name()) == 0  # an exclusive get took it
        assert tier.get(key("node-a", 1), exclusive=False) is None
        assert tier.stats()["remote_pages"] == 1
    finally:
        tier.close()


def test_an_objects_pages_share_a_slot_and_flush_together(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    tier = tier_for(cluster, "node-a", tmp_path)
    try:
        keys = [key("node-a", i, pool=3, oid=Oid(99, 1, 2)) for i in range(20)]
        assert len({admin.keyslot(k.name()) for k in keys}) == 1
        for k in keys:
            tier.put(k, page(k.index), persistent=True)
        other = key("node-a", 0, pool=3, oid=Oid(100, 1, 2))
        tier.put(other, page(5), persistent=True)
        assert tier.flush(keys) == 20
        assert all(admin.exists(k.name()) == 0 for k in keys)
        assert tier.get(other, exclusive=False) == page(5)
    finally:
        tier.close()


def test_a_batch_of_many_objects_goes_by_mset_and_comes_back_each_get_as_asked(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    """put_many writes one MSET per object; get_each answers each get as asked (GETDEL for an
    exclusive one) and a get the ACL refuses only for itself."""
    tier = tier_for(cluster, "node-a", tmp_path)
    try:
        keys = [key("node-a", i, pool=4, oid=Oid(i % 5, 2, 3)) for i in range(40)]
        done = tier.put_many([(k, page(k.index)) for k in keys], persistent=True)
        assert set(done.acknowledged) == set(keys) and not done.errors
        assert all(admin.ttl(k.name()) == -1 for k in keys)
        foreign = key("node-c", 1)
        found = tier.get_each([(k, k.index % 2 == 0) for k in keys] + [(foreign, False)])
        assert found.pages == {k: page(k.index) for k in keys}
        assert list(found.denied) == [foreign] and not found.refused and not found.missing
        assert sorted(k.index for k in keys if admin.exists(k.name())) == \
            list(range(1, 40, 2))  # the exclusive gets took theirs
    finally:
        tier.close()


def test_a_get_on_a_connection_the_server_closed_tries_once_more_on_a_new_one(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    """The tier holds one connection per master for lone gets; a connection closed while
    idle (a server's ``timeout``, a proxy) costs a second try, not an -EIO and a new client."""
    tier = tier_for(cluster, "node-a", tmp_path)
    try:
        tier.put(key("node-a", 1), page(1), persistent=True)
        tier.put(key("node-a", 2), page(2), persistent=True)
        assert tier.get(key("node-a", 1), exclusive=False) == page(1)
        master = cluster.master_of(key("node-a", 1).name())
        with cluster.admin_node(master) as direct:
            assert direct.client_kill_filter(_type="normal", skipme=True) >= 1
        assert tier.get(key("node-a", 1), exclusive=False) == page(1)
        with cluster.admin_node(master) as direct:
            assert direct.client_kill_filter(_type="normal", skipme=True) >= 1
        found = tier.get_many([key("node-a", 1), key("node-a", 2)], exclusive=False)
        assert found.pages == {key("node-a", 1): page(1), key("node-a", 2): page(2)}
        stats = tier.stats()
        assert stats["cluster_errors"] == 0 and stats["reconnects"] == 0
    finally:
        tier.close()


@pytest.mark.parametrize("damage", ["flip", "other-key", "truncate", "foreign"])
def test_a_damaged_or_misplaced_value_is_never_returned(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster, damage: str) -> None:
    tier = tier_for(cluster, "node-a", tmp_path)
    try:
        k = key("node-a", 40, oid=Oid(3, 3, 3))
        tier.put(k, page(40), persistent=True)
        value = bytearray(admin.get(k.name()))
        if damage == "flip":
            value[-1] ^= 1
        elif damage == "other-key":  # a genuine record, but of another page
            value = bytearray(record.encode(key("node-a", 41, oid=Oid(3, 3, 3)), page(41),
                                            persistent=True))
        elif damage == "truncate":
            value = value[:-10]
        else:
            value = bytearray(b"not ours at all")
        admin.set(k.name(), bytes(value))
        with pytest.raises(RecordError):
            tier.get(k, exclusive=False)
        assert tier.stats()["refused_records"] == 1
    finally:
        tier.close()


def test_one_node_cannot_read_overwrite_or_flush_anothers_pages(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    a = tier_for(cluster, "node-a", tmp_path)
    b = tier_for(cluster, "node-b", tmp_path)
    try:
        victim = key("node-a", 50)
        a.put(victim, page(50), persistent=True)
        with pytest.raises(RamsterRefused, match="no permissions"):
            b.get(victim, exclusive=False)
        with pytest.raises(RamsterRefused, match="no permissions"):
            b.put(victim, page(666), persistent=True)
        with pytest.raises(RamsterRefused, match="no permissions"):
            b.flush([victim])
        assert a.get(victim, exclusive=False) == page(50)
    finally:
        a.close()
        b.close()


def test_a_node_cannot_flush_list_or_script_the_whole_cluster(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    """Fails before: the node users had +@read +@write +@keyspace, whose commands without
    keys no ~pattern restricts: node B's FLUSHALL on a master deleted node A's pages, KEYS
    and RANDOMKEY showed every key, FUNCTION FLUSH/LOAD changed the server's functions."""
    a = tier_for(cluster, "node-a", tmp_path)
    victim = key("node-a", 60, oid=Oid(60, 0, 0))
    a.put(victim, page(60), persistent=True)
    master = cluster.master_of(victim.name())
    b = redis.Redis(host="127.0.0.1", port=master.port, username="node-b", password="pw-b")
    try:
        for command in (("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("RANDOMKEY",),
                        ("FUNCTION", "FLUSH"), ("FUNCTION", "DELETE", "lib"),
                        ("FUNCTION", "LOAD", "#!lua name=lib\nreturn 1"),
                        ("INFO", "keyspace"), ("DBSIZE",), ("CONFIG", "GET", "*"),
                        ("EVAL", "return 1", "0"), ("OBJECT", "ENCODING", victim.name())):
            with pytest.raises(redis.exceptions.NoPermissionError):
                b.execute_command(*command)
        assert a.get(victim, exclusive=False) == page(60)  # node A's page survived
        # What docs/ramster.md says SCAN still shows another node: its keys' names (SCAN
        # has no key for the ACL to check), never a value.
        assert victim.name().encode() in b.scan(0, match="xentmem:{node-a:*", count=10_000)[1]
    finally:
        b.close()
        a.flush([victim])
        a.close()


def test_a_client_without_a_user_gets_nothing(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    """Fails before: the ACL file left ``user default on nopass ~* &* +@all`` (what Redis
    makes of a file without a default line too), so a client that did not authenticate
    read, and could flush, every node's pages.  The clusters now have ``user default off``
    as docs/ramster.md asks; the harness has a user of its own."""
    a = tier_for(cluster, "node-a", tmp_path)
    victim = key("node-a", 61, oid=Oid(61, 0, 0))
    a.put(victim, page(61), persistent=True)
    anyone = redis.Redis(host="127.0.0.1", port=cluster.master_of(victim.name()).port)
    try:
        for command in (("GET", victim.name()), ("FLUSHALL",), ("PING",)):
            with pytest.raises(redis.exceptions.AuthenticationError):
                anyone.execute_command(*command)
        assert a.get(victim, exclusive=False) == page(61)
    finally:
        anyone.close()
        a.flush([victim])
        a.close()


def test_the_documented_acl_line_grants_what_the_test_clusters_grant() -> None:
    """docs/ramster.md's ACL SETUSER line and the fixture's users grant the same commands."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ramster.md").read_text()
    lines = [line for line in doc.splitlines() if line.startswith("ACL SETUSER dom5 ")]
    assert len(lines) == 1
    documented = lines[0].split(" -@all ", 1)[1].split()
    assert documented == redis_cluster.NODE_COMMANDS.split()


def test_a_batch_the_acl_refuses_in_part_leaves_nothing_in_the_cluster(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    """Fails before: a batch whose WAIT the ACL refused (a user without +wait) returned
    the refusal and left the MSETs that had landed in the cluster, named nowhere."""
    assert "+wait" not in USERS["node-w"]
    tier = tier_for(cluster, "node-w", tmp_path)
    try:
        keys = [key("node-w", i, oid=Oid(i % 3, 0, 0)) for i in range(9)]
        done = tier.put_many([(k, page(k.index)) for k in keys], persistent=True)
        assert not done.acknowledged and isinstance(done.errors[0], RamsterRefused)
        assert "wait" in str(done.errors[0]) and not done.leftover
        assert [k for k in keys if admin.exists(k.name())] == []
        assert tier.stats()["remote_pages"] == 0 and tier.stats()["refused_by_acl"] >= 1
    finally:
        tier.close()


def test_a_password_the_cluster_refuses_at_a_rebuild_fails_puts_without_raising(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    """Fails before: put_many answers its failures in its result, but a rebuild of the
    client whose password the cluster refused (a file rotated before the ACL) raised
    RamsterRefused out of it, and so out of remotify and the put that started it."""
    tier = tier_for(cluster, "node-a", tmp_path)
    try:
        Path(tier.config.password_file).write_text("rotated-too-early\n")
        tier.reconnect_soon()
        done = tier.put_many([(key("node-a", 70), page(70))], persistent=True)
        assert not done.acknowledged and isinstance(done.errors[0], RamsterRefused)
        assert "refused user 'node-a'" in str(done.errors[0])
    finally:
        tier.close()


def test_a_shared_pool_is_seen_by_the_nodes_granted_it_only(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    a = tier_for(cluster, "node-a", tmp_path)
    b = tier_for(cluster, "node-b", tmp_path)
    c = tier_for(cluster, "node-c", tmp_path)
    try:
        owner = record.owner_of_shared(SHARED_UUID)
        shared = key(owner, 9, pool=0, oid=Oid(4, 0, 0))
        a.put(shared, page(9), persistent=False)
        assert b.get(shared, exclusive=False) == page(9)
        assert b.object_names(owner, 0, Oid(4, 0, 0)) == [shared.name()]
        b.flush([shared])  # an invalidation on one is seen by all
        assert a.get(shared, exclusive=False) is None
        a.put(shared, page(10), persistent=False)
        with pytest.raises(RamsterRefused, match="no permissions"):
            c.get(shared, exclusive=False)
        other = key(record.owner_of_shared(OTHER_UUID), 1, pool=0)
        with pytest.raises(RamsterRefused, match="no permissions"):
            a.put(other, page(1), persistent=False)
    finally:
        for tier in (a, b, c):
            tier.close()


def test_a_wrong_password_or_no_cluster_fails_the_connect_naming_it(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    bad = tmp_path / "bad.password"
    bad.write_text("wrong\n")
    config = TierConfig(nodes=(("127.0.0.1", cluster.nodes[0].port),), node_id="node-a",
                        user="node-a", password_file=str(bad))
    with pytest.raises(RamsterRefused, match="refused user 'node-a'"):
        RemoteTier(config).connect()
    port = redis_cluster.free_ports(1, redis_cluster.PORT_RANGE[0] + 7000)[0]
    nobody = TierConfig(nodes=(("127.0.0.1", port),), node_id="node-a", timeout_ms=500)
    with pytest.raises(RamsterUnavailable, match=f"127.0.0.1:{port}"):
        RemoteTier(nobody).connect()
    missing = TierConfig(nodes=(("127.0.0.1", port),), node_id="node-a",
                         password_file=str(tmp_path / "absent"))
    with pytest.raises(BackendError, match="ramster_password_file"):
        RemoteTier(missing).connect()


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and every exception it carries as cause or context."""
    found: list[BaseException] = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def test_a_password_file_that_is_not_utf8_fails_as_a_backend_error_without_the_password(
        tmp_path: Path) -> None:
    """Fails before: read_text raised a bare UnicodeDecodeError, at load and out of put_many
    at a rebuild, whose ``object`` (and so its repr's neighbours) held the whole file."""
    secret = b"hunter2-\xff-secret"
    bad = tmp_path / "bad.password"
    bad.write_bytes(secret + b"\n")
    port = redis_cluster.free_ports(1, redis_cluster.PORT_RANGE[0] + 7300)[0]  # nothing there
    config = TierConfig(nodes=(("127.0.0.1", port),), node_id="node-a", user="node-a",
                        password_file=str(bad), timeout_ms=300)

    def clean(exc: BaseException) -> None:
        for each in _chain(exc):
            for text in (str(each), repr(each), repr(each.args),
                         repr(getattr(each, "object", b""))):
                assert "hunter2" not in text and "secret" not in text, text

    with pytest.raises(BackendError, match=f"ramster_password_file {bad}: not UTF-8 text"
                       ) as loaded:
        RemoteTier(config).connect()
    clean(loaded.value)
    with pytest.raises(BackendError, match="not UTF-8 text") as by_zcache:
        ZcacheBackend({"capacity": "1M", "ramster": True, "ramster_nodes": f"127.0.0.1:{port}",
                       "ramster_node_id": "node-a", "ramster_password_file": str(bad),
                       "ramster_timeout_ms": 300},
                      roots=Roots(run_dir=tmp_path / "run"), total_ram=lambda: 1 << 30)
    clean(by_zcache.value)
    tier = RemoteTier(config)  # at a rebuild: an outage (paused, retried), not an exception
    done = tier.put_many([(key("node-a", 1), page(1))], persistent=True)
    assert not done.acknowledged and isinstance(done.errors[0], RamsterUnavailable)
    assert "not UTF-8 text" in str(done.errors[0])
    clean(done.errors[0])
    with pytest.raises(RamsterUnavailable, match="not UTF-8 text") as got:
        tier.get(key("node-a", 1), exclusive=False)
    clean(got.value)


def test_keys_under_a_node_s_prefix_that_are_not_its_pages_are_skipped_not_fatal(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    """A name that is not UTF-8 and a key that is not a string (any holder of the node's
    ACL can make them) are skipped by the restart's listing, which once failed on them
    (and with it every load); a password file gone at a rebuild fails puts as an outage
    would, not with an exception out of put_many."""
    tier = tier_for(cluster, "node-a", tmp_path)
    try:
        assert tier.put_many([(key("node-a", 1), page(1))], persistent=True).acknowledged
        odd = b"xentmem:{node-a:1:7.0.0}:\xff"
        admin.set(odd, b"x")
        admin.hset("xentmem:{node-a:1:7.0.0}:9999", "f", "v")
        try:
            found = tier.owner_sizes("node-a")  # other tests' pages of node-a too
            assert key("node-a", 1).name() in found
            assert "xentmem:{node-a:1:7.0.0}:9999" not in found
        finally:
            admin.delete(odd, "xentmem:{node-a:1:7.0.0}:9999")
        Path(tier.config.password_file).unlink()
        tier.reconnect_soon()
        done = tier.put_many([(key("node-a", 2), page(2))], persistent=True)
        assert not done.acknowledged and isinstance(done.errors[0], RamsterUnavailable)
        assert "ramster_password_file" in str(done.errors[0])
    finally:
        tier.close()


def test_a_master_killed_during_puts_loses_no_acknowledged_page(
        own_cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    tier = tier_for(own_cluster, "node-a", tmp_path, timeout_ms=3000)
    acknowledged: dict[RemoteKey, bytes] = {}
    victim = own_cluster.master_of(key("node-a", 0).name())
    killed = threading.Event()
    try:
        for i in range(240):
            if i == 120:
                own_cluster.kill(victim)
                killed.set()
            k = key("node-a", i, oid=Oid(i % 16, 0, 0))
            try:
                tier.put(k, page(i), persistent=True)
            except RamsterUnavailable:
                continue  # not acknowledged: the caller keeps its own copy
            acknowledged[k] = page(i)
        own_cluster.wait_served(key("node-a", 0).name())
        for k, data in acknowledged.items():
            got: bytes | None = None
            for _attempt in range(3):  # the client may still learn the new topology
                try:
                    got = tier.get(k, exclusive=False)
                    break
                except RamsterUnavailable:
                    continue
            assert got == data, k
        assert len(acknowledged) >= 120
    finally:
        tier.close()


def test_the_whole_cluster_down_fails_gets_and_then_resumes_by_itself(
        own_cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    tier = tier_for(own_cluster, "node-a", tmp_path)  # refused connections fail at once
    try:
        k = key("node-a", 1)
        tier.put(k, page(1), persistent=True)
        own_cluster.kill_all()
        with pytest.raises(RamsterUnavailable, match=r"get .* failed"):
            tier.get(k, exclusive=False)
        with pytest.raises(RamsterUnavailable):
            tier.put(key("node-a", 2), page(2), persistent=True)
        assert tier.stats()["cluster_errors"] >= 2 and not tier.stats()["reachable"]
        own_cluster.restart_all()  # no persistence configured: the cluster comes back empty
        # An ephemeral page: no WAIT, so a replica still resyncing cannot make it fail.
        tier.put(key("node-a", 3), page(3), persistent=False)
        assert tier.get(key("node-a", 3), exclusive=False) == page(3)
        assert tier.stats()["reachable"]
    finally:
        tier.close()


def test_an_objects_pages_come_back_in_one_mget_each_checked(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    """A readahead: one object's pages in one MGET; a damaged one refused, a missing one a
    miss, the others served; another node's object refused by the ACL as a whole."""
    a = tier_for(cluster, "node-a", tmp_path)
    b = tier_for(cluster, "node-b", tmp_path)
    try:
        oid = Oid(9, 9, 9)
        keys = [key("node-a", i, oid=oid) for i in range(8)]
        assert len(a.put_many([(k, page(i)) for i, k in enumerate(keys[:6])],
                              persistent=True).acknowledged) == 6
        damaged = bytearray(admin.get(keys[2].name()))
        damaged[-1] ^= 1
        admin.set(keys[2].name(), bytes(damaged))
        found = a.get_object(keys)
        assert found.pages == {k: page(i) for i, k in enumerate(keys[:6]) if i != 2}
        assert set(found.refused) == {keys[2]} and found.missing == keys[6:]
        assert a.stats()["remote_pages"] == 6  # not exclusive: every page stays
        with pytest.raises(ValueError, match="one object"):
            a.get_object([keys[0], key("node-a", 0, oid=Oid(1, 2, 3))])
        with pytest.raises(RamsterRefused, match="no permissions"):
            b.get_object(keys[:3])
    finally:
        a.flush(keys)
        a.close()
        b.close()
