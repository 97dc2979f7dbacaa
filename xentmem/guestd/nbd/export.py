"""One NBD export: a swap area seen as a block device, every page through frontswap.

A 4 KiB write is a frontswap store (tmem first; what tmem refuses goes to the area's backing
store), a read is a load (a page never written reads as zeroes, as a fresh disk), trim and
write-zeroes invalidate (a write-zeroes only if that lasts across a restart), flush syncs
the backing store.  Every request is checked before
anything changes (:meth:`Export.check`): a refused request changed nothing.  The errors are
the protocol's (``proto.EINVAL`` ...), raised as :class:`NbdError`.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from xentmem.errors import AbiError, BackendError
from xentmem.guest.frontends import Frontswap
from xentmem.guest.frontends.backing import BackingStore
from xentmem.guestd.nbd import proto
from xentmem.guestd.nbd.fanout import PageFanout
from xentmem.tmem.abi import PAGE_SIZE

log = logging.getLogger(__name__)
T = TypeVar("T")

ZERO_PAGE = bytes(PAGE_SIZE)
#: OS errors a write reports as "no space" (the protocol: map EDQUOT and EFBIG to ENOSPC).
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NAMES = {proto.EIO: "EIO", proto.EINVAL: "EINVAL", proto.ENOSPC: "ENOSPC",
          proto.ESHUTDOWN: "ESHUTDOWN", proto.EPERM: "EPERM"}


class NbdError(Exception):
    """A request refused with one of the protocol's error values."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error

    @property
    def name(self) -> str:
        return _NAMES.get(self.error, str(self.error))


def _backend_errno(exc: BackendError, writing: bool) -> int:
    """The protocol's error for a backing store's failure: ENOSPC for a full disk (on a
    write), EIO for the rest (a damaged page, a failed read)."""
    cause = exc.__cause__
    if writing and isinstance(cause, OSError) and cause.errno in _NO_SPACE:
        return proto.ENOSPC
    return proto.EIO


