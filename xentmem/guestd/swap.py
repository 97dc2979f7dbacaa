"""The swap areas the daemon creates for the socket's page API, and what they leave behind.

``frontswap.init`` makes an area in memory or as a sparse file
``<state_dir>/swap/type-<N>.swap`` the daemon names itself (a client never chooses a path).
At exit :meth:`SwapAreas.save_maps` flushes each file and then writes its slot map next to
it, atomically, so the pair holds every page stored through the socket; a memory area dies
with the daemon and its pages count as lost (``docs/configuration.md``, "Paths").
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from xentmem.errors import AbiError
from xentmem.files import fsync_path, write_atomically
from xentmem.guest.frontends import FileBacking, Frontswap, MemoryBacking
from xentmem.guest.frontends.backing import BackingStore
from xentmem.tmem.abi import PAGE_SIZE

log = logging.getLogger(__name__)

#: Linux's MAX_SWAPFILES is 32 (less a few for migration entries): the same bound here.
MAX_SWAP_TYPES = 32
#: 4 GiB of slots per area; a memory area only costs what is stored in it.
MAX_AREA_PAGES = 1 << 20
MAP_VERSION = 1
BACKING_KINDS = ("memory", "file")
#: The state directory (systemd's ``StateDirectory=xentmem``); swap files go in ``swap/``.
DEFAULT_STATE_DIR = "/var/lib/xentmem"


def map_path(swap_file: Path) -> Path:
    return swap_file.with_name(swap_file.name + ".map.json")


def read_swap_area(swap_file: Path) -> dict[int, bytes]:
    """Offset -> page of a file-backed area left by a stopped daemon (file + map)."""
    untrusted_map = json.loads(map_path(swap_file).read_text(encoding="utf-8"))
    if untrusted_map.get("version") != MAP_VERSION:
        raise ValueError(f"{map_path(swap_file)}: unknown map version")
    pages = int(untrusted_map["pages"])
    out: dict[int, bytes] = {}
    with open(swap_file, "rb") as handle:
        for offset in untrusted_map["offsets"]:
            if not isinstance(offset, int) or not 0 <= offset < pages:
                raise ValueError(f"{map_path(swap_file)}: bad offset {offset!r}")
            handle.seek(offset * PAGE_SIZE)
            out[offset] = handle.read(PAGE_SIZE)
    return out


class SwapAreas:
    """Creates and forgets the daemon's swap areas; one lock keeps types unique."""

    def __init__(self, frontswap: Frontswap, directory: Path) -> None:
        self._frontswap = frontswap
        self.directory = directory
        self._lock = threading.Lock()
        self._stores: dict[int, BackingStore] = {}

    def path_of(self, swap_type: int) -> Path:
        return self.directory / f"type-{swap_type}.swap"

    def create(self, pages: int, backing: str = "memory", swap_type: int | None = None
               ) -> dict[str, Any]:
        """``swapon``: a new area of ``pages`` slots; its type and backing description."""
        if backing not in BACKING_KINDS:
            raise AbiError(f"backing must be one of {', '.join(BACKING_KINDS)}, got {backing!r}")
        if not 1 <= pages <= MAX_AREA_PAGES:
            raise AbiError(f"pages must be from 1 to {MAX_AREA_PAGES}, got {pages}")
        with self._lock:
            in_use = set(self._frontswap.swap_types())
            if swap_type is None:
                free = [t for t in range(MAX_SWAP_TYPES) if t not in in_use]
                if not free:
                    raise AbiError(f"all {MAX_SWAP_TYPES} swap types are in use")
                swap_type = free[0]
            elif not 0 <= swap_type < MAX_SWAP_TYPES:
                raise AbiError(f"swap type must be from 0 to {MAX_SWAP_TYPES - 1}")
            elif swap_type in in_use:
                raise AbiError(f"swap type {swap_type} is already initialised")
            store: BackingStore
            if backing == "file":
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                path = self.path_of(swap_type)
                for stale in (path, map_path(path)):
                    stale.unlink(missing_ok=True)  # a new area starts empty, as swapon does
                store = FileBacking(path, pages)
            else:
                store = MemoryBacking(pages)
            try:
                self._frontswap.init(swap_type, store)
            except Exception:
                store.close()
                raise
            self._stores[swap_type] = store
            log.info("swap area %d: %d pages, %s backing", swap_type, pages, backing)
            return {"type": swap_type, "backing": store.describe()}

    def forget(self, swap_type: int) -> None:
        """``swapoff``: the frontend forgets the area; its file (if any) is removed."""
        with self._lock:
            self._frontswap.invalidate_area(swap_type)
            store = self._stores.pop(swap_type, None)
            if isinstance(store, FileBacking):
                store.path.unlink(missing_ok=True)
                map_path(store.path).unlink(missing_ok=True)

    def save_maps(self) -> list[dict[str, Any]]:
        """Write each file area's slot map (atomically); one summary per area, all kinds.

        An area whose map cannot be written gets an ``error`` in its summary and the others
        are still saved.
        """
        summaries = []
        with self._lock:
            for swap_type, store in sorted(self._stores.items()):
                summary: dict[str, Any] = {"type": swap_type, **store.describe()}
                if isinstance(store, FileBacking):
                    document = {"version": MAP_VERSION, "type": swap_type, "pages": store.pages,
                                "page_size": PAGE_SIZE, "offsets": store.offsets()}
                    target = map_path(store.path)
                    try:
                        # The data first: a map on disk must never name slots whose pages
                        # are still only in the page cache.
                        fsync_path(store.path)
                        write_atomically(target, json.dumps(document).encode("utf-8"), 0o600)
                    except OSError as exc:
                        summary["error"] = f"cannot save the map {target}: {exc}"
                    else:
                        summary["map"] = str(target)
                summaries.append(summary)
        return summaries

    def close(self) -> None:
        with self._lock:
            for store in self._stores.values():
                store.close()


def lost_in_memory(areas: list[dict[str, Any]]) -> int:
    """Pages that die with the daemon: those held by memory-backed areas at exit."""
    return sum(int(a.get("used", 0)) for a in areas if a.get("kind") == MemoryBacking.__name__)
