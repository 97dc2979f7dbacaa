"""zcache with ramster_tls=1 against a real Redis Cluster that speaks only TLS.

The nodes (3 masters + 3 replicas on loopback) listen on their TLS port alone, with the cluster
bus and replication over TLS too; their certificates come from a CA the test makes with
``openssl`` (``fakes.redis_cluster.make_tls``).  zcache trusts that CA through
``ramster_ca_file`` and authenticates with its ACL user and password, as
``docs/ramster.md`` ("Security") sets a cluster up.  A CA that did not sign the nodes fails
the load naming the node, and nothing is made.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fakes import redis_cluster

from xentmem.errors import BackendError, ParamError
from xentmem.guest.backends.ramster import record
from xentmem.guest.backends.zcache import ZcacheBackend
from xentmem.roots import Roots
from xentmem.tmem.abi import PAGE_SIZE, POOL_PRIVATE_PERSISTENT, PRIVATE_UUID, Oid

GIB = 1 << 30
NODE = "zc-tls"
USERS = {NODE: redis_cluster.node_acl([record.key_pattern(NODE)], f"pw-{NODE}")}
#: Enough pages that a 1 MiB local store must move most of them.
PAGES = 600


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def cluster(tls_dir: Path) -> Iterator[redis_cluster.RedisClusterFixture]:
    reason = redis_cluster.unavailable_reason(tls=True)
    if reason is not None:  # make_tls needs openssl before the cluster can start
        redis_cluster.unavailable("REDIS", "a TLS Redis Cluster (redis-server, openssl)",
                                  reason)
    with redis_cluster.running(USERS, tls=redis_cluster.make_tls(tls_dir / "ca")) as made:
        yield made


def load(cluster: redis_cluster.RedisClusterFixture, tmp_path: Path,
         **values: object) -> ZcacheBackend:
    password = tmp_path / "password"
    password.write_text(f"pw-{NODE}\n")
    assert cluster.tls is not None
    return ZcacheBackend(
        {"capacity": "1M", "ramster": True, "ramster_nodes": cluster.seeds(),
         "ramster_node_id": NODE, "ramster_user": NODE, "ramster_password_file": str(password),
         "ramster_tls": True, "ramster_ca_file": str(cluster.tls.ca),
         "ramster_timeout_ms": 15_000, **values},
        roots=Roots(run_dir=tmp_path / "run"), total_ram=lambda: GIB)


def page(n: int) -> bytes:
    """A page lz4 halves, different for each n."""
    rng = random.Random(n)
    return bytes(rng.randrange(16) for _ in range(PAGE_SIZE // 2)) + bytes(PAGE_SIZE // 2)


def test_pages_move_to_a_tls_cluster_and_come_back(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    made = load(cluster, tmp_path)
    try:
        assert made.describe()["ramster"]["tls"] is True
        pool = made.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
        for n in range(PAGES):
            assert made.put_page(pool, Oid(n // 64), n % 64, page(n)) == 1, n
        stats = made.stats()
        assert stats["ramster_remote_pages"] > PAGES // 2
        assert stats["ramster_reachable"] == 1
        assert stats["ramster_cluster_errors"] == 0
        for n in range(PAGES):
            assert made.get_page(pool, Oid(n // 64), n % 64) == (1, page(n)), n
        assert made.stats()["ramster_fetched"] > 0
        # the pages are in the cluster, as seen through TLS with the same CA
        admin = cluster.admin_cluster()
        try:
            keys = list(admin.scan_iter(match=record.key_pattern(NODE),
                                        target_nodes=admin.PRIMARIES))
        finally:
            admin.close()
        assert len(keys) == made.stats()["ramster_remote_pages"] > 0
    finally:
        made.remove()


def test_the_nodes_speak_only_tls(cluster: redis_cluster.RedisClusterFixture) -> None:
    """The pages above crossed TLS: a plain client on a node's port gets no answer."""
    plain = redis.Redis(host="127.0.0.1", port=cluster.nodes[0].port, socket_timeout=5,
                        socket_connect_timeout=5)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()


def test_a_ca_that_did_not_sign_the_nodes_fails_the_load_naming_the_node(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    other = redis_cluster.make_tls(tmp_path / "other", "another CA")
    ports = "|".join(str(n.port) for n in cluster.nodes)
    with pytest.raises(BackendError) as failed:
        load(cluster, tmp_path, ramster_ca_file=str(other.ca))
    message = str(failed.value)
    assert f"ramster node {NODE}" in message
    assert f"not signed by ramster_ca_file {other.ca}" in message
    assert any(f"127.0.0.1:{port}" in message for port in ports.split("|"))
    assert "certificate verify failed" in message
    assert not (tmp_path / "run").exists()  # nothing half-made: no arena, no pool table


def test_tls_off_against_a_tls_cluster_fails_the_load(
        cluster: redis_cluster.RedisClusterFixture, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=f"ramster node {NODE}: .*127.0.0.1:"):
        load(cluster, tmp_path, ramster_tls=False, ramster_ca_file="")
    assert not (tmp_path / "run").exists()


# -- the CA file, checked before any node is reached (no cluster needed) ---------------------


def unreachable(tmp_path: Path, **values: object) -> ZcacheBackend:
    port = redis_cluster.free_ports(1, redis_cluster.PORT_RANGE[0] + 7200)[0]  # nothing there
    return ZcacheBackend({"ramster": True, "ramster_nodes": f"127.0.0.1:{port}",
                          "ramster_node_id": NODE, "ramster_timeout_ms": 300, **values},
                         roots=Roots(run_dir=tmp_path / "run"), total_ram=lambda: GIB)


def test_a_missing_or_foreign_ca_file_is_named_as_such(tmp_path: Path) -> None:
    """Before the fix both were reported as a node that did not answer."""
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(BackendError, match=f"ramster node {NODE}: ramster_ca_file {missing}: "
                                           "not a readable file of CA certificates"):
        unreachable(tmp_path, ramster_tls=True, ramster_ca_file=str(missing))
    foreign = tmp_path / "foreign.pem"
    foreign.write_text("not a certificate\n")
    with pytest.raises(BackendError, match=f"ramster_ca_file {foreign}: not a readable"):
        unreachable(tmp_path, ramster_tls=True, ramster_ca_file=str(foreign))
    assert not (tmp_path / "run").exists()


def test_a_ca_file_without_tls_is_refused(tmp_path: Path) -> None:
    """A CA file with ramster_tls=0 would be silently unused: refused as a bad param."""
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    with pytest.raises(ParamError, match="ramster_ca_file needs ramster_tls=1"):
        unreachable(tmp_path, ramster_ca_file=str(ca))
    assert not (tmp_path / "run").exists()
