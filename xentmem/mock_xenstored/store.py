"""The xenstore database: node tree, permissions, transactions and quotas.  No sockets.

This is the state our xenstore server (:mod:`xentmem.mock_xenstored.server`) serves.  Its rules are
the ones Debian's Xen 4.17 daemons were *measured* to follow (see
``../shared/reference/xenstored.md`` and ``tests/xenstore/``, which run the same scenarios
against C xenstored, oxenstored and this module), and where the two daemons differ it
follows C xenstored unless :class:`Limits` says otherwise:

* **Permissions.**  A node's permissions are a list of ``<letter><domid>`` entries with
  letters ``n`` (none), ``r`` (read), ``w`` (write), ``b`` (both).  The first entry names the
  *owner*, who may do everything, and its letter is what every domain not listed gets.  A
  privileged caller (dom0) may do everything; a caller with a *target* (``SET_TARGET``) acts
  as its target too.  Only the owner or dom0 may change permissions and only dom0 may change
  the owner (``EPERM``).  A new node copies its parent's permissions; when an unprivileged
  domain creates it, that domain becomes the owner.
* **Errors that leak nothing.**  A missing node is ``ENOENT`` only if the nearest existing
  ancestor grants the caller the access it asked for; otherwise ``EACCES``, exactly like
  C xenstored's ``errno_from_parents``.
* **Transactions** keep their own copy of every node they touch and remember the generation
  each node had when the transaction first looked at it (C xenstored's rule).  Commit fails
  with ``EAGAIN`` if any of those nodes changed since, including a parent whose child list
  grew.
* **Quotas** (unprivileged callers only, as in C): nodes per domain, size of one node's
  record, permissions per node; oxenstored's value-size limit applies to everyone.

Every input that came from a peer is ``untrusted_...`` until :func:`canonical_path`,
:func:`parse_perms` or the domid parsers have checked it; a refused request raises
:class:`StoreError` and changes nothing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntFlag

from xentmem.errors import XenStoreError
from xentmem.mock_xenstored.wire import EQUOTA, XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

#: Domain ids are 16 bits in Xen; DOMID_FIRST_RESERVED (0x7FF0) and above are not domains.
DOMID_FIRST_RESERVED = 0x7FF0

_VALID_PATH_CHARS = re.compile(r"^[A-Za-z0-9\-/_@]*$")
#: Every path :func:`check_path` accepts on its character and slash rules alone matches
#: this; it lets a well-formed path pass with one regex scan.
_WELL_FORMED_PATH = re.compile(r"(?:/[A-Za-z0-9_@-]+)+|/")
_LOCAL_DOMAIN_PREFIX = re.compile(r"^/local/domain/[0-9]{1,5}/")
_UNSIGNED = re.compile(r"^[0-9]{1,10}$")

#: Bytes of C xenstored's TDB record header (``struct xs_tdb_record_hdr``, padded).
RECORD_HEADER_BYTES = 24
#: Bytes per permission entry in that record (``struct xs_permissions``).
RECORD_PERM_BYTES = 8


class StoreError(XenStoreError):
    """A request refused with a xenstore error name (``EACCES``, ``ENOENT``, ``EQUOTA``...)."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name


class Access(IntFlag):
    """What a permission entry grants; ``OWNER`` is never written, only computed."""

    NONE = 0
    READ = 1
    WRITE = 2
    BOTH = 3
    OWNER = 4


_LETTER_ACCESS = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE, "b": Access.BOTH}
_ACCESS_LETTER = {v: k for k, v in _LETTER_ACCESS.items()}

# The same bits as plain ints, for the checks every request makes: ``&``/``|`` on an IntFlag
# run Python code (and so does ``int & IntFlag``, through ``IntFlag.__rand__``).
_READ = int(Access.READ)
_WRITE = int(Access.WRITE)
_WRITE_OWNER = int(Access.WRITE | Access.OWNER)
_EVERYTHING = int(Access.BOTH | Access.OWNER)


@dataclass(frozen=True)
class PermEntry:
    """One ``<letter><domid>`` entry."""

    domid: int
    access: Access

    def encode(self) -> bytes:
        return f"{_ACCESS_LETTER[self.access]}{self.domid}".encode("ascii")


