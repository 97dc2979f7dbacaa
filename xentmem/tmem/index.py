"""The arena's index: which page is where, as fixed-size records in the arena's file.

Two tables of records, each in segments of its own kind:

* objects, 32 bytes: pool (u32), oid (3 x u64), commit (u32);
* pages, 20 bytes: object slot (u32), index (u32), frame (u32), sub (u16), length (u16),
  commit (u32): the page's bytes are ``length`` bytes at the allocator's handle
  (frame, sub).

A record counts only when its commit word is right: for an object, a checksum of its fields;
for a page, a checksum of its data seeded with its fields (the arena computes it).  The
commit word is written last and zeroed first, so a record torn by a crash reads as free.
An object's record is written before any of its pages' and zeroed after the last of them.

In this process only, rebuilt on open: open-addressed tables (4 bytes a bucket) from a key
to its slot, each object's pages as a doubly linked list (two 4-byte links a page), and the
count of pages per object.  ``docs/page-arena.md`` counts the bytes.
"""

from __future__ import annotations

import mmap
import struct
from array import array
from collections.abc import Iterator
from typing import Any

import xxhash

from xentmem.tmem.segments import PAGE, SEG_HWM, SEG_HWM_OFFSET, ArenaFile, Kind

OBJ_FIELDS = struct.Struct("<IQQQ")
OBJ_RECORD = OBJ_FIELDS.size + 4
PAGE_FIELDS = struct.Struct("<IIIHH")
PAGE_KEY = struct.Struct("<II")
PAGE_RECORD = PAGE_FIELDS.size + 4
PAGE_ALL = struct.Struct("<IIIHHI")
COMMIT = struct.Struct("<I")
#: An empty bucket and a removed one.
_EMPTY = 0
_TOMB = 0xFFFFFFFF
#: A persisted high-water mark is raised this many records ahead, not at every new record.
_HWM_STEP = 256
_MIN_BUCKETS = 1024


def seal(checksum: int) -> int:
    """A commit word from a checksum: never 0, which means "no record"."""
    return (checksum & 0xFFFFFFFF) or 1


def object_commit(fields: bytes) -> int:
    return seal(xxhash.xxh3_64_intdigest(fields))


class Records:
    """Fixed-size records in the segments of one kind; a slot number names one."""

    def __init__(self, file: ArenaFile, kind: Kind, size: int) -> None:
        self.file = file
        self.kind = kind
        self.size = size
        self.maps = file.maps[kind]
        self.per_segment = (file.segment_size - PAGE) // size
        #: Slots below this may hold a record; above it, none ever did.
        self.hwm = 0
        self._marks: list[int] = []
        #: Free slots below ``hwm``, the last freed on top.
        self.free = array("I")
        for seg, mm in enumerate(self.maps):
            (mark,) = SEG_HWM.unpack_from(mm, SEG_HWM_OFFSET)
            mark = min(mark, self.per_segment)
            self._marks.append(mark)
            if mark:
                self.hwm = seg * self.per_segment + mark

    def where(self, slot: int) -> tuple[mmap.mmap, int]:
        seg, rest = divmod(slot, self.per_segment)
        return self.maps[seg], PAGE + rest * self.size

    def new_slot(self) -> int:
        if self.free:
            return self.free.pop()
        slot = self.hwm
        seg, rest = divmod(slot, self.per_segment)
        if seg == len(self.maps):
            self.file.add_segment(self.kind)
            self._marks.append(0)
        if rest >= self._marks[seg]:
            mark = min(self.per_segment, rest + _HWM_STEP)
            SEG_HWM.pack_into(self.maps[seg], SEG_HWM_OFFSET, mark)
            self._marks[seg] = mark
        self.hwm = slot + 1
        return slot

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Every slot below the persisted marks and its record's bytes."""
        size = self.size
        for seg, mm in enumerate(self.maps):
            mark = self._marks[seg]
            raw = mm[PAGE : PAGE + mark * size]
            base = seg * self.per_segment
            for i in range(mark):
                yield base + i, raw[i * size : (i + 1) * size]

    def used_bytes(self) -> int:
        return (self.hwm - len(self.free)) * self.size


class Buckets:
    """An open-addressed table of slot + 1 (0 empty, all ones removed), linear probing.

    It holds no keys: the caller compares a candidate slot's record with the key.
    """

    def __init__(self, capacity: int = 0) -> None:
        size = _MIN_BUCKETS
        while size * 3 < capacity * 4:
            size *= 2
        self.table = array("I", bytes(4 * size))
        self.mask = size - 1
        self.count = 0
        self.tombs = 0

    def nbytes(self) -> int:
        return 4 * len(self.table)


