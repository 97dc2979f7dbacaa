"""A real Redis Cluster for tests: Debian's ``redis-server`` nodes on loopback, made into a
cluster with ``redis-cli --cluster create``, stopped and removed afterwards.  With ``tls``
(:func:`make_tls`) every node listens only on its TLS port, and the cluster bus and
replication run over TLS too (``docs/ramster.md``, "Security").

Each node has its own directory, port and ACL file (ACLs are per node in Redis Cluster: every
node loads the same users).  ``cluster-node-timeout`` is short so that a killed master's
replica takes over within seconds; every wait follows the cluster's own state (``CLUSTER
INFO``, ``ROLE``) with a deadline, never a fixed sleep.  :func:`unavailable_reason` says why a
cluster cannot run here (the tests skip with it, or fail under CI).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from fakes.required import unavailable

SERVER = "redis-server"
CLI = "redis-cli"
OPENSSL = "openssl"
#: A killed master is marked failed after this, and a replica promoted soon after.
NODE_TIMEOUT_MS = 1000
START_TIMEOUT_S = 60.0
FAILOVER_TIMEOUT_S = 60.0
POLL_S = 0.05
#: The cluster bus listens on port + 10000; ports are taken from here so both fit.
PORT_RANGE = (21000, 29000)


#: What a node's ACL user may run, and nothing else (``docs/ramster.md``, "Security"): the
#: commands ``xentmem/guest/backends/ramster`` sends (its pages' reads, writes and deletes,
#: SCAN, WAIT, PING) and what redis-py's cluster client sends (CLUSTER SLOTS and COMMAND to
#: learn the topology and the key positions, ASKING while a slot migrates).  Not categories:
#: @read, @write and @keyspace hold commands without keys that no ``~pattern`` restricts
#: (FLUSHALL, FLUSHDB, KEYS, RANDOMKEY, FUNCTION LOAD/DELETE/FLUSH/RESTORE).
NODE_COMMANDS = "+get +getdel +set +mset +mget +del +exists +strlen +scan +wait +ping " \
                "+cluster|slots +command +asking"


#: The harness's own user: it makes the cluster (``redis-cli --cluster create``), replicas
#: authenticate to their masters as it (``masteruser``), and the tests look at and damage
#: values through it.  The ``default`` user is off, as ``docs/ramster.md`` ("Security") asks
#: of a deployment: a client that does not authenticate gets nothing.
ADMIN_USER = "xentmem-admin"
ADMIN_PASSWORD = "xentmem-admin-test-password"


def node_acl(key_patterns: list[str], password: str) -> str:
    """The ACL rules of one node's user: only these key patterns."""
    keys = " ".join(f"~{p}" for p in key_patterns)
    return f"on >{password} resetkeys {keys} -@all {NODE_COMMANDS}"


def unavailable_reason(*, tls: bool = False) -> str | None:
    for tool in (SERVER, CLI, *((OPENSSL,) if tls else ())):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install redis-server redis-tools openssl)"
    return None


@dataclass(frozen=True)
class TlsFiles:
    """A private CA and one certificate for every node (all on 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True,
                   timeout=START_TIMEOUT_S)


def make_tls(directory: Path, name: str = "xentmem test CA") -> TlsFiles:
    """A new CA called ``name`` in ``directory`` and a node certificate it signed, valid for
    127.0.0.1 and localhost (the addresses the nodes announce, which a client verifies)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, request = directory / "node.crt", directory / "node.key", directory / "node.csr"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", "-new", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
             "-subj", f"/CN={name}")
    _openssl("req", "-new", *ec, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1")
    extensions = directory / "node.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                          "basicConstraints=CA:FALSE\n"
                          "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extensions)
    return TlsFiles(ca=ca, cert=cert, key=key)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int) -> list[int]:
    """``count`` ports from ``start`` on whose cluster-bus port (+10000) is free too."""
    found: list[int] = []
    port = start
    while len(found) < count:
        if port >= PORT_RANGE[1]:
            raise RuntimeError("no free loopback ports for a Redis Cluster")
        if _port_free(port) and _port_free(port + 10000):
            found.append(port)
        port += 1
    return found


