"""The swap areas the daemon creates for the socket's page API, and what they leave behind.

``frontswap.init`` makes an area in memory or as a sparse file
``<state_dir>/swap/type-<N>.swap`` the daemon names itself; an NBD export's area may also
be a file at a path its administrator chose (``xentmem swap add --backing FILE``), which
the daemon creates itself and never lets replace anything (:func:`check_area_path`).
A file area holds its own checksummed index, rewritten with every page, so the file alone
names every page stored, whenever the daemon stops or dies; a restart re-attaches it
(:meth:`SwapAreas.reattach`).  A memory area dies with the daemon and its pages count as
lost.  The format and its guarantees: ``docs/swap-areas.md``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from xentmem.control.protocol import MAX_AREA_PAGES, SWAP_BACKINGS
from xentmem.errors import AbiError, BackendError, DaemonStopping
from xentmem.guest.frontends import FileBacking, Frontswap, MemoryBacking
from xentmem.guest.frontends.backing import BackingStore
from xentmem.guest.frontends.swapfile import (
    SwapAreaStale,
    SwapFileError,
    scan,
    stale_after_reboot,
)
from xentmem.roots import Roots

log = logging.getLogger(__name__)

#: Linux's MAX_SWAPFILES is 32 (less a few for migration entries): the same bound here.
MAX_SWAP_TYPES = 32
#: The state directory (systemd's ``StateDirectory=xentmem``); swap files go in ``swap/``.
DEFAULT_STATE_DIR = "/var/lib/xentmem"
#: The name of an area file; what :meth:`SwapAreas.reattach` looks for.
AREA_FILE = re.compile(r"type-(\d{1,2})\.swap")
#: The kernel's id of the current boot (a random uuid per boot).
BOOT_ID = "/proc/sys/kernel/random/boot_id"
#: Linux's PATH_MAX, less the NUL.
MAX_PATH = 4095


def boot_id(roots: Roots) -> bytes | None:
    """This boot's id (16 bytes), None if it cannot be read (then a reboot is not told)."""
    try:
        return uuid.UUID(roots.under(BOOT_ID).read_text(encoding="ascii").strip()).bytes
    except (OSError, ValueError):
        return None


def check_path_text(untrusted_path: object) -> Path:
    """A backing file's path as written: absolute, plainly (no ``.``, ``..``, ``//``, NUL),
    naming a file; AbiError if not.  What it names is :func:`check_area_path`'s to check."""
    if not isinstance(untrusted_path, str) or not 1 <= len(untrusted_path) <= MAX_PATH \
            or "\0" in untrusted_path:
        raise AbiError(f"a backing file's path is 1 to {MAX_PATH} characters without NUL")
    try:
        untrusted_path.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no file can have that name
        raise AbiError(f"a backing file's path is text (UTF-8), got {untrusted_path!r}") \
            from None
    if not os.path.isabs(untrusted_path) or os.path.normpath(untrusted_path) != untrusted_path \
            or untrusted_path.startswith("//"):
        raise AbiError(f"a backing file's path is absolute and plainly written (no ., .. "
                       f"or //), got {untrusted_path!r}")
    path = Path(untrusted_path)
    if path == path.parent:
        raise AbiError("a backing file's path names a file, not /")
    return path


def check_area_path(untrusted_path: object, own_directory: Path, new: bool = True) -> Path:
    """A backing file's path a client chose, once it is safe to create; AbiError if not.

    The daemon runs as root and a client may be a group member (``control_group``), so the
    path must name a new file (it never replaces one), written plainly (absolute, no ``.``,
    ``..`` or symlink in its directory's path), in a directory that only the daemon's user
    can change (no one can move the file away under it), and outside the daemon's own
    directory of area files (whose names are the daemon's).  What systemd's sandbox lets
    the daemon write is the kernel's to say (EROFS at create): ``docs/swap-areas.md``.
    ``new=False``: the same for a file made so before, re-attached after a restart.
    """
    path = check_path_text(untrusted_path)
    parent = path.parent
    try:
        real_parent = Path(os.path.realpath(parent, strict=True))
        status = os.stat(parent)
    except OSError as exc:
        raise AbiError(f"backing file {path}: its directory: {exc.strerror}") from None
    if real_parent != parent:
        raise AbiError(f"backing file {path}: its directory's path has a symlink (it is "
                       f"{real_parent}): give that path")
    if not stat.S_ISDIR(status.st_mode):
        raise AbiError(f"backing file {path}: {parent} is not a directory")
    if status.st_uid != os.geteuid() or status.st_mode & 0o022:
        raise AbiError(f"backing file {path}: {parent} must belong to the daemon's user "
                       f"(uid {os.geteuid()}) and be writable by no one else (it is uid "
                       f"{status.st_uid}, mode {stat.S_IMODE(status.st_mode):04o})")
    own = Path(os.path.realpath(own_directory))
    if real_parent == own or own in real_parent.parents:
        raise AbiError(f"backing file {path}: {own_directory} holds the daemon's own area "
                       "files; choose a path outside it")
    if new and os.path.lexists(path):
        raise AbiError(f"backing file {path} exists: the daemon creates the file itself and "
                       "never replaces one (remove it, or choose another path)")
    if not new:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise AbiError(f"backing file {path} is not a regular file")
        except OSError as exc:
            raise AbiError(f"backing file {path}: {exc.strerror}") from None
    return path


