"""``zcache``: the local tmem store, lz4-compressed pages in this process's memory.

It plays the part zcache2 played in the kernel and answers with the hypervisor's rules
(``docs/tmem-semantics.md``), so the frontends see the same behaviour as over Xen.  How pages
are kept, capacity, the counters and their cost: ``docs/zcache.md``.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import psutil
from lz4.block import compress, decompress

from xentmem.clock import Clock
from xentmem.errors import AbiError, ParamError
from xentmem.guest.backend import Backend, GetResult
from xentmem.params import Param, ParamSet
from xentmem.roots import Roots
from xentmem.tmem.abi import (
    EEMPTY,
    PAGE_SIZE,
    TMEM_POOL_SHARED,
    WILDCARD_UUID,
    ZERO_PAGE,
    Oid,
    PoolFlags,
    PoolUuid,
    TmemControl,
)
from xentmem.tmem.capacity import ACCEPTED, MIB, capacity_bytes, is_share_of_ram
from xentmem.tmem.capacity import parse_capacity as _parse_capacity

log = logging.getLogger(__name__)

#: A compressed page longer than this is stored raw (63 chunks of 64 bytes, zbud's limit).
POOR_COMPRESSION_LIMIT = 4032
#: Bytes charged per stored page on top of its data: its dict slot, ``bytes`` header, index
#: int and share of its object; an ephemeral page adds its LRU key tuple and OrderedDict node.
#: Measured with tracemalloc on CPython 3.11 (80-105 and 240-265 bytes per page, from 16 to
#: thousands of objects), rounded up.
PERSISTENT_PAGE_OVERHEAD = 112
EPHEMERAL_PAGE_OVERHEAD = 288
#: Xen's MAX_POOLS_PER_DOMAIN is 16; a local store serving an unlimited number of cleancache
#: filesystems (our cleancache has no 32-filesystem limit) needs more.
DEFAULT_MAX_POOLS = 1024

_DONE = 1
_NODEV = -errno.ENODEV
_GET_NODEV: GetResult = (-errno.ENODEV, None)
_GET_MISS: GetResult = (0, None)
_GET_EMPTY: GetResult = (-EEMPTY, None)
_GET_ZERO: GetResult = (1, ZERO_PAGE)
_EMPTY = b""

#: The ops that have a counting twin while ``detailed_stats`` is on.
_COUNTED_OPS = ("put_page", "flush_page", "flush_object")

_EphKey = tuple["_Object", int]


def _system_total_ram() -> int:
    return int(psutil.virtual_memory().total)


class _Object(dict):  # type: ignore[type-arg]  # dict[int, bytes]
    """One object's pages, ``{index: data}``, knowing its pool and oid for eviction.

    Equal and hashed by identity (not by contents), so ``(object, index)`` is a cheap,
    unambiguous LRU key.
    """

    __slots__ = ("oid", "pool")
    __hash__ = object.__hash__  # type: ignore[assignment]
    __eq__ = object.__eq__  # type: ignore[assignment]

    def __init__(self, pool: _Pool, oid: Oid) -> None:
        super().__init__()
        self.pool = pool
        self.oid = oid


class _Pool:
    """One pool: ``objects`` maps an oid to its :class:`_Object` (empty ones are removed)."""

    __slots__ = ("ephemeral", "exclusive", "flags", "ids", "objects", "overhead", "shared", "uuid")

    def __init__(self, flags: int, uuid: PoolUuid, *, persistent: bool, shared: bool) -> None:
        self.objects: dict[Oid, _Object] = {}
        self.ephemeral = not persistent
        self.shared = shared
        #: Private ephemeral: a get takes the page away.
        self.exclusive = self.ephemeral and not shared
        #: Bytes charged against the capacity per page, on top of its data.
        self.overhead = EPHEMERAL_PAGE_OVERHEAD if self.ephemeral else PERSISTENT_PAGE_OVERHEAD
        self.flags = flags
        self.uuid = uuid
        #: How many pool ids name this pool (more than one only for a shared pool).
        self.ids = 0

    @property
    def kind(self) -> str:
        if not self.ephemeral:
            return "persistent"
        return "shared-ephemeral" if self.shared else "private-ephemeral"

    def page_count(self) -> int:
        return sum(map(len, self.objects.values()))

    def zbytes(self) -> int:
        return sum(len(data) for obj in self.objects.values() for data in obj.values())


class _DetailedCounters:
    """The zcache2 counters that cost something on every op; kept only while switched on."""

    __slots__ = (
        "eph_zbytes_max",
        "eph_zpages_max",
        "flobj_found",
        "flobj_total",
        "flush_found",
        "flush_total",
        "obj_count_max",
        "pers_zbytes_max",
        "pers_zpages_max",
    )

    def __init__(self) -> None:
        self.flush_total = self.flush_found = self.flobj_total = self.flobj_found = 0
        self.obj_count_max = self.eph_zpages_max = self.pers_zpages_max = 0
        self.eph_zbytes_max = self.pers_zbytes_max = 0


class ZcacheBackend(Backend):
    """The local compressed store (see the module docstring for its rules and choices)."""

    name: ClassVar[str] = "zcache"
    summary: ClassVar[str] = "local store: lz4-compressed pages in this process's memory"
    params: ClassVar[ParamSet] = ParamSet(
        Param(
            "capacity",
            str,
            "10%",
            "memory the store may use (compressed data plus bookkeeping); shrinking it "
            "evicts ephemeral pages at once",
            writable=True,
            parse=_parse_capacity,
            accepts=ACCEPTED,
        ),
        Param(
            "detailed_stats",
            bool,
            False,
            "keep the zcache debugfs counters (high-water marks, flush totals); free when off",
            writable=True,
        ),
        Param(
            "max_pools",
            int,
            DEFAULT_MAX_POOLS,
            "pool slots; NEW_POOL beyond them is refused with -EPERM (Xen has 16)",
            min=1,
            max=65536,
        ),
    )

    def __init__(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        roots: Roots | None = None,
        clock: Clock | None = None,
        total_ram: Callable[[], int] | None = None,
    ) -> None:
        checked = self.params.validate(dict(values or {}), owner=self.name)
        super().__init__(checked, roots=roots, clock=clock)
        self._total_ram = total_ram or _system_total_ram
        self._total_ram_bytes = 0
        self._lock = threading.Lock()
        self._slots: dict[int, _Pool] = {}
        self._shared: dict[PoolUuid, _Pool] = {}
        #: Every ephemeral page, oldest first: (object, index) -> None.
        self._lru: OrderedDict[_EphKey, None] = OrderedDict()
        self._max_pools: int = checked["max_pools"]
        self._capacity = self._resolve_capacity(checked["capacity"])
        self._free = self._capacity
        self._reset_counters()
        self._detailed = False
        self._detail = _DetailedCounters()
        if checked["detailed_stats"]:
            self._switch_detailed(True)

    def _reset_counters(self) -> None:
        self._pers_pages = 0
        self._pers_zbytes = 0
        self._zero_pages = 0
        self._obj_count = 0
        self._evicted = 0
        self._failed_eph_puts = 0
        self._failed_pers_puts = 0
        self._put_to_flush = 0
        self._compress_poor = 0
        self._eph_ate_tail = 0
        self._eph_ate_tail_failed = 0
        self._pers_ate_eph = 0
        self._pers_ate_eph_failed = 0

    def _eph_zbytes(self) -> int:
        """Ephemeral data bytes: what is used, less the persistent pages and all bookkeeping."""
        used = self._capacity - self._free
        return (
            used
            - self._pers_zbytes
            - self._pers_pages * PERSISTENT_PAGE_OVERHEAD
            - len(self._lru) * EPHEMERAL_PAGE_OVERHEAD
        )

    # -- life cycle ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Drop every pool and page; the counting twins go too (they reference ``self``)."""
        with self._lock:
            self._slots.clear()
            self._shared.clear()
            self._lru.clear()
            self._free = self._capacity
            self._reset_counters()
        self._switch_detailed(False)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            used = self._capacity - self._free
        return {
            "name": self.name,
            "compression": "lz4 block per 4 KiB page",
            "capacity": self.values["capacity"],
            "capacity_bytes": self._capacity,
            "used_bytes": used,
            "total_ram_bytes": self._total_ram_bytes,
            "max_pools": self._max_pools,
            "detailed_stats": self._detailed,
            "poor_compression_limit": POOR_COMPRESSION_LIMIT,
            "page_overhead": {
                "ephemeral": EPHEMERAL_PAGE_OVERHEAD,
                "persistent": PERSISTENT_PAGE_OVERHEAD,
            },
        }

    # -- params --------------------------------------------------------------------------------

    def _resolve_capacity(self, spec: str) -> int:
        """Bytes for a capacity; refuses a size larger than the RAM it would live in."""
        total = self._total_ram()
        wanted = capacity_bytes(spec, total)
        if not is_share_of_ram(spec) and wanted > total:
            raise ParamError(
                f"capacity: {spec} is more than this machine's {total // MIB} MiB of RAM; "
                f"accepted: {ACCEPTED}"
            )
        if wanted < PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD:
            raise ParamError(
                f"capacity: {spec} of {total // MIB} MiB of RAM holds no page; accepted: {ACCEPTED}"
            )
        self._total_ram_bytes = total
        return wanted

    def apply_param(self, name: str, value: Any) -> None:
        if name == "capacity":
            self._set_capacity(self._resolve_capacity(value))
        elif name == "detailed_stats":
            self._switch_detailed(bool(value))

    def _set_capacity(self, new_capacity: int) -> None:
        with self._lock:
            used = self._capacity - self._free
            self._capacity = new_capacity
            self._free = new_capacity - used
            if self._free < 0:
                self._evict(0)

    def _switch_detailed(self, on: bool) -> None:
        """Swap the counting twins in (or out) as instance attributes: no per-op test."""
        if on and not self._detailed:
            with self._lock:
                self._detail = _DetailedCounters()
                self._sample_maxima()
            self.__dict__.update(
                put_page=self._put_page_counted,
                flush_page=self._flush_page_counted,
                flush_object=self._flush_object_counted,
            )
        elif not on and self._detailed:
            for op in _COUNTED_OPS:
                self.__dict__.pop(op, None)
        self._detailed = on

    # -- pools ---------------------------------------------------------------------------------

    def new_pool(self, uuid: PoolUuid, flags: int) -> int:
        try:
            decoded = PoolFlags.decode(flags)
            checked_uuid = PoolUuid.checked(*uuid)
        except (AbiError, TypeError, ValueError) as exc:
            log.info("zcache: new pool refused: %s", exc)
            return -errno.EINVAL
        refusal = decoded.refusal()
        if refusal is not None:
            log.info("zcache: new pool refused: %s", refusal)
            return -errno.EPERM
        shared = decoded.shared and checked_uuid != WILDCARD_UUID
        effective_flags = flags if shared else flags & ~TMEM_POOL_SHARED
        with self._lock:
            pool_id = next((i for i in range(self._max_pools) if i not in self._slots), None)
            if pool_id is None:
                log.info("zcache: new pool refused: all %d pool slots in use", self._max_pools)
                return -errno.EPERM
            pool = self._shared.get(checked_uuid) if shared else None
            if pool is None:
                pool = _Pool(
                    effective_flags, checked_uuid, persistent=decoded.persistent, shared=shared
                )
                if shared:
                    self._shared[checked_uuid] = pool
            pool.ids += 1
            self._slots[pool_id] = pool
            return pool_id

    def destroy_pool(self, pool_id: int) -> int:
        with self._lock:
            pool = self._slots.pop(pool_id, None)
            if pool is None:
                return 0
            pool.ids -= 1
            if pool.ids == 0:
                for oid in list(pool.objects):
                    self._drop_object(pool, oid)
                if pool.shared:
                    del self._shared[pool.uuid]
            return _DONE

    # -- the data path (lean; see the module docstring before adding anything here) -----------
    # The lock is taken with acquire/release rather than ``with``: half the cost in CPython.

    def put_page(self, pool_id: int, oid: Oid, index: int, page: bytes) -> int:
        if len(page) != PAGE_SIZE:
            return self._refuse_put(pool_id, oid, index, -errno.EINVAL)
        if page == ZERO_PAGE:
            data = _EMPTY
        else:
            data = compress(page, store_size=False)
            if len(data) > POOR_COMPRESSION_LIMIT:
                data = page if type(page) is bytes else bytes(page)
        size = len(data)
        lock = self._lock
        lock.acquire()
        try:
            pool = self._slots.get(pool_id)
            if pool is None:
                return _NODEV
            obj = pool.objects.get(oid)
            if obj is not None and index in obj:
                return self._put_slow(pool, oid, index, data, duplicate=True)
            free = self._free - size - pool.overhead
            if free < 0:
                return self._put_slow(pool, oid, index, data, duplicate=False)
            self._free = free
            if obj is None:
                pool.objects[oid] = obj = _Object(pool, oid)
                self._obj_count += 1
            obj[index] = data
            if pool.ephemeral:
                self._lru[(obj, index)] = None
            else:
                self._pers_pages += 1
                self._pers_zbytes += size
            if not size:
                self._zero_pages += 1
            elif size == PAGE_SIZE:
                self._compress_poor += 1
            return _DONE
        finally:
            lock.release()

    def get_page(self, pool_id: int, oid: Oid, index: int) -> GetResult:
        lock = self._lock
        lock.acquire()
        try:
            pool = self._slots.get(pool_id)
            if pool is None:
                return _GET_NODEV
            objects = pool.objects
            obj = objects.get(oid)
            if obj is None:
                return _GET_MISS if objects else _GET_EMPTY
            if pool.exclusive:
                data = obj.pop(index, None)
                if data is None:
                    return _GET_MISS
                del self._lru[(obj, index)]
                if not obj:
                    del objects[oid]
                    self._obj_count -= 1
                size = len(data)
                self._free += size + EPHEMERAL_PAGE_OVERHEAD
                if not size:
                    self._zero_pages -= 1
            else:
                data = obj.get(index)
                if data is None:
                    return _GET_MISS
                if pool.shared:
                    self._lru.move_to_end((obj, index))
                size = len(data)
        finally:
            lock.release()
        if size == PAGE_SIZE:
            return (1, data)
        if size:
            return (1, decompress(data, uncompressed_size=PAGE_SIZE))
        return _GET_ZERO

    def flush_page(self, pool_id: int, oid: Oid, index: int) -> int:
        with self._lock:
            pool = self._slots.get(pool_id)
            if pool is None:
                return _NODEV
            return _DONE if self._drop_page(pool, oid, index) else 0

    def flush_object(self, pool_id: int, oid: Oid) -> int:
        with self._lock:
            pool = self._slots.get(pool_id)
            if pool is None:
                return _NODEV
            return _DONE if self._drop_object(pool, oid) else 0

    # -- slow paths (called with the lock held, except _refuse_put) ---------------------------

    def _put_slow(self, pool: _Pool, oid: Oid, index: int, data: bytes, *, duplicate: bool) -> int:
        """A duplicate, or a put that needs room: drop the old copy, evict, then store or fail."""
        if duplicate:
            self._drop_page(pool, oid, index)
        size = len(data)
        cost = size + pool.overhead
        if self._free < cost:
            self._evict(cost)
            fits = self._free >= cost
            # zcache2's names: an ephemeral put "ate the tail" of the LRU, a persistent one
            # "ate ephemeral" pages; *_failed when even that left too little room.
            if pool.ephemeral:
                if fits:
                    self._eph_ate_tail += 1
                else:
                    self._eph_ate_tail_failed += 1
            elif fits:
                self._pers_ate_eph += 1
            else:
                self._pers_ate_eph_failed += 1
            if not fits:
                self._count_failed_put(pool, duplicate)
                if size == PAGE_SIZE:
                    self._compress_poor += 1
                return -errno.ENOSPC if duplicate else -errno.ENOMEM
        self._store(pool, oid, index, data)
        return _DONE

    def _refuse_put(self, pool_id: int, oid: Oid, index: int, rc: int) -> int:
        """A put that cannot be stored at all: the old copy, if any, must not survive it."""
        with self._lock:
            pool = self._slots.get(pool_id)
            if pool is None:
                return _NODEV
            self._count_failed_put(pool, self._drop_page(pool, oid, index))
            return rc

    def _count_failed_put(self, pool: _Pool, dropped_old_copy: bool) -> None:
        if pool.ephemeral:
            self._failed_eph_puts += 1
        else:
            self._failed_pers_puts += 1
        if dropped_old_copy:
            self._put_to_flush += 1

    def _store(self, pool: _Pool, oid: Oid, index: int, data: bytes) -> None:
        """What the lean put does once it has room (the object may have been evicted since)."""
        size = len(data)
        self._free -= size + pool.overhead
        obj = pool.objects.get(oid)
        if obj is None:
            pool.objects[oid] = obj = _Object(pool, oid)
            self._obj_count += 1
        obj[index] = data
        if pool.ephemeral:
            self._lru[(obj, index)] = None
        else:
            self._pers_pages += 1
            self._pers_zbytes += size
        if not size:
            self._zero_pages += 1
        elif size == PAGE_SIZE:
            self._compress_poor += 1

    def _release(self, pool: _Pool, data: bytes) -> None:
        """Account for a page that left the store (its map and LRU entries are already gone)."""
        size = len(data)
        self._free += size + pool.overhead
        if not pool.ephemeral:
            self._pers_pages -= 1
            self._pers_zbytes -= size
        if not size:
            self._zero_pages -= 1

    def _drop_page(self, pool: _Pool, oid: Oid, index: int) -> bool:
        objects = pool.objects
        obj = objects.get(oid)
        if obj is None:
            return False
        data = obj.pop(index, None)
        if data is None:
            return False
        if pool.ephemeral:
            del self._lru[(obj, index)]
        if not obj:
            del objects[oid]
            self._obj_count -= 1
        self._release(pool, data)
        return True

    def _drop_object(self, pool: _Pool, oid: Oid) -> bool:
        obj = pool.objects.pop(oid, None)
        if obj is None:
            return False
        self._obj_count -= 1
        lru = self._lru
        for index, data in obj.items():
            if pool.ephemeral:
                del lru[(obj, index)]
            self._release(pool, data)
        return True

    def _evict(self, need: float) -> int:
        """Evict ephemeral pages, oldest first, until ``need`` bytes are free or none is left."""
        lru = self._lru
        evicted = 0
        while self._free < need and lru:
            (obj, index), _ = lru.popitem(last=False)
            data = obj.pop(index)
            pool = obj.pool
            if not obj:
                del pool.objects[obj.oid]
                self._obj_count -= 1
            self._release(pool, data)
            evicted += 1
        self._evicted += evicted
        return evicted

    # -- the counting twins (swapped in by detailed_stats) -------------------------------------

    def _put_page_counted(self, pool_id: int, oid: Oid, index: int, page: bytes) -> int:
        rc = type(self).put_page(self, pool_id, oid, index, page)
        if rc == _DONE:
            with self._lock:
                self._sample_maxima()
        return rc

    def _flush_page_counted(self, pool_id: int, oid: Oid, index: int) -> int:
        rc = type(self).flush_page(self, pool_id, oid, index)
        with self._lock:
            self._detail.flush_total += 1
            if rc == _DONE:
                self._detail.flush_found += 1
        return rc

    def _flush_object_counted(self, pool_id: int, oid: Oid) -> int:
        rc = type(self).flush_object(self, pool_id, oid)
        with self._lock:
            self._detail.flobj_total += 1
            if rc == _DONE:
                self._detail.flobj_found += 1
        return rc

    def _sample_maxima(self) -> None:
        detail = self._detail
        if self._obj_count > detail.obj_count_max:
            detail.obj_count_max = self._obj_count
        eph_pages = len(self._lru)
        if eph_pages > detail.eph_zpages_max:
            detail.eph_zpages_max = eph_pages
        if self._pers_pages > detail.pers_zpages_max:
            detail.pers_zpages_max = self._pers_pages
        if self._pers_zbytes > detail.pers_zbytes_max:
            detail.pers_zbytes_max = self._pers_zbytes
        eph_zbytes = self._eph_zbytes()
        if eph_zbytes > detail.eph_zbytes_max:
            detail.eph_zbytes_max = eph_zbytes

    # -- control and reporting -----------------------------------------------------------------

    def control(self, subop: TmemControl, arg: Any = None) -> Any:
        """TMEMC_FLUSH (evict ``arg`` KiB of ephemeral pages, all if None; returns KiB freed)
        and TMEMC_QUERY_FREEABLE_MB (MiB the ephemeral pages hold); anything else -ENOSYS."""
        if subop == TmemControl.FLUSH:
            if arg is not None and (not isinstance(arg, int) or isinstance(arg, bool) or arg < 0):
                return -errno.EINVAL
            with self._lock:
                before = self._free
                self._evict(float("inf") if arg is None else before + arg * 1024)
                return (self._free - before) // 1024
        if subop == TmemControl.QUERY_FREEABLE_MB:
            with self._lock:
                return (self._eph_zbytes() + len(self._lru) * EPHEMERAL_PAGE_OVERHEAD) // MIB
        return -errno.ENOSYS

    def stats(self) -> dict[str, int]:
        with self._lock:
            eph_pages = len(self._lru)
            eph_zbytes = self._eph_zbytes()
            return {
                "pools": len(self._slots),
                "pages": eph_pages + self._pers_pages,
                "eph_pages": eph_pages,
                "pers_pages": self._pers_pages,
                "zbytes": eph_zbytes + self._pers_zbytes,
                "eph_zbytes": eph_zbytes,
                "pers_zbytes": self._pers_zbytes,
                "zero_pages": self._zero_pages,
                "evictions": self._evicted,
                "failed_puts": self._failed_eph_puts + self._failed_pers_puts,
                "failed_eph_puts": self._failed_eph_puts,
                "failed_pers_puts": self._failed_pers_puts,
                "capacity_bytes": self._capacity,
                "used_bytes": self._capacity - self._free,
            }

    def detailed_stats(self) -> dict[str, int]:
        """zcache2's debugfs names; empty while ``detailed_stats`` is off.

        High-water marks and flush totals count from the moment the param was switched on.
        Left out, for want of the thing they count: objnode_count(_max) (no radix tree),
        failed_getfreepages, failed_alloc, mean_compress_poor, *_pageframes (no zbud frames),
        last_*_pageframes, *_nonactive_puts_ignored, the writeback counters.
        """
        if not self._detailed:
            return {}
        with self._lock:
            detail = self._detail
            return {
                "obj_count": self._obj_count,
                "obj_count_max": detail.obj_count_max,
                "flush_total": detail.flush_total,
                "flush_found": detail.flush_found,
                "flobj_total": detail.flobj_total,
                "flobj_found": detail.flobj_found,
                "failed_eph_puts": self._failed_eph_puts,
                "failed_pers_puts": self._failed_pers_puts,
                "put_to_flush": self._put_to_flush,
                "compress_poor": self._compress_poor,
                "eph_ate_tail": self._eph_ate_tail,
                "eph_ate_tail_failed": self._eph_ate_tail_failed,
                "pers_ate_eph": self._pers_ate_eph,
                "pers_ate_eph_failed": self._pers_ate_eph_failed,
                "evicted_eph_zpages": self._evicted,
                "eph_zpages": len(self._lru),
                "eph_zpages_max": detail.eph_zpages_max,
                "pers_zpages": self._pers_pages,
                "pers_zpages_max": detail.pers_zpages_max,
                "eph_zbytes": self._eph_zbytes(),
                "eph_zbytes_max": detail.eph_zbytes_max,
                "pers_zbytes": self._pers_zbytes,
                "pers_zbytes_max": detail.pers_zbytes_max,
                "zero_filled_pages": self._zero_pages,
            }

    def pools(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "pool_id": pool_id,
                    "flags": f"{pool.flags:#010x}",
                    "kind": pool.kind,
                    "persistent": not pool.ephemeral,
                    "shared": pool.shared,
                    "uuid": str(pool.uuid),
                    "ids": pool.ids,
                    "objects": len(pool.objects),
                    "pages": pool.page_count(),
                    "zbytes": pool.zbytes(),
                }
                for pool_id, pool in sorted(self._slots.items())
            ]


__all__ = [
    "EPHEMERAL_PAGE_OVERHEAD",
    "PERSISTENT_PAGE_OVERHEAD",
    "POOR_COMPRESSION_LIMIT",
    "ZcacheBackend",
]
