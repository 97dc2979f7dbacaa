"""The daemon's NBD exports: each one a swap area of its own, made and deleted together.

:meth:`Exports.add` makes a swap area (``guestd/swap.py``: memory, or a file the daemon
names under its state directory or creates at a path the client chose) and exports it;
:meth:`Exports.remove` ends the export's connections, then turns the area off (its pages
are dropped and its file removed, as ``swapoff`` after the kernel read every page back).
Names are the client's handle: ``nbd-client -N NAME``, ``nbd+unix:///NAME?socket=...``.

The exports of file areas are also written to a table next to the areas' files
(:data:`TABLE`), with each file's path, so that after a kill the next daemon re-attaches
the files (those at chosen paths by the table, :func:`recorded_files`) and exports
each area again under its name (:meth:`Exports.restore`) and the kernel's device
can reconnect to it (docs/nbd.md, "When the daemon dies").
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from xentmem.errors import AbiError
from xentmem.guest.frontends import FileBacking, Frontswap
from xentmem.guestd.nbd.export import Export
from xentmem.guestd.nbd.resident import Residency, SwapUnsafe
from xentmem.guestd.nbd.server import STOP_GRACE_S, NbdServer
from xentmem.guestd.swap import AreaNotOwned, SwapAreas

log = logging.getLogger(__name__)

#: An export's name: what a client types, and nothing a shell or a URI would mangle.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The kernel's NBD devices.
DEVICE = re.compile(r"/dev/nbd[0-9]{1,4}")
#: The exports of file areas, in the areas' directory: ``[{name, type, pages, device, path}]``
#: (``path`` was added later: a row without one names a file in the directory).
TABLE = "nbd-exports.json"
ROW_KEYS = frozenset({"name", "type", "pages", "device"})


def recorded_files(untrusted_rows: list[Any]) -> dict[int, str]:
    """Swap type -> path of each file area the table's rows name, for
    :meth:`SwapAreas.reattach` (which checks them); untrusted."""
    files: dict[int, str] = {}
    for row in untrusted_rows:
        if isinstance(row, dict) and type(row.get("type")) is int and \
                isinstance(row.get("path"), str):
            files.setdefault(row["type"], row["path"])
    return files


class ExportBusy(AbiError):
    """An export not removed now: its connections did not end in time, or another remove
    of it is under way.  It stays (as the other remove leaves it)."""


class Exports:
    """Name -> :class:`Export`; the table an :class:`NbdServer` serves."""

    def __init__(self, frontswap: Frontswap, swap: SwapAreas,
                 residency: Residency | None = None, table: Path | None = None) -> None:
        """``residency``: how the process stays resident once it serves swap (the real
        system calls unless a test or a benchmark says otherwise); ``table``: where the
        exports of file areas are kept for the next daemon (None: nowhere)."""
        self.frontswap = frontswap
        self.swap = swap
        self.table = table
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
            swap_type: int | None = None, device: str | None = None,
            path: str | None = None) -> dict[str, Any]:
        """A new swap area of ``pages`` pages, exported under ``name`` (``swapN`` by
        default, N its swap type).  ``device``: the ``/dev/nbdN`` the caller attaches it to,
        kept to be shown (``xentmem swap remove`` finds the device by it); ``path``: the
        backing file to create (default: the daemon's own name for it)."""
        self.swap.check_new(pages, backing, path)  # before anything is locked or made
        if device is not None and not DEVICE.fullmatch(device):
            raise AbiError(f"a device is /dev/nbdN, got {device!r}")
        if name is not None and not NAME.fullmatch(name):
            raise AbiError(f"an export name is 1-64 of A-Z a-z 0-9 . _ - (not starting with "
                           f"a punctuation mark), got {name!r}")
        with self._lock:
            # Every refusal that can be told now comes before the lock (an mlockall pins
            # the whole daemon); what only trying tells undoes a lock this call took.
            free = self.swap.free_type(swap_type)  # none free, stopping: refused
            likely = name or f"swap{free}"
            if likely in self._exports:
                raise AbiError(f"export {likely!r} already exists")
            locked_now = self.residency.lock_memory()  # SwapUnsafe: refused, nothing made
            try:
                export = self._make(pages, backing, name, swap_type, path)
            except BaseException:
                if locked_now:  # no other export (it would have locked): no swap served
                    self.residency.unlock_memory()
                raise
            export.device = device
            self._exports[export.name] = export
            self._save()
            name, swap_type = export.name, export.swap_type
        log.info("nbd export %s: swap type %d, %d pages (%s)", name, swap_type, pages, backing)
        return self.describe_one(export)

    def _make(self, pages: int, backing: str, name: str | None, swap_type: int | None,
              path: str | None) -> Export:
        """The area and its export, not yet listed (under the lock); nothing made if refused."""
        chosen = name
        area = self.swap.create(pages, backing, swap_type, path,
                                owner=lambda made: chosen or f"swap{made}")
        swap_type = int(area["type"])
        name = name or f"swap{swap_type}"
        if name in self._exports:  # a default name taken by a chosen one meanwhile
            self.swap.forget(swap_type, owner=name)
            raise AbiError(f"export {name!r} already exists")
        return Export(name, self.frontswap, swap_type, pages, self.swap.store_of(swap_type))

    def remove(self, name: str, timeout_s: float = STOP_GRACE_S) -> dict[str, Any]:
        """End the export's connections, then turn its swap area off.

        The lock is not held while the connections end (up to ``timeout_s``): a second
        remove of the export meanwhile is refused (ExportBusy), and the area is turned off
        only if the name still maps to this export, so an export added under that name, on
        the swap type this one freed, is never touched."""
        with self._lock:
            export = self._exports.get(name)
            if export is None:
                raise KeyError(name)
            if export.closing:
                raise ExportBusy(f"export {name!r} is already being removed")
            export.closing = True
        if self.server is not None and not self.server.detach(export, timeout_s):
            export.closing = False  # this call set it (a second remove is refused above)
            raise ExportBusy(f"export {name!r}: its connections did not end in "
                             f"{timeout_s:g}s; it stays")
        with self._lock:
            if self._exports.get(name) is not export:  # gone meanwhile: nothing of ours left
                log.warning("nbd export %s was removed by another call meanwhile", name)
                raise KeyError(name)
            summary = self.describe_one(export)
            try:
                self.swap.forget(export.swap_type, owner=name)
            except AreaNotOwned as exc:  # never expected: another's area is never touched
                log.error("nbd export %s removed, its swap type %d left on: %s", name,
                          export.swap_type, exc)
            del self._exports[name]
            self._save()
        log.info("nbd export %s removed (swap type %d)", name, export.swap_type)
        return summary

    def read_table(self) -> list[Any]:
        """The table's rows as found (untrusted), [] if there is none or it is unreadable;
        read once at start, for :func:`recorded_files` and :meth:`restore`."""
        if self.table is None:
            return []
        try:
            untrusted_rows = json.loads(self.table.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("nbd exports table %s unreadable, no export restored: %s", self.table, exc)
            return []
        return untrusted_rows if isinstance(untrusted_rows, list) else []

    def held(self) -> set[str]:
        """The exports some client (the kernel's device) is connected to."""
        server = self.server
        with self._lock:
            exports = list(self._exports.values())
        return {e.name for e in exports if server is not None and server.connections(e)}

    def remove_unheld(self, held: set[str]) -> list[str]:
        """At a clean stop: remove each export not in ``held`` (its device was detached:
        ``xentmem swap stop`` turned its swap off, so no page on it will be read again);
        the names removed.  An export still held stays, with its table row, for the next
        daemon to serve again (docs/nbd.md, "At start and stop")."""
        removed = []
        for name in self.names():
            if name not in held:
                try:
                    self.remove(name)
                except (ExportBusy, KeyError) as exc:  # a control client's remove under way
                    log.warning("nbd: export %r not removed at stop: %s", name, exc)
                    continue
                removed.append(name)
        return removed

    def restore(self, untrusted_rows: list[Any]) -> list[str]:
        """At start, once the area files are re-attached: export each area the table's rows
        (:meth:`read_table`) name again, under its name and with its device; the names
        restored.

        A row whose area did not come back (its file was damaged, or it was a memory area)
        or does not match it is dropped with a warning; the table is rewritten.
        """
        if self.table is None:
            return []
        restored = []
        with self._lock:
            attached = set(self.frontswap.swap_types())
            for row in untrusted_rows:
                why = self._unrestorable(row, attached)
                if why:
                    log.warning("nbd export not restored (%s): %.200r", why, row)
                    continue
                try:
                    self.residency.lock_memory()
                except SwapUnsafe as exc:  # as a refused add: no swap that can deadlock
                    log.error("nbd export %s not restored: %s", row["name"], exc)
                    continue
                export = Export(row["name"], self.frontswap, row["type"], row["pages"],
                                self.swap.store_of(row["type"]))
                export.device = row["device"]
                self._exports[export.name] = export
                self.swap.claim(export.swap_type, export.name)
                restored.append(export.name)
                log.info("nbd export %s restored: swap type %d, %d pages, device %s",
                         export.name, export.swap_type, export.pages, export.device)
            self._save()
        return restored

    def _unrestorable(self, untrusted_row: Any, attached: set[int]) -> str:
        """Why a table row cannot be exported again ("" if it can)."""
        row = untrusted_row
        if not isinstance(row, dict) or set(row) not in (ROW_KEYS, ROW_KEYS | {"path"}):
            return "not a table row"
        if not isinstance(row["name"], str) or not NAME.fullmatch(row["name"]):
            return "bad name"
        if row["device"] is not None and not (isinstance(row["device"], str)
                                              and DEVICE.fullmatch(row["device"])):
            return "bad device"
        if row["name"] in self._exports:
            return "name taken"
        if type(row["type"]) is not int or row["type"] not in attached or \
                any(e.swap_type == row["type"] for e in self._exports.values()):
            return "its area was not re-attached"
        store = self.swap.store_of(row["type"])
        if not isinstance(store, FileBacking) or type(row["pages"]) is not int or \
                store.pages != row["pages"]:
            return f"the area is not a file area of {row['pages']} pages"
        if "path" in row and row["path"] != str(store.path):
            return f"its area's file is {store.path}"
        return ""

    def _save(self) -> None:
        """Rewrite the table (under the lock): the exports of file areas, atomically."""
        if self.table is None:
            return
        rows = []
        for e in self._exports.values():
            store = self.swap.store_of(e.swap_type)
            if isinstance(store, FileBacking):
                rows.append({"name": e.name, "type": e.swap_type, "pages": e.pages,
                             "device": e.device, "path": str(store.path)})
        temporary = self.table.with_name(self.table.name + ".tmp")
        try:
            self.table.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary.write_text(json.dumps(rows), encoding="utf-8")
            os.replace(temporary, self.table)
        except OSError as exc:  # the exports work; only a restart would not restore them
            log.error("nbd exports table %s not written: %s", self.table, exc)

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
