"""The swap device behind frontswap: where a page lives when it is not in tmem.

In the kernel a frontswap store that fails makes swap write the page to disk, and a shrink
or swapoff brings tmem pages back through the swap cache.  Here the frontswap frontend owns
one backing store per swap type, so a page is always either in tmem or in its backing store,
and unloading a backend can repatriate every persistent page before the backend goes.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from xentmem.errors import AbiError, BackendError
from xentmem.tmem.abi import PAGE_SIZE


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
    def discard(self, offset: int) -> None:
        """Forget a slot (the swap entry was freed)."""

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

    def discard(self, offset: int) -> None:
        self._slots.pop(offset, None)

    def used(self) -> int:
        return len(self._slots)

    def offsets(self) -> list[int]:
        return list(self._slots)

    def clear(self) -> None:
        self._slots.clear()


class FileBacking(BackingStore):
    """Slots in a sparse file, ``pages * 4096`` bytes, like a swap file.

    Which slots are valid is kept in memory (as the swap map is); the file holds the data.
    """

    def __init__(self, path: Path | str, pages: int) -> None:
        super().__init__(pages)
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(self._fd, pages * PAGE_SIZE)
        except OSError:
            os.close(self._fd)
            raise
        self._valid: set[int] = set()

    def write(self, offset: int, page: bytes) -> None:
        self.check_offset(offset)
        try:
            written = os.pwrite(self._fd, page, offset * PAGE_SIZE)
        except OSError as exc:
            raise BackendError(
                f"swap file {self.path}: write of slot {offset} failed: {exc}"
            ) from exc
        if written != len(page):
            raise BackendError(f"swap file {self.path}: short write at slot {offset}")
        self._valid.add(offset)

    def read(self, offset: int) -> bytes | None:
        if offset not in self._valid:
            return None
        return os.pread(self._fd, PAGE_SIZE, offset * PAGE_SIZE)

    def discard(self, offset: int) -> None:
        self._valid.discard(offset)

    def used(self) -> int:
        return len(self._valid)

    def offsets(self) -> list[int]:
        return sorted(self._valid)

    def clear(self) -> None:
        self._valid.clear()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "path": str(self.path)}
