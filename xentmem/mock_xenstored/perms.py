"""Xenstore permissions for the stand-in: who asks (:class:`Caller`), what a node grants
(:class:`Perms`) and the rule joining the two (:func:`perm_for`).

The rule is written once, in :mod:`xentmem.xenbus.perms`, for the host service and for this
server alike: both follow the real daemons exactly (docs/mock-xenstored.md, Permissions).
"""

from __future__ import annotations

from xentmem.xenbus.perms import LETTER_ACCESS, Access, Caller, PermEntry, Perms, perm_for

__all__ = ["LETTER_ACCESS", "Access", "Caller", "PermEntry", "Perms", "perm_for"]
