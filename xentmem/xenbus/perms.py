"""xenstore's permission rule, written once: what a node's permission list lets a domain do.

A list is ``<letter><domid>`` entries (``n`` none, ``r`` read, ``w`` write, ``b`` both).  The
first entry names the *owner*, who may do everything, and its letter is also what every
domain *not listed* gets: ``["b6"]`` means "owned by 6, and everybody may read and write".
Later entries grant their letter to their domain (the first entry naming a domain wins).  A
privileged caller (dom0) may do everything, and a domain that dom0 made another's device
model (``SET_TARGET``) acts as its target too.  This is C xenstored's ``perm_for_conn`` and
oxenstored's ``Perms.check``; both daemons were checked against it (``tests/hostd/
test_attack.py``).  The host service asks :func:`holders` which domains can write a node it
reads a guest's requests from; the stand-in xenstored asks :func:`perm_for` on every request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntFlag


class Access(IntFlag):
    """What a permission entry grants; ``OWNER`` is never written, only computed."""

    NONE = 0
    READ = 1
    WRITE = 2
    BOTH = 3
    OWNER = 4


LETTER_ACCESS = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE, "b": Access.BOTH}
_ACCESS_LETTER = {v: k for k, v in LETTER_ACCESS.items()}
_ENTRY_RE = re.compile(r"([nrwb])(0|[1-9][0-9]{0,9})")


class PermsError(ValueError):
    """A permission list that is not one (empty, or an entry outside the grammar)."""


@dataclass(frozen=True)
class PermEntry:
    """One ``<letter><domid>`` entry."""

    domid: int
    access: Access

    def encode(self) -> bytes:
        return f"{_ACCESS_LETTER[self.access]}{self.domid}".encode("ascii")


@dataclass(frozen=True)
class Perms:
    """A node's permission list; ``entries[0]`` is the owner and the default for others."""

    entries: tuple[PermEntry, ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise PermsError("a permission list has at least the owner entry")

    @classmethod
    def of(cls, owner: int, default: Access = Access.NONE) -> Perms:
        """A one-entry list: ``owner`` owns it, everybody else gets ``default``."""
        return cls((PermEntry(owner, default),))

    @classmethod
    def parse(cls, untrusted: Sequence[bytes]) -> Perms:
        """A list as ``GET_PERMS`` returns it (trailing NULs allowed), or PermsError."""
        entries = []
        for untrusted_entry in untrusted:
            text = untrusted_entry.rstrip(b"\x00").decode("ascii", "replace")
            match = _ENTRY_RE.fullmatch(text)
            if match is None:
                raise PermsError(f"bad permission {text[:20]!a}")
            entries.append(PermEntry(int(match[2]), LETTER_ACCESS[match[1]]))
        return cls(tuple(entries))

    @property
    def owner(self) -> int:
        return self.entries[0].domid

    def with_owner(self, domid: int) -> Perms:
        first = self.entries[0]
        return Perms((PermEntry(domid, first.access), *self.entries[1:]))

    def encode(self) -> list[bytes]:
        return [e.encode() for e in self.entries]

    def __str__(self) -> str:
        return " ".join(e.encode().decode("ascii") for e in self.entries)


@dataclass(frozen=True)
class Caller:
    """Who sends a request: a domain, whether it is privileged, and its ``SET_TARGET``."""

    domid: int
    privileged: bool = False
    target: int | None = None

    @classmethod
    def dom0(cls) -> Caller:
        return cls(0, privileged=True)


#: What the privileged, a node's owner and its owner's device model may do (made once:
#: combining flags runs Python code in ``enum``, on every request of the stand-in).
FULL_ACCESS = Access.BOTH | Access.OWNER


def perm_for(caller: Caller, perms: Perms) -> Access:
    """What ``caller`` may do on a node with ``perms``: the rule of this module's docstring."""
    if caller.privileged or perms.owner in (caller.domid, caller.target):
        return FULL_ACCESS
    for entry in perms.entries[1:]:
        if entry.domid in (caller.domid, caller.target):
            return entry.access
    return perms.entries[0].access


@dataclass(frozen=True)
class Holders:
    """The unprivileged domains holding an access to a node: ``listed``, and, if ``others``,
    every domain the list does not name (``named``)."""

    listed: frozenset[int]
    others: bool
    named: frozenset[int]

    def besides(self, allowed: Iterable[int]) -> Holders:
        """The holders other than ``allowed`` (they stay named, so not among "others")."""
        allowed = frozenset(allowed)
        return Holders(self.listed - allowed, self.others, self.named | allowed)

    def __bool__(self) -> bool:
        return bool(self.listed) or self.others

    def __contains__(self, domid: object) -> bool:
        return domid in self.listed or (self.others and domid not in self.named)

    def __str__(self) -> str:
        listed = sorted(self.listed)
        if not self.others:
            return f"domains {listed}"
        return "every domain" + (f" (and {listed})" if listed else "") + (
            f" but {sorted(self.named - self.listed)}" if self.named - self.listed else "")


def holders(perms: Perms, want: Access) -> Holders:
    """Which unprivileged domains get ``want`` (all of it) on a node with ``perms``: the
    answer of :func:`perm_for` for every domain at once.  Privileged domains and device
    models (targets) are not counted: xenstore does not list them."""
    first: dict[int, Access] = {}
    for entry in perms.entries[1:]:
        first.setdefault(entry.domid, entry.access)
    owner = perms.owner
    listed = {owner} | {d for d, a in first.items() if a & want == want}
    named = frozenset({owner, *first})
    return Holders(frozenset(listed), perms.entries[0].access & want == want, named)
