"""RAMster's remote tier: compressed pages in a Redis Cluster, through redis-py's cluster client.

The cluster does membership, failover, replication and access control; this module only
names pages (:mod:`.record`), moves them and counts.  What it promises:

- a persistent page's move is acknowledged only once ``replicas`` replicas hold it (``WAIT``
  on the connection that wrote it), so a master's failover loses no acknowledged page;
  persistent pages never carry a TTL, so a cluster on ``maxmemory-policy volatile-lru`` can
  evict only ephemeral ones;
- a value that is not the page asked for (damaged, another key's, truncated) is refused,
  counted and logged, never returned (:class:`.record.RecordError`);
- an operation fails within about ``timeout_ms`` with :class:`RamsterUnavailable` naming the
  node and what failed; after a failure the tier rebuilds its client on the next call, so it
  resumes by itself when the cluster is back.

Design and failure costs: ``docs/ramster.md``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from xentmem.errors import BackendError

from .record import PageKey, RecordError, decode, encode, object_tag

log = logging.getLogger(__name__)

#: What redis-py raises when the cluster, a node or the network fails (its cluster errors are
#: not all RedisErrors).
CLUSTER_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
#: redis-py retries an operation this many times after a connection error or a moved slot
#: (a failover in progress); each try is bounded by the socket timeout.
CLIENT_RETRIES = 2


class RamsterUnavailable(BackendError):
    """The cluster (or the node serving a page) did not answer in time: the tmem op is -EIO."""


class RamsterRefused(BackendError):
    """The cluster answered and refused: this node's ACL user may not touch that key."""