@dataclass(frozen=True)
class Perms:
    """A node's permission list; ``entries[0]`` is the owner and the default for others.

    ``owner`` and the private ``_default``/``_others`` are derived from ``entries`` once, as
    plain ints, for the permission check every request makes (:func:`perm_for`).
    """

    entries: tuple[PermEntry, ...]
    owner: int = field(init=False, repr=False, compare=False)
    _default: int = field(init=False, repr=False, compare=False)
    _others: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("a permission list has at least the owner entry")
        first = self.entries[0]
        object.__setattr__(self, "owner", first.domid)
        object.__setattr__(self, "_default", int(first.access))
        others = tuple((e.domid, int(e.access)) for e in self.entries[1:])
        object.__setattr__(self, "_others", others)

    @classmethod
    def of(cls, owner: int, default: Access = Access.NONE) -> Perms:
        """A one-entry list: ``owner`` owns it, everybody else gets ``default``."""
        return cls((PermEntry(owner, default),))

    def with_owner(self, domid: int) -> Perms:
        if domid == self.owner:
            return self  # the same list: a Perms never changes
        first = self.entries[0]
        return Perms((PermEntry(domid, first.access), *self.entries[1:]))

    def encode(self) -> list[bytes]:
        return [e.encode() for e in self.entries]

    def __str__(self) -> str:
        return " ".join(e.encode().decode("ascii") for e in self.entries)


def parse_perm(untrusted_entry: bytes) -> PermEntry:
    """``b"r5"`` -> ``PermEntry(5, READ)``; anything else is ``EINVAL``."""
    try:
        text = untrusted_entry.decode("ascii")
    except UnicodeDecodeError:
        raise StoreError("EINVAL", f"permission {untrusted_entry!r} is not ASCII") from None
    letter, digits = text[:1], text[1:]
    if letter not in _LETTER_ACCESS or not _UNSIGNED.match(digits):
        raise StoreError("EINVAL", f"bad permission {text!r}")
    domid = int(digits)
    if domid >= 1 << 32:
        raise StoreError("EINVAL", f"domid {domid} out of range")
    return PermEntry(domid, _LETTER_ACCESS[letter])


def parse_perms(untrusted_entries: Sequence[bytes]) -> Perms:
    """A whole list; at least one entry."""
    if not untrusted_entries:
        raise StoreError("EINVAL", "no permissions given")
    return Perms(tuple(parse_perm(e) for e in untrusted_entries))


def parse_domid(untrusted: bytes) -> int:
    """A domain id argument: decimal digits below DOMID_FIRST_RESERVED, else ``EINVAL``."""
    try:
        text = untrusted.decode("ascii")
    except UnicodeDecodeError:
        raise StoreError("EINVAL", "domid is not ASCII") from None
    if not _UNSIGNED.match(text) or int(text) >= DOMID_FIRST_RESERVED:
        raise StoreError("EINVAL", f"bad domid {text!r}")
    return int(text)


def parse_unsigned(untrusted: bytes) -> int:
    """An unsigned decimal argument (mfn, event channel, offset), else ``EINVAL``."""
    try:
        text = untrusted.decode("ascii")
    except UnicodeDecodeError:
        raise StoreError("EINVAL", "number is not ASCII") from None
    if not _UNSIGNED.match(text):
        raise StoreError("EINVAL", f"bad number {text!r}")
    return int(text)


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


@dataclass(frozen=True)
class Caller:
    """Who sends a request: a domain, whether it is privileged, and its ``SET_TARGET``."""

    domid: int
    privileged: bool = False
    target: int | None = None

    @classmethod
    def dom0(cls) -> Caller:
        return cls(0, privileged=True)

    @property
    def home(self) -> str:
        return home_path(self.domid)


def perm_for(caller: Caller, perms: Perms) -> Access:
    """What ``caller`` may do on a node with ``perms`` (C xenstored's ``perm_for_conn``)."""
    return Access(_access(caller, perms))


def _access(caller: Caller, perms: Perms) -> int:
    """:func:`perm_for` as a plain int (the store's own checks use this)."""
    if caller.privileged:
        return _EVERYTHING
    owner = perms.owner
    domid, target = caller.domid, caller.target
    if owner in (domid, target):
        return _EVERYTHING
    for entry_domid, access in perms._others:
        if entry_domid in (domid, target):
            return access
    return perms._default