@dataclass
class Node:
    port: int
    directory: Path
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class RedisClusterFixture:
    """``masters`` masters, each with ``replicas`` replicas; ``users`` become ACL lines
    (``name -> rules`` after ``user name``) beside ``user default off`` and the harness's
    own :data:`ADMIN_USER` (:meth:`admin`)."""

    masters: int = 3
    replicas: int = 1
    users: dict[str, str] = field(default_factory=dict)
    base: Path | None = None
    #: TLS only: no plain port, and the cluster bus and replication over TLS too.
    tls: TlsFiles | None = None
    nodes: list[Node] = field(default_factory=list)
    _owned_dir: bool = False

    def start(self) -> RedisClusterFixture:
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="xentmem-redis-"))
            self._owned_dir = True
        start = PORT_RANGE[0] + (hash(str(self.base)) % 4000)
        ports = free_ports(self.masters * (1 + self.replicas), start)
        acl = self.base / "users.acl"
        lines = ["user default off", f"user {ADMIN_USER} on >{ADMIN_PASSWORD} ~* &* +@all"]
        lines += [f"user {name} {rules}" for name, rules in self.users.items()]
        acl.write_text("\n".join(lines) + "\n")
        for port in ports:
            directory = self.base / str(port)
            directory.mkdir()
            self.nodes.append(Node(port, directory))
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self._wait_pong(node)
            subprocess.run(
                [CLI, *self.cli_tls(), "--user", ADMIN_USER, "--cluster", "create",
                 *(n.address for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                env={**os.environ, "REDISCLI_AUTH": ADMIN_PASSWORD})
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def cli_tls(self) -> list[str]:
        """``redis-cli``'s options to reach the nodes."""
        return [] if self.tls is None else ["--tls", "--cacert", str(self.tls.ca)]

    def _listen(self, node: Node) -> list[str]:
        """The port options: the plain port, or only the TLS port (clients need no
        certificate of their own: their ACL user and password authenticate them)."""
        if self.tls is None:
            return ["--port", str(node.port)]
        return ["--port", "0", "--tls-port", str(node.port),
                "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no",
                "--tls-cluster", "yes", "--tls-replication", "yes"]

    def _spawn(self, node: Node) -> None:
        assert self.base is not None
        node.process = subprocess.Popen(
            [SERVER, *self._listen(node), "--bind", "127.0.0.1",
             "--dir", str(node.directory), "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--aclfile", str(self.base / "users.acl"),
             "--masteruser", ADMIN_USER, "--masterauth", ADMIN_PASSWORD,
             "--maxmemory-policy", "volatile-lru",
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--logfile", str(node.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client_tls(self) -> dict[str, object]:
        """redis-py's options to reach the nodes."""
        return {} if self.tls is None else {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}

    def admin(self) -> dict[str, object]:
        """redis-py's options to reach the nodes as the harness's own user."""
        return {"username": ADMIN_USER, "password": ADMIN_PASSWORD, **self.client_tls()}

    def admin_password_file(self) -> Path:
        """A file holding :data:`ADMIN_PASSWORD` (a ``ramster_password_file``)."""
        assert self.base is not None
        path = self.base / "admin.password"
        path.write_text(f"{ADMIN_PASSWORD}\n")
        return path

    def admin_cluster(self) -> redis.cluster.RedisCluster:
        """A cluster client as the harness's own user (the caller closes it)."""
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port,
                                          **self.admin())  # type: ignore[arg-type]

    def admin_node(self, node: Node) -> redis.Redis:
        """A client of one node as the harness's own user (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=2.0,
                           socket_connect_timeout=2.0, **self.admin())  # type: ignore[arg-type]

    _client = admin_node

    def _wait_pong(self, node: Node) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(redis.RedisError), self._client(node) as client:
                if client.ping():
                    return
            if node.process is not None and node.process.poll() is not None:
                log = (node.directory / "redis.log")
                raise RuntimeError(f"redis-server on {node.port} exited: "
                                   f"{log.read_text()[-2000:] if log.exists() else ''}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on {node.port} did not answer PING")
            time.sleep(POLL_S)

    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def wait_ok(self, timeout_s: float = FAILOVER_TIMEOUT_S) -> None:
        """Until every live node says ``cluster_state:ok`` with all 16384 slots served."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = []
            for node in self.live_nodes():
                with contextlib.suppress(redis.RedisError), self._client(node) as client:
                    info = client.cluster("info")
                    states.append(info.get("cluster_state") == "ok"
                                  and int(info.get("cluster_slots_ok", 0)) == 16384)
                    continue
                states.append(False)
            if states and all(states) and self._replicas_linked():
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(POLL_S)

    def _replicas_linked(self) -> bool:
        """Every live replica's link to its master is up (else WAIT would wait for it)."""
        for node in self.live_nodes():
            with contextlib.suppress(redis.RedisError), self._client(node) as client:
                info = client.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
                continue
            return False
        return True

    def masters_now(self) -> list[Node]:
        found = []
        for node in self.live_nodes():
            with contextlib.suppress(redis.RedisError), self._client(node) as client:
                if client.execute_command("ROLE")[0] in (b"master", "master"):
                    found.append(node)
        return found

    def wait_served(self, key: str, timeout_s: float = FAILOVER_TIMEOUT_S) -> Node:
        """Until a live master serves ``key``'s slot and the cluster is ok (after a kill:
        the failover is done); that master."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(LookupError):
                node = self.master_of(key)
                if node in self.live_nodes():
                    self.wait_ok(max(deadline - time.monotonic(), POLL_S))
                    return node
            if time.monotonic() > deadline:
                raise TimeoutError(f"no live master took over {key!r}'s slot")
            time.sleep(POLL_S)

    def master_of(self, key: str) -> Node:
        """The node that serves ``key``'s slot now (as the live nodes see it)."""
        for node in self.live_nodes():
            with contextlib.suppress(redis.RedisError), self._client(node) as client:
                slot = client.cluster("keyslot", key)
                for start, end, primary, *_replicas in client.cluster("slots"):
                    if start <= slot <= end:  # primary: [host, port, node id, ...]
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no live master serves {key!r}")

    def kill(self, node: Node) -> None:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10)

    def kill_all(self) -> None:
        for node in self.nodes:
            self.kill(node)

    def restart(self, node: Node) -> None:
        """Start a killed node again on its own directory (it rejoins from its nodes.conf)."""
        self._spawn(node)
        self._wait_pong(node)

    def restart_all(self) -> None:
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                self._spawn(node)
        for node in self.nodes:
            self._wait_pong(node)
        self.wait_ok()

    def seeds(self) -> str:
        """The ``ramster_nodes`` value: every node's address."""
        return ",".join(n.address for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node)
        if self._owned_dir and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)



@contextlib.contextmanager
def running(users: dict[str, str], tls: TlsFiles | None = None
            ) -> Iterator[RedisClusterFixture]:
    """A started cluster with these ACL users (over TLS only with ``tls``), stopped after; a
    missing redis-server (or openssl) skips, or fails under ``CI=true`` (:mod:`fakes.required`)."""
    reason = unavailable_reason(tls=tls is not None)
    if reason is not None:
        unavailable("REDIS", "a Redis Cluster (redis-server, redis-cli, openssl)", reason)
    made = RedisClusterFixture(users=users, tls=tls).start()
    try:
        yield made
    finally:
        made.stop()
