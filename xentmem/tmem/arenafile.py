"""The page arena's one file: a checksummed header, high-water marks, three regions.

::

    0        header (one page): magic, version, sizes, allocator, xxh3-64 of them
    4096     marks (one page): how far the object and page records ever reached, how much
             of the data region is reserved
    8192     objects region   fixed-size object records
    ...      pages region     fixed-size page records
    ...      data region      4 KiB frames the allocator packs pages into

The file is sparse and mapped whole, once: a region's memory is reserved
(``posix_fallocate``) a segment at a time as it fills, so a full tmpfs is an error at that
moment rather than a SIGBUS on a later write into the map, and the process pays for what
the arena holds, not for its size.  The header is written once, to a temporary file linked
into place, so it is never torn.  A mark is raised before a record beyond it is written, so
every record is below its mark, and only over slots zeroed first; the marks have no checksum,
so a reopen checks a records mark against what the file holds (:meth:`ArenaFile.records_end`).
What is checked, refused or set aside: ``docs/page-arena.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import time
from pathlib import Path

import xxhash

from xentmem.errors import ArenaDamaged, ArenaError, ArenaRefused

log = logging.getLogger(__name__)

PAGE = 4096
#: The header page and the marks page come before the regions.
REGIONS_AT = 2 * PAGE
MAGIC = b"XENTMEM-ARENA\0\0\0"
VERSION = 1
#: magic, version, page size, segment size, allocator, reserved, created (ns), bytes of the
#: objects, pages and data regions; then xxh3-64 of those.
_HEADER = struct.Struct("<16sIIQIIQQQQ")
_HEADER_SUM = struct.Struct("<Q")
#: The marks: object records, page records, bytes of the data region reserved (u64 each).
_MARKS = struct.Struct("<QQQ")
#: Reservation steps from 64 KiB to 1 GiB; the default keeps each growth of tmpfs small.
MIN_SEGMENT = 16 * PAGE
MAX_SEGMENT = 1 << 30
DEFAULT_SEGMENT = 8 << 20
#: How much a region's reservation grows at a time (at most a segment): what the arena may
#: hold beyond what it uses, until the next put or trim.
DATA_STEP = 256 << 10
RECORDS_STEP = 16 << 10
#: A page record names its bytes in 16-byte units with a u32: at most 64 GiB of frames.
MAX_DATA = (1 << 32) * 16
#: The allocators' numbers in the header.
ALLOCATORS = {"zbud": 1, "zsmalloc": 2}
_ALLOCATOR_NAMES = {number: name for name, number in ALLOCATORS.items()}
OBJECTS, PAGES, DATA = 0, 1, 2
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
#: fallocate(2)'s mode for a hole that keeps the file's size (linux/falloc.h).
_FALLOC_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
_REGION_NAMES = ("objects", "pages", "data")


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def region_sizes(data_bytes: int, segment_size: int) -> tuple[int, int, int]:
    """The three regions for ``data_bytes`` of frames: a quarter of that for each table of
    records, room for a record per 80 bytes of frames (zero pages take no frame)."""
    data = min(_round_up(max(data_bytes, segment_size), segment_size), MAX_DATA)
    records = _round_up(max(data // 4, segment_size), segment_size)
    return records, records, data


def _check_segment_size(segment_size: int) -> None:
    if segment_size % PAGE or not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
        raise ValueError(
            f"segment size {segment_size} must be a multiple of {PAGE} "
            f"from {MIN_SEGMENT} to {MAX_SEGMENT}"
        )


class ArenaFile:
    """An open, locked arena file, mapped whole."""

    def __init__(self, path: Path, fd: int, segment_size: int, allocator: str,
                 sizes: tuple[int, int, int]) -> None:
        self.path = path
        self.fd = fd
        self.segment_size = segment_size
        self.allocator = allocator
        self.sizes = sizes
        self.bases = (REGIONS_AT, REGIONS_AT + sizes[0], REGIONS_AT + sizes[0] + sizes[1])
        self.size = REGIONS_AT + sum(sizes)
        self.mm = mmap.mmap(fd, self.size)
        #: Bytes of each region reserved so far (from its start).
        self.reserved = [0, 0, 0]
        #: Whether the filesystem tells the file's holes apart (tmpfs, ext4, xfs do): the
        #: file is always sparse, so one that reports no hole before its end does not.
        try:
            self.holes_told = os.lseek(fd, 0, os.SEEK_HOLE) < self.size
        except OSError:
            self.holes_told = False

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, *, allocator: str, segment_size: int, data_bytes: int) -> None:
        """Write a new, empty arena at ``path``, atomically: header to a temporary, then
        linked into place; FileExistsError if another process made one first."""
        _check_segment_size(segment_size)
        sizes = region_sizes(data_bytes, segment_size)
        fields = _HEADER.pack(MAGIC, VERSION, PAGE, segment_size, ALLOCATORS[allocator], 0,
                              time.time_ns(), *sizes)
        header = fields + _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(fields))
        tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.ftruncate(fd, REGIONS_AT + sum(sizes))  # sparse: costs nothing yet
                os.pwrite(fd, header, 0)
            finally:
                os.close(fd)
            os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @classmethod
    def open(cls, path: Path) -> ArenaFile:
        """Open, lock and map an existing arena after checking its header.

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
            segment_size, allocator, sizes = _check_header(path, fd)
            return cls(path, fd, segment_size, allocator, sizes)
        except BaseException:
            os.close(fd)
            raise

    # -- marks and reservations --------------------------------------------------------------

    def marks(self) -> tuple[int, int, int]:
        """How many object and page records were ever reached (records beyond are zero),
        and how many bytes of the data region were reserved."""
        return _MARKS.unpack_from(self.mm, PAGE)  # type: ignore[return-value]

    def set_mark(self, region: int, value: int) -> None:
        _MARKS.pack_into(self.mm, PAGE, *(
            value if r == region else m for r, m in enumerate(self.marks())
        ))

    def held_runs(self, region: int, start: int, end: int) -> list[tuple[int, int]] | None:
        """The runs ``(a, b)`` of bytes from ``start`` to ``end`` of a region (counted from
        the region's start) that the file holds (``SEEK_DATA``, ``SEEK_HOLE``): what was
        ever written there and not given back.  None when the filesystem does not tell."""
        if not self.holes_told:
            return None
        base = self.bases[region]
        pos, stop = base + start, base + end
        runs: list[tuple[int, int]] = []
        while pos < stop:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= stop:
                break
            pos = min(os.lseek(self.fd, data, os.SEEK_HOLE), stop)
            runs.append((data - base, pos - base))
        return runs

    def records_end(self, region: int, size: int, mark: int, capacity: int) -> int:
        """The slot after the last record a reopen reads in a records region, from its mark
        (the marks page has no checksum) checked against what the file holds there: no
        further than the last byte it holds (a mark raised by damage reserves nothing past
        it), and as far as the last committed record (commit word, a record's last 4 bytes,
        not 0) it holds at or past the mark (read with ``pread``: a hole costs no memory).
        The mark as it is when the filesystem does not tell holes."""
        runs = self.held_runs(region, 0, capacity * size)
        if runs is None:
            return mark
        mark = min(mark, -(-runs[-1][1] // size) if runs else 0)
        end = mark
        words = size // 4
        step = max(1, (1 << 20) // size)
        for a, b in runs:
            slot, stop = max(mark, a // size), min(capacity, -(-b // size))
            while slot < stop:
                n = min(step, stop - slot)
                raw = os.pread(self.fd, n * size, self.bases[region] + slot * size)
                commits = memoryview(raw[: len(raw) // size * size]).cast("I")[words - 1 :: words]
                last = commits.tobytes().rstrip(bytes(1))
                if last:
                    end = max(end, slot + (len(last) - 1) // 4 + 1)
                slot += n
        return end

    def reserve(self, region: int, upto: int) -> None:
        """Reserve a region's memory through byte ``upto`` (rounded up to a segment, or a
        32nd of one for the records' regions).

        ArenaError when the region is full or tmpfs cannot give the memory.
        """
        if upto <= self.reserved[region]:
            return
        # Frames and records come a few at a time: the regions grow in small steps, so what
        # is reserved stays close to what is used (the capacity counts reserved memory:
        # docs/page-arena.md, "Memory given back").
        step = min(self.segment_size, DATA_STEP if region == DATA else RECORDS_STEP)
        want = _round_up(upto, step)
        if want > self.sizes[region]:
            raise ArenaError(
                f"arena {self.path}: the {_REGION_NAMES[region]} region is full "
                f"({self.sizes[region]} bytes)"
            )
        start = self.reserved[region]
        try:
            os.posix_fallocate(self.fd, self.bases[region] + start, want - start)
        except OSError as exc:
            raise ArenaError(
                f"arena {self.path}: cannot reserve {want - start} more bytes for the "
                f"{_REGION_NAMES[region]} region: {exc.strerror}"
            ) from None
        # Map the reserved pages now, in one call, rather than fault them in one by one
        # as puts first touch them (MADV_POPULATE_WRITE, Linux 5.14; an older kernel
        # refuses it and pays the faults instead).
        with contextlib.suppress(OSError, ValueError):
            self.mm.madvise(_MADV_POPULATE_WRITE, self.bases[region] + start, want - start)
        self.reserved[region] = want
        if region == DATA and want > self.marks()[DATA]:
            self.set_mark(DATA, want)

    def back(self, start: int, length: int) -> None:
        """Reserve again ``length`` bytes at ``start`` of the data region after
        :meth:`unback` gave them back (a frame reused): ArenaError when tmpfs has no memory."""
        at = self.bases[DATA] + start
        try:
            os.posix_fallocate(self.fd, at, length)
        except OSError as exc:
            raise ArenaError(f"arena {self.path}: cannot reserve {length} bytes of the data "
                             f"region again: {exc.strerror}") from None
        with contextlib.suppress(OSError, ValueError):
            self.mm.madvise(_MADV_POPULATE_WRITE, at, length)

    def unback(self, start: int, length: int) -> None:
        """Give the memory of ``length`` bytes at ``start`` of the data region (free frames)
        back to tmpfs: a hole punched in the file, which the kernel also unmaps.  Not
        ``MADV_REMOVE`` on the mapping: once a process serving swap has locked its memory
        (``mlockall``, docs/nbd.md) madvise refuses locked ranges with EINVAL, while a hole
        punched in the file is allowed.  The reserved size of the region is unchanged;
        :meth:`back` takes the memory again."""
        if _fallocate(self.fd, _FALLOC_PUNCH_HOLE, self.bases[DATA] + start, length) != 0:
            err = ctypes.get_errno()
            raise ArenaError(f"arena {self.path}: cannot give back {length} bytes of the data "
                             f"region: {os.strerror(err)}")

    # -- figures and closing -----------------------------------------------------------------

    def reserved_bytes(self) -> int:
        """Bytes of the file reserved (header, marks and every region's reserved part)."""
        return REGIONS_AT + sum(self.reserved)

    def close(self) -> None:
        """Unmap and unlock; the file and its pages stay for the next open."""
        if self.fd < 0:
            return
        with contextlib.suppress(BufferError):
            self.mm.close()
        os.close(self.fd)
        self.fd = -1


def _check_header(path: Path, fd: int) -> tuple[int, str, tuple[int, int, int]]:
    """Segment size, allocator and region sizes of a sound header; else why not."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, _HEADER.size + _HEADER_SUM.size, 0)
    if raw[: len(MAGIC)] != MAGIC:
        if size == 0:
            raise ArenaDamaged(f"arena {path}: empty file (0 bytes), no arena header")
        raise ArenaRefused(
            f"arena {path}: not a xentmem page arena (no {MAGIC.rstrip(bytes(1)).decode()} "
            "magic at its start); left untouched"
        )
    if len(raw) < _HEADER.size + _HEADER_SUM.size or size < REGIONS_AT:
        raise ArenaDamaged(f"arena {path}: truncated ({size} bytes), the header is incomplete")
    _, version, page, segment_size, allocator, _, _, *sizes = _HEADER.unpack_from(raw)
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
    if any(s <= 0 or s % segment_size for s in sizes) or sizes[2] > MAX_DATA:
        raise ArenaDamaged(f"arena {path}: region sizes {sizes} are not whole segments")
    expected = REGIONS_AT + sum(sizes)
    if size != expected:
        raise ArenaDamaged(
            f"arena {path}: size {size} is not the {expected} bytes its header says"
        )
    return segment_size, _ALLOCATOR_NAMES[allocator], (sizes[0], sizes[1], sizes[2])


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