def canonical_path(untrusted_path: bytes, caller: Caller, limits: Limits) -> str:
    """Resolve a relative path under the caller's home and check it; ``EINVAL`` if bad.

    Paths starting with ``@`` are returned unchanged: only WATCH, UNWATCH and SET_PERMS
    accept them, and they check for themselves.
    """
    try:
        path = untrusted_path.decode("ascii")
    except UnicodeDecodeError:
        raise StoreError("EINVAL", "path is not ASCII") from None
    if path.startswith("@"):
        return path
    if not path.startswith("/"):
        path = f"{caller.home}/{path}"
    check_path(path, limits)
    return path


def check_path(path: str, limits: Limits) -> None:
    """C xenstored's ``is_valid_nodename`` with its length rules."""
    if (
        len(path) <= limits.max_path_bytes
        and len(path) <= XENSTORE_ABS_PATH_MAX
        and _WELL_FORMED_PATH.fullmatch(path)
    ):
        return  # passes every rule below (the one slow path: length below the home)
    if not path.startswith("/"):
        raise StoreError("EINVAL", f"{path!r} is not absolute")
    if path != "/" and path.endswith("/"):
        raise StoreError("EINVAL", f"{path!r} ends in /")
    if "//" in path:
        raise StoreError("EINVAL", f"{path!r} holds //")
    if not _VALID_PATH_CHARS.fullmatch(path):  # (match() would let a final "\n" through)
        raise StoreError("EINVAL", f"{path!r} holds a character xenstore refuses")
    if len(path) > XENSTORE_ABS_PATH_MAX:
        raise StoreError("EINVAL", f"path longer than {XENSTORE_ABS_PATH_MAX}")
    local = _LOCAL_DOMAIN_PREFIX.match(path)
    below_home = len(path) - (local.end() if local else 0)
    if below_home > limits.max_path_bytes:
        raise StoreError("EINVAL", f"path longer than {limits.max_path_bytes} below the home")


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


@dataclass(frozen=True)
class Node:
    """One node: value, permissions, child names in creation order, and its generation."""

    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()
    generation: int = 0

    def record_bytes(self) -> int:
        """Size of C xenstored's record for this node, which its ``-S`` quota limits."""
        child_bytes = sum(map(len, self.children)) + len(self.children)
        return (
            RECORD_HEADER_BYTES
            + RECORD_PERM_BYTES * len(self.perms.entries)
            + len(self.value)
            + child_bytes
        )


@dataclass(frozen=True)
class Change:
    """A change that fires watches: ``path`` changed (``exact``: only watches on exactly
    that path see it, as for the children of a removed subtree).  ``readable_via`` holds the
    permission lists any one of which, if readable, lets a domain see the event: the node's
    (old and new) and its parent's, as C xenstored's ``watch_permitted`` checks them.
    ``special`` is set for ``@introduceDomain``/``@releaseDomain``, which only the privileged
    (or those the special node's permissions let read) see.
    """

    path: str
    exact: bool = False
    readable_via: tuple[Perms, ...] = ()
    special: bool = False

    def visible_to(self, caller: Caller) -> bool:
        if caller.privileged:
            return True
        for perms in self.readable_via:  # noqa: SIM110 (cheaper than any() over a generator)
            if _access(caller, perms) & _READ:
                return True
        return False

    def fires(self, watch_path: str) -> bool:
        """Whether a watch on ``watch_path`` (absolute or ``@...``) sees this change."""
        if self.exact or self.special or watch_path.startswith("@"):
            return watch_path == self.path
        return is_under(self.path, watch_path)


# ``Node(...)`` and ``Change(...)`` for the hot path: a frozen dataclass's ``__init__`` sets
# each field through ``object.__setattr__``, which costs more than the rest of a small
# request's bookkeeping.  These build the very same objects (equal, hashable, frozen), so
# they must set every field and stay in step with the classes (which have no
# ``__post_init__`` to skip).
_new_object = object.__new__


def _node(value: bytes, perms: Perms, children: tuple[str, ...], generation: int) -> Node:
    node = _new_object(Node)
    fields = node.__dict__
    fields["value"] = value
    fields["perms"] = perms
    fields["children"] = children
    fields["generation"] = generation
    return node