class Index:
    """Both tables and their lookups.  Not thread-safe: the arena's caller serialises."""

    def __init__(self, file: ArenaFile) -> None:
        self.objects = Records(file, Kind.OBJECTS, OBJ_RECORD)
        self.pages = Records(file, Kind.PAGES, PAGE_RECORD)
        self.obj_buckets = Buckets()
        self.page_buckets = Buckets()
        #: Per object slot: pages it holds, its first page's slot + 1.
        self.obj_pages = array("I")
        self.obj_head = array("I")
        #: Per page slot: the next and previous page of its object, slot + 1.
        self.next = array("I")
        self.prev = array("I")
        self.page_count = 0
        self.object_count = 0

    # -- objects -----------------------------------------------------------------------------

    def find_object(self, key: tuple[int, int, int, int]) -> int:
        """The slot of object ``(pool, w0, w1, w2)``, or -1."""
        b = self.obj_buckets
        table, mask = b.table, b.mask
        where = self.objects.where
        unpack = OBJ_FIELDS.unpack_from
        i = hash(key) & mask
        while True:
            v = table[i]
            if v == _EMPTY:
                return -1
            if v != _TOMB:
                mm, off = where(v - 1)
                if unpack(mm, off) == key:
                    return v - 1
            i = (i + 1) & mask

    def add_object(self, key: tuple[int, int, int, int]) -> int:
        """Write and commit a new object's record (it must not exist); its slot."""
        slot = self.objects.new_slot()
        mm, off = self.objects.where(slot)
        fields = OBJ_FIELDS.pack(*key)
        mm[off : off + OBJ_FIELDS.size] = fields
        COMMIT.pack_into(mm, off + OBJ_FIELDS.size, object_commit(fields))
        self._track_object(key, slot)
        return slot

    def _track_object(self, key: tuple[int, int, int, int], slot: int) -> None:
        if slot >= len(self.obj_pages):
            more = max(slot + 1, len(self.obj_pages) + len(self.obj_pages) // 4, 64) - len(
                self.obj_pages)
            self.obj_pages.frombytes(bytes(4 * more))
            self.obj_head.frombytes(bytes(4 * more))
        self.obj_pages[slot] = 0
        self.obj_head[slot] = 0
        self._insert(self.obj_buckets, hash(key), slot)
        self.object_count += 1

    def remove_object(self, slot: int) -> None:
        """Zero the commit of an object that holds no page, and forget it."""
        mm, off = self.objects.where(slot)
        key = OBJ_FIELDS.unpack_from(mm, off)
        COMMIT.pack_into(mm, off + OBJ_FIELDS.size, 0)
        self._remove(self.obj_buckets, hash(key), slot)
        self.objects.free.append(slot)
        self.object_count -= 1

    def object_key(self, slot: int) -> tuple[int, int, int, int]:
        mm, off = self.objects.where(slot)
        return OBJ_FIELDS.unpack_from(mm, off)  # type: ignore[return-value]

    def live_objects(self) -> Iterator[int]:
        counts = self.obj_pages
        for slot in range(min(len(counts), self.objects.hwm)):
            if counts[slot]:
                yield slot

    # -- pages -------------------------------------------------------------------------------

    def find_page(self, obj: int, index: int) -> int:
        """The slot of page ``index`` of object slot ``obj``, or -1."""
        b = self.page_buckets
        table, mask = b.table, b.mask
        where = self.pages.where
        unpack = PAGE_KEY.unpack_from
        key = (obj, index)
        i = hash(key) & mask
        while True:
            v = table[i]
            if v == _EMPTY:
                return -1
            if v != _TOMB:
                mm, off = where(v - 1)
                if unpack(mm, off) == key:
                    return v - 1
            i = (i + 1) & mask

    def read_page(self, slot: int) -> tuple[int, int, int, int, int, int]:
        """(object, index, frame, sub, length, commit) of a page's record."""
        mm, off = self.pages.where(slot)
        return PAGE_ALL.unpack_from(mm, off)  # type: ignore[return-value]

    def add_page(self, obj: int, index: int, frame: int, sub: int, length: int,
                 commit: int) -> int:
        """Write a page's record, its commit word last; its slot."""
        slot = self.pages.new_slot()
        mm, off = self.pages.where(slot)
        PAGE_FIELDS.pack_into(mm, off, obj, index, frame, sub, length)
        COMMIT.pack_into(mm, off + PAGE_FIELDS.size, commit)
        self._track_page(obj, index, slot)
        return slot

    def _track_page(self, obj: int, index: int, slot: int) -> None:
        if slot >= len(self.next):
            more = max(slot + 1, len(self.next) + len(self.next) // 4, 256) - len(self.next)
            self.next.frombytes(bytes(4 * more))
            self.prev.frombytes(bytes(4 * more))
        head = self.obj_head[obj]
        self.next[slot] = head
        self.prev[slot] = 0
        if head:
            self.prev[head - 1] = slot + 1
        self.obj_head[obj] = slot + 1
        self.obj_pages[obj] += 1
        self._insert(self.page_buckets, hash((obj, index)), slot)
        self.page_count += 1

    def remove_page(self, slot: int, obj: int, index: int) -> int:
        """Zero a page's commit and forget it; the pages its object still holds."""
        mm, off = self.pages.where(slot)
        COMMIT.pack_into(mm, off + PAGE_FIELDS.size, 0)
        self._remove(self.page_buckets, hash((obj, index)), slot)
        nxt, prv = self.next[slot], self.prev[slot]
        if prv:
            self.next[prv - 1] = nxt
        else:
            self.obj_head[obj] = nxt
        if nxt:
            self.prev[nxt - 1] = prv
        self.pages.free.append(slot)
        self.page_count -= 1
        left = self.obj_pages[obj] - 1
        self.obj_pages[obj] = left
        return left

    def object_pages(self, obj: int) -> list[int]:
        """The slots of an object's pages."""
        out = []
        link = self.obj_head[obj]
        nxt = self.next
        while link:
            out.append(link - 1)
            link = nxt[link - 1]
        return out

    # -- the tables --------------------------------------------------------------------------

    def _insert(self, b: Buckets, h: int, slot: int) -> None:
        if (b.count + b.tombs + 1) * 4 > len(b.table) * 3:
            self._resize(b, b.count + 1)
        table, mask = b.table, b.mask
        i = h & mask
        while True:
            v = table[i]
            if v == _EMPTY:
                break
            if v == _TOMB:
                b.tombs -= 1
                break
            i = (i + 1) & mask
        table[i] = slot + 1
        b.count += 1

    def _remove(self, b: Buckets, h: int, slot: int) -> None:
        table, mask = b.table, b.mask
        i = h & mask
        while table[i] != slot + 1:
            if table[i] == _EMPTY:
                raise AssertionError(f"slot {slot} is not in its table")
            i = (i + 1) & mask
        if table[(i + 1) & mask] == _EMPTY:
            table[i] = _EMPTY
        else:
            table[i] = _TOMB
            b.tombs += 1
        b.count -= 1

    def _resize(self, b: Buckets, count: int) -> None:
        """Rehash into a table at most half full (tombstones go)."""
        fresh = Buckets(2 * count)
        if b is self.obj_buckets:
            keys = ((self.object_key(s), s) for s in self._slots(b))
        else:
            keys = ((PAGE_KEY.unpack_from(*self.pages.where(s)), s) for s in self._slots(b))
        table, mask = fresh.table, fresh.mask
        for key, slot in keys:
            i = hash(key) & mask
            while table[i]:
                i = (i + 1) & mask
            table[i] = slot + 1
        fresh.count = b.count
        b.table, b.mask, b.tombs = fresh.table, fresh.mask, 0

    @staticmethod
    def _slots(b: Buckets) -> Iterator[int]:
        for v in b.table:
            if v and v != _TOMB:
                yield v - 1

    def reserve(self, objects: int, pages: int) -> None:
        """Size the tables for a rebuild, so it does not resize as it goes."""
        self.obj_buckets = Buckets(2 * objects)
        self.page_buckets = Buckets(2 * pages)

    # -- figures -----------------------------------------------------------------------------

    def metadata_bytes(self) -> dict[str, Any]:
        """Bytes of the index: records in the file, and what this process keeps."""
        return {
            "records": self.objects.used_bytes() + self.pages.used_bytes(),
            "buckets": self.obj_buckets.nbytes() + self.page_buckets.nbytes(),
            "links": 4 * (len(self.next) + len(self.prev) + len(self.obj_pages)
                          + len(self.obj_head)),
            "free_slots": 4 * (len(self.objects.free) + len(self.pages.free)),
        }