class SwapAreaDamaged(SwapFileError):
    """An area file with pages that cannot be returned; :attr:`intact` holds the others."""

    def __init__(self, message: str, damaged: dict[int, str], intact: dict[int, bytes]) -> None:
        super().__init__(message)
        self.damaged = damaged
        self.intact = intact


def read_swap_area(swap_file: Path, this_boot: bytes | None = None) -> dict[int, bytes]:
    """Offset -> page of a file-backed area left by a stopped or killed daemon.

    Every entry and page is checked; SwapAreaDamaged (with the intact pages) if any is
    damaged, SwapFileError if the file is not a usable area at all.  Never a wrong page.
    With ``this_boot`` (:func:`boot_id`), SwapAreaStale if the area was in use when the
    system went down (a page written after its last clean stop may come back older).
    """
    fd = os.open(swap_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = scan(fd, str(swap_file), keep_pages=True)
    finally:
        os.close(fd)
    if stale_after_reboot(found.use, this_boot):
        raise SwapAreaStale(f"{swap_file}: in use when the system went down (no clean stop "
                            "since): a page written after its last clean stop may be older")
    if found.damaged:
        first = ", ".join(f"{o}: {why}" for o, why in sorted(found.damaged.items())[:5])
        raise SwapAreaDamaged(f"{swap_file}: {len(found.damaged)} damaged page(s) ({first})",
                              found.damaged, found.pages)
    return found.pages


class AreaNotOwned(AbiError):
    """A swap area turned off by someone other than its owner (an NBD export's area by a
    frontswap client, or another export's); refused, the area is unchanged."""


class SwapAreas:
    """Creates and forgets the daemon's swap areas; one lock keeps types unique."""

    def __init__(self, frontswap: Frontswap, directory: Path,
                 this_boot: bytes | None = None) -> None:
        self._frontswap = frontswap
        self.directory = directory
        #: This boot's id, marked in each area file in use (``docs/swap-areas.md``).
        self.this_boot = this_boot
        self._lock = threading.Lock()
        self._stores: dict[int, BackingStore] = {}
        #: Swap type -> the NBD export whose area it is: only that export's removal may
        #: turn it off, and the socket's page API may not touch it (docs/nbd.md).
        self._owners: dict[int, str] = {}
        #: Why no new area may be made (the daemon is stopping); None while they may.
        self._refusing: str | None = None

    def refuse_new(self, why: str) -> None:
        """From now on :meth:`create` refuses (DaemonStopping): the daemon is stopping, and
        an area made after :meth:`sync` would be left out of it.  One being made now is
        done before :meth:`sync` starts (both hold the lock)."""
        self._refusing = why

    def path_of(self, swap_type: int) -> Path:
        return self.directory / f"type-{swap_type}.swap"

    def check_path(self, untrusted_path: object) -> Path:
        """:func:`check_area_path` against this daemon's directory."""
        return check_area_path(untrusted_path, self.directory)

    def check_new(self, pages: int, backing: str, path: str | None) -> Path | None:
        """What :meth:`create` refuses before it makes anything (AbiError); the path
        checked, if one was given."""
        if backing not in SWAP_BACKINGS:
            raise AbiError(f"backing must be one of {', '.join(SWAP_BACKINGS)}, got {backing!r}")
        if not 1 <= pages <= MAX_AREA_PAGES:
            raise AbiError(f"pages must be from 1 to {MAX_AREA_PAGES}, got {pages}")
        if path is not None and backing != "file":
            raise AbiError("a backing file's path goes with backing \"file\" only")
        return None if path is None else self.check_path(path)

    def free_type(self, swap_type: int | None = None) -> int:
        """The type :meth:`create` would use now (``swap_type``, or the lowest free one), or
        what it would refuse with; an NBD export asks before it locks memory."""
        with self._lock:
            return self._free_type(swap_type)

    def _free_type(self, swap_type: int | None) -> int:
        if self._refusing is not None:
            raise DaemonStopping(f"no new swap area: {self._refusing}")
        in_use = set(self._frontswap.swap_types())
        if swap_type is None:
            free = [t for t in range(MAX_SWAP_TYPES) if t not in in_use]
            if not free:
                raise AbiError(f"all {MAX_SWAP_TYPES} swap types are in use")
            return free[0]
        if not 0 <= swap_type < MAX_SWAP_TYPES:
            raise AbiError(f"swap type must be from 0 to {MAX_SWAP_TYPES - 1}")
        if swap_type in in_use:
            raise AbiError(f"swap type {swap_type} is already initialised")
        return swap_type

    def create(self, pages: int, backing: str = "memory", swap_type: int | None = None,
               path: str | None = None, owner: Callable[[int], str] | None = None
               ) -> dict[str, Any]:
        """``swapon``: a new area of ``pages`` slots; its type and backing description.

        ``path``: a file area's file, one the daemon creates (default: its own name for it
        in :attr:`directory`); ``owner``: the name, given the type, of the NBD export the
        area is made for, recorded under the lock so no client can take it meanwhile."""
        chosen = self.check_new(pages, backing, path)
        with self._lock:
            swap_type = self._free_type(swap_type)
            store: BackingStore
            if chosen is not None:  # a new file, never one that exists (O_EXCL)
                store = FileBacking(chosen, pages, swap_type, self.this_boot, exclusive=True)
            elif backing == "file":
                try:
                    self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                except OSError as exc:
                    raise BackendError(f"swap directory {self.directory}: {exc}") from exc
                # Replaces an old file of that name, as swapon.
                store = FileBacking(self.path_of(swap_type), pages, swap_type, self.this_boot)
            else:
                store = MemoryBacking(pages)
            try:
                self._frontswap.init(swap_type, store)
            except Exception:
                store.close()
                raise
            self._stores[swap_type] = store
            if owner is not None:
                self._owners[swap_type] = owner(swap_type)
            log.info("swap area %d: %d pages, %s backing", swap_type, pages, backing)
            return {"type": swap_type, "backing": store.describe()}

    def store_of(self, swap_type: int) -> BackingStore:
        """The backing store of an area (an NBD export syncs it on a flush)."""
        with self._lock:
            try:
                return self._stores[swap_type]
            except KeyError:
                raise AbiError(f"swap type {swap_type} is not initialised") from None

    def claim(self, swap_type: int, export: str) -> None:
        """Record a re-attached area as NBD export ``export``'s (its restore at start)."""
        with self._lock:
            self._owners[swap_type] = export

    def owner_of(self, swap_type: int) -> str | None:
        """The NBD export whose area ``swap_type`` is; None for a frontswap client's."""
        with self._lock:
            return self._owners.get(swap_type)

    def forget(self, swap_type: int, owner: str | None = None) -> None:
        """``swapoff``: the frontend forgets the area; its file (if any) is removed.

        ``owner``: the NBD export turning its own area off (None: a frontswap client).
        AreaNotOwned, nothing changed, if the area is not the caller's: an export's area
        stays until the export is removed, and an export never turns off another's."""
        with self._lock:
            found = self._owners.get(swap_type)
            if found != owner:
                if owner is None:
                    raise AreaNotOwned(f"swap type {swap_type} belongs to NBD export "
                                       f"{found!r}; use nbd.remove")
                raise AreaNotOwned(f"swap type {swap_type} is not NBD export {owner!r}'s "
                                   f"area" + (f" (it is {found!r}'s)" if found else ""))
            self._frontswap.invalidate_area(swap_type)
            self._owners.pop(swap_type, None)
            store = self._stores.pop(swap_type, None)
            if isinstance(store, FileBacking):
                try:
                    store.path.unlink(missing_ok=True)
                except OSError as exc:  # the area is off; its file is only litter now
                    log.error("swapoff of area %d: %s stays: %s", swap_type, store.path, exc)

    def reattach(self, elsewhere: dict[int, str] | None = None) -> list[dict[str, Any]]:
        """At start: take over the area files a stopped or killed daemon left, each with
        its pages checked; one summary per file found.

        The files in :attr:`directory` are found by their names; ``elsewhere`` (swap type
        -> untrusted path, as the NBD exports table recorded them) adds the files at paths a
        client chose, each checked as at create (:func:`check_area_path`) but for existing.  A file
        that is not a usable area is left where it is (for an administrator to look at) and
        reported with its ``error``; its swap type stays free for a new area, which then
        replaces a file in :attr:`directory` (never one elsewhere).
        """
        found: list[dict[str, Any]] = []
        candidates: list[tuple[int, Path | str]] = []
        try:
            names = sorted(p.name for p in self.directory.iterdir())
        except FileNotFoundError:
            names = []
        except OSError as exc:
            log.error("swap areas: cannot list %s: %s", self.directory, exc)
            found.append({"path": str(self.directory), "error": str(exc)})
            names = []
        for name in names:
            match = AREA_FILE.fullmatch(name)
            if match is not None and int(match[1]) < MAX_SWAP_TYPES:
                candidates.append((int(match[1]), self.directory / name))
        candidates.extend(sorted((t, p) for t, p in (elsewhere or {}).items()
                                 if Path(p).parent != self.directory))  # found by name
        with self._lock:
            for swap_type, untrusted_path in candidates:
                summary = self._reattach_one(swap_type, untrusted_path,
                                             own=isinstance(untrusted_path, Path))
                found.append(summary)
        return found

    def _reattach_one(self, swap_type: int, untrusted_path: Path | str, own: bool
                      ) -> dict[str, Any]:
        """Re-attach one file (under the lock); its summary, with ``error`` if it was not."""
        try:
            if swap_type in self._stores:  # two files for one type: the first one stays
                raise AbiError(f"swap type {swap_type} is taken by "
                               f"{self._stores[swap_type].describe().get('path')}")
            path = (Path(untrusted_path) if own
                    else check_area_path(untrusted_path, self.directory, new=False))
            store = FileBacking.attach(path, self.this_boot)
            if store.swap_type != swap_type:
                store.close()
                raise SwapFileError(f"{path}: the header says swap type {store.swap_type}")
            try:
                self._frontswap.init(swap_type, store)
            except BaseException:
                store.close()
                raise
        except (SwapFileError, BackendError, AbiError) as exc:
            log.error("swap area %d not re-attached: %s", swap_type, exc)
            return {"type": swap_type, "path": str(untrusted_path), "error": str(exc)}
        self._stores[swap_type] = store
        summary = {"type": swap_type, **store.describe()}
        if store.damaged:
            summary["damaged_offsets"] = sorted(store.damaged)[:64]
            log.error("swap area %d re-attached from %s: %d page(s), %d damaged (never "
                      "returned; a load of one is an error)", swap_type, path, store.used(),
                      len(store.damaged))
        else:
            log.info("swap area %d re-attached from %s: %d page(s)", swap_type, path,
                     store.used())
        return summary

    def sync(self) -> list[dict[str, Any]]:
        """At exit: flush each file area to disk; one summary per area, all kinds.

        An area that cannot be flushed gets an ``error`` in its summary (its pages may not
        survive a power cut) and the others are still flushed.
        """
        summaries = []
        with self._lock:
            for swap_type, store in sorted(self._stores.items()):
                summary: dict[str, Any] = {"type": swap_type, **store.describe()}
                try:
                    store.sync()
                    if isinstance(store, FileBacking):
                        store.mark_stopped()  # a later boot may trust it
                except BackendError as exc:
                    summary["error"] = str(exc)
                summaries.append(summary)
        return summaries

    def close(self) -> None:
        with self._lock:
            for store in self._stores.values():
                store.close()


def lost_at_exit(area: dict[str, Any]) -> int:
    """Pages of one area (a :meth:`SwapAreas.sync` summary) that no one can read after the
    exit: all of a memory area's; a file area's damaged ones, and all of its pages if it
    could not be flushed (they may not be on disk)."""
    if area.get("kind") == MemoryBacking.__name__:
        return int(area.get("used", 0))
    damaged = int(area.get("damaged", 0))
    return damaged + (int(area.get("used", 0)) if "error" in area else 0)
