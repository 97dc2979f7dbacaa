"""The frontswap frontend: swap pages into one persistent tmem pool, with lazy init.

Follows ``mm/frontswap.c`` (3.11-4.6, the lazy-init era) and the frontswap half of
``drivers/xen/tmem.c`` (``docs/tmem-semantics.md``): one private persistent pool serves every
swap type, each type spread over 16 objects by the 4-bit swizzle.  Swap types initialised
before a backend exists are recorded and replayed, in order, when one registers.

Unlike the kernel, this frontend also owns the swap device: one :class:`BackingStore` per
swap type.  A store that tmem refuses goes to the backing store (where the kernel's swap
would write the disk), so a page is always either in tmem or in its backing store, and
``shrink`` or an unload repatriates tmem pages into it.  That is what makes unloading a
backend safe, which the kernel never supported.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from xentmem.errors import AbiError, BackendError, UnloadRefused
from xentmem.guest.backend import Backend
from xentmem.guest.frontends.backing import BackingStore
from xentmem.guest.frontends.guarded import Guarded
from xentmem.guest.frontends.keys import SWIZ_BITS, SWIZ_MASK, offset_fits, swizzle_oids
from xentmem.tmem.abi import (
    PAGE_SIZE,
    POOL_PRIVATE_PERSISTENT,
    PRIVATE_UUID,
    TMEM_DONE,
    Oid,
    rc_name,
)

log = logging.getLogger(__name__)


@dataclass
class _SwapArea:
    swap_type: int
    backing: BackingStore
    oids: tuple[Oid, ...]
    #: Offsets whose page is in tmem (the kernel's ``frontswap_map``), oldest first.
    in_tmem: dict[int, None] = field(default_factory=dict)


class Frontswap(Guarded):
    """Frontswap with its swap devices.  Thread-safe, and parallel across offsets.

    Two kinds of lock: one *slot lock* per offset (striped: :data:`SLOT_LOCKS` locks shared by
    all offsets) serialises everything done to one offset, backend calls included; the
    *map lock* guards the maps, the registration and the counters, and is held only briefly,
    never across a backend call.  So stores to different offsets reach the backend together
    (the ``xen`` backend batches them into one message).  Lock order: slot locks (in index
    order when several), then the map lock.  An unload marks the frontend draining, takes
    and releases every slot lock (so every data operation that began before has ended),
    repatriates, and holds them all again while the backend goes.

    Long jobs (an unload's or a shrink's repatriation) run in batches, and :meth:`curr_pages`
    reads a counter without a lock, so a monitor (the daemon's watchdog ping, the balloon
    loop) never waits behind a repatriation.
    """

    #: Pages repatriated per batch during an unload or a shrink.
    REPATRIATE_BATCH = 256
    #: Slot locks: offsets that share one wait for each other, others proceed in parallel.
    SLOT_LOCKS = 64

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._slot_locks = tuple(threading.Lock() for _ in range(self.SLOT_LOCKS))
        self._ops: Backend | None = None
        self._pool_id = -1
        self._areas: dict[int, _SwapArea] = {}
        self._need_init: list[int] = []
        #: Pages in tmem over all areas (the sum of ``len(in_tmem)``), readable without the lock.
        self._tmem_pages = 0
        #: Set while an unload repatriates: new stores go straight to the backing store.
        self._draining = False
        self.writethrough = False
        self.exclusive_gets = False
        #: The backend keeps its pages across its own restart (see :meth:`_adopt`).
        self._outlives = False
        # debugfs names (/sys/kernel/debug/frontswap/), plus four of our own.
        self.loads = 0
        self.succ_stores = 0
        self.failed_stores = 0
        self.invalidates = 0
        self.repatriated = 0
        self.failed_loads = 0
        self.backing_writes = 0
        self.backend_errors = 0

    # -- registration -----------------------------------------------------------------------

    @property
    def ops(self) -> Backend | None:
        return self._ops

    @property
    def pool_id(self) -> int:
        """The real pool id, -1 before a backend created it (or if it refused to)."""
        return self._pool_id

    def register_ops(
        self, ops: Backend, *, writethrough: bool = False, exclusive_gets: bool = False
    ) -> None:
        """``frontswap_register_ops``: replay recorded swap types, then publish the ops.

        All or nothing: if the backend raises while the pool is made or its kept pages are
        taken back, nothing is kept (the swap types wait for the next backend).
        """
        with self._all_slots(), self._lock:  # no store or load is half done meanwhile
            if self._ops is not None:
                raise BackendError(f"frontswap already has a backend ({self._ops.name})")
            self._pool_id = -1
            # A backend whose pages outlive its process (zcache's arena) may hold this
            # frontend's pages from before a crash: they are taken back now, for the areas
            # re-attached, and a store no longer trusts an older copy in the backing store.
            outlives = bool(getattr(ops, "outlives_process", False))
            adopted: list[tuple[_SwapArea, int]] = []
            try:
                for swap_type in self._need_init:
                    self._tmem_init(ops, swap_type)
                if getattr(ops, "restored_pools", 0) and self._pool_id < 0:
                    self._tmem_init(ops, -1)
                if outlives and self._pool_id >= 0:
                    self._adopt(ops, self._pool_id, adopted)
            except Exception:  # as if never called: the types wait for the next backend
                for area, offset in adopted:
                    self._forget(area, offset)
                self._pool_id = -1
                raise
            self._need_init.clear()
            self._outlives = outlives
            self.writethrough = writethrough
            self.exclusive_gets = exclusive_gets
            self._ops = ops

    def unregister_ops(self) -> int:
        """Repatriate every tmem page to its backing store, then let the backend go.

        Returns the number of pages repatriated.  While it runs, new stores go to the backing
        store and loads are still served.  If any page cannot be brought back, raise
        :class:`UnloadRefused`: the backend stays registered and no page is lost (those already
        moved are valid in their backing store).
        """
        with self._lock:
            ops = self._ops
            if ops is None:
                return 0
            self._draining = True
        with self._all_slots():  # every store that began before the drain has ended
            pass
        try:
            moved = self._repatriate_down_to(ops, 0)
        except Exception as exc:
            with self._lock:
                self._draining = False
            raise UnloadRefused(
                f"frontswap: {self._tmem_pages} page(s) could not be repatriated: {exc}"
            ) from exc
        # Every page is out of tmem now; a load or a flush still inside the backend ends
        # before its pool goes, and none starts until the backend is gone.
        with self._all_slots(), self._lock:
            if self._pool_id >= 0:
                self.quietly("destroy_pool", ops.destroy_pool, self._pool_id)
            self._pool_id = -1
            self._need_init = list(self._areas)
            self._ops = None
            self._draining = False
            return moved

    def _tmem_init(self, ops: Backend, swap_type: int) -> None:
        """``tmem_frontswap_init``: the one persistent pool is created for the first type."""
        if self._pool_id < 0:
            rc = ops.new_pool(PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
            self._pool_id = rc
            if rc < 0:
                log.warning("frontswap: backend %s refused the persistent pool: %s",
                            ops.name, rc_name(rc))

    def _adopt(self, ops: Backend, pool_id: int, adopted: list[tuple[_SwapArea, int]]) -> None:
        """Pages the backend kept across a restart become this frontend's again where an
        area (re-attached from its file) has the offset and its file holds no copy of it;
        the others are flushed: no area to serve them, or the file's copy is the newer one
        (a store writes the file before tmem whenever both could hold it, and one answered
        with its page in tmem only has had the file forget its copy: :meth:`_store`).
        Each page taken back is listed in ``adopted`` (undone if the registration fails)."""
        owners: dict[Oid, tuple[_SwapArea, int]] = {}
        for area in self._areas.values():
            for low, oid in enumerate(area.oids):
                owners[oid] = (area, low)
        flushed = 0
        for oid, index in ops.restored_pages(pool_id):  # type: ignore[attr-defined]
            found = owners.get(oid)
            offset = -1
            if found is not None:
                area, low = found
                offset = (index << SWIZ_BITS) | low
                if not 0 <= offset < area.backing.pages or area.backing.has(offset) \
                        or offset in area.in_tmem:
                    offset = -1
            if offset < 0:
                self.quietly("flush_page", ops.flush_page, pool_id, oid, index)
                flushed += 1
                continue
            area.in_tmem[offset] = None
            self._tmem_pages += 1
            adopted.append((area, offset))
        if adopted or flushed:
            log.info("frontswap: %d swap page(s) kept by %s across its restart taken back, "
                     "%d flushed (no area, or the area's file has the page)", len(adopted),
                     ops.name, flushed)

    # -- swap areas ---------------------------------------------------------------------------

    def init(self, swap_type: int, backing: BackingStore) -> None:
        """``frontswap_init(type)`` at swapon, with the device that backs this type."""
        oids = swizzle_oids(swap_type)
        with self._lock:
            if swap_type in self._areas:
                raise AbiError(f"swap type {swap_type} is already initialised")
            if self._ops is not None:
                self._tmem_init(self._ops, swap_type)
            else:
                self._need_init.append(swap_type)
            self._areas[swap_type] = _SwapArea(swap_type, backing, oids)

    def _area(self, swap_type: int) -> _SwapArea:
        try:
            return self._areas[swap_type]
        except KeyError:
            raise AbiError(f"swap type {swap_type} is not initialised") from None

    def swap_types(self) -> list[int]:
        with self._lock:
            return list(self._areas)

    @staticmethod
    def _slot(area: _SwapArea, offset: int) -> tuple[Oid, int]:
        """The kernel's swizzle: oid ``(type << 4) | (offset & 0xF)``, index ``offset >> 4``."""
        return area.oids[offset & SWIZ_MASK], offset >> SWIZ_BITS

    def _forget(self, area: _SwapArea, offset: int) -> None:
        del area.in_tmem[offset]
        self._tmem_pages -= 1

    def _slot_lock(self, swap_type: int, offset: int) -> threading.Lock:
        return self._slot_locks[(swap_type * 7919 + offset) % self.SLOT_LOCKS]

    @contextlib.contextmanager
    def _all_slots(self) -> Iterator[None]:
        """Every slot lock, in index order: no data operation is under way meanwhile."""
        with contextlib.ExitStack() as held:
            for lock in self._slot_locks:
                held.enter_context(lock)
            yield

    # -- data path ----------------------------------------------------------------------------

    def store(self, swap_type: int, offset: int, page: bytes) -> int:
        """Store a page: 0 if tmem took it, -1 if it went to the backing store (as the kernel).

        Whatever the backend does (refuse, fail, raise), the page ends up in tmem or in the
        backing store, and an older copy of the slot is never left where a load would find it.
        A store the backing store refuses (BackendError: a full disk, an I/O error) changes
        nothing: the slot's previous page stays readable.  So the old copy is only flushed
        once the new page is safe: a duplicate, which a failed put would drop (Xen's rule,
        ``docs/tmem-semantics.md``), is written to the backing store before the put.  A page
        tmem took is answered 0 only once the backing store dropped its older copy for good
        (a file: its index entry cleared), for a restart on a backend whose pages outlive it
        takes that copy over tmem's (:meth:`_adopt`); if it cannot, the page goes to the
        backing store instead (-1), and if that refuses too, BackendError as above.
        """
        if len(page) != PAGE_SIZE:
            raise AbiError(f"a page is {PAGE_SIZE} bytes, got {len(page)}")
        with self._slot_lock(swap_type, offset):
            with self._lock:
                area = self._area(swap_type)
                area.backing.check_offset(offset)
                ops = self._ops
                pool_id = self._pool_id
                duplicate = offset in area.in_tmem
                to_tmem = not (ops is None or self._draining or pool_id < 0
                               or not offset_fits(offset))
                writethrough = self.writethrough
            return self._store(area, ops, pool_id, offset, page, duplicate, to_tmem,
                               writethrough)

    def _store(self, area: _SwapArea, ops: Backend | None, pool_id: int, offset: int,
               page: bytes, duplicate: bool, to_tmem: bool, writethrough: bool) -> int:
        """:meth:`store` under the offset's slot lock; the map lock only around the maps."""
        if not to_tmem:
            area.backing.write(offset, page)  # raises: nothing changed
            with self._lock:
                self.backing_writes += 1
            if duplicate and ops is not None:
                self._flush(ops, pool_id, area, offset)  # the tmem copy is stale now
            return -1
        assert ops is not None
        written = False
        # An older copy in the backing store goes only once the new page is in tmem (below):
        # across a crash of a backend whose pages outlive it, the file's copy wins over
        # tmem's (_adopt), which is right for a store that had not returned yet, and wrong
        # for one that had: so the store returns only once that copy is gone for good.
        if duplicate or writethrough:
            area.backing.write(offset, page)  # raises: nothing changed
            with self._lock:
                self.backing_writes += 1
            written = True
        oid, index = self._slot(area, offset)
        rc = self.quietly("put_page", ops.put_page, pool_id, oid, index, page)
        if rc == TMEM_DONE:
            with self._lock:
                if duplicate:
                    self._forget(area, offset)  # re-added below: the newest page
                area.in_tmem[offset] = None
                self._tmem_pages += 1
                self.succ_stores += 1
            if writethrough:
                return -1
            try:  # an older (or this) copy there is not needed, but must go for good:
                area.backing.discard(offset, durable=True)
            except BackendError as exc:
                return self._keep_in_backing(ops, pool_id, area, offset, page, written, exc)
            return 0
        with self._lock:
            self.failed_stores += 1
        if duplicate:
            self._flush(ops, pool_id, area, offset)  # a failed duplicate put drops the old copy
        if not written:
            area.backing.write(offset, page)  # raises: the slot had no tmem copy
            with self._lock:
                self.backing_writes += 1
        return -1

    def _keep_in_backing(self, ops: Backend, pool_id: int, area: _SwapArea, offset: int,
                         page: bytes, written: bool, exc: BackendError) -> int:
        """tmem took the page, but the backing store could not forget its copy of the slot
        for good (a file whose index entry could not be cleared): after a restart that copy
        would win over tmem's (:meth:`_adopt`), so the page goes to the backing store
        instead, as when tmem refuses it (already there if ``written``).  If the backing
        store refuses it too, raise: the slot's previous page stays, there and only there."""
        log.warning("frontswap: swap page %d:%d goes to the backing store: its older copy "
                    "there could not be dropped (%s)", area.swap_type, offset, exc)
        self._flush(ops, pool_id, area, offset)
        if not written:
            area.backing.write(offset, page)  # raises: the backing store's copy stays
            with self._lock:
                self.backing_writes += 1
        return -1

    def _flush(self, ops: Backend, pool_id: int, area: _SwapArea, offset: int) -> None:
        """Forget the tmem copy of ``offset`` and flush it from the backend (the offset's
        slot lock is held; the map lock only while the map changes)."""
        with self._lock:
            if offset not in area.in_tmem:
                return
            self._forget(area, offset)
        oid, index = self._slot(area, offset)
        self.quietly("flush_page", ops.flush_page, pool_id, oid, index)

    def load(self, swap_type: int, offset: int) -> bytes | None:
        """The page stored at ``offset``, from tmem or the backing store; None if none."""
        with self._slot_lock(swap_type, offset):
            with self._lock:
                area = self._area(swap_type)
                ops = self._ops
                pool_id = self._pool_id
                if ops is None or offset not in area.in_tmem:
                    ops = None
                exclusive, writethrough = self.exclusive_gets, self.writethrough
            if ops is None:
                return area.backing.read(offset)
            return self._load_tmem(area, ops, pool_id, offset, exclusive, writethrough)

    def _load_tmem(self, area: _SwapArea, ops: Backend, pool_id: int, offset: int,
                   exclusive: bool, writethrough: bool) -> bytes | None:
        oid, index = self._slot(area, offset)
        rc, data = ops.get_page(pool_id, oid, index)
        if rc == TMEM_DONE and data is not None:
            with self._lock:
                self.loads += 1
            if exclusive:
                try:
                    area.backing.write(offset, data)
                except BackendError as exc:  # the page stays in tmem: still one copy
                    log.warning("frontswap: exclusive get of %d:%d kept in tmem: %s",
                                area.swap_type, offset, exc)
                else:
                    self._flush(ops, pool_id, area, offset)
            return data
        with self._lock:
            self.failed_loads += 1
        if writethrough:
            return area.backing.read(offset)
        raise BackendError(
            f"frontswap: backend {ops.name} could not return swap page "
            f"{area.swap_type}:{offset} ({rc_name(rc)})"
        )

    def invalidate_page(self, swap_type: int, offset: int, durable: bool = False) -> None:
        """The swap entry was freed: drop the page wherever it is.  ``durable``: a backing
        store that cannot make its drop last across a restart raises BackendError and keeps
        its copy (a tmem copy is dropped all the same); else it only logs and counts it."""
        with self._slot_lock(swap_type, offset):
            with self._lock:
                area = self._area(swap_type)
                ops = self._ops
                pool_id = self._pool_id
                in_tmem = offset in area.in_tmem
                if in_tmem:
                    self._forget(area, offset)
                    self.invalidates += 1
            if in_tmem and ops is not None:
                oid, index = self._slot(area, offset)
                self.quietly("flush_page", ops.flush_page, pool_id, oid, index)
            area.backing.discard(offset, durable)

    def invalidate_area(self, swap_type: int) -> None:
        """swapoff: flush the type's 16 objects and forget the area (every slot lock held:
        no data operation is half done on it)."""
        with self._all_slots():
            self._invalidate_area(swap_type)

    def _invalidate_area(self, swap_type: int) -> None:
        with self._lock:
            area = self._area(swap_type)
            ops = self._ops
            if ops is not None and self._pool_id >= 0:
                for oid in area.oids:
                    self.quietly("flush_object", ops.flush_object, self._pool_id, oid)
            del self._areas[swap_type]
            self._tmem_pages -= len(area.in_tmem)
            if swap_type in self._need_init:
                self._need_init.remove(swap_type)
            area.backing.clear()
            area.backing.close()

    # -- shrinking ----------------------------------------------------------------------------

    def curr_pages(self) -> int:
        """``frontswap_curr_pages``: pages held by tmem across every swap type (no lock)."""
        return self._tmem_pages

    def shrink(self, target_pages: int) -> int:
        """``frontswap_shrink``: repatriate pages until tmem holds at most ``target_pages``.

        Returns how many pages moved.  Oldest pages go first.
        """
        if target_pages < 0:
            raise AbiError(f"shrink target must be >= 0, got {target_pages}")
        ops = self._ops
        if ops is None:
            return 0
        return self._repatriate_down_to(ops, target_pages)

    def _repatriate_down_to(self, ops: Backend, target_pages: int) -> int:
        """Move the oldest tmem pages to their backing stores, a batch at a time: each page
        under its slot lock, so stores to other offsets go on meanwhile."""
        moved = 0
        while True:
            with self._lock:
                if self._ops is not ops:
                    return moved
                excess = min(self._tmem_pages - target_pages, self.REPATRIATE_BATCH)
                if excess <= 0:
                    return moved
                batch: list[tuple[_SwapArea, int]] = []
                for area in self._areas.values():
                    batch += [(area, o) for o in list(area.in_tmem)[: excess - len(batch)]]
                    if len(batch) >= excess:
                        break
                pool_id = self._pool_id
            for area, offset in batch:
                with self._slot_lock(area.swap_type, offset):
                    with self._lock:
                        if (self._ops is not ops or offset not in area.in_tmem
                                or self._areas.get(area.swap_type) is not area):
                            continue  # re-stored, invalidated or turned off meanwhile
                    self._repatriate(ops, pool_id, area, offset)
                    moved += 1

    def _repatriate(self, ops: Backend, pool_id: int, area: _SwapArea, offset: int) -> None:
        oid, index = self._slot(area, offset)
        rc, data = ops.get_page(pool_id, oid, index)
        if rc != TMEM_DONE or data is None:
            raise BackendError(
                f"swap page {area.swap_type}:{offset} unavailable from {ops.name} ({rc_name(rc)})"
            )
        area.backing.write(offset, data)
        self._flush(ops, pool_id, area, offset)
        with self._lock:
            self.repatriated += 1

    # -- reporting ----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The debugfs counters (loads, succ_stores, failed_stores, invalidates) and ours."""
        return {
            "loads": self.loads,
            "succ_stores": self.succ_stores,
            "failed_stores": self.failed_stores,
            "invalidates": self.invalidates,
            "failed_loads": self.failed_loads,
            "repatriated": self.repatriated,
            "backing_writes": self.backing_writes,
            "backend_errors": self.backend_errors,
            "curr_pages": self._tmem_pages,
        }

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pool_id": self._pool_id,
                "registered": self._ops is not None,
                "draining": self._draining,
                "pending_init": list(self._need_init),
                "writethrough": self.writethrough,
                "exclusive_gets": self.exclusive_gets,
                "swap_types": [
                    {"type": a.swap_type, "tmem_pages": len(a.in_tmem), **a.backing.describe()}
                    for a in self._areas.values()
                ],
            }
