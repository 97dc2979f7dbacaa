"""The page arena's one file: a checksummed header, then whole segments, each mapped alone.

The file outlives the process (it lives on tmpfs in the service's runtime directory), so
everything in it is read back after a crash at any instant: the header is written once, to a
temporary file renamed into place, so it is never torn; a segment is added by growing the
file and then writing its own small header, checksum last, so a grow torn by a crash leaves a
segment that reads as free.  What is checked, what is refused and what is set aside:
``docs/page-arena.md``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import time
from enum import IntEnum
from pathlib import Path

import xxhash

from xentmem.errors import ArenaDamaged, ArenaError, ArenaRefused

log = logging.getLogger(__name__)

PAGE = 4096
#: The file header takes the first page; segments follow, each ``segment_size`` bytes.
HEADER_SIZE = PAGE
MAGIC = b"XENTMEM-ARENA\0\0\0"
VERSION = 1
#: magic, version, page size, segment size, allocator, reserved, created (ns); then xxh3-64.
_HEADER = struct.Struct("<16sIIQIIQ")
_HEADER_SUM = struct.Struct("<Q")
#: Segments of 64 KiB up to 1 GiB; the default keeps each growth of tmpfs small.
MIN_SEGMENT = 16 * PAGE
MAX_SEGMENT = 1 << 30
DEFAULT_SEGMENT = 8 << 20

#: Each segment's first page: magic, kind, ordinal within its kind, xxh3-64 of those; then
#: the high-water mark of an index segment's records (not checksummed: only ever raised, and
#: a mark too high costs a longer scan, never a wrong page).
SEG_MAGIC = b"XTMSEG\0\1"
_SEG = struct.Struct("<8sII")
_SEG_SUM = struct.Struct("<Q")
SEG_SUM_OFFSET = _SEG.size
SEG_HWM_OFFSET = SEG_SUM_OFFSET + _SEG_SUM.size
SEG_HWM = struct.Struct("<I")


class Kind(IntEnum):
    """What a segment holds."""

    FREE = 0
    OBJECTS = 1
    PAGES = 2
    DATA = 3


#: The allocators' numbers in the header.
ALLOCATORS = {"zbud": 1, "zsmalloc": 2}
_ALLOCATOR_NAMES = {number: name for name, number in ALLOCATORS.items()}


def _header_bytes(segment_size: int, allocator: str) -> bytes:
    fields = _HEADER.pack(
        MAGIC, VERSION, PAGE, segment_size, ALLOCATORS[allocator], 0, time.time_ns()
    )
    return fields + _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(fields))


def _check_segment_size(segment_size: int) -> None:
    if segment_size % PAGE or not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
        raise ValueError(
            f"segment size {segment_size} must be a multiple of {PAGE} "
            f"from {MIN_SEGMENT} to {MAX_SEGMENT}"
        )


class ArenaFile:
    """An open, locked arena file and its mapped segments, by kind, in ordinal order."""

    def __init__(self, path: Path, fd: int, segment_size: int, allocator: str) -> None:
        self.path = path
        self.fd = fd
        self.segment_size = segment_size
        self.allocator = allocator
        #: Per kind, the segments' maps in ordinal order.
        self.maps: dict[Kind, list[mmap.mmap]] = {Kind.OBJECTS: [], Kind.PAGES: [], Kind.DATA: []}
        #: File positions (segment numbers) of segments that hold nothing yet.
        self._free: list[int] = []
        self._all: list[mmap.mmap] = []
        #: Segments found free because their header was torn or unreadable (logged).
        self.torn_segments = 0

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, *, allocator: str, segment_size: int) -> None:
        """Write a new, empty arena at ``path``, atomically: header to a temporary, then
        linked into place; FileExistsError if another process made one first."""
        _check_segment_size(segment_size)
        tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.ftruncate(fd, HEADER_SIZE)
                os.pwrite(fd, _header_bytes(segment_size, allocator), 0)
            finally:
                os.close(fd)
            os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @classmethod
    def open(cls, path: Path) -> ArenaFile:
        """Open and lock an existing arena, check its header and map its segments.

        ArenaRefused: not ours, or a newer version's (never touched).  ArenaDamaged: ours but
        damaged.  ArenaError: in use by another process, or unreadable.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ArenaError(f"arena {path}: cannot open: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ArenaError(
                    f"arena {path}: in use by another process (it holds the file's lock)"
                ) from None
            segment_size, allocator = _check_header(path, fd)
            arena = cls(path, fd, segment_size, allocator)
            arena._map_segments()
            return arena
        except BaseException:
            os.close(fd)
            raise

    def _map_segments(self) -> None:
        size = os.fstat(self.fd).st_size
        count = (size - HEADER_SIZE) // self.segment_size
        found: dict[Kind, dict[int, mmap.mmap]] = {k: {} for k in self.maps}
        for number in range(count):
            mm = self._map(number)
            self._all.append(mm)
            magic, kind, ordinal = _SEG.unpack_from(mm, 0)
            (stored,) = _SEG_SUM.unpack_from(mm, SEG_SUM_OFFSET)
            if magic == bytes(8) and stored == 0:
                self._free.append(number)
                continue
            good = (
                magic == SEG_MAGIC
                and stored == xxhash.xxh3_64_intdigest(mm[: _SEG.size])
                and kind in (Kind.OBJECTS, Kind.PAGES, Kind.DATA)
            )
            if not good:
                # A grow torn by a crash: nothing was placed in it before its header was
                # complete.  A damaged one that did hold records shows up as a gap below.
                log.warning("arena %s: segment %d has no valid header; reused as free",
                            self.path, number)
                self.torn_segments += 1
                self._free.append(number)
                continue
            if ordinal in found[Kind(kind)]:
                raise ArenaDamaged(
                    f"arena {self.path}: two {Kind(kind).name.lower()} segments claim "
                    f"ordinal {ordinal}"
                )
            found[Kind(kind)][ordinal] = mm
        for kind, by_ordinal in found.items():
            if sorted(by_ordinal) != list(range(len(by_ordinal))):
                missing = sorted(set(range(max(by_ordinal) + 1)) - set(by_ordinal))
                raise ArenaDamaged(
                    f"arena {self.path}: {kind.name.lower()} segment(s) {missing} missing "
                    "(a segment header is damaged)"
                )
            self.maps[kind] = [by_ordinal[i] for i in range(len(by_ordinal))]

    def _map(self, number: int) -> mmap.mmap:
        offset = HEADER_SIZE + number * self.segment_size
        return mmap.mmap(self.fd, self.segment_size, offset=offset)

    # -- growing -----------------------------------------------------------------------------

    def add_segment(self, kind: Kind) -> mmap.mmap:
        """A new segment for ``kind``: a free one of the file, else the file grows by one.

        The segment's memory is reserved (``posix_fallocate``), so a full tmpfs is an
        ArenaError here rather than a SIGBUS on a later write into the map.
        """
        ordinal = len(self.maps[kind])
        if self._free:
            number = self._free.pop(0)
            mm = self._all[number]
            mm[:] = bytes(self.segment_size)  # whatever a torn grow left
        else:
            number = len(self._all)
            try:
                os.posix_fallocate(self.fd, HEADER_SIZE + number * self.segment_size,
                                   self.segment_size)
            except OSError as exc:
                # Give back what a partial reservation took; the file keeps whole segments.
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, HEADER_SIZE + number * self.segment_size)
                raise ArenaError(
                    f"arena {self.path}: cannot grow by {self.segment_size} bytes: "
                    f"{exc.strerror or errno.errorcode.get(exc.errno or 0, exc)}"
                ) from None
            mm = self._map(number)
            self._all.append(mm)
        fields = _SEG.pack(SEG_MAGIC, kind, ordinal)
        mm[: _SEG.size] = fields
        _SEG_SUM.pack_into(mm, SEG_SUM_OFFSET, xxhash.xxh3_64_intdigest(fields))
        self.maps[kind].append(mm)
        return mm

    # -- figures and closing -----------------------------------------------------------------

    def file_bytes(self) -> int:
        """Bytes the file takes (the header and every segment, reserved or not)."""
        return HEADER_SIZE + len(self._all) * self.segment_size

    def close(self) -> None:
        """Unmap and unlock; the file and its pages stay for the next open."""
        for mm in self._all:
            with contextlib.suppress(BufferError):
                mm.close()
        self._all.clear()
        for maps in self.maps.values():
            maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_header(path: Path, fd: int) -> tuple[int, str]:
    """The segment size and allocator of a sound header; else why not, naming the file."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, _HEADER.size + _HEADER_SUM.size, 0)
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        if size == 0:
            raise ArenaDamaged(f"arena {path}: empty file (0 bytes), no arena header")
        raise ArenaRefused(
            f"arena {path}: not a xentmem page arena (no {MAGIC.rstrip(bytes(1)).decode()} "
            "magic at its start); left untouched"
        )
    if len(raw) < _HEADER.size + _HEADER_SUM.size or size < HEADER_SIZE:
        raise ArenaDamaged(f"arena {path}: truncated header ({size} bytes)")
    _, version, page, segment_size, allocator, _, _ = _HEADER.unpack_from(raw)
    (stored,) = _HEADER_SUM.unpack_from(raw, _HEADER.size)
    if stored != xxhash.xxh3_64_intdigest(raw[: _HEADER.size]):
        raise ArenaDamaged(f"arena {path}: header checksum mismatch")
    if version > VERSION:
        raise ArenaRefused(
            f"arena {path}: format version {version} is newer than this xentmem's "
            f"({VERSION}); left untouched"
        )
    if version != VERSION:
        raise ArenaDamaged(f"arena {path}: unknown format version {version}")
    if page != PAGE:
        raise ArenaDamaged(f"arena {path}: page size {page}, not {PAGE}")
    try:
        _check_segment_size(segment_size)
    except ValueError as exc:
        raise ArenaDamaged(f"arena {path}: {exc}") from None
    if allocator not in _ALLOCATOR_NAMES:
        raise ArenaDamaged(f"arena {path}: unknown allocator number {allocator}")
    if (size - HEADER_SIZE) % segment_size:
        raise ArenaDamaged(
            f"arena {path}: size {size} is not the {HEADER_SIZE}-byte header plus whole "
            f"segments of {segment_size} bytes"
        )
    return segment_size, _ALLOCATOR_NAMES[allocator]


def set_aside(path: Path) -> Path:
    """Rename a damaged arena out of the way (kept for inspection, never read again)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    os.replace(path, target)
    return target
