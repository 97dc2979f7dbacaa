"""The swap device behind frontswap: where a page lives when it is not in tmem.

In the kernel a frontswap store that fails makes swap write the page to disk, and a shrink
or swapoff brings tmem pages back through the swap cache.  Here the frontswap frontend owns
one backing store per swap type, so a page is always either in tmem or in its backing store,
and unloading a backend can repatriate every persistent page before the backend goes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, TypeVar

from xentmem.errors import AbiError, BackendError
from xentmem.files import fsync_directory
from xentmem.guest.frontends import swapfile
from xentmem.tmem.abi import PAGE_SIZE

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def _locked(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run a :class:`FileBacking` method under its lock."""
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> _T:
        with self._io:
            return method(self, *args, **kwargs)
    return run


#: The use mark's boot id when this boot's is unknown (a restart then cannot tell a reboot).
NO_BOOT = bytes(16)


class BackingStore(ABC):
    """A fixed-size array of page slots (a swap area of ``pages`` slots)."""

    def __init__(self, pages: int) -> None:
        if pages <= 0:
            raise AbiError(f"a swap area needs at least one page, got {pages}")
        self.pages = pages

    def check_offset(self, offset: int) -> None:
        if not 0 <= offset < self.pages:
            raise AbiError(f"swap offset {offset} outside the area (0..{self.pages - 1})")

    @abstractmethod
    def write(self, offset: int, page: bytes) -> None:
        """Store a page; raise BackendError if the device cannot take it."""

    @abstractmethod
    def read(self, offset: int) -> bytes | None:
        """The page at ``offset``, or None if the slot holds nothing."""

    @abstractmethod
    def discard(self, offset: int, durable: bool = False) -> None:
        """Forget a slot (the swap entry was freed).  ``durable``: if the forgetting would
        not last across a restart (a failed index write), raise BackendError and keep the
        slot as it was; else that is only logged and counted."""

    def has(self, offset: int) -> bool:
        """True when the slot holds a page (or a damaged one)."""
        return offset in self.offsets()

    @abstractmethod
    def used(self) -> int:
        """How many slots hold a page."""

    def clear(self) -> None:
        """Forget every slot (swapoff)."""
        for offset in list(self.offsets()):
            self.discard(offset)

    @abstractmethod
    def offsets(self) -> list[int]:
        """The slots that hold a page."""

    def sync(self) -> None:
        """Flush to stable storage what a restart should find (nothing for memory)."""

    def close(self) -> None:
        """Release what the store holds open."""

    def describe(self) -> dict[str, object]:
        return {"kind": type(self).__name__, "pages": self.pages, "used": self.used()}


class MemoryBacking(BackingStore):
    """Slots kept in a dict: the default, and what tests use."""

    def __init__(self, pages: int) -> None:
        super().__init__(pages)
        self._slots: dict[int, bytes] = {}

    def write(self, offset: int, page: bytes) -> None:
        self.check_offset(offset)
        self._slots[offset] = bytes(page)

    def read(self, offset: int) -> bytes | None:
        return self._slots.get(offset)

    def discard(self, offset: int, durable: bool = False) -> None:
        self._slots.pop(offset, None)

    def has(self, offset: int) -> bool:
        return offset in self._slots

    def used(self) -> int:
        return len(self._slots)

    def offsets(self) -> list[int]:
        return list(self._slots)

    def clear(self) -> None:
        self._slots.clear()


