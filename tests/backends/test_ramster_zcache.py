"""zcache with ramster=1 against a real Redis Cluster (3 masters + 3 replicas on loopback).

Local zcache stays the first tier; these tests fill a small local store and check what moves,
what comes back and what the cluster holds afterwards (through the harness's own user).
Fault tests get a cluster of their own, since they stop nodes; time is an injected clock.
"""

from __future__ import annotations

import errno
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fakes import redis_cluster
from lz4.block import compress

from xentmem.errors import BackendError, ParamError
from xentmem.guest.backends.ramster import record
from xentmem.guest.backends.ramster import tier as tier_module
from xentmem.guest.backends.ramster.remote import PAUSE_S
from xentmem.guest.backends.zcache import ZcacheBackend
from xentmem.guest.cmdline import BootParams
from xentmem.guest.frontends import MemoryBacking
from xentmem.guest.shim import Shim
from xentmem.guestd.metrics import collect, render
from xentmem.roots import Roots
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    Oid,
    PoolUuid,
)
from xentmem.tmem.store import pack_page

GIB = 1 << 30
SHARED_UUID = PoolUuid(0x0123456789ABCDEF, 0xFEDCBA9876543210)
SHARED_HEX = f"{SHARED_UUID.hi:016x}{SHARED_UUID.lo:016x}"
USERS = {
    name: redis_cluster.node_acl(
        [record.key_pattern(name)]
        + ([record.key_pattern(record.owner_of_shared(SHARED_HEX))] if granted else []),
        f"pw-{name}")
    for name, granted in (("zc-a", True), ("zc-b", True), ("zc-c", False))
}
#: An operator's slip: a user without +wait, whose persistent moves the ACL refuses.
USERS["zc-w"] = USERS["zc-c"].replace("zc-c", "zc-w").replace(" +wait ", " ")
#: Pages per test: enough that a 1 MiB local store must move most of them.
PAGES = 600


class StepClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    def wait(self, stop: object, timeout: float) -> bool:
        self.now += timeout
        return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[redis_cluster.RedisClusterFixture]:
    with redis_cluster.running(USERS) as made:
        yield made


@pytest.fixture
def own_cluster() -> Iterator[redis_cluster.RedisClusterFixture]:
    """A cluster of this test's own: it kills nodes."""
    with redis_cluster.running(USERS) as made:
        yield made


@pytest.fixture
def admin(cluster: redis_cluster.RedisClusterFixture) -> Iterator[redis.cluster.RedisCluster]:
    client = cluster.admin_cluster()
    try:
        yield client
    finally:
        client.close()


def node_keys(client: redis.cluster.RedisCluster, node: str) -> set[str]:
    return {k.decode() for k in client.scan_iter(match=record.key_pattern(node),
                                                 target_nodes=client.PRIMARIES)}


def zcache(cluster: redis_cluster.RedisClusterFixture, tmp_path: Path, node: str = "zc-a", *,
           clock: StepClock | None = None, run: Path | None = None,
           **values: object) -> ZcacheBackend:
    password = tmp_path / f"{node}.password"
    password.write_text(f"pw-{node}\n")
    made = ZcacheBackend(
        {"capacity": "1M", "ramster": True, "ramster_nodes": cluster.seeds(),
         "ramster_node_id": node, "ramster_user": node,
         "ramster_password_file": str(password),
         # a busy machine's replica may take a while to acknowledge
         "ramster_timeout_ms": 15_000, **values},
        roots=Roots(run_dir=run or tmp_path / f"run-{node}"), clock=clock,
        total_ram=lambda: GIB)
    made.connect()
    return made


