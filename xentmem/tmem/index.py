"""The arena's index: which page is where, as fixed-size records in the arena's file.

Two tables of records, each in a region of its own:

* objects, 32 bytes: pool (u32), oid (3 x u64), commit (u32);
* pages, 20 bytes: object slot (u32), index (u32), where (u32: the page's bytes start
  ``16 * where`` bytes into the data region), length (u16), sub (u16: the allocator's own
  part of the handle), commit (u32).

A record counts only when its commit word is right: for an object, a checksum of its fields;
for a page, a checksum of its data seeded with its fields (the arena computes it).  The
commit word is written last and zeroed first, so a record torn by a crash reads as free.
An object's record is written before any of its pages' and zeroed after the last of them.

In this process only, rebuilt on open: open-addressed tables from a key to its slot (4 bytes
a bucket: the slot + 1 and 5 bits of the key's hash, so most probes that miss never read a
record; double hashing, at most 70% full counting removed buckets), each object's pages as a
doubly linked list (two 4-byte links a page), and the count of pages per object.
``docs/page-arena.md`` counts the bytes.  The page table's loops (its probe, a new page's
record, its rehash, the rebuild's pass) are C, in ``_hot.c``, over these arrays and the map.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from typing import Any

import xxhash

from xentmem.errors import ArenaError
from xentmem.tmem import _hot
from xentmem.tmem.arenafile import OBJECTS, PAGES, ArenaFile

OBJ_FIELDS = struct.Struct("<IQQQ")
OBJ_RECORD = OBJ_FIELDS.size + 4
PAGE_FIELDS = struct.Struct("<IIIHH")
PAGE_RECORD = PAGE_FIELDS.size + 4
PAGE_ALL = struct.Struct("<IIIHHI")
COMMIT = struct.Struct("<I")
#: A bucket: 5 bits of the key's hash above the slot + 1 (27 bits); 0 empty, all ones removed.
_SLOT_BITS = 27
# The page records and buckets are also read and written by the C loops (_hot.c): the
# same layout, or nothing works.
if (PAGE_RECORD, _SLOT_BITS) != (_hot.PAGE_RECORD, _hot.SLOT_BITS):  # pragma: no cover
    raise ImportError("xentmem.tmem._hot was built for another record layout: rebuild it")
SLOT_MASK = (1 << _SLOT_BITS) - 1
#: Slots a table may name (the removed mark's slot field is never a slot + 1).
MAX_SLOTS = SLOT_MASK - 1
_EMPTY = 0
_TOMB = 0xFFFFFFFF
#: A persisted high-water mark is raised this many records ahead, not at every new record.
_HWM_STEP = 256
_MIN_BUCKETS = 1024
#: A table is full at 70% (used and removed buckets): then it doubles, or is rebuilt at
#: its size when removed buckets make up most of it.
_FULL_NUM, _FULL_DEN = 10, 7


def seal(checksum: int) -> int:
    """A commit word from a checksum: never 0, which means "no record"."""
    return (checksum & 0xFFFFFFFF) or 1


def object_commit(fields: bytes) -> int:
    return seal(xxhash.xxh3_64_intdigest(fields))


class Records:
    """Fixed-size records in one region of the file; a slot number names one."""

    def __init__(self, file: ArenaFile, region: int, size: int) -> None:
        self.file = file
        self.region = region
        self.size = size
        self.base = file.bases[region]
        self.capacity = min(file.sizes[region] // size, MAX_SLOTS)
        #: Slots below this may hold a record; above it, none ever did.  The mark in the
        #: file has no checksum: committed records the file holds past it (a mark lowered
        #: by damage) count too, and are checked as every record is; past what it holds
        #: there is none (a mark raised by damage).
        mark = min(file.marks()[region], self.capacity)
        self.hwm = file.records_end(region, size, mark, self.capacity)
        #: (the mark in the file, the slot after the last committed record past it) when
        #: records were found past the mark.
        self.past_mark = (mark, self.hwm) if self.hwm > mark else None
        self.mark = self.hwm
        if self.hwm:
            file.reserve(region, self.hwm * size)
        #: Free slots below ``hwm``, the last freed on top.
        self.free = array("I")

    def offset(self, slot: int) -> int:
        return self.base + slot * self.size

    def new_slot(self) -> int:
        if self.free:
            return self.free.pop()
        slot = self.hwm
        if slot >= self.mark:
            if slot >= self.capacity:
                raise ArenaError(f"arena {self.file.path}: no room for another record "
                                 f"({self.capacity} at most)")
            mark = min(self.capacity, slot + _HWM_STEP)
            self.file.reserve(self.region, mark * self.size)
            # Slots from here to the new mark were never handed out: zeroed before the mark
            # goes over them, so no record left there (a mark once lowered by damage) can
            # come back under a slot reused since.
            start, stop = self.offset(slot), self.offset(mark)
            self.file.mm[start:stop] = bytes(stop - start)
            self.file.set_mark(self.region, mark)
            self.mark = mark
        self.hwm = slot + 1
        return slot

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Every slot below the mark and its record's bytes."""
        size = self.size
        raw = self.file.mm[self.base : self.base + self.hwm * size]
        for i in range(self.hwm):
            yield i, raw[i * size : (i + 1) * size]

    def scan_fields(self, fields: struct.Struct) -> Iterator[tuple[int, ...]]:
        """Every record below the mark, unpacked (slot numbers count from 0)."""
        return fields.iter_unpack(self.file.mm[self.base : self.base + self.hwm * self.size])

    def used_bytes(self) -> int:
        return (self.hwm - len(self.free)) * self.size


