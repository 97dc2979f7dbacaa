"""zsmalloc, as the kernel's ``mm/zsmalloc.c`` (6.6 and later): size classes and zspages.

Sizes 32..4096 fall in 255 classes 16 bytes apart (``ZS_MIN_ALLOC_SIZE``,
``ZS_SIZE_CLASS_DELTA``).  A class's zspage is a chain of 1..8 pages
(``CONFIG_ZSMALLOC_CHAIN_SIZE``), the chain wasting least (``calculate_zspage_chain_size``);
objects are packed across the chain's pages, so one may straddle two.  Classes that come out
with the same pages and objects per zspage are merged into the largest of them, as
``zs_create_pool`` does.  A zspage sits in a fullness group by the share of its objects in
use (``get_fullness_group``: 0, 10, ..., 99, 100 per cent); an allocation takes a zspage from
the fullest non-full group first (``find_get_zspage``), else a new zspage; a zspage whose last
object is freed goes back at once.  Free objects are linked through their first bytes, as
the kernel's ``link_free``.

Differences, on purpose: a zspage's pages are contiguous frames of the arena (so an
object that straddles two pages is one slice); an object carries no handle in front of it
(the kernel adds ``ZS_HANDLE_SIZE`` for compaction and migration, which this arena does not
do: the index holds where each page is); there is no compaction.
"""

from __future__ import annotations

import logging
import struct
from array import array
from dataclasses import dataclass
from typing import Any

from xentmem.tmem._hot import (
    ZS_CLASSES,
    claim_zsmalloc,
    link_free,
    link_zspages,
    zs_chain_has,
)
from xentmem.tmem.arenafile import DATA, PAGE
from xentmem.tmem.frames import MAX_RUN, ZSPAGE_HEAD, Frames, one_record