@dataclass(frozen=True)
class TierConfig:
    """What the tier needs, already validated (from the ``ramster_*`` params)."""

    nodes: tuple[tuple[str, int], ...]
    node_id: str
    user: str = ""
    password_file: str = ""
    tls: bool = False
    ca_file: str = ""
    replicas: int = 1
    timeout_ms: int = 2000
    ephemeral_ttl_s: int = 600

    def password(self) -> str | None:
        """The ACL password, read from its file at connect (never kept in a param)."""
        if not self.password_file:
            return None
        path = Path(self.password_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BackendError(f"ramster_password_file {path}: {exc.strerror or exc}") from None
        secret = text.rstrip("\r\n")
        if not secret or "\n" in secret:
            raise BackendError(f"ramster_password_file {path}: must hold one non-empty line")
        return secret


@dataclass
class TierCounters:
    remote_pages: int = 0
    remote_bytes: int = 0
    remotified: int = 0
    fetched: int = 0
    flushed: int = 0
    misses: int = 0
    cluster_errors: int = 0
    refused_records: int = 0
    refused_by_acl: int = 0
    short_replication: int = 0
    reconnects: int = 0
    last_error: str = ""


class RemoteTier:
    """One node's view of the cluster; thread-safe (one lock around the client's life)."""

    def __init__(self, config: TierConfig) -> None:
        if not config.nodes:
            raise BackendError("ramster: ramster_nodes names no node")
        self.config = config
        self.counters = TierCounters()
        self._client: RedisCluster | None = None
        #: Whether the last operation reached the cluster (``status`` shows an outage).
        self._reachable = False
        self._lock = threading.Lock()
        #: Bytes each remote page of this node holds in the cluster (for remote_bytes).
        self._sizes: dict[str, int] = {}

    # -- the client's life ------------------------------------------------------------------------

    def connect(self) -> None:
        """Reach the cluster and check every master answers; an error names the node."""
        with self._lock:
            self._client = self._open()
            self._reachable = True

    def _open(self) -> RedisCluster:
        config = self.config
        timeout_s = self._try_ms() / 1000
        password = config.password()
        seeds = ", ".join(f"{h}:{p}" for h, p in config.nodes)
        try:
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in config.nodes],
                username=config.user or None, password=password,
                ssl=config.tls, ssl_ca_certs=config.ca_file or None,
                socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                require_full_coverage=True, retry=Retry(NoBackoff(), CLIENT_RETRIES),
            )
        except CLUSTER_ERRORS as exc:
            if isinstance(exc, redis.AuthenticationError) or isinstance(
                    exc.__cause__, redis.AuthenticationError):
                raise RamsterRefused(f"ramster: the cluster at {seeds} refused user "
                                     f"{config.user or 'default'!r}: {exc.__cause__ or exc}"
                                     ) from None
            raise self._failed(f"no node of {seeds} answered as a cluster", exc) from None
        for node in client.get_primaries():
            try:
                client.get_redis_connection(node).ping()
            except CLUSTER_ERRORS as exc:
                client.close()
                raise self._failed(f"master {node.name} did not answer PING", exc) from None
        return client

    def _try_ms(self) -> int:
        """One try's share of ``timeout_ms``: redis-py may try CLIENT_RETRIES more times."""
        return max(self.config.timeout_ms // (CLIENT_RETRIES + 1), 1)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _cluster(self) -> RedisCluster:
        """The client, rebuilt after a failure (so the tier resumes when the cluster does)."""
        if self._client is None:
            self._client = self._open()
            self.counters.reconnects += 1
            log.info("ramster: the cluster answers again")
        return self._client

    def _refused(self, exc: Exception) -> RamsterRefused:
        """An ACL refusal: the cluster is up, the request was not this node's to make."""
        self.counters.refused_by_acl += 1
        return RamsterRefused(f"ramster: user {self.config.user or 'default'!r}: {exc}")

    def _failed(self, what: str, exc: Exception) -> RamsterUnavailable:
        """Count and log (once per distinct message) a failed operation.

        The client stays: redis-py learns the new topology by itself after a failover.  Only
        a client that could not reach any node is dropped, to be rebuilt on the next call.
        """
        self.counters.cluster_errors += 1
        self._reachable = False
        message = f"ramster: {what}: {exc}"
        if message != self.counters.last_error:
            log.error("%s", message)
        self.counters.last_error = message
        if isinstance(exc, redis.exceptions.RedisClusterException) and self._client is not None:
            self._client.close()
            self._client = None
        return RamsterUnavailable(message)

    # -- pages ------------------------------------------------------------------------------------

    def put(self, key: PageKey, data: bytes, *, persistent: bool) -> None:
        """Store one page; returns only once it is acknowledged (see the module docstring)."""
        name = key.name()
        value = encode(key, data, persistent=persistent)
        with self._lock:
            try:
                cluster = self._cluster()
                if persistent:
                    self._put_replicated(cluster, name, value)
                else:
                    cluster.set(name, value, ex=self.config.ephemeral_ttl_s)
            except RamsterUnavailable:
                raise
            except redis.exceptions.NoPermissionError as exc:
                raise self._refused(exc) from None
            except CLUSTER_ERRORS as exc:
                raise self._failed(f"put {name} failed", exc) from None
            self._reachable = True
            self.counters.remotified += 1
            self._account(name, len(value))

    def _put_replicated(self, cluster: RedisCluster, name: str, value: bytes) -> None:
        """SET then WAIT on one connection of the master that owns the slot."""
        node = cluster.get_node_from_key(name)
        pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
        pipe.set(name, value)
        # WAIT blocks on the server: most of a try's time, the socket's timeout a bit more.
        wait_ms = max(self._try_ms() * 4 // 5, 1)
        pipe.execute_command("WAIT", self.config.replicas, wait_ms)
        _ok, reached = pipe.execute()
        if int(reached) < self.config.replicas:
            self.counters.short_replication += 1
            # Not acknowledged: the caller keeps its own copy; do not leave a stray one.
            try:
                cluster.delete(name)
            except redis.RedisError:
                log.warning("ramster: %s reached %s of %d replicas and could not be removed",
                            name, reached, self.config.replicas)
            raise RamsterUnavailable(
                f"ramster: put {name} reached {reached} of {self.config.replicas} replica(s) "
                f"on master {node.name} within {wait_ms} ms")

    def get(self, key: PageKey, *, exclusive: bool) -> bytes | None:
        """The page, or None when the cluster has none; an exclusive get removes it."""
        name = key.name()
        with self._lock:
            try:
                cluster = self._cluster()
                untrusted_value = cluster.getdel(name) if exclusive else cluster.get(name)
            except RamsterUnavailable:
                raise
            except redis.exceptions.NoPermissionError as exc:
                raise self._refused(exc) from None
            except CLUSTER_ERRORS as exc:
                raise self._failed(f"get {name} failed", exc) from None
            self._reachable = True
            if untrusted_value is None:
                self.counters.misses += 1
                self._forget(name)
                return None
            if exclusive:
                self._forget(name)
            try:
                data = decode(key, untrusted_value)
            except RecordError as exc:
                self.counters.refused_records += 1
                log.error("%s (not served)", exc)
                raise
            self.counters.fetched += 1
            return data

    def flush(self, keys: list[PageKey]) -> int:
        """Remove these pages (one DEL per slot); how many the cluster had."""
        return self.delete_names([k.name() for k in keys])

    def object_names(self, owner: str, pool: int, oid: Any) -> list[str]:
        """Every key of one object in the cluster (one slot: SCAN on its master only).

        Used for shared pools, whose pages other nodes put; a node's own pages are known
        locally and flushed by name.
        """
        tag = object_tag(owner, pool, oid)
        pattern = tag.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?") \
            .replace("[", "\\[") + ":*"
        with self._lock:
            try:
                cluster = self._cluster()
                node = cluster.get_node_from_key(tag + ":0")
                conn = cluster.get_redis_connection(node)
                return [n.decode() if isinstance(n, bytes) else n
                        for n in conn.scan_iter(match=pattern, count=1000)]
            except RamsterUnavailable:
                raise
            except redis.exceptions.NoPermissionError as exc:
                raise self._refused(exc) from None
            except CLUSTER_ERRORS as exc:
                raise self._failed(f"listing {tag} failed", exc) from None

    def delete_names(self, names: list[str]) -> int:
        """Remove these keys; how many the cluster had."""
        if not names:
            return 0
        with self._lock:
            try:
                removed = int(self._cluster().delete(*names))
            except RamsterUnavailable:
                raise
            except redis.exceptions.NoPermissionError as exc:
                raise self._refused(exc) from None
            except CLUSTER_ERRORS as exc:
                raise self._failed(f"flush of {len(names)} page(s) failed", exc) from None
            self._reachable = True
            for name in names:
                self._forget(name)
            self.counters.flushed += removed
            return removed

    # -- accounting -------------------------------------------------------------------------------

    def _account(self, name: str, size: int) -> None:
        old = self._sizes.get(name)
        if old is None:
            self.counters.remote_pages += 1
        else:
            self.counters.remote_bytes -= old
        self._sizes[name] = size
        self.counters.remote_bytes += size

    def _forget(self, name: str) -> None:
        old = self._sizes.pop(name, None)
        if old is not None:
            self.counters.remote_pages -= 1
            self.counters.remote_bytes -= old

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "node_id": self.config.node_id,
            "reachable": self._reachable,
            "remote_pages": c.remote_pages, "remote_bytes": c.remote_bytes,
            "remotified": c.remotified, "fetched": c.fetched, "flushed": c.flushed,
            "remote_misses": c.misses, "cluster_errors": c.cluster_errors,
            "refused_records": c.refused_records, "refused_by_acl": c.refused_by_acl,
            "short_replication": c.short_replication,
            "reconnects": c.reconnects, "last_error": c.last_error,
        }
