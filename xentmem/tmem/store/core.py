"""The tmem store: clients, pools and pages with the hypervisor's rules, in one place.

It plays ``xen/common/tmem.c`` (Xen <= 4.12) for both tmem hosts of xentmem: the ``zcache``
backend is one client of a store, ``xentmem-hostd`` has one client per guest domain.  The rules
(pools, shared pools and their authorisation, exclusive gets, duplicate puts, capacity and
eviction by weight, caps, freeze) are in ``docs/tmem-semantics.md``, "The store"; who loses an
ephemeral page is :mod:`xentmem.tmem.store.eviction`'s choice; the page bytes go through a
:class:`~xentmem.tmem.store.pages.PageStorage`.

Pages come and go in their stored form (:func:`~xentmem.tmem.store.pages.pack_page`): the
callers compress, outside the lock.  Every public method takes the store's one lock, so the
store may be called from any thread.  Return values are the hypercall's (1 done or found,
0 not found, a negative errno), as in ``docs/tmem-semantics.md``, "The ABI".
"""

from __future__ import annotations

import errno
import itertools
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from xentmem.errors import AbiError
from xentmem.tmem.abi import (
    EEMPTY,
    EFROZEN,
    MAX_GLOBAL_SHARED_POOLS,
    MAX_POOLS_PER_DOMAIN,
    PAGE_SIZE,
    TMEM_POOL_SHARED,
    WILDCARD_UUID,
    Oid,
    PoolFlags,
    PoolUuid,
)
from xentmem.tmem.store.eviction import victim
from xentmem.tmem.store.pages import MemoryPages, PageKey, PageStorage, PageStorageFull
from xentmem.tmem.store.records import (
    EPHEMERAL_PAGE_OVERHEAD,
    OBJECT_OVERHEAD,
    PERSISTENT_PAGE_OVERHEAD,
    Client,
    Pool,
)

log = logging.getLogger(__name__)

_D = TypeVar("_D", bound=dict)  # type: ignore[type-arg]

#: Uuids one client may be authorised for (Xen: MAX_GLOBAL_SHARED_POOLS as well).
MAX_AUTH_UUIDS = 16
#: The heaviest eviction weight (``xl tmem-set -w``).
MAX_WEIGHT = 1_000_000

_DONE = 1
_GET_NODEV = (-errno.ENODEV, None)
_GET_EMPTY = (-EEMPTY, None)
_GET_MISS = (0, None)