ZS_MIN_ALLOC_SIZE = 32
ZS_MAX_ALLOC_SIZE = PAGE
CLASS_BITS = 8
ZS_SIZE_CLASS_DELTA = PAGE >> CLASS_BITS
ZS_SIZE_CLASSES = -(-(ZS_MAX_ALLOC_SIZE - ZS_MIN_ALLOC_SIZE) // ZS_SIZE_CLASS_DELTA) + 1
ZS_MAX_PAGES_PER_ZSPAGE = MAX_RUN
#: Fullness groups: 0 (empty, freed at once), 1..10 (up to 10%, ..., 99%), 11 (full).
_GROUP_FULL = 11
log = logging.getLogger(__name__)

_NO_OBJECT = 0xFFFF
_LINK = struct.Struct("<H")
#: A page's bytes start on a multiple of this (arena.py's UNIT; every class size is one).
_UNIT = 16
# A reopen's claims are C (_hot.c): the same number of classes, or nothing works.
if ZS_SIZE_CLASSES != ZS_CLASSES:  # pragma: no cover
    raise ImportError("xentmem.tmem._hot was built for other zsmalloc classes: rebuild it")


def chain_size(class_size: int) -> int:
    """``calculate_zspage_chain_size``: the pages per zspage that waste least."""
    if class_size & (class_size - 1) == 0:
        return 1
    best, best_waste = 1, 1 << 62
    for pages in range(1, ZS_MAX_PAGES_PER_ZSPAGE + 1):
        waste = (pages * PAGE) % class_size
        if waste < best_waste:
            best, best_waste = pages, waste
    return best


def class_index(size: int) -> int:
    """``get_size_class_index``."""
    idx = 0
    if size > ZS_MIN_ALLOC_SIZE:
        idx = -(-(size - ZS_MIN_ALLOC_SIZE) // ZS_SIZE_CLASS_DELTA)
    return min(ZS_SIZE_CLASSES - 1, idx)


@dataclass
class SizeClass:
    """One (merged) size class."""

    id: int
    size: int
    pages: int
    objs: int
    zspages: int = 0
    objs_used: int = 0
    #: The zspage allocated from last: while it is not full, and no free lowered its
    #: fullness group, it is still the fullest (-1: none, search the groups).
    current: int = -1
    #: Entries in this class's group lists, stale ones included.
    listed: int = 0

    def group(self, inuse: int) -> int:
        """``get_fullness_group``."""
        if inuse == 0:
            return 0
        if inuse == self.objs:
            return _GROUP_FULL
        return 100 * inuse // self.objs // 10 + 1


def size_classes() -> list[SizeClass]:
    """``size_class[i]`` for every class index, merged classes sharing one object."""
    table: list[SizeClass | None] = [None] * ZS_SIZE_CLASSES
    prev: SizeClass | None = None
    for i in range(ZS_SIZE_CLASSES - 1, -1, -1):
        size = min(ZS_MIN_ALLOC_SIZE + i * ZS_SIZE_CLASS_DELTA, ZS_MAX_ALLOC_SIZE)
        pages = chain_size(size)
        objs = pages * PAGE // size
        if prev is not None and prev.pages == pages and prev.objs == objs:
            table[i] = prev
            continue
        prev = table[i] = SizeClass(i, size, pages, objs)
    return [c for c in table if c is not None]


class Zsmalloc:
    """The zsmalloc allocator over the arena's frames.

    A handle is (byte offset in the data region, object index in its zspage): the index
    finds the zspage's first frame again when the arena is reopened.
    """

    name = "zsmalloc"

    def __init__(self, frames: Frames) -> None:
        self.frames = frames
        self.mm = frames.file.mm
        self.base = frames.file.bases[DATA]
        self.size_class = size_classes()
        self.classes = sorted({id(c): c for c in self.size_class}.values(), key=lambda c: c.size)
        self._by_size: list[SizeClass] = [self.size_class[class_index(s)] for s in range(PAGE + 1)]
        n = frames.total()
        #: Per zspage, by its first frame: its class's id + 1, objects in use, first free.
        self.class_of = array("H", bytes(2 * n))
        self.inuse = array("H", bytes(2 * n))
        self.freehead = array("H", bytes(2 * n))
        #: Per class id, per fullness group 1..10: zspages, the last pushed on top; an entry
        #: is checked when taken, so a zspage is never searched for in the middle.
        self.groups: dict[int, list[array]] = {
            c.id: [array("I") for _ in range(_GROUP_FULL)] for c in self.classes
        }
        self._stale_limit = 4096
        #: Zspages whose free chain (kept in the data region, so damage can reach it) named
        #: an object past the zspage: never allocated from again; their objects stay until
        #: freed (the last free gives the zspage back) or a reopen links the chain anew.
        self.broken: set[int] = set()
        #: A reopen's claims: a bit for each 16 bytes of the data region, set where a claimed
        #: object starts (freed once the zspages are linked).
        self._claimed = bytearray()
        #: The classes as the C claims read them: the class id of every size 0..4096, and
        #: each class id's object size, pages and objects per zspage (0 for merged ids).
        self._class_by_size = array("H", [c.id for c in self._by_size])
        self._class_size = array("H", bytes(2 * ZS_SIZE_CLASSES))
        self._class_pages = array("H", bytes(2 * ZS_SIZE_CLASSES))
        self._class_objs = array("H", bytes(2 * ZS_SIZE_CLASSES))
        for c in self.classes:
            self._class_size[c.id], self._class_pages[c.id] = c.size, c.pages
            self._class_objs[c.id] = c.objs

    def _grow(self) -> None:
        more = self.frames.total() - len(self.class_of)
        zeros = bytes(2 * more)
        self.class_of.frombytes(zeros)
        self.inuse.frombytes(zeros)
        self.freehead.frombytes(zeros)

    def alloc(self, size: int) -> tuple[int, int]:
        """A handle (offset, object index) for ``size`` bytes (1..4096)."""
        cls = self._by_size[size]
        class_of = self.class_of
        inuse = self.inuse
        tag = cls.id + 1
        head = cls.current
        if head >= 0 and class_of[head] == tag and inuse[head] < cls.objs:
            # The fast path.  Taken from the fullest group, the zspage stays the fullest
            # while it fills and frees empty only the others (a free that lowers its own
            # group ends it), so this is find_get_zspage's choice without a search; its
            # group entries are brought up to date lazily.
            idx = self.freehead[head]
            if idx < cls.objs:
                at = head * PAGE + idx * cls.size
                (self.freehead[head],) = _LINK.unpack_from(self.mm, self.base + at)
                inuse[head] += 1
                cls.objs_used += 1
                return at, idx
            self._break(cls, head)
        groups = self.groups[cls.id]
        for g in range(_GROUP_FULL - 1, 0, -1) if cls.listed else ():
            stack = groups[g]
            while stack:
                head = stack.pop()
                cls.listed -= 1
                if class_of[head] != tag or cls.group(inuse[head]) != g:
                    continue  # stale
                if head in self.broken or self.freehead[head] >= cls.objs:
                    self._break(cls, head)
                    continue
                cls.current = head
                idx = self._take(cls, head)
                return head * PAGE + idx * cls.size, idx
        head = self._new_zspage(cls)
        cls.current = head
        idx = self._take(cls, head)
        return head * PAGE + idx * cls.size, idx

    def _break(self, cls: SizeClass, head: int) -> None:
        """The free chain of zspage ``head`` names no object of it (damaged in place): it is
        allocated from no more (an object taken there could overlap a live one)."""
        if head not in self.broken:
            self.broken.add(head)
            log.error("zsmalloc: zspage at frame %d (class %d bytes): its free chain is "
                      "damaged; no more objects are allocated there until the arena is "
                      "reopened", head, cls.size)
        if cls.current == head:
            cls.current = -1

    def _new_zspage(self, cls: SizeClass) -> int:
        head = self.frames.alloc(cls.pages, ZSPAGE_HEAD)
        if head >= len(self.class_of):
            self._grow()
        self.class_of[head] = cls.id + 1
        self.inuse[head] = 0
        self.freehead[head] = 0
        link_free(self.mm, self.base + head * PAGE, cls.size, bytes(cls.objs))
        cls.zspages += 1
        return head

    def _take(self, cls: SizeClass, head: int) -> int:
        """An object of the class's current zspage (which is in no group's list: its group
        changes with every allocation; a free files it again)."""
        idx = self.freehead[head]
        (self.freehead[head],) = _LINK.unpack_from(self.mm, self.base + head * PAGE
                                                   + idx * cls.size)
        self.inuse[head] += 1
        cls.objs_used += 1
        return idx

    def _push(self, cls: SizeClass, head: int, group: int) -> None:
        self.groups[cls.id][group].append(head)
        cls.listed += 1
        self._stale_limit -= 1
        if self._stale_limit <= 0:
            self._compact_groups()

    def _compact_groups(self) -> None:
        entries = sum(len(s) for groups in self.groups.values() for s in groups)
        zspages = sum(c.zspages for c in self.classes)
        if entries > 2 * zspages + 4096:
            self._rebuild_groups()
        self._stale_limit = max(4096, zspages)

    def _rebuild_groups(self) -> None:
        for groups in self.groups.values():
            for stack in groups:
                del stack[:]
        by_id = {c.id: c for c in self.classes}
        for c in self.classes:
            c.listed = 0
        for head, tag in enumerate(self.class_of):
            if tag:
                cls = by_id[tag - 1]
                g = cls.group(self.inuse[head])
                if 0 < g < _GROUP_FULL:
                    self.groups[cls.id][g].append(head)
                    cls.listed += 1

    def free(self, offset: int, idx: int, size: int) -> None:
        cls = self._by_size[size]
        head = (offset - idx * cls.size) // PAGE
        _LINK.pack_into(self.mm, self.base + offset, self.freehead[head])
        self.freehead[head] = idx
        old = cls.group(self.inuse[head])
        used = self.inuse[head] - 1
        self.inuse[head] = used
        cls.objs_used -= 1
        if used == 0:
            self.broken.discard(head)
            self.class_of[head] = 0
            self.frames.free(head, cls.pages)
            cls.zspages -= 1
            return
        new = cls.group(used)
        if new != old and head not in self.broken:
            self._push(cls, head, new)
            if head == cls.current:
                # No longer surely the fullest: the next allocation looks in the groups,
                # as find_get_zspage does.
                cls.current = -1

    def holds(self, offset: int, idx: int, size: int) -> bool:
        """Whether handle ``(offset, idx)`` of ``size`` bytes is an object in use: of a
        zspage of its class in use, and not on that zspage's free chain (freeing it again
        would break the chain)."""
        if not 0 < size <= PAGE:
            return False
        cls = self._by_size[size]
        head, at = divmod(offset - idx * cls.size, PAGE)
        if at or not (0 <= idx < cls.objs and 0 <= head < len(self.class_of)
                      and self.class_of[head] == cls.id + 1 and self.inuse[head] > 0):
            return False
        return zs_chain_has(self.mm, self.base + head * PAGE, cls.size, cls.objs,
                            self.freehead[head], idx) == 0

    # -- reopening ---------------------------------------------------------------------------

    def claim_pages(self, mm: Any, pbase: int, slots: array) -> array:
        """Mark the object of every page record in ``slots`` (at ``pbase`` of ``mm``) in use,
        its zspage's frames taken, in one C pass (``_hot.claim_zsmalloc``); the slots
        refused (overlap, wrong class, misplaced)."""
        frames = self.frames
        if len(self.class_of) < frames.total():
            self._grow()
        need = frames.total() * (PAGE // _UNIT // 8)
        if len(self._claimed) < need:
            self._claimed.extend(bytes(need - len(self._claimed)))
        counts = array("I", bytes(8 * ZS_SIZE_CLASSES))
        refused, taken = claim_zsmalloc(
            mm, pbase, slots, frames.state, self.class_of, self.inuse, self._claimed,
            self._class_by_size, self._class_size, self._class_pages, self._class_objs, counts)
        frames.claimed(taken)
        for cls in self.classes:
            cls.zspages += counts[2 * cls.id]
            cls.objs_used += counts[2 * cls.id + 1]
        return array("I", refused)

    def claim(self, offset: int, idx: int, size: int) -> bool:
        """Mark one handle found in the index; False if it cannot be (overlap, wrong class)."""
        rec = one_record(offset, idx, size)
        end = offset // PAGE + MAX_RUN
        if rec is None or not self.frames.cover(min(self.frames.capacity, end)):
            return False
        return not self.claim_pages(rec, 0, array("I", [0]))

    def finish_claims(self) -> None:
        """Link every claimed zspage's free objects (in C: ``_hot.link_zspages``) and file
        it by fullness."""
        if self._claimed:
            link_zspages(self.mm, self.base, self.class_of, self._claimed, self._class_size,
                         self._class_objs, self.freehead)
        self._claimed = bytearray()
        self._rebuild_groups()

    # -- figures -----------------------------------------------------------------------------

    def metadata_bytes(self) -> int:
        arrays = 2 * (len(self.class_of) + len(self.inuse) + len(self.freehead))
        stacks = 4 * sum(len(s) for groups in self.groups.values() for s in groups)
        return arrays + stacks

    def header_bytes(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {
            "allocator": self.name,
            "zspages": sum(c.zspages for c in self.classes),
            "frames_used": self.frames.used,
            "classes": {
                c.size: {
                    "pages_per_zspage": c.pages,
                    "objs_per_zspage": c.objs,
                    "zspages": c.zspages,
                    "objs_used": c.objs_used,
                }
                for c in self.classes
                if c.zspages
            },
        }