class Buckets:
    """An open-addressed table of buckets (``_SLOT_BITS``); it holds no keys: a candidate
    slot's record is compared with the key."""

    def __init__(self, count: int = 0, size: int = 0) -> None:
        if not size:
            size = _MIN_BUCKETS
            while size * _FULL_DEN < count * _FULL_NUM * 2:  # at most half "full" when made
                size *= 2
        self.table = array("I", bytes(4 * size))
        self.mask = size - 1
        self.count = 0
        self.tombs = 0

    def full(self) -> bool:
        return (self.count + self.tombs) * _FULL_NUM >= len(self.table) * _FULL_DEN

    def nbytes(self) -> int:
        return 4 * len(self.table)


def _probe_start(h: int, mask: int) -> tuple[int, int, int]:
    """First bucket, odd step and 5-bit tag of a key's hash."""
    return h & mask, ((h >> 17) | 1) & mask, ((h >> 40) & 31) << _SLOT_BITS


class Index:
    """Both tables and their lookups.  Not thread-safe: the arena's caller serialises."""

    def __init__(self, file: ArenaFile) -> None:
        self.mm = file.mm
        self.objects = Records(file, OBJECTS, OBJ_RECORD)
        self.pages = Records(file, PAGES, PAGE_RECORD)
        self.pbase = self.pages.base
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

    def find_object(self, key: tuple[int, int, int, int]) -> tuple[int, int]:
        """The slot of object ``(pool, w0, w1, w2)`` (or -1) and the bucket to insert it at."""
        b = self.obj_buckets
        table, mask = b.table, b.mask
        mm = self.mm
        base = self.objects.base - OBJ_RECORD
        unpack = OBJ_FIELDS.unpack_from
        i, step, tag = _probe_start(hash(key), mask)
        spare = -1
        while True:
            v = table[i]
            if v == _EMPTY:
                return -1, (i if spare < 0 else spare)
            if v == _TOMB:
                if spare < 0:
                    spare = i
            elif v & ~SLOT_MASK == tag and unpack(mm, base + (v & SLOT_MASK) * OBJ_RECORD) == key:
                return (v & SLOT_MASK) - 1, i
            i = (i + step) & mask

    def add_object(self, key: tuple[int, int, int, int]) -> int:
        """Write and commit a new object's record (it must not exist); its slot."""
        slot = self.objects.new_slot()
        mm, off = self.mm, self.objects.offset(slot)
        fields = OBJ_FIELDS.pack(*key)
        mm[off : off + OBJ_FIELDS.size] = fields
        COMMIT.pack_into(mm, off + OBJ_FIELDS.size, object_commit(fields))
        self.track_object(key, slot)
        return slot

    def track_object(self, key: tuple[int, int, int, int], slot: int) -> None:
        """Make a committed object record findable (its key must not be)."""
        if slot >= len(self.obj_pages):
            more = max(slot + 1, len(self.obj_pages) * 5 // 4, 64) - len(self.obj_pages)
            self.obj_pages.frombytes(bytes(4 * more))
            self.obj_head.frombytes(bytes(4 * more))
        self.obj_pages[slot] = 0
        self.obj_head[slot] = 0
        if self.obj_buckets.full():
            self._resize(self.obj_buckets)
        self._place(self.obj_buckets, self.find_object(key)[1], hash(key), slot)
        self.object_count += 1

    def remove_object(self, slot: int) -> None:
        """Zero the commit of an object that holds no page, and forget it."""
        mm, off = self.mm, self.objects.offset(slot)
        key = OBJ_FIELDS.unpack_from(mm, off)
        COMMIT.pack_into(mm, off + OBJ_FIELDS.size, 0)
        _, at = self.find_object(key)
        self._unplace(self.obj_buckets, at)
        self.objects.free.append(slot)
        self.object_count -= 1

    def object_key(self, slot: int) -> tuple[int, int, int, int]:
        return OBJ_FIELDS.unpack_from(self.mm, self.objects.offset(slot))  # type: ignore[return-value]

    def live_objects(self) -> Iterator[int]:
        counts = self.obj_pages
        for slot in range(min(len(counts), self.objects.hwm)):
            if counts[slot]:
                yield slot

    # -- pages -------------------------------------------------------------------------------

    def find_page(self, obj: int, index: int) -> tuple[int, Any, int]:
        """Slot, record (object, index, where, length, sub, commit) and bucket of page
        ``index`` of object slot ``obj``; else (-1, the key's bucket tag, the bucket to
        insert it at), which :meth:`add_page` takes.  The probe is ``_hot.find_page``."""
        return _hot.find_page(self.page_buckets.table, self.mm, self.pbase, obj, index)

    def read_page(self, slot: int) -> tuple[int, ...]:
        """(object, index, where, length, sub, commit) of a page's record."""
        return PAGE_ALL.unpack_from(self.mm, self.pages.offset(slot))

    def write_page(self, slot: int, obj: int, index: int, where: int, length: int, sub: int,
                   commit: int) -> None:
        """Write a page's record in ``slot``, its commit word last."""
        off = self.pages.offset(slot)
        PAGE_FIELDS.pack_into(self.mm, off, obj, index, where, length, sub)
        COMMIT.pack_into(self.mm, off + PAGE_FIELDS.size, commit)

    def add_page(self, obj: int, index: int, where: int, length: int, sub: int, commit: int,
                 tag: int, at: int) -> None:
        """Write a new page's record, its commit word last, and make it findable; ``tag``
        and ``at``: what :meth:`find_page` answered for the missing key (the record, links
        and bucket are written by ``_hot.add_page``: this is every put's path)."""
        b = self.page_buckets
        if (b.count + b.tombs) * _FULL_NUM >= len(b.table) * _FULL_DEN:
            self._resize(b, from_records=True)  # before this page's record is written
            _, tag, at = self.find_page(obj, index)
        pages = self.pages
        if pages.free:
            slot = pages.free.pop()
        elif pages.hwm < pages.mark:
            slot = pages.hwm
            pages.hwm = slot + 1
        else:
            slot = pages.new_slot()
        if slot >= len(self.next):
            self._grow_links(slot)
        table = b.table
        if table[at] == _TOMB:
            b.tombs -= 1
        _hot.add_page(self.mm, pages.base, slot, obj, index, where, length, sub, commit,
                      table, at, tag, self.next, self.prev, self.obj_head, self.obj_pages)
        b.count += 1
        self.page_count += 1

    def grow_links(self, pages: int, objects: int) -> None:
        """Links for ``pages`` page slots and counts for ``objects`` object slots (before the
        rebuild's C pass, which fills them)."""
        if pages > len(self.next):
            self._grow_links(pages - 1)
        more = objects - len(self.obj_pages)
        if more > 0:
            self.obj_pages.frombytes(bytes(4 * more))
            self.obj_head.frombytes(bytes(4 * more))

    def _grow_links(self, slot: int) -> None:
        more = max(slot + 1, len(self.next) * 5 // 4, 256) - len(self.next)
        self.next.frombytes(bytes(4 * more))
        self.prev.frombytes(bytes(4 * more))

    def uncommit_page(self, slot: int) -> None:
        """Zero a page's commit word: from here on, a crash finds no page in this slot."""
        COMMIT.pack_into(self.mm, self.pages.offset(slot) + PAGE_FIELDS.size, 0)

    def remove_page(self, slot: int, obj: int, index: int, at: int = -1) -> int:
        """Zero a page's commit and forget it; the pages its object still holds."""
        self.uncommit_page(slot)
        if at < 0:
            at = self.find_page(obj, index)[2]
        self._unplace(self.page_buckets, at)
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

    def take_page(self, obj: int, index: int, dbase: int) -> Any:
        """An exclusive get of page ``index`` of object slot ``obj`` (its bytes at ``dbase``
        of the map): ``_hot.take_page`` finds, checks and drops it in one call, this counts
        it gone.  None: no such page; (slot, bucket): it failed its checksum (nothing
        changed); else (bytes, slot, where, length, sub, pages its object still holds)."""
        got = _hot.take_page(self.page_buckets.table, self.mm, self.pbase, dbase, obj, index,
                             self.next, self.prev, self.obj_head, self.obj_pages)
        if got is not None and len(got) == 6:
            b = self.page_buckets
            b.tombs += 1
            b.count -= 1
            self.pages.free.append(got[1])
            self.page_count -= 1
        return got

    def object_pages(self, obj: int) -> list[int]:
        """The slots of an object's pages."""
        return _hot.object_pages(self.next, self.obj_head[obj])  # type: ignore[no-any-return]

    def object_sizes(self, obj: int) -> dict[int, int]:
        """{index: stored length} of an object's pages."""
        return _hot.object_sizes(self.mm, self.pbase, self.next,  # type: ignore[no-any-return]
                                 self.obj_head[obj])

    # -- the tables --------------------------------------------------------------------------

    @staticmethod
    def _place(b: Buckets, at: int, h: int, slot: int) -> None:
        if b.table[at] == _TOMB:
            b.tombs -= 1
        b.table[at] = (((h >> 40) & 31) << _SLOT_BITS) | (slot + 1)
        b.count += 1

    @staticmethod
    def _unplace(b: Buckets, at: int) -> None:
        b.table[at] = _TOMB
        b.tombs += 1
        b.count -= 1

    def _resize(self, b: Buckets, from_records: bool = False) -> None:
        """Rehash into a table twice the size, or the same size if removed buckets filled
        it (they go).  ``from_records``: the page table holds every committed page record
        and no other (true between puts, not during a rebuild), so they are read in one
        pass instead of one slot at a time."""
        size = len(b.table)
        if b.count * _FULL_NUM * 2 >= size * _FULL_DEN:  # more than half "full" live: double
            size *= 2
        fresh = Buckets(size=size)
        table, mask = fresh.table, fresh.mask
        if b is not self.obj_buckets:  # pages: hashed and placed in C, as they are probed
            if from_records:
                count = _hot.rehash_records(table, self.mm, self.pbase, self.pages.hwm)
            else:
                count = _hot.rehash_pages(table, self.mm, self.pbase, b.table)
            b.table, b.mask, b.count, b.tombs = table, mask, count, 0
            return
        count = 0
        for key, slot in ((self.object_key(s), s) for s in self._slots(b)):
            h = hash(key)
            i = h & mask
            step = ((h >> 17) | 1) & mask
            while table[i]:
                i = (i + step) & mask
            table[i] = (((h >> 40) & 31) << _SLOT_BITS) | (slot + 1)
            count += 1
        b.table, b.mask, b.count, b.tombs = table, mask, count, 0

    @staticmethod
    def _slots(b: Buckets) -> Iterator[int]:
        for v in b.table:
            if v and v != _TOMB:
                yield (v & SLOT_MASK) - 1

    def reserve(self, objects: int, pages: int) -> None:
        """Size the tables for a rebuild, so it does not resize as it goes."""
        self.obj_buckets = Buckets(objects)
        self.page_buckets = Buckets(pages)

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
