"""The page arena: stored pages in one file that outlives the process, an index beside them.

A page is the bytes a store hands over (lz4 block, raw page or nothing: the arena does not
look inside) under a key ``(pool, oid, index)``: a u32 pool id, an oid of three u64 words and
a u32 index.  Its bytes go where the allocator (``allocator=zbud|zsmalloc``) puts them in the
file's data region; its record goes in the index (``index.py``) with a commit word, a
checksum of the bytes seeded with the record, written last.  :meth:`Arena.put` returns only
once both are in place, so a put that returned is there after a ``kill -9``; one that did not
is either there whole or not at all.  :meth:`Arena.open` rebuilds everything else (lookup
tables, allocator state) from the records, checking each page's checksum; a page that fails
is dropped, counted, logged and reported, never served.  The interface for a store, the file
format and the choices behind them: ``docs/page-arena.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from xentmem.errors import ArenaDamaged, ArenaError
from xentmem.params import Param, ParamSet
from xentmem.tmem._hot import (
    BAD_CHECKSUM,
    BAD_DUPLICATE,
    BAD_LENGTH,
    BAD_OBJECT,
    BAD_OUTSIDE,
    copy_page,
    find_page,
    get_page,
    page_commit,
    page_sound,
    scan_pages,
)
from xentmem.tmem.arenafile import (
    DATA,
    DEFAULT_SEGMENT,
    OBJECTS,
    PAGE,
    PAGES,
    ArenaFile,
    set_aside,
)
from xentmem.tmem.frames import Frames
from xentmem.tmem.index import (
    COMMIT,
    OBJ_FIELDS,
    OBJ_RECORD,
    PAGE_ALL,
    PAGE_FIELDS,
    PAGE_RECORD,
    Index,
    object_commit,
)
from xentmem.tmem.zbud import Zbud
from xentmem.tmem.zsmalloc import Zsmalloc

log = logging.getLogger(__name__)

#: The allocators, by the name the ``allocator`` param takes.
ALLOCATORS = {"zbud": Zbud, "zsmalloc": Zsmalloc}
#: Denser on the bench corpus (``bench/bench_pages.py``: zsmalloc packs a page in about
#: its compressed size, zbud in at least half a frame).
DEFAULT_ALLOCATOR = "zsmalloc"

ARENA_PARAMS = ParamSet(
    Param(
        "allocator",
        str,
        DEFAULT_ALLOCATOR,
        "how stored pages are packed in the arena's frames: zsmalloc (size classes, objects "
        "across pages) or zbud (at most two a frame); an arena that holds pages keeps the "
        "allocator it was made with",
        choices=tuple(ALLOCATORS),
    ),
)

#: A page's bytes start at a multiple of this in the data region (zsmalloc's class step).
UNIT = 16
#: How many lost keys a report lists, and how many drops are logged one by one, on an
#: open (the counts, and the summary line, are complete).
MAX_LOST = 100
MAX_LOGGED = 20
#: Objects whose slot the arena keeps at hand (a dict entry each).
_RECENT_OBJECTS = 256
#: Why a reopen drops a page record (the C pass's codes; the claim's is the last).
_PROBLEMS = {
    BAD_OBJECT: "its object record is missing or damaged",
    BAD_LENGTH: "its length is more than a page",
    BAD_OUTSIDE: "its bytes are outside the arena's data (or in memory given back)",
    BAD_CHECKSUM: "checksum mismatch",
    BAD_DUPLICATE: "a second record for the same page",
}
_UNCLAIMED = "its bytes overlap another page's, or its handle is wrong"

Oid3 = tuple[int, int, int]
PageKey = tuple[int, Oid3, int]
LostKey = Union[PageKey, tuple[str, int]]


@dataclass
class OpenReport:
    """What :meth:`Arena.open` found: for the log, ``status`` and the metrics."""

    path: str
    how: str  # "created", "reopened", "set-aside" (a damaged file moved away, a new one made)
    allocator: str
    pages: int = 0
    objects: int = 0
    stored_bytes: int = 0
    #: Pages whose data failed its checksum: dropped, never served.
    checksum_failures: int = 0
    #: Records that could not stand (object gone, out of range, overlapping, duplicate).
    dropped_records: int = 0
    #: Keys of the pages dropped (the first MAX_LOST); ("object slot", n) when the page's
    #: object record itself was damaged, so its key is unknown.
    lost: list[LostKey] = field(default_factory=list)
    set_aside: str | None = None
    reason: str = ""
    note: str = ""
    seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["lost"] = [list(k) for k in self.lost]
        return out

    def restart_summary(self, found: Mapping[str, int], *, started: float, problem: str = "",
                        pools: int | None = None) -> dict[str, Any]:
        """What a service's restart on this arena kept (``found``: its store's restore:
        pools, pages, orphans), as ``status`` shows it; ``started``: when the service's own
        part began (monotonic), added to the arena's time; ``problem``: why its pool table
        was not used."""
        out: dict[str, Any] = {
            "arena": self.path, "arena_how": self.how, "allocator": self.allocator,
            "pools_restored": found["pools"] if pools is None else pools,
            "pages_restored": found["pages"], "pages_dropped": found["orphans"],
            "checksum_failures": self.checksum_failures,
            "records_dropped": self.dropped_records,
            "seconds": round(self.seconds + time.monotonic() - started, 3),
        }
        if problem:
            out["error"] = problem
        return out


class Arena:
    """Pages by key in one arena file.  Not thread-safe: the store calls it under its lock.

    Open with :meth:`open`; ``close`` keeps the file (and every page) for the next open.
    """

    def __init__(self, file: ArenaFile, report: OpenReport) -> None:
        self._file = file
        self._mm = file.mm
        self._data = file.bases[DATA]
        self.path = file.path
        self.allocator_name = file.allocator
        self._frames = Frames(file)
        self._alloc: Zbud | Zsmalloc = ALLOCATORS[file.allocator](self._frames)
        self._index = Index(file)
        self.report = report
        self.stored_bytes = 0
        self.checksum_failures = 0
        self.dropped_records = 0
        #: Object slots of the objects used last, by key: a put or get of a recent object
        #: skips the lookup table (emptied when full, so its size stays bounded).
        self._recent: dict[tuple[int, int, int, int], int] = {}

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        allocator: str = DEFAULT_ALLOCATOR,
        segment_size: int = DEFAULT_SEGMENT,
        max_bytes: int = 0,
        on_damage: str = "set-aside",
    ) -> Arena:
        """Open the arena at ``path``, making it if there is none, and rebuild its state.

        ``max_bytes``: the bytes of frames a new arena may hold (default: this machine's
        RAM; the file is sparse, so only what is used costs memory).
        ``on_damage``: "set-aside" moves a damaged arena (ours, but a bad header, region
        sizes or file size) to ``<path>.damaged-<time>`` and starts a new one, saying so in
        the log and :attr:`report`; "refuse" raises ArenaDamaged.  A file that is not an arena,
        or a newer version's, is always refused (ArenaRefused) and never touched.
        """
        if allocator not in ALLOCATORS:
            raise ValueError(f"allocator {allocator!r}: accepted: {', '.join(ALLOCATORS)}")
        if on_damage not in ("set-aside", "refuse"):
            raise ValueError(f"on_damage {on_damage!r}: accepted: set-aside, refuse")
        started = time.monotonic()
        path = Path(path)
        max_bytes = max_bytes or _total_ram()
        how = "reopened"
        aside: str | None = None
        reason = ""
        if not path.exists():
            _create(path, allocator, segment_size, max_bytes)
            how = "created"
        try:
            file = ArenaFile.open(path)
        except ArenaDamaged as exc:
            if on_damage == "refuse":
                raise
            reason = str(exc)
            aside = str(set_aside(path))
            log.error("%s; set aside as %s: every page it held is lost; starting a new "
                      "arena", exc, aside)
            _create(path, allocator, segment_size, max_bytes)
            file = ArenaFile.open(path)
            how = "set-aside"
        report = OpenReport(str(path), how, file.allocator, set_aside=aside, reason=reason)
        try:  # a failure closes the file: its descriptor, lock and map are not left behind
            arena = cls(file, report)
            arena._rebuild()
        except BaseException:
            file.close()
            raise
        if file.allocator != allocator:
            if arena._index.page_count == 0:
                # Nothing to keep: remake it with the allocator asked for.
                file.close()
                os.unlink(path)
                _create(path, allocator, segment_size, max_bytes)
                file = ArenaFile.open(path)
                try:
                    arena = cls(file, report)
                except BaseException:
                    file.close()
                    raise
                report.allocator = allocator
            else:
                note = (
                    f"allocator={allocator} asked, but the arena holds pages packed by "
                    f"{file.allocator}: kept {file.allocator} until the arena is emptied"
                )
                log.warning("arena %s: %s", path, note)
                report.note = f"{report.note}; {note}" if report.note else note
        report.seconds = time.monotonic() - started
        return arena

    def _rebuild(self) -> None:
        """Every record checked, the lookups and the allocator rebuilt from those that stand."""
        idx = self._index
        report = self.report
        objects, pages = idx.objects, idx.pages
        for records, what in ((objects, "object"), (pages, "page")):
            if records.past_mark:
                mark, end = records.past_mark
                note = (f"committed {what} records reach slot {end}, past the mark of {mark} "
                        "in the marks page (damaged): they are checked as every record is")
                log.error("arena %s: %s", self.path, note)
                report.note = f"{report.note}; {note}" if report.note else note
        idx.reserve(objects.hwm, pages.hwm)
        valid_obj = bytearray(objects.hwm)
        nfields = OBJ_FIELDS.size
        for slot, rec in objects.scan():
            commit = int.from_bytes(rec[nfields:], "little")
            if not commit:
                objects.free.append(slot)
                continue
            fields = rec[:nfields]
            key = OBJ_FIELDS.unpack(fields)
            if commit != object_commit(fields) or idx.find_object(key)[0] >= 0:
                self._zero(objects, slot, nfields)
                objects.free.append(slot)
                self.dropped_records += 1
                if self.dropped_records <= MAX_LOGGED:
                    log.error("arena %s: object record %d is damaged; dropped", self.path, slot)
                continue
            idx.track_object(key, slot)
            valid_obj[slot] = 1
        alloc = self._alloc
        # The frames the file holds, none reserved (those in holes are never read).
        self._frames.cover_held()
        idx.grow_links(pages.hwm, objects.hwm)
        # The C pass: commit words, bounds, checksums (the bytes read in place), duplicate
        # keys; the pages that stand are placed in the lookup table and their object's list.
        free, kept, stored, dropped = scan_pages(
            self._mm, pages.base, pages.hwm, self._data, self._frames.state, valid_obj,
            idx.page_buckets.table, idx.next, idx.prev, idx.obj_head, idx.obj_pages)
        pages.free.frombytes(free)
        idx.page_buckets.count = idx.page_count = len(kept) // 4
        bad = [(slot, obj, index, _PROBLEMS[why]) for slot, obj, index, why in dropped]
        # The allocator claims every page's bytes in one C pass (zero pages have none): one
        # overlapping another's, or in the wrong place for its size, is dropped as well.
        unpack, mm, pbase = PAGE_ALL.unpack_from, self._mm, pages.base
        for slot in alloc.claim_pages(mm, pbase, array("I", kept)):
            obj, index, _, n, _, _ = unpack(mm, pbase + slot * PAGE_RECORD)
            idx.remove_page(slot, obj, index)  # its commit word zeroed, its slot freed
            stored -= n
            bad.append((slot, obj, index, _UNCLAIMED))
        for slot, obj, index, problem in bad:
            if problem is not _UNCLAIMED:
                self._zero(pages, slot, PAGE_FIELDS.size)
                pages.free.append(slot)
            if problem is _PROBLEMS[BAD_CHECKSUM]:
                self.checksum_failures += 1
            else:
                self.dropped_records += 1
            lost: LostKey = (
                self._key_of(obj, index) if obj < len(valid_obj) and valid_obj[obj]
                else ("object slot", obj)
            )
            if len(report.lost) < MAX_LOST:
                report.lost.append(lost)
            if self.checksum_failures + self.dropped_records <= MAX_LOGGED:
                log.error("arena %s: page %s dropped, reported missing: %s", self.path,
                          _show(lost), problem)
        self.stored_bytes += stored
        for slot in range(len(valid_obj)):
            if valid_obj[slot] and not idx.obj_pages[slot]:
                idx.remove_object(slot)  # made for a put that never completed
        alloc.finish_claims()
        self._frames.finish_claims()
        report.pages = idx.page_count
        report.objects = idx.object_count
        report.stored_bytes = self.stored_bytes
        report.checksum_failures = self.checksum_failures
        report.dropped_records = self.dropped_records
        if self.checksum_failures or self.dropped_records:
            log.error("arena %s: %d page(s) failed their checksum, %d record(s) dropped; "
                      "those pages are reported missing", self.path, self.checksum_failures,
                      self.dropped_records)

    def _zero(self, records: Any, slot: int, commit_at: int) -> None:
        COMMIT.pack_into(self._mm, records.offset(slot) + commit_at, 0)

    def _key_of(self, obj: int, index: int) -> PageKey:
        pool, w0, w1, w2 = self._index.object_key(obj)
        return (pool, (w0, w1, w2), index)

    # -- pages -------------------------------------------------------------------------------

    def _object(self, okey: tuple[int, int, int, int], create: bool) -> int:
        recent = self._recent
        obj = recent.get(okey, -1)
        if obj >= 0:
            return obj
        obj = self._index.find_object(okey)[0]
        if obj < 0:
            if not create:
                return -1
            obj = self._index.add_object(okey)
        if len(recent) >= _RECENT_OBJECTS:
            recent.clear()
        recent[okey] = obj
        return obj

    def put(self, key: PageKey, data: bytes) -> None:
        """Store ``data`` (0..4096 bytes) under ``key``, replacing what was there.

        On return, the page and its record are complete and checksummed.  ArenaError when
        the arena is full or cannot grow: then the key holds nothing (a replaced page is
        gone too, as a failed duplicate put in Xen).
        """
        n = len(data)
        if n > PAGE:
            raise ValueError(f"a stored page is at most {PAGE} bytes, got {n}")
        pool, oid, index = key
        okey = (pool, oid[0], oid[1], oid[2])
        obj = self._recent.get(okey, -1)
        if obj < 0:
            obj = self._object(okey, True)
        idx = self._index
        slot, rec, at = find_page(idx.page_buckets.table, self._mm, idx.pbase, obj, index)
        if slot >= 0:  # a duplicate put: the old page goes first, its slot is reused
            # (checked before its commit word goes: a damaged record frees nothing)
            release = rec[3] > 0 and self._releasable(slot, obj, index, rec[2], rec[3], rec[4])
            idx.uncommit_page(slot)
            if release:
                self._alloc.free(rec[2] * UNIT, rec[4], rec[3])
                self.stored_bytes -= rec[3]
            else:
                self._uncount(rec[3])
        offset = sub = 0
        allocated = False
        try:
            if n:
                offset, sub = self._alloc.alloc(n)
                allocated = True
                commit = copy_page(self._mm, self._data + offset, data, obj, index,
                                   offset // UNIT, sub)
            else:
                commit = page_commit(data, obj, index, 0, 0, 0)
            where = offset // UNIT
            if slot >= 0:
                idx.write_page(slot, obj, index, where, n, sub, commit)
            else:
                idx.add_page(obj, index, where, n, sub, commit, rec, at)  # rec: the tag
        except Exception:  # not on a BaseException: a crash leaves no cleanup either
            if allocated:
                self._alloc.free(offset, sub, n)
            if slot >= 0:
                idx.remove_page(slot, obj, index, at)
            if not idx.obj_pages[obj]:
                self._forget_object(obj)
            raise
        self.stored_bytes += n

    def get(self, key: PageKey) -> bytes | None:
        """The bytes stored under ``key``, or None (never, failed its checksum: dropped)."""
        pool, oid, index = key
        okey = (pool, oid[0], oid[1], oid[2])
        obj = self._recent.get(okey, -1)
        if obj < 0:
            obj = self._object(okey, False)
            if obj < 0:
                return None
        idx = self._index
        got = get_page(idx.page_buckets.table, self._mm, idx.pbase, self._data, obj, index)
        if got.__class__ is tuple:  # (slot, bucket): the page failed its checksum
            self._failed(got[0], got[1], key)
            return None
        return got  # type: ignore[no-any-return]

    def take(self, key: PageKey) -> bytes | None:
        """:meth:`get` and :meth:`delete` in one lookup (an exclusive get): the record's
        lookup, the copy out, the checksum and the index's part of the delete are one C
        call (``_hot.take_page``); the allocator frees the bytes."""
        pool, oid, index = key
        okey = (pool, oid[0], oid[1], oid[2])
        obj = self._recent.get(okey, -1)
        if obj < 0:
            obj = self._object(okey, False)
            if obj < 0:
                return None
        got = self._index.take_page(obj, index, self._data)
        if got is None:
            return None
        if len(got) == 2:  # (slot, bucket): the page failed its checksum
            self._failed(got[0], got[1], key)
            return None
        data, _, where, n, sub, left = got
        if n:
            self._alloc.free(where * UNIT, sub, n)
            self.stored_bytes -= n
        if not left:
            self._forget_object(obj)
        return data  # type: ignore[no-any-return]

    def _failed(self, slot: int, bucket: int, key: PageKey) -> None:
        """Drop a page whose bytes or record failed while open.  Its bytes are not given
        back: whether the record or the bytes were damaged cannot be told, and a record
        damaged in place would free another page's bytes.  They stay taken until the next
        reopen, which claims only what sound records name."""
        self.checksum_failures += 1
        log.error("arena %s: page %s failed its checksum; dropped, reported missing (its "
                  "bytes are kept until the arena is reopened)", self.path, _show(key))
        self._drop(slot, bucket, free=False)

    def _releasable(self, slot: int, obj: int, index: int, where: int, n: int,
                    sub: int) -> bool:
        """Whether the bytes of a page being deleted or replaced may go back to the
        allocator: its record and bytes still pass its commit word (C: ``page_sound``)
        and the allocator holds that allocation.  Else the page is counted and logged and
        its bytes stay taken until the next reopen: a record damaged in place must not
        free another page's bytes, nor free an object twice."""
        if page_sound(self._mm, self._index.pbase, self._data, slot):
            if self._alloc.holds(where * UNIT, sub, n):
                return True
            self.dropped_records += 1
            why = "its allocator holds no such allocation"
        else:
            self.checksum_failures += 1
            why = "it failed its checksum"
        log.error("arena %s: page %s dropped: %s (its bytes are kept until the arena is "
                  "reopened)", self.path, _show(self._key_of(obj, index)), why)
        return False

    def delete(self, key: PageKey) -> bool:
        """Forget ``key``'s page; False if there was none."""
        pool, oid, index = key
        obj = self._object((pool, oid[0], oid[1], oid[2]), False)
        if obj < 0:
            return False
        slot, _, at = self._index.find_page(obj, index)
        if slot < 0:
            return False
        self._drop(slot, at)
        return True

    def _drop(self, slot: int, at: int = -1, free: bool = True) -> None:
        idx = self._index
        obj, index, where, n, sub, _ = idx.read_page(slot)
        release = free and n > 0 and self._releasable(slot, obj, index, where, n, sub)
        left = idx.remove_page(slot, obj, index, at)  # the commit word goes first
        if release:
            self._alloc.free(where * UNIT, sub, n)
            self.stored_bytes -= n
        else:  # its bytes kept (or none): it is no longer stored all the same
            self._uncount(n)
        if not left:
            self._forget_object(obj)

    def _uncount(self, n: int) -> None:
        """Count a page gone from :attr:`stored_bytes` whose record may be damaged, its
        length too: never more than a page, never below 0 (a length changed in place
        leaves the count off by the change until the next reopen, which recounts)."""
        self.stored_bytes = max(0, self.stored_bytes - min(n, PAGE))

    def _forget_object(self, obj: int) -> None:
        self._recent.pop(self._index.object_key(obj), None)
        self._index.remove_object(obj)

    def delete_object(self, pool: int, oid: Oid3) -> int:
        """Forget every page of one object (FLUSH_OBJECT); how many there were."""
        obj = self._object((pool, oid[0], oid[1], oid[2]), False)
        if obj < 0:
            return 0
        slots = self._index.object_pages(obj)
        for slot in slots:
            self._drop(slot)
        return len(slots)

    def delete_pool(self, pool: int) -> int:
        """Forget every page of one pool (DESTROY_POOL); how many there were."""
        idx = self._index
        count = 0
        for obj in list(idx.live_objects()):
            if idx.object_key(obj)[0] == pool:
                for slot in idx.object_pages(obj):
                    self._drop(slot)
                    count += 1
        return count

    def size_of(self, key: PageKey) -> int | None:
        """How many bytes ``key``'s page takes (its stored length), or None."""
        pool, oid, index = key
        obj = self._object((pool, oid[0], oid[1], oid[2]), False)
        if obj < 0:
            return None
        slot, rec, _ = self._index.find_page(obj, index)
        return None if slot < 0 else rec[3]

    def keys(self, pool: int | None = None) -> Iterator[PageKey]:
        """Every key held (of one pool), object by object: what a store rebuilds from.

        Do not change the arena while iterating.
        """
        idx = self._index
        for obj in idx.live_objects():
            p, w0, w1, w2 = idx.object_key(obj)
            if pool is not None and p != pool:
                continue
            oid = (w0, w1, w2)
            for slot in idx.object_pages(obj):
                yield (p, oid, idx.read_page(slot)[1])

    def sized_keys(self) -> Iterator[tuple[int, Oid3, int, int]]:
        """Every (pool, oid, index, stored length) held: :meth:`keys` with each page's
        length, in one pass (what a store rebuilds its index from after a restart)."""
        idx = self._index
        read_page = idx.read_page
        for obj in idx.live_objects():
            p, w0, w1, w2 = idx.object_key(obj)
            oid = (w0, w1, w2)
            for slot in idx.object_pages(obj):
                rec = read_page(slot)
                yield (p, oid, rec[1], rec[3])

    def sized_objects(self) -> Iterator[tuple[int, int, int, int, dict[int, int]]]:
        """Every object held: (pool, oid words, {index: stored length} of its pages), in
        one pass; what a store's index is rebuilt from.  Do not change the arena while
        iterating."""
        idx = self._index
        for obj in idx.live_objects():
            p, w0, w1, w2 = idx.object_key(obj)
            yield p, w0, w1, w2, idx.object_sizes(obj)

    def __len__(self) -> int:
        return self._index.page_count

    # -- figures -----------------------------------------------------------------------------

    def footprint(self) -> int:
        """Bytes of memory the arena holds: frames whose memory is held (in use, or free and
        not yet given back: :meth:`trim`), the records' regions as reserved, this process's
        tables (the per-frame arrays counted at their largest, 7 bytes a frame).  What a
        capacity must bound; cheap enough for every put."""
        idx = self._index
        reserved = self._file.reserved
        return (
            self._frames.resident * PAGE
            + reserved[OBJECTS] + reserved[PAGES]
            + 4 * (len(idx.objects.free) + len(idx.pages.free))
            + idx.obj_buckets.nbytes()
            + idx.page_buckets.nbytes()
            + 8 * (len(idx.next) + len(idx.obj_pages))
            + 7 * len(self._frames.state)
        )

    def trim(self) -> int:
        """Give the memory of every free frame back to tmpfs; the bytes given back (0 when
        every frame that holds memory is in use: a cheap test)."""
        return self._frames.trim() * PAGE

    def stats(self) -> dict[str, Any]:
        """Counters for ``stats`` and the metrics (``docs/page-arena.md`` says what each is)."""
        idx = self._index
        meta = idx.metadata_bytes()
        meta["frame_map"] = len(self._frames.state)
        meta["allocator"] = self._alloc.metadata_bytes()
        meta["frame_headers"] = self._alloc.header_bytes()
        metadata = sum(meta.values())
        pages = idx.page_count
        out: dict[str, Any] = {
            "path": str(self.path),
            "pages": pages,
            "objects": idx.object_count,
            "stored_bytes": self.stored_bytes,
            "frames_used": self._frames.used,
            "frames_resident": self._frames.resident,
            "frames_total": self._frames.total(),
            "file_bytes": self._file.reserved_bytes(),
            "metadata_bytes": metadata,
            "metadata": meta,
            "metadata_per_page": metadata / pages if pages else 0.0,
            "used_bytes": self._frames.used * PAGE - meta["frame_headers"] + metadata,
            "checksum_failures": self.checksum_failures,
            "dropped_records": self.dropped_records,
        }
        out.update(self._alloc.stats())
        return out

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and unlock; the file keeps every page for the next :meth:`open`."""
        self._file.close()

    def discard(self) -> None:
        """Close and remove the file: every page in it is gone (a clean stop that
        repatriated them, or a test)."""
        self._file.close()
        os.unlink(self.path)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create(path: Path, allocator: str, segment_size: int, max_bytes: int) -> None:
    # Another process may have made it first: open that one (its lock decides).
    with contextlib.suppress(FileExistsError):
        try:
            ArenaFile.create(path, allocator=allocator, segment_size=segment_size,
                             data_bytes=max_bytes)
        except FileExistsError:
            raise
        except OSError as exc:
            raise ArenaError(f"arena {path}: cannot create: {exc.strerror}") from None


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _show(key: Any) -> str:
    if isinstance(key, tuple) and len(key) == 3 and isinstance(key[1], tuple):
        pool, oid, index = key
        return f"pool {pool} oid {'.'.join(f'{w:x}' for w in oid)} index {index}"
    return " ".join(str(k) for k in key)


__all__ = ["ALLOCATORS", "ARENA_PARAMS", "DEFAULT_ALLOCATOR", "OBJ_RECORD", "Arena",
           "OpenReport"]