def page(n: int) -> bytes:
    """A page lz4 halves, different for each n."""
    rng = random.Random(n)
    return bytes(rng.randrange(16) for _ in range(PAGE_SIZE // 2)) + bytes(PAGE_SIZE // 2)


def fill(made: ZcacheBackend, pool: int, count: int = PAGES) -> None:
    for n in range(count):
        assert made.put_page(pool, Oid(n // 64), n % 64, page(n)) == 1, n


def where(n: int) -> tuple[Oid, int]:
    return Oid(n // 64), n % 64


# -- params and load ---------------------------------------------------------------------------


def test_params_are_declared_and_the_password_is_only_a_file(tmp_path: Path) -> None:
    described = {n: p.describe() for n, p in ZcacheBackend.params.items()}
    for name in ("ramster", "ramster_nodes", "ramster_node_id", "ramster_user",
                 "ramster_password_file", "ramster_tls", "ramster_ca_file",
                 "ramster_replicas", "ramster_timeout_ms"):
        assert name in described
    assert not any("password" in n and not n.endswith("_file") for n in described)
    with pytest.raises(ParamError, match="ramster_nodes"):
        ZcacheBackend({"ramster": True}, roots=Roots(run_dir=tmp_path), total_ram=lambda: GIB)
    with pytest.raises(ParamError, match="ramster_nodes"):
        ZcacheBackend({"ramster_nodes": "host:99999"}, total_ram=lambda: GIB)
    assert not (tmp_path / "zcache.arena").exists()


def test_an_unreachable_cluster_fails_the_load_naming_the_node(tmp_path: Path) -> None:
    port = redis_cluster.free_ports(1, redis_cluster.PORT_RANGE[0] + 7100)[0]  # nothing there
    with pytest.raises(BackendError, match=f"node zc-a: .*127.0.0.1:{port}"):
        ZcacheBackend({"ramster": True, "ramster_nodes": f"127.0.0.1:{port}",
                       "ramster_node_id": "zc-a", "ramster_timeout_ms": 300},
                      roots=Roots(run_dir=tmp_path), total_ram=lambda: GIB)
    assert list(tmp_path.iterdir()) == []  # nothing half-made: no arena, no pool table


def test_a_wrong_password_fails_the_load_naming_the_user(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it\n")
    with pytest.raises(BackendError, match="zc-a"):
        zcache(cluster, tmp_path, ramster_password_file=str(wrong))


# -- remotify ----------------------------------------------------------------------------------


def test_lru_persistent_pages_move_and_come_back(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    made = zcache(cluster, tmp_path)
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        fill(made, pool)
        stats = made.stats()
        assert stats["ramster_remote_pages"] > PAGES // 2
        assert stats["ramster_remote_pages"] + stats["pers_pages"] == PAGES
        assert stats["arena_pages"] == stats["pers_pages"]  # moved pages left the arena
        assert stats["memory_bytes"] + stats["ramster_bookkeeping_bytes"] \
            <= stats["capacity_bytes"]
        assert len(node_keys(admin, "zc-a")) == stats["ramster_remote_pages"]
        # the oldest went first: page 0 is remote, the last put is local
        assert made._store.peek_page(0, pool, *where(0)) is None
        assert made._store.peek_page(0, pool, *where(PAGES - 1)) is not None
        for key in list(node_keys(admin, "zc-a"))[:5]:
            assert admin.ttl(key) == -1  # persistent pages never carry a TTL
        for n in range(PAGES):
            assert made.get_page(pool, *where(n)) == (1, page(n)), n
        after = made.stats()
        assert after["ramster_fetched"] >= stats["ramster_remote_pages"]
        # read in order: most remote pages came by an object's readahead, not one by one
        assert after["ramster_readahead_hits"] > stats["ramster_remote_pages"] // 2
        restored = set(made.restored_pages(pool))
        assert restored == {where(n) for n in range(PAGES)}
    finally:
        made.remove()
    assert node_keys(admin, "zc-a") == set()


def test_a_put_over_a_remote_page_supersedes_it(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    made = zcache(cluster, tmp_path)
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        fill(made, pool)
        name = record.RemoteKey("zc-a", pool, *where(0)).name()
        assert admin.exists(name)
        assert made.put_page(pool, *where(0), page(9999)) == 1
        assert made.get_page(pool, *where(0)) == (1, page(9999))
        stats = made.stats()
        assert stats["ramster_remote_pages"] + stats["pers_pages"] == PAGES
        assert len(node_keys(admin, "zc-a")) == stats["ramster_remote_pages"]
    finally:
        made.remove()


def test_flush_page_object_and_destroy_pool_remove_remote_copies(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    made = zcache(cluster, tmp_path)
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        fill(made, pool)
        assert admin.exists(record.RemoteKey("zc-a", pool, *where(1)).name())
        assert made.flush_page(pool, *where(1)) == 1
        assert not admin.exists(record.RemoteKey("zc-a", pool, *where(1)).name())
        assert made.get_page(pool, *where(1))[0] == 0
        assert made.flush_object(pool, Oid(0)) == 1  # pages 0..63: remote, one slot
        assert not any(k.startswith(record.object_tag("zc-a", pool, Oid(0)))
                       for k in node_keys(admin, "zc-a"))
        assert made.get_page(pool, Oid(0), 5)[0] == 0
        stats = made.stats()
        assert stats["ramster_remote_pages"] + stats["pers_pages"] == PAGES - 64
        assert made.destroy_pool(pool) == 1
        assert node_keys(admin, "zc-a") == set()
        assert made.stats()["ramster_remote_pages"] == 0
    finally:
        made.remove()


def test_ephemeral_pages_are_evicted_or_moved_with_a_ttl(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    evicting = zcache(cluster, tmp_path, "zc-a")
    try:
        pool = evicting.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        fill(evicting, pool)
        assert evicting.stats()["evictions"] > 0
        assert evicting.stats()["ramster_remote_pages"] == 0
    finally:
        evicting.remove()
    moving = zcache(cluster, tmp_path, "zc-b", ramster_ephemeral="move",
                    ramster_ephemeral_ttl_s=300)
    try:
        pool = moving.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
        fill(moving, pool)
        stats = moving.stats()
        assert stats["evictions"] == 0 and stats["ramster_remote_pages"] > PAGES // 2
        name = record.RemoteKey("zc-b", pool, *where(0)).name()
        assert 0 < admin.ttl(name) <= 300
        assert moving.get_page(pool, *where(0)) == (1, page(0))
        assert not admin.exists(name)  # an exclusive get took the remote copy
        assert moving.get_page(pool, *where(0))[0] == 0
    finally:
        moving.remove()


def test_a_persistent_move_waits_for_the_replicas(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    """Each master has one replica: asking for two, no move is ever acknowledged, so the
    pages stay local and the store fills up (puts beyond it fail), none half-moved."""
    clock = StepClock()
    made = zcache(cluster, tmp_path, clock=clock, ramster_replicas=2, ramster_timeout_ms=600)
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        results = [made.put_page(pool, *where(n), page(n)) for n in range(PAGES)]
        assert -errno.ENOMEM in results
        stats = made.stats()
        assert stats["ramster_remote_pages"] == 0 and stats["ramster_remotify_failures"] > 0
        # WAIT answered too few (or, on a busy machine, did not answer within the timeout)
        assert stats["ramster_short_replication"] + stats["ramster_cluster_errors"] > 0
        assert node_keys(admin, "zc-a") == set()
        for n, rc in enumerate(results):
            if rc == 1:
                assert made.get_page(pool, *where(n)) == (1, page(n))
    finally:
        made.remove()


def test_a_remotify_the_acl_refuses_pauses_and_leaves_nothing_in_the_cluster(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    """Fails before: each put that needed room sent a batch the ACL refused (its WAIT), left
    the batch's MSETs in the cluster and did not pause: every later put repeated it."""
    assert "+wait" not in USERS["zc-w"]
    clock = StepClock()
    made = zcache(cluster, tmp_path, "zc-w", clock=clock)
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        results = [made.put_page(pool, *where(n), page(n)) for n in range(PAGES)]
        assert -errno.ENOMEM in results  # nothing moved: the local store filled up
        stats = made.stats()
        assert stats["ramster_remote_pages"] == 0 and stats["ramster_refused_by_acl"] >= 1
        assert stats["ramster_remotify_failures"] == 1  # then paused, not tried at each put
        assert made.describe()["ramster"]["remotify_paused"]
        assert node_keys(admin, "zc-w") == set()
        clock.now += PAUSE_S  # tried again after the pause, refused again, nothing left
        assert made.put_page(pool, Oid(99), 0, page(1)) == -errno.ENOMEM
        assert made.stats()["ramster_remotify_failures"] == 2
        assert node_keys(admin, "zc-w") == set()
    finally:
        made.remove()


def test_a_damaged_remote_page_is_never_returned(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    made = zcache(cluster, tmp_path)
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        fill(made, pool)
        name = record.RemoteKey("zc-a", pool, *where(2)).name()
        value = bytearray(admin.get(name))
        value[-1] ^= 0xFF
        admin.set(name, bytes(value))
        assert made.get_page(pool, *where(2)) == (-errno.EIO, None)
        assert made.stats()["ramster_refused_records"] == 1
        assert made.get_page(pool, *where(3)) == (1, page(3))
    finally:
        made.remove()


# -- restart -----------------------------------------------------------------------------------


def test_after_a_kill_the_remote_pages_are_found_again_by_scan(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    run = tmp_path / "run"
    first = zcache(cluster, tmp_path, run=run)
    eph = first.new_pool(PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    pool = first.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    fill(first, pool)
    remote = first.stats()["ramster_remote_pages"]
    orphan = record.RemoteKey("zc-a", eph, Oid(1), 1).name()
    admin.set(orphan, b"left by an ephemeral pool that does not come back")
    assert first._arena is not None and first._remote is not None
    first._arena.close()  # what a kill -9 leaves: the arena file and the cluster's keys
    first._remote.tier.close()
    second = zcache(cluster, tmp_path, run=run)
    try:
        assert second.restart["remote_pages_adopted"] == remote
        assert second.restart["remote_pages_dropped"] == 1
        assert not admin.exists(orphan)
        assert second.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == pool
        assert set(second.restored_pages(pool)) == {where(n) for n in range(PAGES)}
        for n in range(PAGES):
            assert second.get_page(pool, *where(n)) == (1, page(n)), n
    finally:
        second.remove()
    assert node_keys(admin, "zc-a") == set()


def test_a_page_flushed_while_its_delete_failed_does_not_come_back_after_a_kill(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    """The flush's DEL failed (a blip), then a kill: the name was kept beside the arena, so
    the restart's SCAN deletes that copy instead of adopting the flushed page again (it was
    adopted, and a load served it)."""
    run = tmp_path / "run"
    first = zcache(cluster, tmp_path, run=run)
    pool = first.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    fill(first, pool)
    assert first._arena is not None and first._remote is not None
    tier = first._remote.tier
    gone = next(w for w in (where(n) for n in range(PAGES))
                if record.RemoteKey("zc-a", pool, *w).name() in node_keys(admin, "zc-a"))
    delete_names = tier.delete_names

    def blip(names: list[str]) -> int:
        tier.delete_names = delete_names  # type: ignore[method-assign]
        raise tier_module.RamsterUnavailable("ramster: a blip")

    tier.delete_names = blip  # type: ignore[method-assign]
    assert first.flush_page(pool, *gone) == 1
    assert first.get_page(pool, *gone) == (0, None)
    assert record.RemoteKey("zc-a", pool, *gone).name() in node_keys(admin, "zc-a")
    first._arena.close()  # a kill -9
    tier.close()
    second = zcache(cluster, tmp_path, run=run)
    try:
        assert second.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == pool
        assert second.get_page(pool, *gone) == (0, None)
        assert gone not in set(second.restored_pages(pool))
        assert record.RemoteKey("zc-a", pool, *gone).name() not in node_keys(admin, "zc-a")
    finally:
        second.remove()
    assert not (run / "ramster.deletes").exists()


# -- shared pools across nodes -----------------------------------------------------------------


def test_a_shared_pool_is_cluster_wide_for_the_nodes_granted_it(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    a = zcache(cluster, tmp_path, "zc-a")
    b = zcache(cluster, tmp_path, "zc-b")
    c = zcache(cluster, tmp_path, "zc-c")
    try:
        pa, pb, pc = (n.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL) for n in (a, b, c))
        assert a.put_page(pa, Oid(5), 1, page(1)) == 1
        assert b.get_page(pb, Oid(5), 1) == (1, page(1))  # B sees A's page
        assert b.put_page(pb, Oid(5), 2, page(2)) == 1
        assert a.get_page(pa, Oid(5), 2) == (1, page(2))
        assert c.get_page(pc, Oid(5), 1)[1] is None  # C was not granted the UUID: a local pool
        assert c.put_page(pc, Oid(5), 1, page(7)) == 1
        assert a.get_page(pa, Oid(5), 1) == (1, page(1))  # C's page stayed C's
        assert b.flush_page(pb, Oid(5), 1) == 1  # an invalidation on B is seen by A
        assert a.get_page(pa, Oid(5), 1)[0] == 0
        assert a.flush_object(pa, Oid(5)) == 1
        assert b.get_page(pb, Oid(5), 2)[0] == 0
        assert a.stats()["ramster_shared_pools"] == 1 and c.stats()["ramster_shared_pools"] == 0
    finally:
        for made in (a, b, c):
            made.remove()


def _cluster_down_once(made: ZcacheBackend) -> None:
    """The next call of ``made``'s tier finds the cluster down (then it answers again)."""
    assert made._remote is not None
    tier = made._remote.tier
    real = tier._cluster

    def down() -> redis.cluster.RedisCluster:
        tier._cluster = real  # type: ignore[method-assign]
        raise redis.ConnectionError("a blip")

    tier._cluster = down  # type: ignore[method-assign]


def test_a_shared_objects_failed_flush_is_remembered_until_it_is_done(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    """Fails before: a shared pool's flush_object whose SCAN failed returned 0 and kept
    nothing, so once the cluster answered again the node served the pages it had
    invalidated.  Now -EIO, the object kept pending (in ramster.deletes, across a kill):
    each of its keys a miss here until the SCAN and DEL are done again (a put into the
    object, the retry of pending deletes), which B then sees too."""
    run = tmp_path / "run-a"
    a = zcache(cluster, tmp_path, "zc-a", run=run)
    b = zcache(cluster, tmp_path, "zc-b")
    second: ZcacheBackend | None = None
    try:
        pa, pb = (n.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL) for n in (a, b))
        for oid in (Oid(7), Oid(8)):
            for index in (0, 1):
                assert a.put_page(pa, oid, index, page(index)) == 1
        _cluster_down_once(a)
        assert a.flush_object(pa, Oid(7)) == -errno.EIO
        assert a.get_page(pa, Oid(7), 0) == (0, None)  # never its invalidated page
        assert a.get_page(pa, Oid(7), 1) == (0, None)
        assert b.get_page(pb, Oid(7), 0) == (1, page(0))  # the cluster has it still
        mark = record.object_tag(record.owner_of_shared(SHARED_HEX), 0, Oid(7)) + ":*"
        assert mark in (run / "ramster.deletes").read_text().split()
        _cluster_down_once(a)
        assert a.flush_object(pa, Oid(8)) == -errno.EIO
        assert a.put_page(pa, Oid(8), 2, page(2)) == 1  # a put into it flushes it first
        assert b.get_page(pb, Oid(8), 0) == (0, None)
        assert a.get_page(pa, Oid(8), 2) == (1, page(2)) == b.get_page(pb, Oid(8), 2)
        assert a._arena is not None and a._remote is not None
        a._arena.close()  # a kill -9: Oid(7)'s flush is still to be done
        a._remote.tier.close()
        second = zcache(cluster, tmp_path, "zc-a", run=run)
        p2 = second.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL)
        assert second.get_page(p2, Oid(7), 0) == (0, None)
        assert second.stats()["ramster_stale_keys"] == 1
        assert second._remote is not None
        second._remote._retry_stale()  # what a remotify does first
        assert second.stats()["ramster_stale_keys"] == 0
        assert b.get_page(pb, Oid(7), 0) == (0, None) and b.get_page(pb, Oid(7), 1) == (0, None)
        assert mark not in (run / "ramster.deletes").read_text().split()
        assert second.put_page(p2, Oid(7), 0, page(5)) == 1
        assert b.get_page(pb, Oid(7), 0) == (1, page(5))
        assert second.flush_object(p2, Oid(7)) == 1 and b.flush_object(pb, Oid(8)) == 1
    finally:
        for made in (second or a, b):
            made.remove()


def test_a_clean_unload_while_the_cluster_is_down_keeps_its_pending_deletes(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    """Fails before: an unload whose deletes the cluster could not take removed
    ramster.deletes with the arena, so the next load of the node served the shared pages it
    had flushed once the cluster was back.  Now the file stays with what is still to be
    deleted: those pages are misses until the deletes are done, then gone for every node."""
    run = tmp_path / "run-a"
    a = zcache(cluster, tmp_path, "zc-a", run=run)
    b = zcache(cluster, tmp_path, "zc-b")
    second: ZcacheBackend | None = None
    try:
        pa, pb = (n.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL) for n in (a, b))
        assert a.put_page(pa, Oid(7), 0, page(0)) == 1
        assert a.put_page(pa, Oid(8), 0, page(1)) == 1
        assert a._remote is not None

        def down() -> redis.cluster.RedisCluster:
            raise redis.ConnectionError("the cluster is down")

        a._remote.tier._cluster = down  # type: ignore[method-assign]
        assert a.flush_page(pa, Oid(7), 0) in (0, 1, -errno.EIO)
        assert a.flush_object(pa, Oid(8)) == -errno.EIO
        a.remove()  # clean, but the cluster took none of the deletes
        assert (run / "ramster.deletes").exists()
        second = zcache(cluster, tmp_path, "zc-a", run=run)
        p2 = second.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL)
        assert second.get_page(p2, Oid(7), 0) == (0, None)
        assert second.get_page(p2, Oid(8), 0) == (0, None)
        assert second._remote is not None
        second._remote._retry_stale()  # what a remotify does first
        assert second.stats()["ramster_stale_keys"] == 0
        assert b.get_page(pb, Oid(7), 0) == (0, None) and b.get_page(pb, Oid(8), 0) == (0, None)
    finally:
        for made in (second, b):
            if made is not None:
                made.remove()
    assert not (run / "ramster.deletes").exists()  # nothing left to delete: no file


def test_pending_deletes_of_another_node_id_are_not_kept(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    """ramster.deletes outlives an unload now, so a run directory loaded with another node
    id may hold that node's names: the ACL refuses their deletes, so they are forgotten
    (a shared pool's are kept: any node granted it may delete them)."""
    run = tmp_path / "run-a"
    run.mkdir()
    other = record.RemoteKey("zc-b", 0, Oid(1), 0).name()
    shared = record.RemoteKey(record.owner_of_shared(SHARED_HEX), 0, Oid(1), 0).name()
    (run / "ramster.deletes").write_text(f"{other}\n{shared}\n")
    made = zcache(cluster, tmp_path, "zc-a", run=run)
    try:
        assert made.stats()["ramster_stale_keys"] == 1
        assert (run / "ramster.deletes").read_text().split() == [shared]
    finally:
        made.remove()


def test_a_refused_shared_pool_leaves_its_slot_private_for_the_next_pool(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    """Fails before: a shared NEW_POOL made cluster-wide and then refused (the pool table
    could not be written) was destroyed in the store only, so its slot stayed cluster-wide;
    the next pool there, frontswap's private persistent one, put its swap pages in the
    shared namespace with a TTL, where node B (granted the UUID) read them."""
    a = zcache(cluster, tmp_path, "zc-a")
    b = zcache(cluster, tmp_path, "zc-b")
    shared_keys = record.key_pattern(record.owner_of_shared(SHARED_HEX))

    def shared() -> set[bytes]:  # other tests' pages of that pool may be there too
        return set(admin.scan_iter(match=shared_keys, target_nodes=admin.PRIMARIES))

    try:
        before = shared()
        pools = a._pools_path
        saved = pools.read_bytes()
        pools.unlink()
        pools.mkdir()  # a directory that is not empty: the table cannot be replaced
        (pools / "x").write_text("")
        assert a.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL) == -errno.ENOMEM
        (pools / "x").unlink()
        pools.rmdir()
        pools.write_bytes(saved)
        slot = a.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        assert slot == 0 and a.stats()["ramster_shared_pools"] == 0
        fill(a, slot)  # the oldest swap pages move to the cluster: under A's own keys
        remote = a.stats()["ramster_remote_pages"]
        assert remote > PAGES // 2 and len(node_keys(admin, "zc-a")) == remote
        assert shared() == before  # nothing of A's swap went to the shared namespace
        pb = b.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL)
        assert b.get_page(pb, *where(0)) == (0, None)  # B sees nothing of A's swap
        assert a.get_page(slot, *where(0)) == (1, page(0))
    finally:
        a.remove()
        b.remove()


def test_a_short_page_another_host_wrote_in_a_shared_pool_is_refused(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    """Fails before: node B (granted the UUID, its own ACL user) writes a well-formed record
    (right key, right checksum) whose lz4 decodes to 100 bytes; A's get_page served it as
    a 'page' of 100 bytes.  Now a refused record: a miss, counted, never served."""
    a = zcache(cluster, tmp_path, "zc-a")
    b = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port,
                                   username="zc-b", password="pw-zc-b")
    try:
        pa = a.new_pool(SHARED_UUID, POOL_SHARED_EPHEMERAL)
        owner = record.owner_of_shared(SHARED_HEX)
        short, fine = (record.RemoteKey(owner, 0, Oid(77), i) for i in (1, 2))
        b.set(short.name(), record.encode(short, compress(b"z" * 100, store_size=False),
                                          persistent=False), ex=600)
        b.set(fine.name(), record.encode(fine, pack_page(page(2)), persistent=False), ex=600)
        assert a.get_page(pa, Oid(77), 1) == (0, None)
        assert a.stats()["ramster_refused_records"] == 1
        assert a.get_page(pa, Oid(77), 2) == (1, page(2))  # a whole page is served
    finally:
        b.delete(short.name(), fine.name())
        b.close()
        a.remove()


# -- faults ------------------------------------------------------------------------------------


def test_the_cluster_down_fails_remote_gets_only_and_remotify_resumes(
        own_cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    clock = StepClock()
    made = zcache(own_cluster, tmp_path, clock=clock, ramster_timeout_ms=3000)
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        fill(made, pool)
        local = next(n for n in reversed(range(PAGES))
                     if made._store.peek_page(0, pool, *where(n)) is not None)
        own_cluster.kill_all()
        with caplog.at_level(logging.ERROR):
            assert made.get_page(pool, *where(0)) == (-errno.EIO, None)
        assert "ramster: get of remote page" in caplog.text and "-EIO" in caplog.text
        assert made.get_page(pool, *where(local)) == (1, page(local))  # local: unaffected
        # remotify fails once, then pauses: later puts fail locally without waiting
        # (as many puts as fill what the arena has left: its reserve depends on its growth step)
        results = []
        for n in range(10 * PAGES):
            results.append(made.put_page(pool, Oid(100), n, page(10_000 + n)))
            if results[-1] == -errno.ENOMEM:
                break
        assert results[-1] == -errno.ENOMEM and set(results[:-1]) <= {1}, results
        failures = made.stats()["ramster_remotify_failures"]
        assert failures >= 1
        assert made.put_page(pool, Oid(102), 0, page(1)) == -errno.ENOMEM
        assert made.stats()["ramster_remotify_failures"] == failures  # paused: not retried
        assert made.describe()["ramster"]["remotify_paused"]
        own_cluster.restart_all()  # no persistence configured: the cluster comes back empty
        # remotify resumes by itself once its pause is over; on a busy machine the first
        # call to a just restarted cluster may outlast ramster_timeout_ms (3 s here): it
        # then pauses again and the next pause's end tries again
        for _attempt in range(5):
            clock.now += PAUSE_S
            resumed = made.put_page(pool, Oid(101), 0, page(20_000))
            if resumed == 1:
                break
            assert resumed == -errno.ENOMEM, resumed  # refused whole: nothing changed
        assert resumed == 1  # remotify resumed
        assert made.describe()["ramster"]["reachable"]
        assert made.get_page(pool, Oid(101), 0) == (1, page(20_000))
    finally:
        made.remove()


# -- unload ------------------------------------------------------------------------------------


def test_unload_repatriates_every_remote_swap_page(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
        admin: redis.cluster.RedisCluster) -> None:
    password = tmp_path / "zc-a.password"
    password.write_text("pw-zc-a\n")
    shim = Shim(roots=Roots(root=tmp_path), boot=BootParams())
    shim.frontswap.init(0, MemoryBacking(PAGES))
    backend = shim.load("zcache", {
        "capacity": "1M", "ramster": True, "ramster_nodes": cluster.seeds(),
        "ramster_node_id": "zc-a", "ramster_user": "zc-a",
        "ramster_password_file": str(password), "ramster_timeout_ms": 15_000})
    for offset in range(PAGES):
        assert shim.frontswap.store(0, offset, page(offset)) == 0
    remote = backend.stats()["ramster_remote_pages"]
    assert remote > PAGES // 2 and len(node_keys(admin, "zc-a")) == remote
    # visible where zcache's counters are: stats (and --json), status, metrics
    stats = shim.stats()["backend"]
    assert stats["ramster_node_id"] == "zc-a" and stats["ramster_remotified"] >= remote
    assert stats["ramster_remote_zbytes"] > 0 and stats["ramster_cluster_errors"] == 0
    described = shim.status()["backend"]["ramster"]
    assert described["node_id"] == "zc-a" and described["reachable"]
    assert "password" not in json.dumps(described) and "pw-zc-a" not in json.dumps(
        shim.params())
    text = render(collect(backend="zcache", stats=shim.stats(), balloon={}))
    assert f'stat="ramster_remote_pages"}} {remote}' in text
    assert 'xentmem_backend_text{backend="zcache",stat="ramster_node_id",text="zc-a"} 1' \
        in text

    assert shim.unload()["repatriated"] == PAGES

    assert node_keys(admin, "zc-a") == set()
    for offset in range(PAGES):  # every page in its backing store, none lost
        assert shim.frontswap.load(0, offset) == page(offset)


def test_a_smaller_capacity_moves_persistent_pages_at_once(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    made = zcache(cluster, tmp_path, capacity="8M")
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        fill(made, pool)
        assert made.stats()["ramster_remote_pages"] == 0
        made.set_param("capacity", "1M")
        stats = made.stats()
        assert stats["memory_bytes"] + stats["ramster_bookkeeping_bytes"] \
            <= stats["capacity_bytes"]
        assert stats["ramster_remote_pages"] + stats["pers_pages"] == PAGES
        assert made.get_page(pool, *where(0)) == (1, page(0))
    finally:
        made.remove()


def test_a_master_killed_during_remotify_loses_no_acknowledged_page(
        own_cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    clock = StepClock()
    made = zcache(own_cluster, tmp_path, clock=clock, ramster_timeout_ms=3000)
    try:
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        stored: set[int] = set()
        for n in range(PAGES):
            if n == PAGES // 2:  # half way: the master of the first object's slot dies
                own_cluster.kill(own_cluster.master_of(
                    record.RemoteKey("zc-a", pool, Oid(0), 0).name()))
            if made.put_page(pool, *where(n), page(n)) == 1:
                stored.add(n)
        own_cluster.wait_served(record.RemoteKey("zc-a", pool, Oid(0), 0).name())
        clock.now += PAUSE_S
        for n in range(PAGES, PAGES + 200):  # remotify resumes on the new topology
            if made.put_page(pool, *where(n), page(n)) == 1:
                stored.add(n)
        assert made.stats()["ramster_remote_pages"] > 0
        for n in sorted(stored):  # every acknowledged page, local or remote, intact
            assert made.get_page(pool, *where(n)) == (1, page(n)), n
    finally:
        made.remove()
