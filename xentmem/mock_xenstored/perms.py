"""Xenstore permissions: who asks (:class:`Caller`), what a node grants (:class:`Perms`) and
C xenstored's rule joining the two (:func:`perm_for`).  The rules are in
docs/mock-xenstored.md."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag


class Access(IntFlag):
    """What a permission entry grants; ``OWNER`` is never written, only computed."""

    NONE = 0
    READ = 1
    WRITE = 2
    BOTH = 3
    OWNER = 4


#: What the privileged, a node's owner and its owner's device model may do (made once:
#: combining flags runs Python code in ``enum``).
FULL_ACCESS = Access.BOTH | Access.OWNER

LETTER_ACCESS = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE, "b": Access.BOTH}
_ACCESS_LETTER = {v: k for k, v in LETTER_ACCESS.items()}


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
            raise ValueError("a permission list has at least the owner entry")

    @classmethod
    def of(cls, owner: int, default: Access = Access.NONE) -> Perms:
        """A one-entry list: ``owner`` owns it, everybody else gets ``default``."""
        return cls((PermEntry(owner, default),))

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


def perm_for(caller: Caller, perms: Perms) -> Access:
    """What ``caller`` may do on a node with ``perms`` (C xenstored's ``perm_for_conn``)."""
    if caller.privileged or perms.owner in (caller.domid, caller.target):
        return FULL_ACCESS
    for entry in perms.entries[1:]:
        if entry.domid in (caller.domid, caller.target):
            return entry.access
    return perms.entries[0].access
