"""RAMster's module params of ``zcache``, declared once (``docs/ramster.md``, "Params").

The password is never a param: ``ramster_password_file`` names a file that holds it, so it
appears on no command line, in no ``params list`` and in no log.
"""

from __future__ import annotations

from xentmem.params import Param, ParamSet
from xentmem.roots import Roots

from .record import check_node_id

DEFAULT_TIMEOUT_MS = 2000
DEFAULT_PORT = 6379
EPHEMERAL_POLICIES = ("evict", "move")


def parse_nodes(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (a bare host means port 6379; an IPv6 address in brackets,
    ``[::1]:7000``); at least one, no duplicates."""
    nodes: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, port_text = _split_node(item)
        if not host or not host.isascii() or any(c.isspace() for c in host):
            raise ValueError(f"{item!r} is not host:port")
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"{item!r}: the port is not 1-65535")
        if (host, int(port_text)) in nodes:
            raise ValueError(f"{item!r} is listed twice")
        nodes.append((host, int(port_text)))
    return tuple(nodes)


def _split_node(item: str) -> tuple[str, str]:
    """One node's host and port text; a colon beyond the port's is an IPv6 address's, which
    must be in brackets (else ``fe80::1`` would read as host ``fe80:`` and port 1)."""
    if item.startswith("["):
        host, closed, rest = item[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")) or "[" in host:
            raise ValueError(f"{item!r} is not [address]:port")
        return host, rest[1:] if rest else str(DEFAULT_PORT)
    if item.count(":") > 1:
        raise ValueError(f"{item!r}: an IPv6 address goes in brackets, [address]:port")
    host, sep, port_text = item.partition(":")
    return host, port_text if sep else str(DEFAULT_PORT)


def _nodes_text(text: str) -> str:
    """The param's value stays text (as given, once it parses)."""
    parse_nodes(text)
    return text.strip()


def _node_id_text(text: str) -> str:
    return check_node_id(text.strip()) if text.strip() else ""


RAMSTER_PARAMS = ParamSet(
    Param("ramster", bool, False,
          "move pages to a Redis Cluster when the local store runs short (RAMster)"),
    Param("ramster_nodes", str, "",
          "seed nodes of the cluster, host:port,... (required with ramster=1)",
          parse=_nodes_text, accepts="host:port,... ([address]:port for IPv6; ports 1-65535)"),
    Param("ramster_node_id", str, "",
          "this node's name in the cluster's keys (default: the domain's UUID on Xen, "
          "else /etc/machine-id)", parse=_node_id_text,
          accepts="letters, digits, '.', '_', '-' (at most 64)"),
    Param("ramster_user", str, "", "the Redis ACL user (empty: the default user)"),
    Param("ramster_password_file", str, "",
          "a file holding the ACL user's password (never the password itself)"),
    Param("ramster_tls", bool, False, "connect with TLS"),
    Param("ramster_ca_file", str, "", "CA certificates for ramster_tls (empty: the system's)"),
    Param("ramster_replicas", int, 1,
          "replicas a persistent page reaches (Redis WAIT) before its move is acknowledged",
          min=0, max=16),
    Param("ramster_timeout_ms", int, DEFAULT_TIMEOUT_MS,
          "how long one cluster operation may take before it fails with -EIO",
          min=10, max=600_000, writable=True),
    Param("ramster_ephemeral", str, "evict",
          "ephemeral pages when the local store runs short: evicted, or moved with a TTL",
          choices=EPHEMERAL_POLICIES, writable=True),
    Param("ramster_ephemeral_ttl_s", int, 600,
          "the TTL of an ephemeral page moved to the cluster (Redis may evict it sooner)",
          min=1, max=86_400 * 30, writable=True),
)


def resolve_node_id(configured: str, roots: Roots) -> str:
    """``ramster_node_id``, or the domain's UUID (``/sys/hypervisor/uuid`` in a Xen guest),
    or ``/etc/machine-id``; a node id either way (:func:`.record.check_node_id`)."""
    if configured:
        return check_node_id(configured)
    for path in (roots.sys / "hypervisor" / "uuid", roots.under("/etc/machine-id")):
        try:
            untrusted = path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if untrusted and untrusted != "00000000-0000-0000-0000-000000000000":
            try:
                return check_node_id(untrusted)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
    raise ValueError("ramster_node_id is not set and neither /sys/hypervisor/uuid nor "
                     "/etc/machine-id names this node")