class TmemStore:
    """Every client's pools and pages, within one capacity in bytes."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        pages: PageStorage | None = None,
        max_pools: int = MAX_POOLS_PER_DOMAIN,
        max_shared_pools: int = MAX_GLOBAL_SHARED_POOLS,
        shared_auth: bool = True,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity must be > 0 bytes")
        if max_pools < 1 or max_shared_pools < 0:
            raise ValueError("max_pools must be >= 1 and max_shared_pools >= 0")
        self.lock = threading.Lock()
        self.pages: PageStorage = pages if pages is not None else MemoryPages()
        # Bound once: the data path calls them on every op.
        self._page_put = self.pages.put
        self._page_get = self.pages.get
        self._page_delete = self.pages.delete
        #: An exclusive get's page, gone from the storage (a storage may only hide it until
        #: the reply is recorded: the host's, across a crash).
        self._page_take: Callable[[PageKey], bytes | None] = getattr(
            self.pages, "take", self._get_and_delete)
        #: What the storage takes beyond the pages' bytes (an arena's rounding and index),
        #: counted against the capacity: None for storage without such a figure.
        self._slack: Callable[[], int] | None = getattr(self.pages, "slack", None)
        #: Gives the memory of the storage's free space back (an arena's free frames): tried
        #: before a page is evicted to make room.
        self._trim: Callable[[], int] | None = getattr(self.pages, "trim", None)
        self.capacity_bytes = capacity_bytes
        self.max_pools = max_pools
        self.max_shared_pools = max_shared_pools
        #: Xen's ``tmem_global.shared_auth``: on, a shared pool needs an authorised uuid.
        self.shared_auth = shared_auth
        self.clients: dict[int, Client] = {}
        self.shared_pools: dict[PoolUuid, Pool] = {}
        self._by_gid: dict[int, Pool] = {}
        self._stamps = itertools.count()
        self._overhead = (EPHEMERAL_PAGE_OVERHEAD, PERSISTENT_PAGE_OVERHEAD)
        self.used_bytes = 0
        self.total_weight = 0
        self.obj_count = 0
        self.evictions = 0

    # -- clients --------------------------------------------------------------------------------

    def client(self, cid: int) -> Client:
        """The client ``cid``, made on first use (as a domain's first tmem op makes it)."""
        with self.lock:
            return self._client(cid)

    @property
    def eph_pages(self) -> int:
        """Ephemeral pages held, every client's."""
        return sum(client.eph_pages for client in self.clients.values())

    @property
    def eph_bytes(self) -> int:
        """What the ephemeral pages are charged, every client's."""
        return sum(client.eph_bytes for client in self.clients.values())

    def _client(self, cid: int) -> Client:
        found = self.clients.get(cid)
        if found is None:
            found = self.clients[cid] = Client(cid, self.max_pools)
        return found

    def destroy_client(self, cid: int) -> int:
        """Let go of every pool of ``cid`` and forget it (its domain is gone); answers how
        many pools it had."""
        with self.lock:
            client = self.clients.get(cid)
            if client is None:
                return 0
            dropped = self._drop_pools(client)
            self.total_weight -= client.weight
            del self.clients[cid]
            return dropped

    def drop_pools(self, cid: int) -> int:
        """Let go of every pool of ``cid`` but keep the client with what the administrator
        set (weight, cap, frozen, compress, authorised uuids): Xen's client lives as long as
        its domain, whatever the guest does with its pools.  Answers the pools dropped."""
        with self.lock:
            client = self.clients.get(cid)
            return 0 if client is None else self._drop_pools(client)

    def _drop_pools(self, client: Client) -> int:
        dropped = 0
        for slot, pool in enumerate(client.slots):
            if pool is not None:
                self._leave(client, slot, pool)
                dropped += 1
        return dropped

    # -- pools ----------------------------------------------------------------------------------

    def new_pool(self, cid: int, uuid: tuple[int, int], flags: int) -> int:
        """NEW_POOL: the lowest free slot, or -EPERM / -EINVAL (``do_tmem_new_pool``)."""
        with self.lock:
            client = self._client(cid)  # even by a refused op, as in Xen
            try:
                decoded = PoolFlags.decode(flags)
                checked_uuid = PoolUuid.checked(*uuid)
            except (AbiError, TypeError, ValueError) as exc:
                log.info("tmem: client %s: new pool refused: %s", cid, exc)
                return -errno.EINVAL
            refusal = decoded.refusal()
            if refusal is not None:
                log.info("tmem: client %s: new pool refused: %s", cid, refusal)
                return -errno.EPERM
            slot = next((i for i, pool in enumerate(client.slots) if pool is None), None)
            if slot is None:
                log.info("tmem: client %s: new pool refused: all %d pool slots in use",
                         cid, len(client.slots))
                return -errno.EPERM
            shared = decoded.shared and checked_uuid != WILDCARD_UUID
            if shared and self.shared_auth and checked_uuid not in client.auth:
                log.info("tmem: client %s: shared auth failed for %s, a private pool instead",
                         cid, checked_uuid)
                shared = False
            pool = self.shared_pools.get(checked_uuid) if shared else None
            if pool is None:
                if shared and len(self.shared_pools) >= self.max_shared_pools:
                    log.info("tmem: client %s: new pool refused: all %d shared pools in use",
                             cid, self.max_shared_pools)
                    return -errno.EPERM
                gid = next(i for i in itertools.count() if i not in self._by_gid)
                pool = Pool(gid, flags if shared else flags & ~TMEM_POOL_SHARED, checked_uuid,
                            persistent=decoded.persistent, shared=shared, owner=cid)
                self._by_gid[gid] = pool
                if shared:
                    self.shared_pools[checked_uuid] = pool
            pool.members[cid] = pool.members.get(cid, 0) + 1
            client.slots[slot] = pool
            return slot

    def destroy_pool(self, cid: int, pool_id: int) -> int:
        """DESTROY_POOL: 1, or 0 for a bad or empty slot.  A shared pool's pages stay while
        another client is a member."""
        with self.lock:
            client = self._client(cid)
            pool = client.pool(pool_id)
            if pool is None:
                return 0
            self._leave(client, pool_id, pool)
            return _DONE

    # -- pages (the data path: acquire/release rather than ``with``, half the cost) -----------

    def put_page(self, cid: int, pool_id: int, oid: Oid, index: int, data: bytes) -> int:
        """PUT_PAGE of a page in its stored form; a duplicate replaces the page."""
        lock = self.lock
        lock.acquire()
        try:
            client = self.clients.get(cid) or self._client(cid)
            counters = client.counters
            counters.puts += 1
            slots = client.slots
            pool = slots[pool_id] if 0 <= pool_id < len(slots) else None
            if pool is None:
                counters.failed_puts += 1
                return -errno.ENODEV
            obj = pool.objects.get(oid)
            duplicate = obj is not None and index in obj
            if duplicate:
                self._drop(pool, oid, index)
            elif client.frozen:
                self._count_failed_put(client, pool, duplicate=False)
                return -EFROZEN
            size = len(data)
            if size == PAGE_SIZE:
                counters.compress_poor += 1
            persistent = pool.persistent
            cost = size + self._overhead[persistent]
            # A new object costs the store too (a duplicate's drop may have taken its object).
            grows = OBJECT_OVERHEAD if oid not in pool.objects else 0
            cap = client.cap
            used = self.used_bytes if self._slack is None else self._memory_bytes()
            if used + cost + grows > self.capacity_bytes or (
                    cap and client.charged + cost > cap):
                fits = self._make_room(client, cost, grows)
                if persistent:
                    if fits:
                        counters.pers_ate_eph += 1
                    else:
                        counters.pers_ate_eph_failed += 1
                elif fits:
                    counters.eph_ate_tail += 1
                else:
                    counters.eph_ate_tail_failed += 1
                obj = pool.objects.get(oid)  # eviction may have taken the object away:
                if fits and obj is None and not grows:  # then it is a new one to make room for
                    fits = self._make_room(client, cost, OBJECT_OVERHEAD)
                if not fits:
                    self._count_failed_put(client, pool, duplicate)
                    return -errno.ENOSPC if duplicate else -errno.ENOMEM
            w0, w1, w2 = oid  # not (gid, *oid, index): that builds a list first
            key = (pool.gid, w0, w1, w2, index)
            try:
                self._page_put(key, data)
            except PageStorageFull:
                self._count_failed_put(client, pool, duplicate)
                return -errno.ENOSPC if duplicate else -errno.ENOMEM
            if duplicate:
                obj = pool.objects.get(oid)  # the old copy may have been the object's last
            if obj is None:
                obj = pool.objects[oid] = {}
                self.obj_count += 1
                self.used_bytes += OBJECT_OVERHEAD
            obj[index] = size
            pool.pages += 1
            pool.zbytes += size
            self.used_bytes += cost
            if persistent:
                client.pers_pages += 1
                client.pers_zbytes += size
            else:
                client.eph_pages += 1
                client.eph_zbytes += size
                client.lru[key] = next(self._stamps)
                if pool.shared:
                    pool.owners[key] = cid
            if not size:
                client.zero_pages += 1
                counters.zero_puts += 1
            elif size < PAGE_SIZE:
                counters.compressed_pages += 1
            counters.succ_puts += 1
            return _DONE
        finally:
            lock.release()

    def refuse_put(self, cid: int, pool_id: int, oid: Oid, index: int, rc: int) -> int:
        """A put whose page is not a page: ``rc``, and no older copy survives it (a failed put
        never leaves a stale page behind, as ``do_tmem_dup_put``'s ``bad_copy``)."""
        with self.lock:
            client = self._client(cid)
            client.counters.puts += 1
            pool = client.pool(pool_id)
            if pool is None:
                client.counters.failed_puts += 1
                return -errno.ENODEV
            obj = pool.objects.get(oid)
            duplicate = obj is not None and index in obj
            if duplicate:
                self._drop(pool, oid, index)
            self._count_failed_put(client, pool, duplicate)
            return rc

    def get_page(self, cid: int, pool_id: int, oid: Oid,
                 index: int) -> tuple[int, bytes | None]:
        """GET_PAGE: ``(1, stored form)``, exclusive from a private ephemeral pool."""
        lock = self.lock
        lock.acquire()
        try:
            client = self.clients.get(cid) or self._client(cid)
            counters = client.counters
            counters.gets += 1
            slots = client.slots
            pool = slots[pool_id] if 0 <= pool_id < len(slots) else None
            if pool is None:
                return _GET_NODEV
            if not pool.pages:
                return _GET_EMPTY
            w0, w1, w2 = oid
            key = (pool.gid, w0, w1, w2, index)
            exclusive = pool.exclusive
            data = self._page_take(key) if exclusive else self._page_get(key)
            if data is None:
                obj = pool.objects.get(oid)
                if obj is not None and index in obj:
                    self._lost(client, pool, oid, index)
                return _GET_MISS
            if exclusive:  # the page is taken already: the rest of a flush
                self._drop(pool, oid, index, stored=False)
            elif not pool.persistent:  # shared ephemeral: the page becomes most recently used
                lru = self.clients[pool.owners[key]].lru
                lru.move_to_end(key)
                lru[key] = next(self._stamps)
            counters.found_gets += 1
            return (1, data)
        finally:
            lock.release()

    def flush_page(self, cid: int, pool_id: int, oid: Oid, index: int) -> int:
        """FLUSH_PAGE: 1 flushed, 0 nothing there; -EFROZEN (after flushing) when frozen."""
        with self.lock:
            client = self._client(cid)
            counters = client.counters
            counters.flushes += 1
            pool = client.pool(pool_id)
            if pool is None:
                return -errno.ENODEV
            obj = pool.objects.get(oid)
            found = obj is not None and index in obj
            if found:
                self._drop(pool, oid, index)
                counters.flushes_found += 1
            if client.frozen:
                return -EFROZEN
            return _DONE if found else 0

    def flush_object(self, cid: int, pool_id: int, oid: Oid) -> int:
        """FLUSH_OBJECT: 1 when a page went, else 0; -EFROZEN (after flushing) when frozen."""
        with self.lock:
            client = self._client(cid)
            counters = client.counters
            counters.flobjs += 1
            pool = client.pool(pool_id)
            if pool is None:
                return -errno.ENODEV
            obj = pool.objects.get(oid)
            found = obj is not None
            if found:
                for index in list(obj):
                    self._drop(pool, oid, index)
                counters.flobjs_found += 1
            if client.frozen:
                return -EFROZEN
            return _DONE if found else 0

    # -- a second tier (zcache's RAMster): pages read and taken out without a guest op -------

    def peek_page(self, cid: int, pool_id: int, oid: Oid, index: int) -> bytes | None:
        """The stored form of one page, or None; no get is counted and nothing changes."""
        with self.lock:
            client = self.clients.get(cid)
            pool = client.pool(pool_id) if client is not None else None
            obj = pool.objects.get(oid) if pool is not None else None
            if obj is None or index not in obj:
                return None
            w0, w1, w2 = oid
            data = self._page_get((pool.gid, w0, w1, w2, index))
            if data is None:
                self._lost(client, pool, oid, index)  # type: ignore[arg-type]
            return data

    def take_page(self, cid: int, pool_id: int, oid: Oid, index: int) -> bool:
        """Drop one page if it is there (a copy of it went elsewhere; the caller knows it
        did not change meanwhile); no flush is counted.  True when it was dropped."""
        with self.lock:
            client = self.clients.get(cid)
            pool = client.pool(pool_id) if client is not None else None
            obj = pool.objects.get(oid) if pool is not None else None
            if obj is None or index not in obj:
                return False
            self._drop(pool, oid, index)
            return True

    def oldest_ephemeral(self, cid: int, count: int) -> list[tuple[int, Oid, int, bytes]]:
        """Up to ``count`` of ``cid``'s ephemeral pages in private pools, oldest first, as
        (slot, oid, index, stored form): what a second tier may take in eviction order."""
        with self.lock:
            client = self.clients.get(cid)
            if client is None:
                return []
            slots = {id(pool): slot for slot, pool in enumerate(client.slots)
                     if pool is not None and pool.exclusive}
            found = []
            lost = []
            for key in client.lru:
                if len(found) >= count:
                    break
                slot = slots.get(id(self._by_gid[key[0]]))
                if slot is None:
                    continue
                data = self._page_get(key)
                if data is None:
                    lost.append(key)
                else:
                    found.append((slot, Oid(*key[1:4]), key[4], data))
            for key in lost:
                self._lost(client, self._by_gid[key[0]], Oid(*key[1:4]), key[4])
            return found

    # -- control (xl tmem-*, TMEMC_*) -----------------------------------------------------------

    def freeze(self, cid: int, frozen: bool = True) -> None:
        """``tmem-freeze`` / ``tmem-thaw``: a frozen client's new puts fail with -EFROZEN."""
        with self.lock:
            self._client(cid).frozen = frozen

    def set_weight(self, cid: int, weight: int) -> None:
        """``tmem-set -w``: the client's share of the ephemeral bytes when there is no room."""
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight {weight} outside 0..{MAX_WEIGHT}")
        with self.lock:
            client = self._client(cid)
            self.total_weight += weight - client.weight
            client.weight = weight

    def set_cap(self, cid: int, cap_bytes: int) -> int:
        """``tmem-set -c``: at most ``cap_bytes`` charged to the client (0: no cap).  Its own
        ephemeral pages above a lowered cap go at once; answers how many went."""
        if cap_bytes < 0:
            raise ValueError(f"cap {cap_bytes} is negative")
        with self.lock:
            client = self._client(cid)
            client.cap = cap_bytes
            evicted = 0
            while cap_bytes and client.charged > cap_bytes and client.lru:
                self._evict_oldest(client)
                evicted += 1
            return evicted

    def set_compress(self, cid: int, compress: bool) -> None:
        """``tmem-set -p``: read by whoever packs the client's pages; kept pages stay as they
        are (as in Xen)."""
        with self.lock:
            self._client(cid).compress = compress

    def authorise(self, cid: int, uuid: PoolUuid, allow: bool) -> int:
        """``tmem-shared-auth``: 1 done, -ENOSPC when the client's list is full."""
        with self.lock:
            client = self._client(cid)
            if not allow:
                client.auth.discard(uuid)
                return _DONE
            if uuid not in client.auth and len(client.auth) >= MAX_AUTH_UUIDS:
                return -errno.ENOSPC
            client.auth.add(uuid)
            return _DONE

    def set_capacity(self, capacity_bytes: int) -> int:
        """A new capacity: ephemeral pages above it go at once, persistent ones stay (new puts
        fail until there is room); answers how many pages went."""
        if capacity_bytes <= 0:
            raise ValueError("capacity must be > 0 bytes")
        with self.lock:
            self.capacity_bytes = capacity_bytes
            return self._evict_until(lambda: self._memory_bytes() <= capacity_bytes)

    def flush_ephemeral(self, nbytes: int | None = None) -> int:
        """TMEMC_FLUSH: evict ephemeral pages until ``nbytes`` are freed (all if None), in
        eviction order; answers the bytes freed."""
        with self.lock:
            before = self.used_bytes
            self._evict_until(
                (lambda: False) if nbytes is None else (lambda: before - self.used_bytes >= nbytes)
            )
            return before - self.used_bytes

    def freeable_bytes(self) -> int:
        """What evicting every ephemeral page would free (``tmem-freeable``)."""
        with self.lock:
            return self.eph_bytes

    # -- reading --------------------------------------------------------------------------------

    def pool_rows(self, cid: int) -> list[dict[str, Any]]:
        """One row per pool id of ``cid`` (a shared pool's pages count once per row)."""
        with self.lock:
            client = self.clients.get(cid)
            if client is None:
                return []
            return [
                {
                    "pool_id": slot,
                    "flags": f"{pool.flags:#010x}",
                    "kind": pool.kind,
                    "persistent": pool.persistent,
                    "shared": pool.shared,
                    "uuid": str(pool.uuid),
                    "ids": pool.members[cid],
                    "objects": len(pool.objects),
                    "pages": pool.pages,
                    "zbytes": pool.zbytes,
                }
                for slot, pool in enumerate(client.slots)
                if pool is not None
            ]

    def memory_bytes(self) -> int:
        """What the capacity bounds: the bytes charged, plus what the storage takes beyond
        the pages' bytes when it can tell (a page arena)."""
        with self.lock:
            return self._memory_bytes()

    def page_keys(self, cid: int, pool_id: int) -> list[tuple[Oid, int]]:
        """Every (oid, index) held in one pool of ``cid`` (what a frontend re-adopts)."""
        with self.lock:
            client = self.clients.get(cid)
            pool = client.pool(pool_id) if client is not None else None
            if pool is None:
                return []
            return [(oid, index) for oid, obj in pool.objects.items() for index in obj]

    # -- a restart: the pools out, and back in over the storage's pages ---------------------

    def pool_table(self) -> list[dict[str, Any]]:
        """The pools as a restart needs them: store-wide id, flags, uuid, owner and each
        member client's slots; plain JSON values (``docs/tmem-semantics.md``, "Restart")."""
        with self.lock:
            rows = []
            for gid, pool in sorted(self._by_gid.items()):
                slots = {str(cid): [slot for slot, held in enumerate(self.clients[cid].slots)
                                    if held is pool]
                         for cid in pool.members}
                rows.append({"gid": gid, "flags": pool.flags,
                             "uuid": [pool.uuid.lo, pool.uuid.hi], "owner": pool.owner,
                             "slots": slots})
            return rows

    def restore(self, untrusted_table: Any) -> dict[str, int]:
        """Pools from a :meth:`pool_table` (read back from a file: checked whole first),
        then every page the storage holds in them; the storage's pages of any other pool
        are deleted.  Only into an empty store.  ValueError, and nothing changed, when the
        table does not stand; answers pages restored and orphans deleted."""
        with self.lock:
            if self._by_gid or any(c.slots.count(None) != len(c.slots)
                                   for c in self.clients.values()):
                raise ValueError("restore: the store already holds pools")
            pools = self._checked_table(untrusted_table)
            for pool, slots in pools:
                self._by_gid[pool.gid] = pool
                if pool.shared:
                    self.shared_pools[pool.uuid] = pool
                for cid, taken in slots.items():
                    client = self._client(cid)
                    for slot in taken:
                        client.slots[slot] = pool
                    pool.members[cid] = len(taken)
            restored = orphans = 0
            storage = self.pages
            overhead = self._overhead
            by_gid = self._by_gid
            sized_objects = getattr(storage, "sized_objects", None)
            sized_keys = getattr(storage, "sized_keys", None)
            held: list[tuple[PageKey, int | None]] = []
            if sized_objects is not None:
                # A persistent object's pages come back whole, as the dict the store keeps
                # (index -> size), without a Python step per page: what a restart mostly is.
                for gid, w0, w1, w2, sizes in sized_objects():
                    found = by_gid.get(gid)
                    if found is None or not found.persistent:
                        held += [((gid, w0, w1, w2, index), size)
                                 for index, size in sizes.items()]
                        continue
                    found.objects[Oid(w0, w1, w2)] = sizes
                    self.obj_count += 1
                    count, total = len(sizes), sum(sizes.values())
                    found.pages += count
                    found.zbytes += total
                    self.used_bytes += total + count * PERSISTENT_PAGE_OVERHEAD + OBJECT_OVERHEAD
                    owner = self.clients[found.owner]  # persistent pools are never shared
                    owner.pers_pages += count
                    owner.pers_zbytes += total
                    owner.zero_pages += count - sum(map(bool, sizes.values()))
                    restored += count
            elif sized_keys is not None:
                held = sized_keys()
            else:
                held = [(key, _stored_size(storage, key)) for key in storage.keys()]  # noqa: SIM118
            for key, size in held:
                gid, w0, w1, w2, index = key
                found = by_gid.get(gid)
                if found is None or size is None:
                    self._page_delete(key)
                    orphans += 1
                    continue
                oid = Oid(w0, w1, w2)
                obj = found.objects.get(oid)
                if obj is None:
                    obj = found.objects[oid] = {}
                    self.obj_count += 1
                    self.used_bytes += OBJECT_OVERHEAD
                obj[index] = size
                found.pages += 1
                found.zbytes += size
                self.used_bytes += size + overhead[found.persistent]
                owner = self.clients[found.owner if not found.shared else found.first_member()]
                if found.persistent:
                    owner.pers_pages += 1
                    owner.pers_zbytes += size
                else:
                    owner.eph_pages += 1
                    owner.eph_zbytes += size
                    owner.lru[key] = next(self._stamps)
                    if found.shared:
                        found.owners[key] = owner.cid
                if not size:
                    owner.zero_pages += 1
                restored += 1
            return {"pools": len(pools), "pages": restored, "orphans": orphans}

    def _checked_table(self, untrusted: Any) -> list[tuple[Pool, dict[int, list[int]]]]:
        """Pools made from a table, each with its members' slots; ValueError naming what is
        wrong (nothing is changed here)."""
        if not isinstance(untrusted, list):
            raise ValueError("the pool table is not a list")
        out: list[tuple[Pool, dict[int, list[int]]]] = []
        gids: set[int] = set()
        taken: set[tuple[int, int]] = set()
        uuids: set[PoolUuid] = set()
        for n, row in enumerate(untrusted):
            try:
                gid, flags, owner = row["gid"], row["flags"], row["owner"]
                lo, hi = row["uuid"]
                slot_rows = row["slots"]
                if not all(type(v) is int for v in (gid, flags, owner, lo, hi)):
                    raise TypeError("not an integer")
                if not isinstance(slot_rows, dict) or not slot_rows:
                    raise TypeError("no member")
                decoded = PoolFlags.decode(flags)
                uuid = PoolUuid.checked(lo, hi)
                slots = {int(cid): list(held) for cid, held in slot_rows.items()}
            except (AbiError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"pool row {n}: {exc}") from None
            if not 0 <= gid <= 0xFFFFFFFF or gid in gids:
                raise ValueError(f"pool row {n}: id {gid} out of range or seen twice")
            shared = decoded.shared
            if decoded.refusal() is not None or (shared and decoded.persistent):
                raise ValueError(f"pool row {n}: flags {flags:#x} are not a pool's")
            if shared == (owner >= 0) or (not shared and (len(slots) != 1
                                                          or owner not in slots)):
                raise ValueError(f"pool row {n}: owner {owner} does not fit its members")
            if shared and uuid in uuids:
                raise ValueError(f"pool row {n}: shared uuid {uuid} seen twice")
            for cid, held in slots.items():
                if not held or not all(type(s) is int and 0 <= s < self.max_pools
                                       and (cid, s) not in taken for s in held):
                    raise ValueError(f"pool row {n}: slots {held} of client {cid} do not fit")
                taken.update((cid, s) for s in held)
            gids.add(gid)
            if shared:
                uuids.add(uuid)
            pool = Pool(gid, flags, uuid, persistent=decoded.persistent, shared=shared,
                        owner=owner)
            out.append((pool, slots))
        if sum(pool.shared for pool, _ in out) > self.max_shared_pools:
            raise ValueError("more shared pools than this store holds")
        return out

    def overhead(self, *, persistent: bool) -> int:
        """Bytes charged per page of that kind on top of its data."""
        return self._overhead[persistent]

    # -- internals (the lock is held) -----------------------------------------------------------

    def _get_and_delete(self, key: PageKey) -> bytes | None:
        """An exclusive get's page, for a storage without ``take``."""
        data = self._page_get(key)
        if data is not None:
            self._page_delete(key)
        return data

    def _memory_bytes(self) -> int:
        slack = self._slack
        return self.used_bytes if slack is None else self.used_bytes + slack()

    def _count_failed_put(self, client: Client, pool: Pool, duplicate: bool) -> None:
        counters = client.counters
        counters.failed_puts += 1
        if pool.persistent:
            counters.failed_pers_puts += 1
        else:
            counters.failed_eph_puts += 1
        if duplicate:
            counters.put_to_flush += 1

    def _lost(self, client: Client, pool: Pool, oid: Oid, index: int) -> None:
        """The storage no longer holds a page the index lists (it failed its checksum):
        never served, counted, and dropped from the index and the accounting."""
        log.warning("tmem: pool %d oid %s index %d: page missing from storage; dropped",
                    pool.gid, oid, index)
        client.counters.lost_pages += 1
        self._drop(pool, oid, index, stored=False)

    def _drop(self, pool: Pool, oid: Oid, index: int, *, stored: bool = True) -> None:
        """Take one page (which is there) out of the pool, its storage (unless the storage
        lost it) and the accounting."""
        objects = pool.objects
        obj = objects[oid]
        size = obj.pop(index)
        left = len(obj)
        if not left:
            del objects[oid]
            self.obj_count -= 1
            self.used_bytes -= OBJECT_OVERHEAD
            left = len(objects)
            if not left & (left - 1):
                pool.objects = _compacted(objects)
        elif not left & (left - 1):
            objects[oid] = _compacted(obj)
        w0, w1, w2 = oid
        key = (pool.gid, w0, w1, w2, index)
        if stored:
            self._page_delete(key)
        pool.pages -= 1
        pool.zbytes -= size
        if pool.persistent:
            owner = self.clients[pool.owner]  # persistent pools are never shared
            owner.pers_pages -= 1
            owner.pers_zbytes -= size
            self.used_bytes -= size + PERSISTENT_PAGE_OVERHEAD
        else:
            if pool.shared:
                owners = pool.owners
                owner = self.clients[owners.pop(key)]
                left = len(owners)
                if not left & (left - 1):
                    pool.owners = _compacted(owners)
            else:
                owner = self.clients[pool.owner]
            lru = owner.lru
            del lru[key]
            left = len(lru)
            if not left & (left - 1):
                owner.lru = _compacted(lru)
            owner.eph_pages -= 1
            owner.eph_zbytes -= size
            self.used_bytes -= size + EPHEMERAL_PAGE_OVERHEAD
        if not size:
            owner.zero_pages -= 1

    def _evict_oldest(self, client: Client) -> None:
        """Evict ``client``'s oldest ephemeral page (it has one)."""
        key = next(iter(client.lru))
        self._drop(self._by_gid[key[0]], Oid(*key[1:4]), key[4])
        client.counters.evicted += 1
        self.evictions += 1

    def _make_room(self, client: Client, cost: int, grows: int = 0) -> bool:
        """Evict until ``cost`` more bytes fit the client's cap and, with ``grows`` (a new
        object's), the capacity."""
        cap = client.cap
        if cap:
            while client.charged + cost > cap:
                if not client.lru:
                    return False
                self._evict_oldest(client)
        clients = self.clients.values()
        trim = self._trim
        while self._memory_bytes() + cost + grows > self.capacity_bytes:
            if trim is not None and trim():
                continue  # memory given back: perhaps no page need go
            loser = victim(client, clients, self.total_weight, self.eph_bytes)
            if loser is None:
                return False
            self._evict_oldest(loser)
        return True

    def _evict_until(self, enough: Callable[[], bool]) -> int:
        """Evict, whose page the eviction rule says, until ``enough()`` or nothing is left."""
        evicted = 0
        clients = self.clients.values()
        trim = self._trim
        while not enough():
            if trim is not None and trim():
                continue
            loser = victim(None, clients, self.total_weight, self.eph_bytes)
            if loser is None:
                break
            self._evict_oldest(loser)
            evicted += 1
        return evicted

    def _leave(self, client: Client, slot: int, pool: Pool) -> None:
        """``client`` lets go of slot ``slot``; the pool goes with its last member."""
        client.slots[slot] = None
        cid = client.cid
        left = pool.members[cid] - 1
        if left:
            pool.members[cid] = left
            return
        del pool.members[cid]
        if pool.members:  # a shared pool another client still uses: hand the pages over
            self._hand_over(pool, client, self.clients[pool.first_member()])
            return
        for oid in list(pool.objects):
            for index in list(pool.objects[oid]):
                self._drop(pool, oid, index)
        del self._by_gid[pool.gid]
        if pool.shared:
            del self.shared_pools[pool.uuid]

    def _hand_over(self, pool: Pool, leaver: Client, heir: Client) -> None:
        """Charge ``leaver``'s pages in shared ``pool`` to ``heir``, keeping their LRU order;
        the heir's oldest ephemeral pages go if that takes it over its cap."""
        moved: list[tuple[PageKey, int]] = []
        for key, owner in pool.owners.items():
            if owner != leaver.cid:
                continue
            pool.owners[key] = heir.cid
            moved.append((key, leaver.lru.pop(key)))
            size = pool.objects[Oid(*key[1:4])][key[4]]
            for who, sign in ((leaver, -1), (heir, 1)):
                who.eph_pages += sign
                who.eph_zbytes += sign * size
                if not size:
                    who.zero_pages += sign
        if moved:
            heir.lru = OrderedDict(sorted([*heir.lru.items(), *moved], key=lambda kv: kv[1]))
        while heir.cap and heir.charged > heir.cap and heir.lru:  # the heir's cap holds too
            self._evict_oldest(heir)


#: A dict of n entries takes about 40 bytes each, an OrderedDict about 90 (CPython 3.11),
#: and up to twice that just after growing; one past these took its size from entries
#: deleted since.
_DICT_BYTES = 120
_ORDERED_BYTES = 200


def _compacted(table: _D) -> _D:
    """``table``, or a copy of it when deletions left it holding memory for far more entries
    than it has: a dict never shrinks by itself, so after a flood its table would stay
    sized for the flood's peak, memory the capacity no longer counts.  Called when a table
    shrank to a power of two entries, so each copy is paid for by as many deletions."""
    entries = len(table)
    if entries < 64:
        return table
    per_entry = _ORDERED_BYTES if type(table) is OrderedDict else _DICT_BYTES
    if sys.getsizeof(table) <= per_entry * entries:
        return table
    return type(table)(table)  # type: ignore[return-value]


def _stored_size(storage: PageStorage, key: PageKey) -> int | None:
    data = storage.get(key)
    return None if data is None else len(data)


__all__ = [
    "EPHEMERAL_PAGE_OVERHEAD",
    "MAX_AUTH_UUIDS",
    "MAX_WEIGHT",
    "OBJECT_OVERHEAD",
    "PERSISTENT_PAGE_OVERHEAD",
    "TmemStore",
]