def _change(path: str, exact: bool, readable_via: tuple[Perms, ...]) -> Change:
    change = _new_object(Change)
    fields = change.__dict__
    fields["path"] = path
    fields["exact"] = exact
    fields["readable_via"] = readable_via
    fields["special"] = False
    return change


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
    # remembers each one and fails its commit if any of them changed.  The fast paths below
    # look at exactly the nodes the general rule (:meth:`get_node`) would.

    def _nearest_existing(self, path: str) -> Node:
        while path != "/":
            path = parent_of(path)
            node = self.get(path)
            if node is not None:
                return node
        raise StoreError("EIO", "the root node is missing")  # never: "/" cannot be removed

    def get_node(self, caller: Caller, path: str, want: Access) -> Node:
        """The node if ``caller`` has ``want`` on it; else the error that leaks nothing."""
        return self._get_node(caller, path, int(want))

    def _get_node(self, caller: Caller, path: str, want: int) -> Node:
        node = self.get(path)
        if node is not None:
            if _access(caller, node.perms) & want == want:
                return node
            error = "EACCES"
        else:
            error = "ENOENT"
        if path != "/" and not _access(caller, self._nearest_existing(path).perms) & want:
            error = "EACCES"
        raise StoreError(error, path)

    def read(self, caller: Caller, path: str) -> bytes:
        return self._get_node(caller, path, _READ).value

    def directory(self, caller: Caller, path: str) -> list[str]:
        return list(self._get_node(caller, path, _READ).children)

    def get_perms(self, caller: Caller, path: str) -> Perms:
        return self._get_node(caller, path, _READ).perms

    def write(self, caller: Caller, path: str, value: bytes) -> None:
        limit = self.limits.max_value_bytes
        if limit is not None and len(value) > limit:
            raise StoreError("E2BIG", f"value of {len(value)} bytes, limit {limit}")
        node = self.get(path)
        if node is None:
            self._create(caller, path, value)
            return
        if not _access(caller, node.perms) & _WRITE:
            self._get_node(caller, path, _WRITE)  # raises EACCES
        updated = _node(value, node.perms, node.children, node.generation)
        self._check_record(caller, updated)
        self.put(path, updated)
        self.note(path)

    def mkdir(self, caller: Caller, path: str) -> None:
        node = self.get(path)
        if node is None:
            self._create(caller, path, b"")
        elif not _access(caller, node.perms) & _WRITE:
            self._get_node(caller, path, _WRITE)  # raises EACCES

    def rm(self, caller: Caller, path: str) -> None:
        try:
            node = self._get_node(caller, path, _WRITE)
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
            self.put(parent_path, _node(parent.value, parent.perms, kids, parent.generation))

    def set_perms(self, caller: Caller, path: str, perms: Perms) -> None:
        limit = self.limits.max_perms_per_node
        if not caller.privileged and limit is not None and len(perms.entries) > limit:
            raise StoreError(self.limits.quota_error, f"more than {limit} permissions")
        node = self._get_node(caller, path, _WRITE_OWNER)
        if not caller.privileged and perms.owner != node.perms.owner:
            raise StoreError("EPERM", "only dom0 may change a node's owner")
        updated = _node(node.value, perms, node.children, node.generation)
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
        """Create the missing ``path`` and any missing ancestors, if ``caller`` may write
        the nearest existing one (else ``EACCES``, as :meth:`get_node` answers); all checks
        pass before anything changes."""
        missing = [path]
        parent_path = parent_of(path)
        parent = self.get(parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = parent_of(parent_path)
            parent = self.get(parent_path)
        if not _access(caller, parent.perms) & _WRITE:
            raise StoreError("EACCES", path)
        updates: list[tuple[str, Node]] = []
        privileged, domid = caller.privileged, caller.domid
        for new_path in reversed(missing):
            perms = parent.perms if privileged else parent.perms.with_owner(domid)
            node = _node(value if new_path == path else b"", perms, (), 0)
            children = (*parent.children, basename(new_path))
            parent = _node(parent.value, parent.perms, children, parent.generation)
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
        owner = node.perms.owner
        if old is None:
            self._owned[owner] += 1
        elif old.perms.owner != owner:
            self._owned[old.perms.owner] -= 1
            self._owned[owner] += 1
        self._generation += 1
        self._nodes[path] = _node(node.value, node.perms, node.children, self._generation)

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
        self._changes.append(_change(path, exact, tuple(via)))

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
        if _access(caller, self.special_perms[path]) & _WRITE_OWNER != _WRITE_OWNER:
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
