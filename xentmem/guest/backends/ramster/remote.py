"""zcache's second tier: which pages are remote, remotify when the local store runs short, and
the tmem ops over both tiers (``docs/ramster.md``, "Remotify").

The local store (:class:`~xentmem.tmem.store.TmemStore`, pages in the arena) stays the first
tier.  Before a put that would not fit, the least recently used persistent pages (and, with
``ramster_ephemeral=move``, the oldest private ephemeral pages) move to the cluster in one
batch: acknowledged by the tier (``WAIT`` for persistent pages), then recorded here, then
dropped from the store if they did not change meanwhile.  A get looks locally first, then
here.  The index below is the one record of which pages are remote: exact (an entry exists
exactly while the cluster holds this node's acknowledged copy) and bounded (each entry is
charged :data:`REMOTE_ENTRY_BYTES` of the local capacity, so remote pages cannot outgrow
what the local store could index).

A shared ephemeral pool whose UUID this node's ACL user was granted is cluster-wide: its
pages live only in the cluster, under the UUID's namespace, so every node that opened the
same UUID sees them and an invalidation on one is seen by all.  Without the grant the pool
stays local (as Xen makes a private pool when shared authorisation fails).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from xentmem.errors import BackendError
from xentmem.guest.backend import GetResult
from xentmem.tmem.abi import PAGE_SIZE, Oid, PoolUuid
from xentmem.tmem.store import TmemStore, pack_page, unpack_page

from .fetch import Fetcher
from .pending import PendingDeletes
from .readahead import Flight, Readahead
from .record import (
    SHARED,
    RecordError,
    RemoteKey,
    marked_object,
    object_mark,
    object_tag,
    owner_of_shared,
    page_name,
    parse_name,
)
from .tier import GetResult as GetMany
from .tier import RamsterUnavailable, RemoteTier

log = logging.getLogger(__name__)

#: Local memory one remote page's bookkeeping costs (its entries in this index and in the
#: tier's size table), charged against the local capacity: 197 bytes measured with
#: tracemalloc on CPython 3.11, 512 pages per object (docs/ramster.md, "Capacity"), rounded up.
REMOTE_ENTRY_BYTES = 256
#: The persistent LRU's entry per local persistent page (an OrderedDict entry and its key
#: tuple): 289 bytes measured the same way, rounded up.
LRU_ENTRY_BYTES = 320
#: A remotify moves at least a quarter of the local capacity, between these bounds, and at
#: most BATCH_PAGES pages: one pipeline per master and one WAIT per batch, so the fewer the
#: batches, the fewer the waits for a replica (1 MiB moved 1.6x the pages per second of
#: 256 KiB in the put loop of bench_ramster.py, medians of 6 rounds, docs/ramster.md).
BATCH_MIN_BYTES = 256 * 1024
BATCH_MAX_BYTES = 1024 * 1024
BATCH_PAGES = 512
#: A remotify that finds fewer local pages than this to move while the remote pages' index
#: takes half the capacity or more is *cramped*: the local store has almost nothing left,
#: so puts wait for a remotify of a page or two each (warned once, counted).
CRAMPED_PAGES = 16
#: After the cluster failed a remotify, the next one waits this long (puts meanwhile are
#: what the local store alone can take); then it is tried again by itself.
PAUSE_S = 5.0
#: A get waits its turn behind other callers' fetches at most this many ``ramster_timeout_ms``
#: plus FETCH_WAIT_S, then fails with -EIO (a safety net: each fetch is bounded already).
FETCH_WAIT_TIMEOUTS = 2
FETCH_WAIT_S = 5.0

#: A get whose page was put, flushed or moved while it fetched asks again, this many times
#: at most (then -EIO for a persistent page, a miss for an ephemeral one).
GET_TRIES = 4

_DONE = 1
_MISS: GetResult = (0, None)
_EIO: GetResult = (-errno.EIO, None)

#: (slot, oid, index): one page of this node's pools.
Where = tuple[int, Oid, int]


class RemotePages:
    """The remote half of one zcache: its index, its persistent LRU and the ops over both."""

    def __init__(self, store: TmemStore, cid: int, tier: RemoteTier, *,
                 ephemeral: str, clock_now: Callable[[], float],
                 deletes_path: Path | None = None) -> None:
        self._store = store
        self._cid = cid
        self.tier = tier
        self.owner = tier.config.node_id
        self.ephemeral = ephemeral
        self._now = clock_now
        #: Guards the index, the LRU and the pending deletes, and makes "record remote,
        #: then take local" one step against a put of the same page.
        self._books = threading.Lock()
        #: slot -> oid -> index -> stored size: this node's pages the cluster holds.
        self._remote: dict[int, dict[Oid, dict[int, int]]] = {}
        self._remote_pages = 0
        self._remote_zbytes = 0
        #: Local persistent pages, least recently used first (entries of flushed pages are
        #: dropped when met, and all of them pruned when they outnumber the pages twice).
        self._lru: OrderedDict[Where, None] = OrderedDict()
        #: Pages whose remote copy a put or a flush is deleting: remotify leaves them alone.
        self._deleting: set[Where] = set()
        #: Pages a remotify read and is moving: a put or flush of one takes it out, so the
        #: move knows the page changed without reading it again.
        self._moving: set[Where] = set()
        #: Pages with gets fetching outside the books: [version, gets]; every change of
        #: the page's index entry bumps its version, so a get can tell that what it
        #: fetched is no longer what the entry it read named.
        self._versions: dict[Where, list[int]] = {}
        #: Puts into the local store so far: a get that missed there and then finds no
        #: remote copy looks again only when a put came in between.
        self._local_puts = 0
        #: Key names whose delete failed (the cluster was down); retried, never served.
        self._stale = PendingDeletes(deletes_path)
        self._forget_foreign_deletes()
        #: slot -> owner of the cluster-wide namespace of a shared pool.
        self._shared: dict[int, str] = {}
        self._remotify = threading.Lock()
        self._paused_until = 0.0
        self._get_failing = False
        self.remotify_failures = 0
        self.remotify_rounds = 0
        self.remotify_cramped = 0
        self._cramped_warned = False
        #: Gets of remote pages: concurrent callers share one pipeline per master.
        self.fetcher = Fetcher(tier, wait_s=lambda: FETCH_WAIT_TIMEOUTS *
                               tier.config.timeout_ms / 1000 + FETCH_WAIT_S,
                               ready=self._ready)
        #: Pages of an object read ahead of their gets (persistent pools, gets in order):
        #: whatever changes a page's index entry drops its copy there (:meth:`_record`,
        #: :meth:`_unrecord` and the flushes of objects and pools).
        self._ahead = Readahead()

    # -- pools ------------------------------------------------------------------------------------

    def opened(self, slot: int, uuid: PoolUuid) -> None:
        """A new pool in ``slot``: a shared one is cluster-wide when this node was granted
        its UUID's namespace.  Whatever the slot held before is forgotten first: a pool
        that is not cluster-wide must never send its pages to another pool's namespace."""
        self._shared.pop(slot, None)
        pool = self._pool(slot)
        if pool is None or not pool.shared:
            return
        owner = owner_of_shared(f"{uuid.hi:016x}{uuid.lo:016x}")
        try:
            granted = self.tier.may_access(owner)
        except RamsterUnavailable as exc:
            log.warning("ramster: shared pool %s kept local: %s", uuid, exc)
            return
        if granted:
            self._shared[slot] = owner
            log.info("ramster: shared pool %s is cluster-wide (%s)", uuid, owner)
        else:
            log.info("ramster: user %r was not granted shared pool %s: kept local",
                     self.tier.config.user or "default", uuid)

    def destroyed(self, slot: int) -> None:
        """The pool in ``slot`` is gone: its remote pages go too.  A cluster-wide shared
        pool's pages stay for the other nodes (they carry a TTL)."""
        if self._shared.pop(slot, None) is not None:
            return
        with self._books:
            objects = self._remote.pop(slot, {})
            self._ahead.drop_where(lambda w: w[0] == slot)
            names = [RemoteKey(self.owner, slot, oid, index).name()
                     for oid, obj in objects.items() for index in obj]
            self._remote_pages -= len(names)
            self._remote_zbytes -= sum(sum(obj.values()) for obj in objects.values())
            self._lru = OrderedDict((w, None) for w in self._lru if w[0] != slot)
            self._moving.difference_update([w for w in self._moving if w[0] == slot])
        self._delete(names)

    def _forget_foreign_deletes(self) -> None:
        """Pending deletes of another node's own keys (this run directory's node id was
        changed) are not ours to retry: the ACL would refuse them, and hold up the rest."""
        foreign = []
        for name in self._stale:
            tag = marked_object(name)
            try:
                owner = parse_name(name if tag is None else page_name(tag, 0)).owner
            except ValueError:
                owner = ""
            if owner != self.owner and not owner.startswith(f"{SHARED}:"):
                foreign.append(name)
        if foreign:
            log.warning("ramster: %d pending delete(s) of another node (not %s) forgotten",
                        len(foreign), self.owner)
            self._stale.difference_update(foreign)

    def _pool(self, slot: int) -> Any:
        slots = self._store.clients[self._cid].slots
        return slots[slot] if 0 <= slot < len(slots) else None

    # -- the data path ----------------------------------------------------------------------------

    def put_page(self, slot: int, oid: Oid, index: int, page: bytes) -> int:
        store, cid = self._store, self._cid
        pool = self._pool(slot)
        if pool is not None and slot in self._shared:
            return self._shared_put(slot, oid, index, page)
        where = (slot, oid, index)
        if len(page) != PAGE_SIZE or pool is None:
            rc = store.refuse_put(cid, slot, oid, index, -errno.EINVAL) if pool is not None \
                else store.put_page(cid, slot, oid, index, b"")
            self._superseded(where)
            return rc
        data = pack_page(page)
        persistent = pool.persistent
        self._make_room(len(data) + store.overhead(persistent=persistent))
        with self._books:
            rc = store.put_page(cid, slot, oid, index, data)
            self._local_puts += 1
            self._moving.discard(where)
            if persistent:
                if rc == _DONE:
                    self._lru[where] = None
                    self._lru.move_to_end(where)
                else:
                    self._lru.pop(where, None)
            name = self._unrecord(where)
        if name is not None:  # a put, failed or not, supersedes the remote copy
            self._delete([name], deleting=[where])
        return rc

    def get_page(self, slot: int, oid: Oid, index: int) -> GetResult:
        for _ in range(GET_TRIES):
            got = self._get_once(slot, oid, index)
            if got is not None:
                return got
        pool = self._pool(slot)
        log.warning("ramster: pool %d oid %s index %d changed under %d gets in a row; "
                    "not served", slot, oid, index, GET_TRIES)
        return _EIO if pool is not None and pool.persistent else _MISS

    def _get_once(self, slot: int, oid: Oid, index: int) -> GetResult | None:
        """One try of a get; None when the page's index entry changed while its remote copy
        was fetched (a put, a flush, a remotify): what came back may be another version's
        or nothing, so the caller asks again and the page's state now answers."""
        puts = self._local_puts
        rc, data = self._store.get_page(self._cid, slot, oid, index)
        where = (slot, oid, index)
        if data is not None:
            if where in self._lru:
                with self._books:
                    if where in self._lru:
                        self._lru.move_to_end(where)
            return (1, unpack_page(data))
        if rc == -errno.ENODEV:
            return rc, None
        if slot in self._shared:
            return self._shared_get(slot, oid, index)
        pool = self._pool(slot)
        exclusive = pool is not None and pool.exclusive
        persistent = pool is not None and pool.persistent
        ahead = persistent and not exclusive
        flight = waiting = None
        buffered: bytes | None = None
        in_order = False
        with self._books:
            obj = self._remote.get(slot, {}).get(oid)
            if obj is None or index not in obj:
                if puts != self._local_puts and \
                        self._store.peek_page(self._cid, slot, oid, index) is not None:
                    return None  # put (and its remote copy dropped) since the store missed
                return rc, None
            if ahead:
                in_order = self._ahead.in_order(where)
                if in_order:  # near the furthest page read ahead: the next window
                    flight = self._ahead.begin_next(where, obj)
                buffered = self._ahead.take(where)
                if buffered is None:
                    waiting = self._ahead.flying(where)
                    if waiting is None and in_order:
                        flight = self._ahead.begin(where, obj)
            # Taken from the buffer under the books, a page is the entry's own; one fetched
            # outside them is checked against the entry's version afterwards.
            watching = buffered is None
            seen = self._watch(where) if watching else 0
        try:
            if waiting is not None:  # another caller's readahead asked for it: wait for that
                waiting.done.wait(self.fetcher.wait_s())
                with self._books:
                    if self._versions[where][0] != seen:
                        return None
                    obj = self._remote.get(slot, {}).get(oid)
                    if obj is None or index not in obj:  # its pool destroyed meanwhile
                        return rc, None
                    if in_order:
                        flight = self._ahead.begin_next(where, obj)
                    buffered = self._ahead.take(where)
                    if buffered is not None:
                        watching = False
                        self._unwatch(where, seen)
            key = RemoteKey(self.owner, slot, oid, index)
            try:
                if buffered is not None:
                    try:
                        found: bytes | None = self._unpacked(key, buffered)
                    finally:  # the next window is read (and so ended) whatever this page is
                        if flight is not None:
                            self._read_window(flight)
                elif flight is not None:
                    found = self._read_ahead(key, flight)
                else:
                    found = self.fetcher.get(key, exclusive=exclusive)
            except RecordError:  # logged and counted by the tier: never served
                if not watching:  # a buffered page: its own get fetches it and drops it
                    return _EIO if persistent else _MISS
                with self._books:
                    watching = False
                    if not self._unwatch(where, seen):
                        return None
                    name = self._unrecord(where)
                if name is not None:  # the damaged value goes too
                    self._delete([name], deleting=[where])
                return _EIO if persistent else _MISS
            except BackendError as exc:
                self._get_failed(key, exc)
                return _EIO
            self._get_failing = False
            if watching:
                with self._books:
                    watching = False
                    if not self._unwatch(where, seen):
                        return None
                    if found is None or exclusive:  # its remote copy is gone: nothing to delete
                        if self._unrecord(where) is not None:
                            self._deleting.discard(where)
                    elif ahead:  # fetched: no readahead brings it back again
                        self._ahead.served(where)
        finally:
            if watching:
                with self._books:
                    self._unwatch(where, seen)
        if found is None:  # an ephemeral page's TTL ran out, or Redis evicted it
            if persistent:
                log.error("ramster: %s: the cluster lost an acknowledged persistent page",
                          key.name())
                return _EIO
            return _MISS
        return (1, found)

    def _watch(self, where: Where) -> int:
        """A get is about to fetch ``where`` outside the books (held): its version now."""
        version = self._versions.get(where)
        if version is None:
            version = self._versions[where] = [0, 0]
        version[1] += 1
        return version[0]

    def _unwatch(self, where: Where, seen: int) -> bool:
        """That get is done (the books are held): whether ``where``'s index entry is still
        the one it read (version ``seen``)."""
        version = self._versions[where]
        version[1] -= 1
        if not version[1]:
            del self._versions[where]
        return version[0] == seen

    def _ready(self, data: bytes) -> bytes:
        """The fetcher's form of a fetched record's data: its page.  Data that does not
        unpack to exactly a page (damaged lz4, or a short page another host wrote in a
        shared pool) is counted as a refused record; the fetcher logs it and never serves
        it."""
        try:
            return unpack_page(data)
        except Exception:
            self.tier.count_refused_record()
            raise

    def _unpacked(self, key: RemoteKey, data: bytes) -> bytes:
        """The page of a checked record; RecordError when it does not unpack to exactly a
        page (counted and logged as the fetcher refuses it)."""
        try:
            return unpack_page(data)
        except Exception as exc:  # lz4's errors and any other: the page is not served
            self.tier.count_refused_record()
            refused = RecordError(f"{key.name()}: the page does not unpack: {exc}")
            log.error("%s (not served)", refused)
            raise refused from None

    def _read_ahead(self, key: RemoteKey, flight: Flight) -> bytes | None:
        """The missed page and the object's next remote pages in one MGET; the others wait
        in the buffer (none dropped meanwhile).  Answers as :meth:`Fetcher.get` does."""
        found = self._read_window(flight, key)
        if key in found.refused:
            raise found.refused[key]
        data = found.pages.get(key)
        return None if data is None else self._unpacked(key, data)

    def _read_window(self, flight: Flight, key: RemoteKey | None = None) -> GetMany:
        """``flight``'s pages (and ``key``'s, a miss) in one MGET; they wait in the buffer.
        Without a miss (the window ahead of the readers) a failure keeps nothing and raises nothing:
        each page is fetched by its own get, which reports it."""
        keys = [RemoteKey(self.owner, *where) for where in flight.wheres]
        kept: dict[Where, bytes] = {}
        try:
            found = self.tier.get_object(keys if key is None else [key, *keys])
            for other, where in zip(keys, flight.wheres):
                data = found.pages.get(other)
                if data is not None:
                    kept[where] = data
        except BackendError:
            if key is not None:
                raise
            found = GetMany()
        finally:
            with self._books:
                self._ahead.end(flight, kept)
        return found

    def _get_failed(self, key: RemoteKey, exc: BaseException) -> None:
        """One log line per outage (the tier's line names the node and what failed)."""
        if not self._get_failing:
            log.error("ramster: get of remote page %s failed with -EIO: %s", key.name(), exc)
        self._get_failing = True

    def flush_page(self, slot: int, oid: Oid, index: int) -> int:
        if slot in self._shared:
            self._store.flush_page(self._cid, slot, oid, index)
            return self._shared_flush([RemoteKey(self._shared[slot], 0, oid, index).name()])
        where = (slot, oid, index)
        with self._books:
            rc = self._store.flush_page(self._cid, slot, oid, index)
            self._moving.discard(where)
            self._lru.pop(where, None)
            name = self._unrecord(where)
        if name is None:
            return rc
        self._delete([name], deleting=[where])
        return _DONE if rc >= 0 else rc

    def flush_object(self, slot: int, oid: Oid) -> int:
        if slot in self._shared:
            self._store.flush_object(self._cid, slot, oid)
            return self._shared_flush_object(object_tag(self._shared[slot], 0, oid))
        with self._books:
            rc = self._store.flush_object(self._cid, slot, oid)
            self._moving.difference_update([w for w in self._moving if w[:2] == (slot, oid)])
            obj = self._remote.get(slot, {}).pop(oid, None) or {}
            self._ahead.drop_where(lambda w: w[0] == slot and w[1] == oid)
            if not self._remote.get(slot, True):
                del self._remote[slot]
            self._remote_pages -= len(obj)
            self._remote_zbytes -= sum(obj.values())
            wheres = [(slot, oid, index) for index in obj]
            self._deleting.update(wheres)
        if not obj:
            return rc
        self._delete([RemoteKey(self.owner, slot, oid, i).name() for i in obj],
                     deleting=wheres)  # one object: one slot, one DEL
        return _DONE if rc >= 0 else rc

    # -- shared pools: the cluster is their only tier ---------------------------------------------

    def _shared_put(self, slot: int, oid: Oid, index: int, page: bytes) -> int:
        key = RemoteKey(self._shared[slot], 0, oid, index)
        if len(page) != PAGE_SIZE:
            self._shared_flush([key.name()])
            return -errno.EINVAL
        if self._stale and object_mark(key.object_tag()) in self._stale \
                and self._shared_flush_object(key.object_tag()) < 0:
            return -errno.EIO  # its object's flush is still to be done: nothing put in it
        try:
            self.tier.put(key, pack_page(page), persistent=False)
        except BackendError:  # the old copy must not outlive a failed put
            self._shared_flush([key.name()])
            return -errno.EIO
        self._stale.discard(key.name())
        return _DONE

    def _shared_get(self, slot: int, oid: Oid, index: int) -> GetResult:
        key = RemoteKey(self._shared[slot], 0, oid, index)
        if self._stale and (key.name() in self._stale
                            or object_mark(key.object_tag()) in self._stale):
            return _MISS  # flushed here, its delete still to be done: never served
        try:
            found = self.fetcher.get(key, exclusive=False)
        except RecordError:
            return _MISS
        except BackendError as exc:
            self._get_failed(key, exc)
            return _EIO
        self._get_failing = False
        return _MISS if found is None else (1, found)

    def _shared_flush(self, names: list[str]) -> int:
        try:
            removed = self.tier.delete_names(names)
        except BackendError:
            self._stale.update(names)
            return -errno.EIO
        self._stale.difference_update(names)
        return _DONE if removed else 0

    def _shared_flush_object(self, tag: str) -> int:
        """One shared object's keys (other nodes put them) listed by SCAN of its slot and
        deleted: 1 if the cluster had some, 0 if none, -EIO when it failed.  A failure is
        remembered (:func:`.record.object_mark` among the pending deletes, so in
        ``ramster.deletes`` too): every key of the object is then a miss here until this is
        done again, by a put into the object, a flush of it or the retry of pending deletes."""
        mark = object_mark(tag)
        try:
            names = self.tier.tag_names(tag)
            removed = self.tier.delete_names(names) if names else 0
        except BackendError:
            self._stale.update([mark])
            return -errno.EIO
        self._stale.difference_update([mark, *names])
        return _DONE if removed else 0

    # -- remotify ---------------------------------------------------------------------------------

    def _bookkeeping_bytes(self) -> int:
        return self._remote_pages * REMOTE_ENTRY_BYTES + len(self._lru) * LRU_ENTRY_BYTES

    def shortfall(self, cost: int) -> int:
        """Bytes to free before a put of ``cost`` fits (the store evicts ephemeral pages
        itself unless they are to move)."""
        store = self._store
        short = store.memory_bytes() + self._bookkeeping_bytes() + cost - store.capacity_bytes
        if short > 0 and self.ephemeral != "move":
            short -= store.freeable_bytes()
        return short

    def batch_bytes(self) -> int:
        """What one remotify moves at least: a quarter of the local capacity, within bounds."""
        return max(BATCH_MIN_BYTES, min(BATCH_MAX_BYTES, self._store.capacity_bytes // 4))

    def _make_room(self, cost: int) -> None:
        if self._now() < self._paused_until or self.shortfall(cost) <= 0:
            return
        self.remotify(cost)

    def remotify(self, cost: int = 0) -> int:
        """Move pages until ``cost`` more bytes fit (at least one batch's worth); answers how
        many moved.  One remotify at a time; a cluster failure pauses it for PAUSE_S."""
        with self._remotify:
            need = self.shortfall(cost)
            if need <= 0:
                return 0
            self._retry_stale()
            need = max(need, self.batch_bytes())
            eph: list[tuple[Where, bytes]] = []
            if self.ephemeral == "move":
                cost_each = self._store.overhead(persistent=False) - REMOTE_ENTRY_BYTES
                with self._books:
                    for slot, oid, index, data in self._store.oldest_ephemeral(
                            self._cid, BATCH_PAGES):
                        if need <= 0:
                            break
                        where = (slot, oid, index)
                        if where in self._deleting:  # its old copy's delete could take it
                            continue
                        eph.append((where, data))
                        self._moving.add(where)
                        need -= len(data) + cost_each
            pers = self._persistent_victims(need, BATCH_PAGES - len(eph))
            moved = 0
            for persistent, batch in ((True, pers), (False, eph)):
                if batch:
                    moved += self._move(batch, persistent=persistent)
            self.remotify_rounds += 1
            self._note_cramped(len(pers) + len(eph))
            return moved

    def _note_cramped(self, found: int) -> None:
        """Count a cramped remotify (CRAMPED_PAGES), and say once why and what to do; said
        again after the index has fallen below a quarter of the capacity."""
        index = self._remote_pages * REMOTE_ENTRY_BYTES  # the LRU's share is not the index's
        capacity = self._store.capacity_bytes
        if found < CRAMPED_PAGES and 2 * index >= capacity:
            self.remotify_cramped += 1
            if not self._cramped_warned:
                self._cramped_warned = True
                log.warning(
                    "ramster: the index of %d remote page(s) takes %d of zcache's %d KiB "
                    "capacity: remotify found %d local page(s) to move, so puts wait for a "
                    "round trip each; raise zcache's capacity (each remote page costs %d "
                    "bytes of it: docs/ramster.md, \"Capacity planning\")", self._remote_pages,
                    index >> 10, capacity >> 10, found, REMOTE_ENTRY_BYTES)
        elif 4 * index < capacity:
            self._cramped_warned = False

    def _persistent_victims(self, need: int, limit: int) -> list[tuple[Where, bytes]]:
        """The least recently used local persistent pages, until ``need`` bytes or ``limit``
        pages; LRU entries of pages no longer there are dropped on the way."""
        found: list[tuple[Where, bytes]] = []
        gone: list[Where] = []
        overhead = self._store.overhead(persistent=True) + LRU_ENTRY_BYTES - REMOTE_ENTRY_BYTES
        with self._books:
            for where in self._lru:
                if need <= 0 or len(found) >= limit:
                    break
                if where in self._deleting:
                    continue
                data = self._store.peek_page(self._cid, *where)
                if data is None:
                    gone.append(where)
                    continue
                found.append((where, data))
                self._moving.add(where)
                need -= len(data) + overhead
            for where in gone:
                del self._lru[where]
        return found

    def _move(self, batch: list[tuple[Where, bytes]], *, persistent: bool) -> int:
        """One batch to the cluster; each acknowledged page recorded, then taken out of the
        store if it is unchanged (else its fresh remote copy is removed again)."""
        keys = {RemoteKey(self.owner, *where): (where, data) for where, data in batch}
        result = self.tier.put_many([(k, d) for k, (_w, d) in keys.items()],
                                    persistent=persistent)
        self._stale.update(result.leftover)
        if result.errors:  # an outage, or a refusal by the ACL (no use retrying at each put)
            self.remotify_failures += 1
            self._paused_until = self._now() + PAUSE_S
            log.warning("ramster: remotify paused for %.0f s: %s", PAUSE_S, result.errors[0])
        moved = 0
        undo: list[str] = []
        undone: list[Where] = []
        with self._books:
            for key in result.acknowledged:
                where, data = keys[key]
                # still in _moving: no put, flush or destroy since it was read
                if where in self._deleting or where not in self._moving:
                    undo.append(key.name())
                    continue
                self._record(where, len(data))
                self._stale.discard(key.name())  # a pending delete must not take this copy
                if self._store.take_page(self._cid, *where):
                    self._lru.pop(where, None)
                    moved += 1
                else:  # evicted or taken by an exclusive get meanwhile
                    self._unrecord(where)
                    undo.append(key.name())
                    undone.append(where)
            self._moving.difference_update(w for w, _d in batch)
            self._prune_lru()
        self._delete(undo, deleting=undone)
        return moved

    def _prune_lru(self) -> None:
        """Drop the LRU's entries of pages flushed with their object (the books are held)."""
        if len(self._lru) > 2 * self._store.clients[self._cid].pers_pages + 1024:
            self._lru = OrderedDict(
                (w, None) for w in self._lru if self._store.peek_page(self._cid, *w) is not None)

    # -- the index --------------------------------------------------------------------------------

    def _record(self, where: Where, size: int) -> None:
        slot, oid, index = where
        self._ahead.drop(where)
        version = self._versions.get(where)
        if version is not None:
            version[0] += 1
        obj = self._remote.setdefault(slot, {}).setdefault(oid, {})
        if index not in obj:
            self._remote_pages += 1
        self._remote_zbytes += size - obj.get(index, 0)
        obj[index] = size

    def _unrecord(self, where: Where) -> str | None:
        """Forget one remote page (the books are held); its key name, None if not remote."""
        slot, oid, index = where
        objects = self._remote.get(slot)
        obj = objects.get(oid) if objects is not None else None
        if obj is None or index not in obj:
            return None
        self._remote_zbytes -= obj.pop(index)
        self._ahead.drop(where)
        version = self._versions.get(where)
        if version is not None:
            version[0] += 1
        if not obj:
            del objects[oid]
            if not objects:
                del self._remote[slot]
        self._remote_pages -= 1
        self._deleting.add(where)
        return RemoteKey(self.owner, *where).name()

    def _superseded(self, where: Where) -> None:
        with self._books:
            self._moving.discard(where)
            name = self._unrecord(where)
            self._lru.pop(where, None)
        if name is not None:
            self._delete([name], deleting=[where])

    def _delete(self, names: list[str], *, deleting: Iterable[Where] = ()) -> None:
        """Remove remote copies no index entry points to; a failure keeps their names to
        retry (they are never served: nothing points to them), a success ends their wait
        (an unload keeps the file of pending deletes only while some are left)."""
        try:
            if names:
                self.tier.delete_names(names)
        except BackendError:
            self._stale.update(names)
        else:
            if self._stale:
                self._stale.difference_update(names)
        finally:
            if deleting:
                with self._books:
                    self._deleting.difference_update(deleting)

    def _retry_stale(self) -> None:
        if not self._stale:
            return
        names: list[str] = []
        tags: list[str] = []
        for name in self._stale:
            tag = marked_object(name)
            if tag is None:
                names.append(name)
            else:
                tags.append(tag)
        if names:
            try:
                self.tier.delete_names(names)
            except BackendError:
                return
            self._stale.difference_update(names)
        for tag in tags:  # a shared object's flush: SCAN and DEL again
            if self._shared_flush_object(tag) < 0:
                return

    def remote_keys(self, slot: int) -> list[tuple[Oid, int]]:
        with self._books:
            return [(oid, index) for oid, obj in self._remote.get(slot, {}).items()
                    for index in obj]

    # -- a restart, and the end -------------------------------------------------------------------

    def adopt(self, restored_slots: Iterable[int]) -> dict[str, int]:
        """After the local store's restore: this node's keys in the cluster (SCAN) become the
        index where their pool came back and no local copy exists (a local copy is never
        older); every other key of this node is deleted.  Answers the figures."""
        slots = set(restored_slots)
        for slot in slots:
            for oid, index in self._store.page_keys(self._cid, slot):
                self._lru[(slot, oid, index)] = None
        found = self.tier.owner_sizes(self.owner)
        drop: list[str] = []
        adopted = 0
        with self._books:
            for name, size in found.items():
                try:
                    key = parse_name(name)
                except ValueError:
                    drop.append(name)
                    continue
                where = (key.pool, key.oid, key.index)
                if key.owner != self.owner or key.pool not in slots or name in self._stale \
                        or self._store.peek_page(self._cid, *where) is not None:
                    drop.append(name)
                    continue
                self._record(where, size)
                adopted += 1
        self._delete(drop)
        return {"remote_pages_adopted": adopted, "remote_pages_dropped": len(drop)}

    def drop_all(self) -> int:
        """Every remote page of this node goes (an unload: persistent ones were repatriated
        already).  Answers how many deletes the cluster did not take: they stay in
        ``ramster.deletes`` for the next load of this node (the SCAN of its own keys would
        drop the private ones, but not a shared page flushed here, which it would serve)."""
        with self._books:
            names = [RemoteKey(self.owner, slot, oid, index).name()
                     for slot, objects in self._remote.items()
                     for oid, obj in objects.items() for index in obj]
            self._remote.clear()
            self._ahead.drop_where(lambda _w: True)
            self._remote_pages = self._remote_zbytes = 0
            self._lru.clear()
        pending = list(self._stale)
        self._delete(names + [name for name in pending if marked_object(name) is None])
        for tag in filter(None, map(marked_object, pending)):
            self._shared_flush_object(tag)
        self.tier.close()
        if self._stale:
            where = "lost with this process (no run directory)" if self._stale.path is None \
                else f"kept in {self._stale.path} for the next load of node {self.owner}"
            log.error("ramster: unload: %d remote delete(s) the cluster did not take, %s",
                      len(self._stale), where)
        return len(self._stale)

    # -- reporting --------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        tier = self.tier.stats()
        return {
            "ramster_remote_pages": self._remote_pages,
            "ramster_remote_zbytes": self._remote_zbytes,
            "ramster_remote_bytes": tier["remote_bytes"],
            "ramster_remotified": tier["remotified"],
            "ramster_fetched": tier["fetched"],
            "ramster_flushed": tier["flushed"],
            "ramster_misses": tier["remote_misses"],
            "ramster_cluster_errors": tier["cluster_errors"],
            "ramster_refused_records": tier["refused_records"],
            "ramster_refused_by_acl": tier["refused_by_acl"],
            "ramster_short_replication": tier["short_replication"],
            "ramster_reconnects": tier["reconnects"],
            "ramster_remotify_rounds": self.remotify_rounds,
            "ramster_remotify_failures": self.remotify_failures,
            "ramster_remotify_cramped": self.remotify_cramped,
            "ramster_reachable": int(tier["reachable"]),
            "ramster_shared_pools": len(self._shared),
            "ramster_stale_keys": len(self._stale),
            "ramster_bookkeeping_bytes": self._bookkeeping_bytes(),
            "ramster_readahead_pages": self._ahead.read,
            "ramster_readahead_hits": self._ahead.hits,
            "ramster_readahead_unused": self._ahead.unused,
        }

    def describe(self) -> dict[str, Any]:
        tier = self.tier.stats()
        config = self.tier.config
        return {
            "node_id": self.owner,
            "nodes": ",".join(f"{h}:{p}" for h, p in config.nodes),
            "user": config.user or "default",
            "tls": config.tls,
            "replicas": config.replicas,
            "timeout_ms": config.timeout_ms,
            "ephemeral": self.ephemeral,
            "reachable": tier["reachable"],
            "remotify_paused": self._now() < self._paused_until,
            "last_error": tier["last_error"],
        }


__all__ = ["REMOTE_ENTRY_BYTES", "RemotePages"]
