"""The xenstore database: node tree, transactions, quotas and the changes that fire watches.

No sockets: the server (:mod:`xentmem.mock_xenstored.server`) serialises every request.
The rules follow Debian's C xenstored 4.17 as measured, oxenstored's where :class:`Limits`
says so; docs/mock-xenstored.md lists them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from xentmem.errors import XenStoreError
from xentmem.mock_xenstored.perms import Access, Caller, Perms, perm_for
from xentmem.mock_xenstored.wire import EQUOTA, XENSTORE_REL_PATH_MAX

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

#: Bytes of C xenstored's TDB record header (``struct xs_tdb_record_hdr``, padded).
RECORD_HEADER_BYTES = 24
#: Bytes per permission entry in that record (``struct xs_permissions``).
RECORD_PERM_BYTES = 8


class StoreError(XenStoreError):
    """A request refused with a xenstore error name (``EACCES``, ``ENOENT``, ``EQUOTA``...)."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name


def home_path(domid: int) -> str:
    """Where a domain's relative paths resolve: ``/local/domain/<domid>``."""
    return f"/local/domain/{domid}"


@dataclass(frozen=True)
class Limits:
    """What a daemon refuses, and with which error.  ``None`` switches a limit off.

    The numbers are the daemons' configured values; the off-by-one in the watch and
    transaction quotas (129 watches, 11 transactions pass with 128 / 10) is theirs too.
    """

    flavour: str = "c-xenstored"
    #: Longest path below ``/local/domain/<id>/`` (C: 2048; oxenstored: 1024).
    max_path_bytes: int = XENSTORE_REL_PATH_MAX
    #: Largest value anyone may write (oxenstored's ``quota-maxsize``: 2048; C: none).
    max_value_bytes: int | None = None
    #: Largest node record an unprivileged domain may write (C's ``-S``: 2048).
    max_node_record_bytes: int | None = 2048
    #: Nodes an unprivileged domain may own (C ``-E`` / oxenstored ``quota-maxentity``).
    max_nodes_per_domain: int | None = 1000
    #: Permission entries an unprivileged domain may set on one node (C ``-A``: 5).
    max_perms_per_node: int | None = 5
    #: Watches per unprivileged connection (C ``-W``: 128; oxenstored: 100).
    max_watches_per_domain: int | None = 128
    #: Open transactions per unprivileged connection (both: 10).
    max_transactions_per_domain: int | None = 10
    #: Error for a node, record or transaction quota (C: ENOSPC; oxenstored: EQUOTA).
    quota_error: str = "ENOSPC"
    #: Error for the watch quota (C: E2BIG; oxenstored: EQUOTA).
    watch_quota_error: str = "E2BIG"
    #: A request whose header announces more than 4096 bytes: ``"drop"`` the connection
    #: (C) or answer ``"E2BIG"`` and go on (oxenstored).
    oversized: str = "drop"

    def __post_init__(self) -> None:
        if self.oversized not in ("drop", "E2BIG"):
            raise ValueError(f"oversized must be 'drop' or 'E2BIG', not {self.oversized!r}")

    @classmethod
    def c_xenstored(cls) -> Limits:
        """Debian's C xenstored 4.17 with its default quotas."""
        return cls()

    @classmethod
    def oxenstored(cls) -> Limits:
        """Debian's oxenstored 4.17 with ``/etc/xen/oxenstored.conf`` defaults."""
        return cls(
            flavour="oxenstored",
            max_path_bytes=1024,
            max_value_bytes=2048,
            max_node_record_bytes=None,
            max_nodes_per_domain=1000,
            max_perms_per_node=None,
            max_watches_per_domain=100,
            max_transactions_per_domain=10,
            quota_error=EQUOTA,
            watch_quota_error=EQUOTA,
            oversized="E2BIG",
        )


def parent_of(path: str) -> str:
    slash = path.rfind("/")
    return "/" if slash <= 0 else path[:slash]


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def is_under(path: str, ancestor: str) -> bool:
    """``path`` is ``ancestor`` or below it (xenstored's ``is_child``)."""
    if ancestor == "/":
        return path.startswith("/")
    return path == ancestor or path.startswith(ancestor + "/")


class Node(NamedTuple):
    """One node: value, permissions, child names in creation order, and its generation.

    Immutable, so the store and a transaction may share it; every write makes a copy with
    one field changed (``_replace``, which costs a third of ``dataclasses.replace``).
    """

    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()
    generation: int = 0

    def record_bytes(self) -> int:
        """Size of C xenstored's record for this node, which its ``-S`` quota limits."""
        child_bytes = sum(map(len, self.children)) + len(self.children)  # each NUL-ended
        return (
            RECORD_HEADER_BYTES
            + RECORD_PERM_BYTES * len(self.perms.entries)
            + len(self.value)
            + child_bytes
        )


