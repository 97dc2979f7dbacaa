"""The on-disk format of a file-backed swap area: a header, an index and the page slots.

One file holds everything a later reader needs, so the map can never be missing or older
than the data.  Every page and every index entry carries a CRC-32, the header states the
sizes, and a page is written out of place (to a free slot) before the index entry that
names it: a crash or a refused write leaves the slot's previous page intact.  The layout,
what a crash can lose and the fsync policy: ``docs/swap-areas.md``.

This module only encodes, decodes and checks; :class:`~.backing.FileBacking` does the I/O
of a live area and :func:`scan` the checks of an area found on disk.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field

from xentmem.errors import XentmemError
from xentmem.tmem.abi import PAGE_SIZE

MAGIC = b"XTMSWAP\0"
VERSION = 2
#: magic, version, page_size, pages, slots, swap_type; then the header's CRC-32.
HEADER = struct.Struct("<8sIIQQI")
HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = PAGE_SIZE
#: Where in the header page the use mark is: the boot that last used the area, whether it
#: was stopped cleanly since, and the mark's CRC-32.
USE_AT = 512
USE = struct.Struct("<16sII")
USE_BODY = struct.Struct("<16sI")
IN_USE, STOPPED = 1, 0
#: slot + 1 (0: no page), the page's CRC-32, the entry's CRC-32, zero.
ENTRY = struct.Struct("<IIII")
EMPTY_ENTRY = bytes(ENTRY.size)
#: What the entry's CRC covers besides its fields: its own offset, so a moved entry fails.
ENTRY_KEY = struct.Struct("<QII")
#: Offsets are u32 in an entry (slot + 1 must fit too).
MAX_PAGES = (1 << 32) - 2


class SwapFileError(XentmemError, ValueError):
    """A swap area file that cannot be used as a whole: not ours, a bad header, cut short."""


class SwapAreaStale(SwapFileError):
    """An area that was in use when the system went down: a page may come back older."""


def page_crc(page: bytes) -> int:
    return zlib.crc32(page)


def _round_up(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


@dataclass(frozen=True)
class Layout:
    """Where things are in an area of ``pages`` offsets (and ``pages + 1`` data slots: one
    spare, so a page is always written to a free slot, never over the page it replaces)."""

    pages: int
    swap_type: int

    @property
    def slots(self) -> int:
        return self.pages + 1

    @property
    def index_start(self) -> int:
        return HEADER_SIZE

    @property
    def data_start(self) -> int:
        return HEADER_SIZE + _round_up(self.pages * ENTRY.size)

    @property
    def file_size(self) -> int:
        return self.data_start + self.slots * PAGE_SIZE

    def entry_at(self, offset: int) -> int:
        return self.index_start + offset * ENTRY.size

    def slot_at(self, slot: int) -> int:
        return self.data_start + slot * PAGE_SIZE

    def header(self) -> bytes:
        body = HEADER.pack(MAGIC, VERSION, PAGE_SIZE, self.pages, self.slots, self.swap_type)
        return body + HEADER_CRC.pack(zlib.crc32(body))


def encode_use(boot_id: bytes, state: int) -> bytes:
    body = USE_BODY.pack(boot_id, state)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_use(untrusted: bytes) -> tuple[bytes, int] | None:
    """``(boot_id, state)`` of the use mark, None if it does not check out."""
    if len(untrusted) < USE.size:
        return None
    boot_id, state, crc = USE.unpack_from(untrusted)
    if crc != zlib.crc32(USE_BODY.pack(boot_id, state)) or state not in (IN_USE, STOPPED):
        return None
    return boot_id, state


def check_pages(pages: int) -> None:
    if not 1 <= pages <= MAX_PAGES:
        raise SwapFileError(f"a swap area file holds 1 to {MAX_PAGES} pages, not {pages}")


def encode_entry(offset: int, slot: int, crc: int) -> bytes:
    key = ENTRY_KEY.pack(offset, slot + 1, crc)
    return ENTRY.pack(slot + 1, crc, zlib.crc32(key), 0)


def decode_entry(offset: int, untrusted: bytes, slots: int) -> tuple[int, int] | str | None:
    """``(slot, page_crc)``, None for an empty entry, or why the entry is damaged."""
    if untrusted == EMPTY_ENTRY:
        return None
    slot_plus1, crc, entry_crc, zero = ENTRY.unpack(untrusted)
    if zero != 0 or entry_crc != zlib.crc32(ENTRY_KEY.pack(offset, slot_plus1, crc)):
        return "index entry checksum mismatch"
    if not 1 <= slot_plus1 <= slots:
        return f"index entry names slot {slot_plus1 - 1}, outside the file"
    return slot_plus1 - 1, crc


def decode_header(untrusted: bytes, where: str) -> Layout:
    """The layout a header states; SwapFileError if it is not a valid header of ours."""
    size = HEADER.size + HEADER_CRC.size
    if len(untrusted) < size:
        raise SwapFileError(f"{where}: too short for a swap area header")
    body = untrusted[:HEADER.size]
    magic, version, page_size, pages, slots, swap_type = HEADER.unpack(body)
    if magic != MAGIC:
        raise SwapFileError(f"{where}: not a xentmem swap area (bad magic)")
    (crc,) = HEADER_CRC.unpack_from(untrusted, HEADER.size)
    if crc != zlib.crc32(body):
        raise SwapFileError(f"{where}: header checksum mismatch")
    if version != VERSION:
        raise SwapFileError(f"{where}: swap area format {version}, this xentmemd reads "
                            f"{VERSION}")
    if page_size != PAGE_SIZE:
        raise SwapFileError(f"{where}: page size {page_size}, expected {PAGE_SIZE}")
    check_pages(pages)
    layout = Layout(pages, swap_type)
    if slots != layout.slots:
        raise SwapFileError(f"{where}: {slots} slots for {pages} pages, expected "
                            f"{layout.slots}")
    return layout


@dataclass
class Scan:
    """What an area file holds: its layout, the valid entries, and the damaged offsets."""

    layout: Layout
    #: The use mark: the boot that last used the area and IN_USE or STOPPED (None: unreadable).
    use: tuple[bytes, int] | None = None
    #: offset -> (slot, page CRC) of every entry whose page checked out.
    entries: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: offset -> why its page cannot be returned.
    damaged: dict[int, str] = field(default_factory=dict)
    #: The pages read while checking (offset -> page), if the caller asked for them.
    pages: dict[int, bytes] = field(default_factory=dict)


def stale_after_reboot(use: tuple[bytes, int] | None, boot_id: bytes | None) -> bool:
    """True if the area was in use when the system went down: a power cut or a kernel
    crash may have kept an older page (or a freed one) for pages written since its last
    clean stop, and its checksums cannot tell.  An unknown boot (``boot_id`` None, or the
    file's boot id all zero) cannot be compared: False; an unreadable mark: True."""
    if boot_id is None:
        return False
    if use is None:
        return True
    return use[1] == IN_USE and use[0] not in (boot_id, bytes(16))


def scan(fd: int, where: str, *, keep_pages: bool = False) -> Scan:
    """Check a whole area file: header, sizes, every index entry and every page it names.

    A bad header or an index cut short is :class:`SwapFileError`; a damaged entry or page
    (checksum mismatch, slot past the end of a truncated file, a slot named twice) is listed
    in :attr:`Scan.damaged` and never in :attr:`Scan.entries`.
    """
    head = os.pread(fd, HEADER_SIZE, 0)
    layout = decode_header(head, where)
    size = os.fstat(fd).st_size
    if size < layout.data_start:
        raise SwapFileError(f"{where}: cut short ({size} bytes; its index alone needs "
                            f"{layout.data_start})")
    index = os.pread(fd, layout.pages * ENTRY.size, layout.index_start)
    if len(index) != layout.pages * ENTRY.size:
        raise SwapFileError(f"{where}: the index could not be read whole")
    result = Scan(layout, decode_use(head[USE_AT:USE_AT + USE.size]))
    owner: dict[int, int] = {}
    for offset in range(layout.pages):
        raw = index[offset * ENTRY.size:(offset + 1) * ENTRY.size]
        decoded = decode_entry(offset, raw, layout.slots)
        if decoded is None:
            continue
        if isinstance(decoded, str):
            result.damaged[offset] = decoded
            continue
        slot, crc = decoded
        if slot in owner:
            result.damaged[offset] = f"slot {slot} is also named by offset {owner[slot]}"
            continue
        page = os.pread(fd, PAGE_SIZE, layout.slot_at(slot))
        if len(page) != PAGE_SIZE:
            result.damaged[offset] = "its slot lies past the end of the file (cut short)"
            continue
        if page_crc(page) != crc:
            result.damaged[offset] = "page checksum mismatch"
            continue
        owner[slot] = offset
        result.entries[offset] = (slot, crc)
        if keep_pages:
            result.pages[offset] = page
    return result