class FileBacking(BackingStore):
    """Slots in a sparse file that also holds their checksummed index (``swapfile.py``).

    A write goes to a free slot, then the index entry that names it is rewritten: a refused
    write or a crash between the two leaves the offset's previous page readable, and the
    file always names exactly the pages stored (``docs/swap-areas.md``).  Every page read
    is checked against its CRC-32; a damaged one is an error, never data.  No fsync per
    write (a killed process loses nothing the kernel already has): :meth:`sync` flushes.
    """

    def __init__(self, path: Path | str, pages: int, swap_type: int = 0,
                 boot_id: bytes | None = None, exclusive: bool = False) -> None:
        """Create the area file (an older file of that name is replaced, as ``swapon``;
        with ``exclusive``, a file that exists is refused instead).

        ``boot_id`` (16 bytes: the kernel's ``boot_id``) goes into the file's use mark, so a
        restart after a reboot can tell the area was in use when the system went down.
        """
        if pages > swapfile.MAX_PAGES:
            raise AbiError(f"a swap area file holds at most {swapfile.MAX_PAGES} pages")
        super().__init__(pages)
        self.path = Path(path)
        layout = swapfile.Layout(pages, swap_type)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                         | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)
        except OSError as exc:
            raise BackendError(f"swap file {self.path}: cannot create it: {exc}") from exc
        try:
            os.ftruncate(fd, layout.file_size)
            # The header and the index get their blocks now, so rewriting an entry never
            # needs room the disk may not have; the slots stay sparse.
            with contextlib.suppress(OSError):  # no fallocate here (some FUSE/NFS): sparse
                os.posix_fallocate(fd, 0, layout.data_start)
            os.pwrite(fd, layout.header(), 0)
            os.pwrite(fd, swapfile.encode_use(boot_id or NO_BOOT, swapfile.IN_USE),
                      swapfile.USE_AT)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise BackendError(f"swap file {self.path}: cannot create it: {exc}") from exc
        self._setup(fd, swapfile.Scan(layout), boot_id)
        fsync_directory(self.path.parent)

    @classmethod
    def attach(cls, path: Path | str, boot_id: bytes | None = None) -> FileBacking:
        """Take over an area file a stopped (or killed) daemon left: every entry and page
        is checked; the damaged ones are listed in :attr:`damaged` and never returned.

        SwapFileError if the file is not a usable area (bad header, index cut short), and
        SwapAreaStale if it was in use when the system went down (``boot_id`` is this
        boot's; None skips that check); BackendError if it cannot be opened or read.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise BackendError(f"swap file {path}: cannot open it: {exc}") from exc
        try:
            found = swapfile.scan(fd, str(path))
            if swapfile.stale_after_reboot(found.use, boot_id):
                raise swapfile.SwapAreaStale(
                    f"{path}: in use when the system went down (no clean stop since); pages "
                    "written after its last clean stop may come back older: not re-attached")
            if os.fstat(fd).st_size < found.layout.file_size:  # cut short: whole again
                os.ftruncate(fd, found.layout.file_size)
        except OSError as exc:
            os.close(fd)
            raise BackendError(f"swap file {path}: cannot read it: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        self = cls.__new__(cls)
        BackingStore.__init__(self, found.layout.pages)
        self.path = path
        self._setup(fd, found, boot_id)
        self._stopped = True
        try:
            self._touch()  # in use again, from this boot
        except BackendError:
            self.close()
            raise
        return self

    def _setup(self, fd: int, found: swapfile.Scan, boot_id: bytes | None) -> None:
        if not hasattr(self, "_io"):
            #: Frontswap calls a store for different offsets from several threads: the free
            #: list, the entries and the index are changed under this lock.
            self._io = threading.RLock()
        self._fd = fd
        self._boot_id = boot_id or NO_BOOT
        #: The use mark on disk says "stopped cleanly": the next change must say "in use".
        self._stopped = False
        self.layout = found.layout
        self.swap_type = found.layout.swap_type
        #: offset -> (slot, page CRC) of every valid page.
        self._entries: dict[int, tuple[int, int]] = dict(found.entries)
        #: offset -> why its page cannot be read (found at attach, or at a read).
        self.damaged: dict[int, str] = dict(found.damaged)
        used = {slot for slot, _crc in self._entries.values()}
        #: Free slots, lowest last (popped first).
        self._free = [s for s in range(found.layout.slots - 1, -1, -1) if s not in used]
        #: Index writes that failed (the file may name an older page there after a crash).
        self.index_errors = 0
        #: Offsets forgotten whose index entry could not be cleared: the file may still
        #: name a page there (each later discard tries again; a write replaces the entry).
        self._uncleared: set[int] = set()

    def _mark(self, state: int) -> None:
        """Write and flush the use mark (OSError as BackendError)."""
        try:
            self._pwrite(swapfile.encode_use(self._boot_id, state), swapfile.USE_AT)
            os.fsync(self._fd)
        except OSError as exc:
            raise self._fail("cannot write its use mark", exc) from exc

    def _touch(self) -> None:
        """Before a change to an area marked stopped: mark it in use (one fsync)."""
        if self._stopped:
            self._mark(swapfile.IN_USE)
            self._stopped = False

    @_locked
    def mark_stopped(self) -> None:
        """After the final :meth:`sync`: the area was stopped cleanly, whatever boot comes."""
        self._mark(swapfile.STOPPED)
        self._stopped = True

    def _fail(self, what: str, exc: OSError) -> BackendError:
        return BackendError(f"swap file {self.path}: {what}: {exc}")

    def _pwrite(self, data: bytes, position: int) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, "the swap area is closed")
        if os.pwrite(self._fd, data, position) != len(data):
            raise OSError(errno.EIO, "short write")

    @_locked
    def write(self, offset: int, page: bytes) -> None:
        self.check_offset(offset)
        self._touch()
        if not self._free:  # pages + 1 slots: one is free unless index writes failed
            raise BackendError(f"swap file {self.path}: no free slot (after index errors)")
        slot = self._free.pop()
        crc = swapfile.page_crc(page)
        try:
            self._pwrite(page, self.layout.slot_at(slot))
        except OSError as exc:
            self._free.append(slot)
            raise self._fail(f"write of slot {offset} refused", exc) from exc
        old = self._entries.get(offset)
        try:
            self._pwrite(swapfile.encode_entry(offset, slot, crc), self.layout.entry_at(offset))
        except OSError as exc:
            self.index_errors += 1
            previous = (swapfile.EMPTY_ENTRY if old is None
                        else swapfile.encode_entry(offset, *old))
            try:  # put the previous entry back: then nothing changed
                self._pwrite(previous, self.layout.entry_at(offset))
            except OSError:
                log.error("swap file %s: the index entry of slot %d is unknown after a "
                          "failed write; a restart may find it damaged", self.path, offset)
                # It may name the refused page: the next discard clears it (else a later
                # page of this offset kept in tmem only lost to it after a restart).
                self._uncleared.add(offset)
            else:
                self._free.append(slot)
            raise self._fail(f"write of slot {offset} refused (index)", exc) from exc
        self._entries[offset] = (slot, crc)
        self.damaged.pop(offset, None)
        self._uncleared.discard(offset)
        if old is not None:
            self._free.append(old[0])

    @_locked
    def read(self, offset: int) -> bytes | None:
        if offset in self.damaged:
            raise BackendError(f"swap file {self.path}: slot {offset} is damaged "
                               f"({self.damaged[offset]})")
        entry = self._entries.get(offset)
        if entry is None:
            return None
        slot, crc = entry
        try:
            page = os.pread(self._fd, PAGE_SIZE, self.layout.slot_at(slot))
        except OSError as exc:
            raise self._fail(f"read of slot {offset} failed", exc) from exc
        if len(page) != PAGE_SIZE or swapfile.page_crc(page) != crc:
            why = "cut short" if len(page) != PAGE_SIZE else "page checksum mismatch"
            self.damaged[offset] = why
            del self._entries[offset]
            self._free.append(slot)  # the entry on disk stays damaged: the slot is reusable
            raise BackendError(f"swap file {self.path}: slot {offset} is damaged ({why})")
        return page

    def discard(self, offset: int, durable: bool = False) -> None:
        if offset not in self._entries and offset not in self.damaged and \
                offset not in self._uncleared:
            return  # nothing there (frontswap's slot lock keeps this offset still meanwhile)
        self._discard(offset, durable)

    @_locked
    def _discard(self, offset: int, durable: bool) -> None:
        entry = self._entries.get(offset)
        if entry is None and offset not in self.damaged and offset not in self._uncleared:
            return
        try:
            self._touch()
            self._pwrite(swapfile.EMPTY_ENTRY, self.layout.entry_at(offset))
        except (OSError, BackendError) as exc:
            self.index_errors += 1
            if durable:  # refused: the slot stays as the file names it
                log.error("swap file %s: slot %d not freed: its index entry could not be "
                          "cleared (%s)", self.path, offset, exc)
                raise BackendError(f"swap file {self.path}: slot {offset} not freed: its "
                                   f"index entry could not be cleared: {exc}") from exc
            self._uncleared.add(offset)
            log.error("swap file %s: slot %d freed but its index entry could not be "
                      "cleared (%s); a restart may find the older page there",
                      self.path, offset, exc)
        else:
            self._uncleared.discard(offset)
        self._entries.pop(offset, None)
        self.damaged.pop(offset, None)
        if entry is not None:
            self._free.append(entry[0])

    @_locked
    def has(self, offset: int) -> bool:
        return offset in self._entries or offset in self.damaged

    @_locked
    def used(self) -> int:
        return len(self._entries)

    @_locked
    def offsets(self) -> list[int]:
        return sorted(self._entries)

    @_locked
    def clear(self) -> None:
        try:
            self._touch()
            self._pwrite(bytes(self.layout.data_start - self.layout.index_start),
                         self.layout.index_start)
        except (OSError, BackendError) as exc:
            self.index_errors += 1
            log.error("swap file %s: the index could not be cleared: %s", self.path, exc)
        self._setup(self._fd, swapfile.Scan(self.layout), self._boot_id)

    @_locked
    def sync(self) -> None:
        """Flush the pages and the index to stable storage (at unload and at exit)."""
        try:
            if self._fd < 0:
                raise OSError(errno.EBADF, "the swap area is closed")
            os.fsync(self._fd)
        except OSError as exc:
            raise self._fail("fsync failed", exc) from exc

    @_locked
    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @_locked
    def describe(self) -> dict[str, object]:
        return {**super().describe(), "path": str(self.path), "damaged": len(self.damaged),
                "index_errors": self.index_errors}
