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

import contextlib
import logging
import ssl
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from xentmem.errors import BackendError
from xentmem.tmem.abi import Oid

from .record import (
    RecordError,
    RemoteKey,
    decode_named,
    encode_named,
    key_pattern,
    object_tag,
    page_name,
)

log = logging.getLogger(__name__)

#: What redis-py raises when the cluster, a node or the network fails (its cluster errors are
#: not all RedisErrors).
CLUSTER_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
#: redis-py retries an operation this many times after a connection error or a moved slot
#: (a failover in progress); each try is bounded by the socket timeout.
CLIENT_RETRIES = 2


#: One page of a batch put: its key, its key's name and its value (the record).
_Record = tuple[RemoteKey, str, bytes]


class RamsterUnavailable(BackendError):
    """The cluster (or the node serving a page) did not answer in time: the tmem op is -EIO."""


class RamsterRefused(BackendError):
    """The cluster answered and refused: this node's ACL user may not touch that key."""


@dataclass
class GetResult:
    """What a batch get found: pages by key, keys the cluster has not, values refused, and
    gets this node's ACL user may not make."""

    pages: dict[RemoteKey, bytes] = field(default_factory=dict)
    missing: list[RemoteKey] = field(default_factory=list)
    refused: dict[RemoteKey, RecordError] = field(default_factory=dict)
    denied: dict[RemoteKey, RamsterRefused] = field(default_factory=dict)


