"""The daemon's NBD exports: each one a swap area of its own, made and deleted together.

:meth:`Exports.add` makes a swap area (``guestd/swap.py``: memory, or a file the daemon
names under its state directory) and exports it; :meth:`Exports.remove` ends the export's
connections, then turns the area off (its pages are dropped and its file removed, as
``swapoff`` after the kernel read every page back).  Names are the client's handle:
``nbd-client -N NAME``, ``nbd+unix:///NAME?socket=...``.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from xentmem.errors import AbiError
from xentmem.guest.frontends import Frontswap
from xentmem.guestd.nbd.export import Export
from xentmem.guestd.nbd.resident import Residency
from xentmem.guestd.nbd.server import STOP_GRACE_S, NbdServer
from xentmem.guestd.swap import SwapAreas

log = logging.getLogger(__name__)

#: An export's name: what a client types, and nothing a shell or a URI would mangle.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The kernel's NBD devices.
DEVICE = re.compile(r"/dev/nbd[0-9]{1,4}")


class ExportBusy(AbiError):
    """An export whose connections did not end in time: it stays."""


class Exports:
    """Name -> :class:`Export`; the table an :class:`NbdServer` serves."""

    def __init__(self, frontswap: Frontswap, swap: SwapAreas,
                 residency: Residency | None = None) -> None:
        """``residency``: how the process stays resident once it serves swap (the real
        system calls unless a test or a benchmark says otherwise)."""
        self.frontswap = frontswap
        self.swap = swap
        self.residency = residency if residency is not None else Residency()
        self.server: NbdServer | None = None
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}

    # -- the server's view ----------------------------------------------------------------------

    def get(self, name: str) -> Export | None:
        return self._exports.get(name)

    def names(self) -> list[str]:
        return sorted(self._exports)

    # -- the daemon's ---------------------------------------------------------------------------

    def add(self, pages: int, backing: str = "file", name: str | None = None,
            swap_type: int | None = None, device: str | None = None) -> dict[str, Any]:
        """A new swap area of ``pages`` pages, exported under ``name`` (``swapN`` by
        default, N its swap type).  ``device``: the ``/dev/nbdN`` the caller attaches it to,
        kept to be shown (``xentmem swap remove`` finds the device by it)."""
        if device is not None and not DEVICE.fullmatch(device):
            raise AbiError(f"a device is /dev/nbdN, got {device!r}")
        if name is not None and not NAME.fullmatch(name):
            raise AbiError(f"an export name is 1-64 of A-Z a-z 0-9 . _ - (not starting with "
                           f"a punctuation mark), got {name!r}")
        with self._lock:
            if name is not None and name in self._exports:
                raise AbiError(f"export {name!r} already exists")
            self.residency.lock_memory()  # SwapUnsafe: refused, nothing made
            area = self.swap.create(pages, backing, swap_type)
            swap_type = int(area["type"])
            name = name or f"swap{swap_type}"
            if name in self._exports:  # a default name taken by a chosen one
                self.swap.forget(swap_type)
                raise AbiError(f"export {name!r} already exists")
            export = Export(name, self.frontswap, swap_type, pages,
                            self.swap.store_of(swap_type))
            export.device = device
            self._exports[name] = export
        log.info("nbd export %s: swap type %d, %d pages (%s)", name, swap_type, pages, backing)
        return self.describe_one(export)

    def remove(self, name: str, timeout_s: float = STOP_GRACE_S) -> dict[str, Any]:
        """End the export's connections, then turn its swap area off."""
        with self._lock:
            export = self._exports.get(name)
            if export is None:
                raise KeyError(name)
            export.closing = True
        if self.server is not None and not self.server.detach(export, timeout_s):
            export.closing = False
            raise ExportBusy(f"export {name!r}: its connections did not end in "
                             f"{timeout_s:g}s; it stays")
        with self._lock:
            summary = self.describe_one(export)
            self.swap.forget(export.swap_type)
            del self._exports[name]
        log.info("nbd export %s removed (swap type %d)", name, export.swap_type)
        return summary

    def describe_one(self, export: Export) -> dict[str, Any]:
        info = export.describe()
        area = next((a for a in self.frontswap.describe()["swap_types"]
                     if a["type"] == export.swap_type), {})
        info["tmem_pages"] = area.get("tmem_pages", 0)
        info["backing"] = {k: v for k, v in area.items() if k not in ("type", "tmem_pages")}
        info["connections"] = 0 if self.server is None else self.server.connections(export)
        return info

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            exports = list(self._exports.values())
        return [self.describe_one(e) for e in exports]