class Change(NamedTuple):
    """A change that fires watches: ``path`` changed (``exact``: only watches on exactly
    that path see it, as for the children of a removed subtree).  ``readable_via`` holds the
    permission lists any one of which, if readable, lets a domain see the event: the node's
    (old and new) and its parent's, as C xenstored's ``watch_permitted`` checks them.
    ``special`` is set for ``@introduceDomain``/``@releaseDomain``, which only the privileged
    (or those the special node's permissions let read) see.  A NamedTuple, like
    :class:`Node`: one is made per node a request changes.
    """

    path: str
    exact: bool = False
    readable_via: tuple[Perms, ...] = ()
    special: bool = False

    def visible_to(self, caller: Caller) -> bool:
        if caller.privileged:
            return True
        return any(Access.READ in perm_for(caller, p) for p in self.readable_via)

    def fires(self, watch_path: str) -> bool:
        """Whether a watch on ``watch_path`` (absolute or ``@...``) sees this change."""
        if self.exact or self.special or watch_path.startswith("@"):
            return watch_path == self.path
        return is_under(self.path, watch_path)


class _View:
    """Node-level access every operation is written against; the live store or a
    transaction's private copy implement it."""

    limits: Limits

    def get(self, path: str) -> Node | None:
        raise NotImplementedError

    def put(self, path: str, node: Node) -> None:
        raise NotImplementedError

    def remove(self, path: str) -> None:
        raise NotImplementedError

    def owned_count(self, domid: int) -> int:
        raise NotImplementedError

    def note(self, path: str, *, exact: bool = False, old_perms: Perms | None = None) -> None:
        """Record that ``path`` changed (called while the node, if any, is still there)."""
        raise NotImplementedError

    # -- the operations ----------------------------------------------------------------
    #
    # Which nodes an operation looks at (``get``) matters beyond its answer: a transaction
    # remembers each one and fails its commit if any of them changed.

    def _nearest_existing(self, path: str) -> Node:
        while path != "/":
            path = parent_of(path)
            node = self.get(path)
            if node is not None:
                return node
        raise StoreError("EIO", "the root node is missing")  # never: "/" cannot be removed

    def get_node(self, caller: Caller, path: str, want: Access) -> Node:
        """The node if ``caller`` has ``want`` on it; else the error that leaks nothing:
        ``ENOENT`` only if the nearest existing ancestor grants ``want`` (C xenstored's
        ``errno_from_parents``)."""
        node = self.get(path)
        if node is not None:
            if want in perm_for(caller, node.perms):  # ``in``: a subset, and cheaper than &
                return node
            error = "EACCES"
        else:
            error = "ENOENT"
        if path != "/" and not perm_for(caller, self._nearest_existing(path).perms) & want:
            error = "EACCES"
        raise StoreError(error, path)

    def _writable_or_missing(self, caller: Caller, path: str) -> Node | None:
        """For WRITE and MKDIR: the node if ``caller`` may write it, None if it is missing
        and may be created (the nearest existing ancestor grants write, so
        :meth:`get_node` would say ``ENOENT``), else :meth:`get_node`'s error.  Creating, the
        common case, raises and catches nothing."""
        if (
            self.get(path) is None
            and path != "/"
            and Access.WRITE in perm_for(caller, self._nearest_existing(path).perms)
        ):
            return None
        return self.get_node(caller, path, Access.WRITE)

    def read(self, caller: Caller, path: str) -> bytes:
        return self.get_node(caller, path, Access.READ).value

    def directory(self, caller: Caller, path: str) -> list[str]:
        return list(self.get_node(caller, path, Access.READ).children)

    def get_perms(self, caller: Caller, path: str) -> Perms:
        return self.get_node(caller, path, Access.READ).perms

    def write(self, caller: Caller, path: str, value: bytes) -> None:
        limit = self.limits.max_value_bytes
        if limit is not None and len(value) > limit:
            raise StoreError("E2BIG", f"value of {len(value)} bytes, limit {limit}")
        node = self._writable_or_missing(caller, path)
        if node is None:
            self._create(caller, path, value)
            return
        updated = node._replace(value=value)
        self._check_record(caller, updated)
        self.put(path, updated)
        self.note(path)

    def mkdir(self, caller: Caller, path: str) -> None:
        if self._writable_or_missing(caller, path) is None:
            self._create(caller, path, b"")

    def rm(self, caller: Caller, path: str) -> None:
        try:
            node = self.get_node(caller, path, Access.WRITE)
        except StoreError as e:
            if e.name == "ENOENT" and self.get(parent_of(path)) is not None:
                return  # removing what is not there is fine if the parent exists
            raise
        if path == "/":
            raise StoreError("EINVAL", "cannot remove the root")
        below = self._subtree_postorder(path, node)
        for below_path in below:
            self.note(below_path, exact=True)
        self.note(path)
        for below_path in below:
            self.remove(below_path)
        self.remove(path)
        parent_path = parent_of(path)
        parent = self.get(parent_path)
        if parent is not None:
            name = basename(path)
            kids = tuple(c for c in parent.children if c != name)
            self.put(parent_path, parent._replace(children=kids))

    def set_perms(self, caller: Caller, path: str, perms: Perms) -> None:
        limit = self.limits.max_perms_per_node
        if not caller.privileged and limit is not None and len(perms.entries) > limit:
            raise StoreError(self.limits.quota_error, f"more than {limit} permissions")
        node = self.get_node(caller, path, Access.WRITE | Access.OWNER)
        if not caller.privileged and perms.owner != node.perms.owner:
            raise StoreError("EPERM", "only dom0 may change a node's owner")
        updated = node._replace(perms=perms)
        self._check_record(caller, updated)
        self.put(path, updated)
        self.note(path, old_perms=node.perms)

    # -- helpers -----------------------------------------------------------------------

    def _subtree_postorder(self, path: str, node: Node) -> list[str]:
        """Every path below ``path`` (not ``path`` itself), children before parents."""
        out: list[str] = []
        stack: list[tuple[str, Node, bool]] = [(path, node, False)]
        while stack:
            p, n, expanded = stack.pop()
            if expanded:
                if p != path:
                    out.append(p)
                continue
            stack.append((p, n, True))
            for name in reversed(n.children):
                child_path = join(p, name)
                child = self.get(child_path)
                if child is not None:
                    stack.append((child_path, child, False))
        return out

    def _check_record(self, caller: Caller, node: Node) -> None:
        limit = self.limits.max_node_record_bytes
        if not caller.privileged and limit is not None and node.record_bytes() >= limit:
            raise StoreError(self.limits.quota_error, f"node record of {node.record_bytes()}")

    def _check_node_quota(self, caller: Caller, new_nodes: int) -> None:
        limit = self.limits.max_nodes_per_domain
        if caller.privileged or limit is None:
            return
        if self.owned_count(caller.domid) + new_nodes > limit:
            raise StoreError(self.limits.quota_error, f"domain {caller.domid} owns {limit} nodes")

    def _create(self, caller: Caller, path: str, value: bytes) -> None:
        """Create ``path`` and any missing ancestors; all checks pass before anything
        changes (the caller already checked write access on the nearest ancestor)."""
        missing = [path]
        parent_path = parent_of(path)
        parent = self.get(parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = parent_of(parent_path)
            parent = self.get(parent_path)
        updates: list[tuple[str, Node]] = []
        for new_path in reversed(missing):
            perms = parent.perms  # inherited; a domain owns what it creates
            if not caller.privileged and perms.owner != caller.domid:
                perms = perms.with_owner(caller.domid)
            node = Node(value if new_path == path else b"", perms)
            parent = parent._replace(children=(*parent.children, basename(new_path)))
            updates.append((parent_path, parent))
            parent_path, parent = new_path, node
        updates.append((path, parent))
        self._check_node_quota(caller, len(missing))
        for _, node in updates:
            self._check_record(caller, node)
        for p, node in updates:
            self.put(p, node)
        self.note(path)


class Store(_View):
    """The live database.  Not thread-safe: the server serialises every request."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits.c_xenstored()
        self._nodes: dict[str, Node] = {}
        self._owned: Counter[int] = Counter()
        self._generation = 0
        self._changes: list[Change] = []
        self.special_perms: dict[str, Perms] = {p: Perms.of(0) for p in SPECIAL_PATHS}
        root_perms = Perms.of(0)
        # What C xenstored's setup_structure() creates.
        self.put("/", Node(b"", root_perms, ("tool",)))
        self.put("/tool", Node(b"", root_perms, ("xenstored",)))
        self.put("/tool/xenstored", Node(b"", root_perms))

    # -- _View primitives --------------------------------------------------------------

    def get(self, path: str) -> Node | None:
        return self._nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        old = self._nodes.get(path)
        if old is not None:
            self._owned[old.perms.owner] -= 1
        self._generation += 1
        # Stamped with the next generation (made directly: ``_replace`` is a Python call).
        self._nodes[path] = Node(node.value, node.perms, node.children, self._generation)
        self._owned[node.perms.owner] += 1

    def remove(self, path: str) -> None:
        old = self._nodes.pop(path, None)
        if old is not None:
            self._owned[old.perms.owner] -= 1

    def owned_count(self, domid: int) -> int:
        return self._owned[domid]

    def note(
        self,
        path: str,
        *,
        exact: bool = False,
        old_perms: Perms | None = None,
        gone: Node | None = None,
    ) -> None:
        """Record a change, judging who may see it by the store as it is now (``gone``: the
        node as it was, if a transaction's commit has just removed it)."""
        via: list[Perms] = []
        if old_perms is not None:
            via.append(old_perms)
        node = self._nodes.get(path) or gone
        if node is not None:
            via.append(node.perms)
        if path != "/":
            parent = self._nodes.get(parent_of(path))
            if parent is not None:
                via.append(parent.perms)
        self._changes.append(Change(path, exact, tuple(via)))

    # -- for the server ----------------------------------------------------------------

    def take_changes(self) -> list[Change]:
        """The changes since the last call, in order (the server turns them into events)."""
        changes, self._changes = self._changes, []
        return changes

    def special_change(self, path: str) -> Change:
        return Change(path, True, (self.special_perms[path],), special=True)

    def set_special_perms(self, caller: Caller, path: str, perms: Perms) -> None:
        """SET_PERMS on ``@introduceDomain``/``@releaseDomain`` (who may watch them)."""
        if path not in self.special_perms:
            raise StoreError("EINVAL", f"{path!r} is not a special path")
        have = perm_for(caller, self.special_perms[path])
        if have & (Access.WRITE | Access.OWNER) != Access.WRITE | Access.OWNER:
            raise StoreError("EACCES", path)
        self.special_perms[path] = perms

    def remove_domain_nodes(self, domid: int) -> None:
        """Delete every node ``domid`` owns, with its subtree, as C xenstored does when a
        domain is released or dies (XSA-419); watches fire as for a removal by dom0."""
        dom0 = Caller.dom0()
        for path in sorted(p for p, n in self._nodes.items() if n.perms.owner == domid):
            if path != "/" and path in self._nodes:
                self.rm(dom0, path)

    def begin(self) -> Transaction:
        return Transaction(self)

    def paths(self) -> Iterable[str]:
        """Every path, sorted (for dumps and tests)."""
        return sorted(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)


class Transaction(_View):
    """A transaction: a private copy of each node it touches over the live store.

    ``_seen`` holds the generation (or absence, ``None``) each node had when the transaction
    first read it; :meth:`commit` refuses with ``EAGAIN`` if any of them moved since.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.limits = store.limits
        self._overlay: dict[str, Node | None] = {}
        self._seen: dict[str, int | None] = {}
        self._owned_delta: Counter[int] = Counter()
        self._queued: list[tuple[str, bool, Perms | None]] = []
        self.closed = False

    def get(self, path: str) -> Node | None:
        if path in self._overlay:
            return self._overlay[path]
        node = self.store.get(path)
        if path not in self._seen:
            self._seen[path] = node.generation if node is not None else None
        return node

    def put(self, path: str, node: Node) -> None:
        old = self.get(path)
        if old is not None:
            self._owned_delta[old.perms.owner] -= 1
        self._owned_delta[node.perms.owner] += 1
        self._overlay[path] = node

    def remove(self, path: str) -> None:
        old = self.get(path)
        if old is not None:
            self._owned_delta[old.perms.owner] -= 1
        self._overlay[path] = None

    def owned_count(self, domid: int) -> int:
        return self.store.owned_count(domid) + self._owned_delta[domid]

    def note(self, path: str, *, exact: bool = False, old_perms: Perms | None = None) -> None:
        self._queued.append((path, exact, old_perms))

    def commit(self) -> None:
        """Apply the transaction or raise ``EAGAIN`` (nothing applied).  Its changes then
        come out of the store's :meth:`Store.take_changes`, one per path, as C does."""
        self.closed = True
        for path, generation in self._seen.items():
            node = self.store.get(path)
            if (node.generation if node is not None else None) != generation:
                raise StoreError("EAGAIN", f"{path} changed since the transaction read it")
        before = {p: self.store.get(p) for p in self._overlay}
        for path, node in self._overlay.items():
            if node is None:
                self.store.remove(path)
            else:
                self.store.put(path, node)
        done: set[tuple[str, bool]] = set()
        for path, exact, old_perms in self._queued:
            if (path, exact) not in done:
                done.add((path, exact))
                self.store.note(path, exact=exact, old_perms=old_perms, gone=before.get(path))

    def abort(self) -> None:
        self.closed = True