@dataclass
class PutResult:
    """What a batch put did: the pages acknowledged, and why the others were not."""

    acknowledged: list[RemoteKey] = field(default_factory=list)
    errors: list[BackendError] = field(default_factory=list)
    #: Names an unacknowledged put may have written and that could not be removed: the
    #: caller deletes them later (nothing points to them, so they are never served).
    leftover: list[str] = field(default_factory=list)


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
            raw = path.read_bytes()
        except OSError as exc:
            raise BackendError(f"ramster_password_file {path}: {exc.strerror or exc}") from None
        text: str | None = None
        with contextlib.suppress(UnicodeDecodeError):
            text = raw.decode("utf-8")
        if text is None:  # raised here, not in an except: no context holding the file's bytes
            raise BackendError(f"ramster_password_file {path}: not UTF-8 text")
        secret = text.rstrip("\r\n")
        if not secret or "\n" in secret:
            raise BackendError(f"ramster_password_file {path}: must hold one non-empty line")
        return secret

    def check_tls(self) -> None:
        """At load: ``ca_file`` must load as CA certificates (PEM), so a missing or wrong
        file is named as such, not taken for a node that did not answer."""
        if not self.tls or not self.ca_file:
            return
        try:
            ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise BackendError(f"ramster_ca_file {self.ca_file}: not a readable file of CA "
                               f"certificates (PEM): {reason}") from None

    def tls_failure(self, exc: BaseException) -> str | None:
        """What a failed connect says when a node's certificate was not verified (the
        message redis-py gives names the node)."""
        text = str(exc)
        verify_failed = "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text
        if not self.tls or not verify_failed:
            return None
        trusted = f"ramster_ca_file {self.ca_file}" if self.ca_file else "the system's CAs"
        return f"TLS: a node's certificate is not signed by {trusted} (or not for its address)"


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
        #: Per master, a connection taken from its pool for the client's life (the lock
        #: serialises its use): a lone get is one command written and its reply read, without
        #: redis-py's per-call pool, retry and tracing layers, which cost twice the CPU of the
        #: round trip itself (``docs/ramster.md``, "Fetch").
        self._held: dict[str, tuple[Any, Any]] = {}

    # -- the client's life ------------------------------------------------------------------------

    def connect(self) -> None:
        """Reach the cluster and check every master answers; an error names the node."""
        self.config.check_tls()
        with self._lock:
            self._client = self._open(check_masters=True)
            self._reachable = True

    def _open(self, *, check_masters: bool = False) -> RedisCluster:
        """A client on the cluster's current topology; at load, every master must answer
        (a rebuild after a failure does not wait for a master that is failing over)."""
        config = self.config
        timeout_s = self._try_ms() / 1000
        seeds = ", ".join(f"{h}:{p}" for h, p in config.nodes)
        try:
            password = config.password()
        except BackendError as exc:  # removed or half-rotated: as unreachable, paused and retried
            raise RamsterUnavailable(f"ramster: cannot connect to {seeds}: {exc}") from None
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
            tls = config.tls_failure(exc)
            raise self._failed(f"{tls}: no node of {seeds} was reached" if tls else
                               f"no node of {seeds} answered as a cluster", exc) from None
        for node in client.get_primaries() if check_masters else ():
            try:
                client.get_redis_connection(node).ping()
            except CLUSTER_ERRORS as exc:
                client.close()
                tls = config.tls_failure(exc)
                raise self._failed(f"{tls}: master {node.name}" if tls else
                                   f"master {node.name} did not answer PING", exc) from None
        return client

    def _try_ms(self) -> int:
        """One try's share of ``timeout_ms``: redis-py may try CLIENT_RETRIES more times."""
        return max(self.config.timeout_ms // (CLIENT_RETRIES + 1), 1)

    def close(self) -> None:
        with self._lock:
            self._drop_held()
            if self._client is not None:
                self._client.close()
                self._client = None

    def _drop_held(self) -> None:
        """The held connections go back to their pools, closed (the lock is held)."""
        for pool, conn in self._held.values():
            conn.disconnect()
            pool.release(conn)
        self._held.clear()

    def _held_for(self, cluster: RedisCluster, node: Any) -> Any:
        held = self._held.get(node.name)
        if held is None:
            pool = cluster.get_redis_connection(node).connection_pool
            held = self._held[node.name] = (pool, pool.get_connection())
        return held[1]

    def reconnect_soon(self) -> None:
        """The next call builds a new client (a changed timeout takes effect there)."""
        self.close()

    def _cluster(self) -> RedisCluster:
        """The client, rebuilt after a failure (so the tier resumes when the cluster does)."""
        if self._client is None:
            self._client = self._open()
            self.counters.reconnects += 1
            log.info("ramster: the cluster answers again")
        return self._client

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """One call to the cluster: an ACL refusal becomes :class:`RamsterRefused`, any other
        failure :class:`RamsterUnavailable` (counted and logged by :meth:`_failed`)."""
        try:
            yield
        except RamsterUnavailable:
            raise
        except redis.exceptions.NoPermissionError as exc:
            raise self._refused(exc) from None
        except CLUSTER_ERRORS as exc:
            raise self._failed(what, exc) from None

    def _refused(self, exc: Exception) -> RamsterRefused:
        """An ACL refusal: the cluster is up, the request was not this node's to make."""
        self.counters.refused_by_acl += 1
        return RamsterRefused(f"ramster: user {self.config.user or 'default'!r}: {exc}")

    def _failed(self, what: str, exc: Exception) -> RamsterUnavailable:
        """Count and log (once per distinct message) a failed operation.

        The client is dropped and rebuilt on the next call: the batches go to one master's
        connection directly, so redis-py's own redirection never sees a failover; a new
        client reads the topology the cluster has now.
        """
        self.counters.cluster_errors += 1
        self._reachable = False
        message = f"ramster: {what}: {exc}"
        if message != self.counters.last_error:
            log.error("%s", message)
        self.counters.last_error = message
        self._drop_held()
        if self._client is not None:
            self._client.close()
            self._client = None
        return RamsterUnavailable(message)

    # -- pages ------------------------------------------------------------------------------------

    def put(self, key: RemoteKey, data: bytes, *, persistent: bool) -> None:
        """Store one page; returns only once it is acknowledged, else raises."""
        done = self.put_many([(key, data)], persistent=persistent)
        if not done.acknowledged:
            raise done.errors[0]

    def put_many(self, pages: Sequence[tuple[RemoteKey, bytes]], *,
                 persistent: bool) -> PutResult:
        """Store pages as remotify does, in batches: one pipeline per master that owns some
        of their slots (one MSET per object of a persistent batch, then one WAIT; one SET
        with its TTL per ephemeral page).  A master's group that fails or reaches too few
        replicas is not acknowledged: its pages stay with the caller, and the tier removes
        what it wrote of them."""
        result = PutResult()
        with self._lock:
            try:
                cluster = self._cluster()
                groups = self._by_master(cluster, pages, persistent)
            except (RamsterUnavailable, RamsterRefused) as exc:  # a rebuild refused too
                result.errors.append(exc)
                return result
            except CLUSTER_ERRORS as exc:
                result.errors.append(self._failed(f"put of {len(pages)} page(s) failed", exc))
                return result
            for node, objects in groups.values():
                error = self._put_group(cluster, node, objects, persistent, result.leftover)
                if error is not None:
                    result.errors.append(error)
                    continue
                for records in objects:
                    for key, name, value in records:
                        self._account(name, len(value))
                        result.acknowledged.append(key)
            self.counters.remotified += len(result.acknowledged)
        return result

    @staticmethod
    def _by_master(cluster: RedisCluster, pages: Sequence[tuple[RemoteKey, bytes]],
                   persistent: bool) -> dict[str, tuple[Any, list[list[_Record]]]]:
        """The pages' records by master, then by object: an object's pages share its hash
        tag's slot, so the tag and its master are found once per object."""
        groups: dict[str, tuple[Any, list[list[_Record]]]] = {}
        objects: dict[tuple[str, int, Oid], tuple[str, list[_Record]]] = {}
        for key, data in pages:
            found = objects.get((key.owner, key.pool, key.oid))
            if found is None:
                tag = key.object_tag()
                node = cluster.get_node_from_key(tag)
                found = objects[(key.owner, key.pool, key.oid)] = (tag, [])
                groups.setdefault(node.name, (node, []))[1].append(found[1])
            name = page_name(found[0], key.index)
            found[1].append((key, name, encode_named(name.encode(), data,
                                                     persistent=persistent)))
        return groups

    def _put_group(self, cluster: RedisCluster, node: Any, objects: list[list[_Record]],
                   persistent: bool, leftover: list[str]) -> BackendError | None:
        """One master's share of a batch, on one connection; None once acknowledged.  What
        a failed group may have written is removed (or named in ``leftover``)."""
        names = [name for records in objects for _key, name, _value in records]
        pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
        ttl = self.config.ephemeral_ttl_s
        written: list[list[str]] = []  # the names each write command writes, in order
        for records in objects:
            if persistent:  # one object: one slot, so one MSET (no TTL: never evicted)
                pipe.execute_command("MSET", *(part for _key, name, value in records
                                               for part in (name, value)))
                written.append([name for _key, name, _value in records])
            else:
                for _key, name, value in records:
                    pipe.execute_command("SET", name, value, "EX", ttl)
                    written.append([name])
        wait_ms = 0
        if persistent:
            # WAIT blocks on the server: most of a try's time, the socket's timeout a bit more.
            wait_ms = max(self._try_ms() * 4 // 5, 1)
            pipe.execute_command("WAIT", self.config.replicas, wait_ms)
        try:
            replies = pipe.execute(raise_on_error=False)
        except CLUSTER_ERRORS as exc:  # the SETs may have landed (a WAIT that timed out)
            self._discard(cluster, names, leftover)
            return self._failed(f"put of {len(names)} page(s) on {node.name} failed", exc)
        refusals = [r for r in replies if isinstance(r, redis.exceptions.NoPermissionError)]
        if refusals:  # what the commands the ACL let through wrote goes (not the others')
            landed = [name for names_of, reply in zip(written, replies)
                      if not isinstance(reply, Exception) for name in names_of]
            if landed:
                self._discard(cluster, landed, leftover)
            return self._refused(refusals[0])
        failures = [r for r in replies if isinstance(r, Exception)]
        if failures:  # a slot moved mid-batch (a failover): redis-py refreshes its map
            self._discard(cluster, names, leftover)
            return self._failed(f"put on {node.name} failed", failures[0])
        self._reachable = True
        if persistent and int(replies[-1]) < self.config.replicas:
            self.counters.short_replication += 1
            self._discard(cluster, names, leftover)
            return RamsterUnavailable(
                f"ramster: put of {len(names)} page(s) reached {replies[-1]} of "
                f"{self.config.replicas} replica(s) on master {node.name} within {wait_ms} ms")
        return None

    def _discard(self, cluster: RedisCluster, names: list[str], leftover: list[str]) -> None:
        """Remove what an unacknowledged put wrote: the caller keeps its own copies."""
        try:
            cluster.delete(*names)
        except CLUSTER_ERRORS:
            leftover.extend(names)
            log.warning("ramster: %d unacknowledged page(s) could not be removed yet (never "
                        "served: the caller's index does not point to them)", len(names))

    def get(self, key: RemoteKey, *, exclusive: bool) -> bytes | None:
        """The page, or None when the cluster has none; an exclusive get removes it.

        A value that is not this page's raises :class:`.record.RecordError` (never served).
        """
        name = key.name()
        found = GetResult()
        command = "GETDEL" if exclusive else "GET"
        with self._lock:  # one page: one command on its master's held connection
            with self._calling("get of 1 page failed"):
                cluster = self._cluster()
                node = cluster.get_node_from_key(name)
                try:
                    untrusted_value = self._command(cluster, node, command, name)
                except redis.ConnectionError:  # closed while idle: one more try, on a new one
                    self._drop_held()
                    untrusted_value = self._command(cluster, node, command, name)
            self._reachable = True
            self._take(key, name, untrusted_value, exclusive, found)
        if key in found.refused:
            raise found.refused[key]
        return found.pages.get(key)

    def _command(self, cluster: RedisCluster, node: Any, *args: Any) -> Any:
        """One command on ``node``'s held connection, its reply (an error reply raised)."""
        conn = self._held_for(cluster, node)
        conn.send_command(*args)
        return conn.read_response()

    def _commands(self, cluster: RedisCluster, node: Any, commands: list[tuple[Any, ...]]
                  ) -> list[Any]:
        """Commands pipelined on ``node``'s held connection: one write, then every reply in
        order, an error reply in its command's place (the connection stays in step)."""
        conn = self._held_for(cluster, node)
        conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _command in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
        return replies

    def get_object(self, keys: Sequence[RemoteKey]) -> GetResult:
        """Pages of one object (one hash slot) in one ``MGET`` on its master's held
        connection, never exclusive: a readahead (``docs/ramster.md``, "Readahead").  Each
        page checked as :meth:`get_each` checks it; an ACL refusal refuses the whole call."""
        tag = keys[0].object_tag()
        if any(key.object_tag() != tag for key in keys):
            raise ValueError("get_object: the keys are not one object's")
        names = [page_name(tag, key.index) for key in keys]
        result = GetResult()
        with self._lock:
            with self._calling(f"get of {len(keys)} page(s) of {tag} failed"):
                cluster = self._cluster()
                node = cluster.get_node_from_key(tag)
                try:
                    values = self._command(cluster, node, "MGET", *names)
                except redis.ConnectionError:  # closed while idle: once more, on a new one
                    self._drop_held()
                    values = self._command(cluster, node, "MGET", *names)
            self._reachable = True
            if not isinstance(values, list) or len(values) != len(names):
                raise self._failed(f"MGET of {len(names)} page(s) on {node.name}",
                                   ValueError(f"a reply of {type(values).__name__}"))
            for key, name, untrusted_value in zip(keys, names, values):
                self._take(key, name, untrusted_value, False, result)
        return result

    def get_many(self, keys: Sequence[RemoteKey], *, exclusive: bool) -> GetResult:
        """Fetch pages, one pipeline per master (GET, or GETDEL for exclusive gets); as
        :meth:`get_each`."""
        return self.get_each([(key, exclusive) for key in keys])

    def get_each(self, requests: Sequence[tuple[RemoteKey, bool]]) -> GetResult:
        """Fetch distinct pages, each with its own exclusiveness, one pipeline per master
        (GET, or GETDEL for an exclusive get).

        Raises :class:`RamsterUnavailable` when a master's group fails: then none of that
        call's exclusive gets may be assumed to have happened or not, so the caller treats
        the whole call as failed (-EIO), as tmem would.  A get the ACL refuses is in
        ``denied`` (the others are answered).
        """
        result = GetResult()
        with self._lock:
            with self._calling(f"get of {len(requests)} page(s) failed"):
                cluster = self._cluster()
                groups: dict[str, tuple[Any, list[tuple[RemoteKey, str, bool]]]] = {}
                objects: dict[tuple[str, int, Oid], tuple[str, list[Any]]] = {}
                for key, exclusive in requests:
                    found = objects.get((key.owner, key.pool, key.oid))
                    if found is None:  # one object: one slot, found once
                        tag = key.object_tag()
                        node = cluster.get_node_from_key(tag)
                        group = groups.setdefault(node.name, (node, []))[1]
                        found = objects[(key.owner, key.pool, key.oid)] = (tag, group)
                    found[1].append((key, page_name(found[0], key.index), exclusive))
                replies: list[tuple[tuple[RemoteKey, str, bool], Any]] = []
                for node, group in groups.values():
                    commands = [("GETDEL" if exclusive else "GET", name)
                                for _key, name, exclusive in group]
                    try:
                        answers = self._commands(cluster, node, commands)
                    except redis.ConnectionError:  # closed while idle: once more, on a new one
                        self._drop_held()
                        answers = self._commands(cluster, node, commands)
                    replies.extend(zip(group, answers))
                failures = [r for _g, r in replies if isinstance(r, Exception) and
                            not isinstance(r, redis.exceptions.NoPermissionError)]
                if failures:  # a slot moved (a failover): the whole call failed
                    raise failures[0]
            self._reachable = True
            for (key, name, exclusive), untrusted_value in replies:
                if isinstance(untrusted_value, redis.exceptions.NoPermissionError):
                    result.denied[key] = self._refused(untrusted_value)
                else:
                    self._take(key, name, untrusted_value, exclusive, result)
        return result

    def _take(self, key: RemoteKey, name: str, untrusted_value: bytes | None,
              exclusive: bool, result: GetResult) -> None:
        """One fetched value into ``result``: a page, a miss, or a refused record."""
        if untrusted_value is None or exclusive:
            self._forget(name)
        if untrusted_value is None:
            self.counters.misses += 1
            result.missing.append(key)
            return
        try:
            result.pages[key] = decode_named(name.encode(), untrusted_value)
        except RecordError as exc:
            self.counters.refused_records += 1
            log.error("%s (not served)", exc)
            result.refused[key] = exc
            return
        self.counters.fetched += 1

    def flush(self, keys: list[RemoteKey]) -> int:
        """Remove these pages (one DEL per slot); how many the cluster had."""
        return self.delete_names([k.name() for k in keys])

    def object_names(self, owner: str, pool: int, oid: Any) -> list[str]:
        """Every key of one object in the cluster (one slot: SCAN on its master only).

        Used for shared pools, whose pages other nodes put; a node's own pages are known
        locally and flushed by name.
        """
        return self.tag_names(object_tag(owner, pool, oid))

    def tag_names(self, tag: str) -> list[str]:
        """As :meth:`object_names`, for the object whose :func:`.record.object_tag` is
        ``tag`` (a pending flush of an object is kept by its tag)."""
        pattern = tag.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?") \
            .replace("[", "\\[") + ":*"
        with self._lock, self._calling(f"listing {tag} failed"):
            cluster = self._cluster()
            node = cluster.get_node_from_key(tag + ":0")
            conn = cluster.get_redis_connection(node)
            return _text_names(conn.scan_iter(match=pattern, count=1000))

    def may_access(self, owner: str) -> bool:
        """Whether this node's ACL user may touch ``owner``'s keys (a shared pool's grant):
        one EXISTS of a key in that namespace; RamsterUnavailable when the cluster is down."""
        probe = RemoteKey(owner, 0, Oid(0, 0, 0), 0).name()
        try:
            with self._lock, self._calling(f"checking access to {owner} failed"):
                self._cluster().exists(probe)
        except RamsterRefused:
            return False
        return True

    def owner_sizes(self, owner: str) -> dict[str, int]:
        """Every key of ``owner`` in the cluster with its value's length: SCAN of each master
        (a restart's rebuild of the remote index, ``docs/ramster.md``, "Restart"), then
        STRLEN in one pipeline per master.  The keys found are counted as this node's."""
        pattern = key_pattern(owner)  # no glob character: a node id cannot hold one
        found: dict[str, int] = {}
        with self._lock:
            with self._calling(f"listing {pattern} failed"):
                cluster = self._cluster()
                for node in cluster.get_primaries():
                    conn = cluster.get_redis_connection(node)
                    names = _text_names(conn.scan_iter(match=pattern, count=1000))
                    pipe = conn.pipeline(transaction=False)
                    for name in names:
                        pipe.strlen(name)
                    for name, size in zip(names, pipe.execute(raise_on_error=False)):
                        # a key that is not a string (WRONGTYPE) is not a page: size 0, gone
                        found[name] = size if isinstance(size, int) else 0
            self._reachable = True
            for name, size in found.items():
                if size:
                    self._account(name, size)
        return {name: size for name, size in found.items() if size}

    def delete_names(self, names: list[str]) -> int:
        """Remove these keys; how many the cluster had."""
        if not names:
            return 0
        with self._lock:
            with self._calling(f"flush of {len(names)} page(s) failed"):
                removed = int(self._cluster().delete(*names))
            self._reachable = True
            for name in names:
                self._forget(name)
            self.counters.flushed += removed
            return removed

    # -- accounting -------------------------------------------------------------------------------

    def count_refused_record(self) -> None:
        """A record that passed its checks but whose page the caller refused (it does not
        unpack to exactly a page): counted with the records refused here."""
        with self._lock:
            self.counters.refused_records += 1

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


def _text_names(untrusted_names: Iterable[bytes | str]) -> list[str]:
    """Key names from a SCAN as text; one that is not UTF-8 is none of ours (no name this
    project writes is) and is skipped, logged, never parsed."""
    names = []
    for untrusted in untrusted_names:
        if isinstance(untrusted, bytes):
            try:
                untrusted = untrusted.decode()
            except UnicodeDecodeError:
                log.warning("ramster: key %r is not UTF-8: not ours, skipped", untrusted[:80])
                continue
        names.append(untrusted)
    return names
