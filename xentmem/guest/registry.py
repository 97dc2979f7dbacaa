"""Finds backends through the ``xentmem.backends`` entry-point group.

A third-party distribution adds a backend by declaring, in its own metadata::

    [project.entry-points."xentmem.backends"]
    mystore = "mypkg.store:MyStoreBackend"

and nothing in xentmem changes.  A name that resolves to something that is not a
:class:`~xentmem.guest.backend.Backend` is refused with a message, never half-loaded.
"""

from __future__ import annotations

import logging
import sys
from importlib import metadata

from xentmem.errors import BackendError, UnknownBackend
from xentmem.guest.backend import Backend

GROUP = "xentmem.backends"
log = logging.getLogger(__name__)


def _entry_points() -> list[metadata.EntryPoint]:
    if sys.version_info >= (3, 10):
        return list(metadata.entry_points(group=GROUP))
    return list(metadata.entry_points().get(GROUP, ()))  # pragma: no cover - 3.9 only


def available() -> dict[str, metadata.EntryPoint]:
    """Backend name -> entry point, for every installed distribution that declares one."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in _entry_points():
        if ep.name in found and found[ep.name].value != ep.value:
            log.warning("backend %r declared twice (%s, %s); using the first", ep.name,
                        found[ep.name].value, ep.value)
            continue
        found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


def backend_class(name: str) -> type[Backend]:
    """Import and check the backend called ``name``."""
    points = available()
    if name not in points:
        known = ", ".join(points) or "none installed"
        raise UnknownBackend(f"unknown backend {name!r}; available backends: {known}")
    try:
        obj = points[name].load()
    except Exception as exc:  # a broken plugin must not take the daemon down
        raise BackendError(f"backend {name!r} failed to import: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise BackendError(f"backend {name!r} ({points[name].value}) is not a xentmem Backend")
    return obj