class Export:
    """Swap type ``swap_type`` of ``frontswap`` as an export of ``pages`` 4 KiB blocks.

    Thread-safe (frontswap is): connections of one export run on threads of their own.
    """

    def __init__(self, name: str, frontswap: Frontswap, swap_type: int, pages: int,
                 backing: BackingStore) -> None:
        self.name = name
        self.frontswap = frontswap
        self.swap_type = swap_type
        self.pages = pages
        self.size = pages * PAGE_SIZE
        self.backing = backing
        self.flags = proto.TRANSMISSION_FLAGS
        #: The ``/dev/nbdN`` a caller said it attached this export to (None: not said).
        self.device: str | None = None
        #: Set when the export is being deleted or the server stops: new requests get
        #: ESHUTDOWN.
        self.closing = False
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        #: The counters of every read and write (the hot path): attributes, not dict items.
        self._reads = self._writes = self._to_tmem = self._to_backing = 0

    @property
    def description(self) -> str:
        return f"xentmem swap type {self.swap_type}, {self.pages} pages"

    def count(self, what: str, n: int = 1) -> None:
        counts = self._counts
        with self._lock:
            counts[what] = counts.get(what, 0) + n

    def counts(self) -> dict[str, int]:
        """Every counter that moved, by name (``nbd.list``'s ``counts``)."""
        with self._lock:
            counts = dict(self._counts)
            if self._reads:
                counts["reads"] = self._reads
            if self._writes:
                counts.update(writes=self._writes, pages_to_tmem=self._to_tmem,
                              pages_to_backing=self._to_backing)
        return counts

    # -- checks ------------------------------------------------------------------------------

    def check(self, cmd: int, flags: int, offset: int, length: int) -> None:
        """Refuse a request before it changes anything, with the protocol's error."""
        if self.closing:
            raise NbdError(proto.ESHUTDOWN, f"export {self.name} is going away")
        allowed = proto.CMD_FLAGS_ALLOWED.get(cmd)
        if allowed is None:
            raise NbdError(proto.EINVAL, f"command {cmd} is not supported")
        if flags & ~allowed:
            raise NbdError(proto.EINVAL, f"command flags {flags:#x} not valid for command {cmd}")
        if cmd == proto.CMD_FLUSH:
            if offset or length:
                raise NbdError(proto.EINVAL, "a flush's offset and length must be zero")
            return
        if offset % proto.MIN_BLOCK or length % proto.MIN_BLOCK:
            raise NbdError(proto.EINVAL, f"offset {offset} or length {length} is not a "
                                         f"multiple of {proto.MIN_BLOCK}")
        if cmd != proto.CMD_TRIM and length > proto.MAX_BLOCK:
            raise NbdError(proto.EINVAL, f"length {length} exceeds the maximum block size "
                                         f"{proto.MAX_BLOCK}")
        if offset + length > self.size:
            # A write past the end is ENOSPC; a read or a trim past it EINVAL ("Error values").
            error = proto.EINVAL if cmd in (proto.CMD_READ, proto.CMD_TRIM) else proto.ENOSPC
            raise NbdError(error, f"{offset}+{length} is beyond the export's {self.size} bytes")

    # -- commands (each after check) -----------------------------------------------------------

    def _each_page(self, fn: Callable[[int], T], count: int,
                   fanout: PageFanout | None) -> list[T]:
        """``fn(i)`` for each page of a request: side by side on ``fanout``'s threads where
        the backend batches (``Backend.concurrency``), raising the first error once every
        page ran; else in order, stopping at the first error."""
        ops = self.frontswap.ops
        width = ops.concurrency() if ops is not None else 1
        if width > 1 and count > 1 and fanout is not None:
            return fanout.map(fn, count, width)
        return [fn(i) for i in range(count)]

    def read(self, offset: int, length: int, fanout: PageFanout | None = None) -> bytes:
        """The pages of ``[offset, offset+length)``; EIO (and no data) if one is unreadable.
        ``fanout``: threads to load the pages side by side (see :meth:`_each_page`)."""
        first = offset // PAGE_SIZE
        load, swap_type = self.frontswap.load, self.swap_type

        def get(i: int) -> bytes:
            try:
                data = load(swap_type, first + i)
            except BackendError as exc:
                log.error("nbd export %s: page %d: %s", self.name, first + i, exc)
                raise
            return ZERO_PAGE if data is None else data

        try:
            pages = self._each_page(get, length // PAGE_SIZE, fanout)
        except BackendError as exc:
            self.count("read_errors")
            raise NbdError(_backend_errno(exc, writing=False), str(exc)) from exc
        except AbiError as exc:
            raise NbdError(proto.EINVAL, str(exc)) from exc
        with self._lock:
            self._reads += 1
        return pages[0] if len(pages) == 1 else b"".join(pages)

    def write(self, offset: int, data: bytes | memoryview, fua: int = 0,
              fanout: PageFanout | None = None) -> None:
        """Store each page.  A page is all or nothing; if the backing store refuses a page
        (a full disk), the request fails (ENOSPC or EIO): pages before it are written, and,
        where the pages went side by side, those after it may be too (the protocol leaves
        a failed write's blocks undefined).

        ``data`` may be a view of a buffer that is reused: each page is copied before it is
        handed to frontswap (a backend may keep the object)."""
        first = offset // PAGE_SIZE
        count = len(data) // PAGE_SIZE
        store, swap_type = self.frontswap.store, self.swap_type

        def put(i: int) -> bool:
            try:
                return store(swap_type, first + i,
                             bytes(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])) == 0
            except BackendError as exc:
                log.error("nbd export %s: page %d not stored: %s", self.name, first + i, exc)
                raise

        try:
            in_tmem = put(0) if count == 1 else sum(self._each_page(put, count, fanout))
        except BackendError as exc:
            self.count("write_errors")
            raise NbdError(_backend_errno(exc, writing=True), str(exc)) from exc
        except AbiError as exc:
            raise NbdError(proto.EINVAL, str(exc)) from exc
        with self._lock:
            self._writes += 1
            self._to_tmem += in_tmem
            self._to_backing += count - in_tmem
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Invalidate the pages: the swap slots are free (reads give zeroes after)."""
        first = offset // PAGE_SIZE
        for page in range(first, first + length // PAGE_SIZE):
            self._invalidate(page)
        self.count("trims")
        if fua:
            self.flush()

    def write_zeroes(self, offset: int, length: int, flags: int) -> None:
        """Invalidate the pages (they read as zeroes); with NO_HOLE store zero pages instead,
        so the backing store's slots are provisioned where tmem refuses them.

        Unlike a trim's, the invalidation must last: a page whose backing file still names
        its old contents (its index entry could not be cleared) fails the request with EIO,
        for a restart would read that page back (the protocol lets a trim leave old data,
        not a write-zeroes)."""
        if flags & proto.CMD_FLAG_NO_HOLE:
            self.write(offset, bytes(length))
        else:
            first = offset // PAGE_SIZE
            for page in range(first, first + length // PAGE_SIZE):
                self._invalidate(page, durable=True)
        self.count("write_zeroes")
        if flags & proto.CMD_FLAG_FUA:
            self.flush()

    def _invalidate(self, page: int, durable: bool = False) -> None:
        try:
            self.frontswap.invalidate_page(self.swap_type, page, durable)
        except (BackendError, AbiError) as exc:
            self.count("trim_errors")
            raise NbdError(proto.EIO, str(exc)) from exc

    def flush(self) -> None:
        """Every write already answered (on any connection) reaches stable storage."""
        try:
            self.backing.sync()
        except BackendError as exc:
            self.count("flush_errors")
            log.error("nbd export %s: flush: %s", self.name, exc)
            raise NbdError(proto.EIO, str(exc)) from exc
        self.count("flushes")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "type": self.swap_type,
                "pages": self.pages,
                "size": self.size, "closing": self.closing, "counts": self.counts()}
