"""``zcache``: the local tmem store, lz4-compressed pages in this process's memory.

It plays the part zcache2 played in the kernel: one client of the tmem store
(:class:`~xentmem.tmem.store.TmemStore`), which answers with the hypervisor's rules
(``docs/tmem-semantics.md``, "The store"), so the frontends see the same behaviour as over
Xen.  This module adds what is zcache's own: its params, lz4 outside the store's lock, and
the zcache2 counters (``docs/zcache.md``).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import psutil
from lz4.block import decompress

from xentmem.clock import Clock
from xentmem.errors import ParamError
from xentmem.guest.backend import Backend, GetResult
from xentmem.params import Param, ParamSet
from xentmem.roots import Roots
from xentmem.tmem.abi import PAGE_SIZE, ZERO_PAGE, Oid, PoolUuid, TmemControl
from xentmem.tmem.capacity import ACCEPTED, MIB, capacity_bytes, is_share_of_ram
from xentmem.tmem.capacity import parse_capacity as _parse_capacity
from xentmem.tmem.store import (
    EPHEMERAL_PAGE_OVERHEAD,
    PERSISTENT_PAGE_OVERHEAD,
    POOR_COMPRESSION_LIMIT,
    TmemStore,
    pack_page,
)

log = logging.getLogger(__name__)

#: Xen's MAX_POOLS_PER_DOMAIN is 16; a local store serving an unlimited number of cleancache
#: filesystems (our cleancache has no 32-filesystem limit) needs more.
DEFAULT_MAX_POOLS = 1024
#: zcache is the store's only client.
CLIENT = 0

_DONE = 1
_GET_ZERO: GetResult = (1, ZERO_PAGE)

#: The ops that have a counting twin while ``detailed_stats`` is on.
_COUNTED_OPS = ("put_page", "flush_page", "flush_object")


def _system_total_ram() -> int:
    return int(psutil.virtual_memory().total)


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
        self._max_pools: int = checked["max_pools"]
        self._store = self._new_store(self._resolve_capacity(checked["capacity"]))
        self._detail_lock = threading.Lock()
        self._detailed = False
        self._detail = _DetailedCounters()
        if checked["detailed_stats"]:
            self._switch_detailed(True)

    def _new_store(self, capacity: int) -> TmemStore:
        """One client, every uuid may be shared (no authorisation list: Xen's shared_auth off),
        as many shared pools as pool slots."""
        store = TmemStore(capacity, max_pools=self._max_pools,
                          max_shared_pools=self._max_pools, shared_auth=False)
        self._client = store.client(CLIENT)
        return store

    # -- life cycle ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Drop every pool and page; the counting twins go too (they reference ``self``)."""
        self._store = self._new_store(self._store.capacity_bytes)
        self._switch_detailed(False)

    def describe(self) -> dict[str, Any]:
        store = self._store
        return {
            "name": self.name,
            "compression": "lz4 block per 4 KiB page",
            "capacity": self.values["capacity"],
            "capacity_bytes": store.capacity_bytes,
            "used_bytes": store.used_bytes,
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
            self._store.set_capacity(self._resolve_capacity(value))
        elif name == "detailed_stats":
            self._switch_detailed(bool(value))

    def _switch_detailed(self, on: bool) -> None:
        """Swap the counting twins in (or out) as instance attributes: no per-op test."""
        if on and not self._detailed:
            with self._detail_lock:
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
        return self._store.new_pool(CLIENT, uuid, flags)

    def destroy_pool(self, pool_id: int) -> int:
        return self._store.destroy_pool(CLIENT, pool_id)

    # -- the data path (lean: lz4 here, outside the store's lock) ------------------------------

    def put_page(self, pool_id: int, oid: Oid, index: int, page: bytes) -> int:
        if len(page) != PAGE_SIZE:
            return self._store.refuse_put(CLIENT, pool_id, oid, index, -errno.EINVAL)
        return self._store.put_page(CLIENT, pool_id, oid, index, pack_page(page))

    def get_page(self, pool_id: int, oid: Oid, index: int) -> GetResult:
        rc, data = self._store.get_page(CLIENT, pool_id, oid, index)
        if data is None:
            return rc, None
        size = len(data)  # unpack_page, inlined: a call costs a tenth of a get
        if size == PAGE_SIZE:
            return (1, data)
        if size:
            return (1, decompress(data, uncompressed_size=PAGE_SIZE))
        return _GET_ZERO

    def flush_page(self, pool_id: int, oid: Oid, index: int) -> int:
        return self._store.flush_page(CLIENT, pool_id, oid, index)

    def flush_object(self, pool_id: int, oid: Oid) -> int:
        return self._store.flush_object(CLIENT, pool_id, oid)

    # -- the counting twins (swapped in by detailed_stats) -------------------------------------

    def _put_page_counted(self, pool_id: int, oid: Oid, index: int, page: bytes) -> int:
        rc = type(self).put_page(self, pool_id, oid, index, page)
        if rc == _DONE:
            with self._detail_lock:
                self._sample_maxima()
        return rc

    def _flush_page_counted(self, pool_id: int, oid: Oid, index: int) -> int:
        rc = type(self).flush_page(self, pool_id, oid, index)
        with self._detail_lock:
            self._detail.flush_total += 1
            if rc == _DONE:
                self._detail.flush_found += 1
        return rc

    def _flush_object_counted(self, pool_id: int, oid: Oid) -> int:
        rc = type(self).flush_object(self, pool_id, oid)
        with self._detail_lock:
            self._detail.flobj_total += 1
            if rc == _DONE:
                self._detail.flobj_found += 1
        return rc

    def _sample_maxima(self) -> None:
        detail, client = self._detail, self._client
        with self._store.lock:
            figures = (self._store.obj_count, client.eph_pages, client.pers_pages,
                       client.pers_zbytes, client.eph_zbytes)
        obj_count, eph_pages, pers_pages, pers_zbytes, eph_zbytes = figures
        detail.obj_count_max = max(detail.obj_count_max, obj_count)
        detail.eph_zpages_max = max(detail.eph_zpages_max, eph_pages)
        detail.pers_zpages_max = max(detail.pers_zpages_max, pers_pages)
        detail.pers_zbytes_max = max(detail.pers_zbytes_max, pers_zbytes)
        detail.eph_zbytes_max = max(detail.eph_zbytes_max, eph_zbytes)

    # -- control and reporting -----------------------------------------------------------------

    def control(self, subop: TmemControl, arg: Any = None) -> Any:
        """TMEMC_FLUSH (evict ``arg`` KiB of ephemeral pages, all if None; returns KiB freed)
        and TMEMC_QUERY_FREEABLE_MB (MiB the ephemeral pages hold); anything else -ENOSYS."""
        if subop == TmemControl.FLUSH:
            if arg is not None and (not isinstance(arg, int) or isinstance(arg, bool) or arg < 0):
                return -errno.EINVAL
            return self._store.flush_ephemeral(None if arg is None else arg * 1024) // 1024
        if subop == TmemControl.QUERY_FREEABLE_MB:
            return self._store.freeable_bytes() // MIB
        return -errno.ENOSYS

    def stats(self) -> dict[str, int]:
        store, client = self._store, self._client
        with store.lock:
            counters = client.counters
            return {
                "pools": sum(pool is not None for pool in client.slots),
                "pages": client.eph_pages + client.pers_pages,
                "eph_pages": client.eph_pages,
                "pers_pages": client.pers_pages,
                "zbytes": client.eph_zbytes + client.pers_zbytes,
                "eph_zbytes": client.eph_zbytes,
                "pers_zbytes": client.pers_zbytes,
                "zero_pages": client.zero_pages,
                "evictions": store.evictions,
                "failed_puts": counters.failed_eph_puts + counters.failed_pers_puts,
                "failed_eph_puts": counters.failed_eph_puts,
                "failed_pers_puts": counters.failed_pers_puts,
                "capacity_bytes": store.capacity_bytes,
                "used_bytes": store.used_bytes,
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
        store, client = self._store, self._client
        with self._detail_lock, store.lock:
            detail, counters = self._detail, client.counters
            return {
                "obj_count": store.obj_count,
                "obj_count_max": detail.obj_count_max,
                "flush_total": detail.flush_total,
                "flush_found": detail.flush_found,
                "flobj_total": detail.flobj_total,
                "flobj_found": detail.flobj_found,
                "failed_eph_puts": counters.failed_eph_puts,
                "failed_pers_puts": counters.failed_pers_puts,
                "put_to_flush": counters.put_to_flush,
                "compress_poor": counters.compress_poor,
                "eph_ate_tail": counters.eph_ate_tail,
                "eph_ate_tail_failed": counters.eph_ate_tail_failed,
                "pers_ate_eph": counters.pers_ate_eph,
                "pers_ate_eph_failed": counters.pers_ate_eph_failed,
                "evicted_eph_zpages": store.evictions,
                "eph_zpages": client.eph_pages,
                "eph_zpages_max": detail.eph_zpages_max,
                "pers_zpages": client.pers_pages,
                "pers_zpages_max": detail.pers_zpages_max,
                "eph_zbytes": client.eph_zbytes,
                "eph_zbytes_max": detail.eph_zbytes_max,
                "pers_zbytes": client.pers_zbytes,
                "pers_zbytes_max": detail.pers_zbytes_max,
                "zero_filled_pages": client.zero_pages,
            }

    def pools(self) -> list[dict[str, Any]]:
        return self._store.pool_rows(CLIENT)


__all__ = [
    "EPHEMERAL_PAGE_OVERHEAD",
    "PERSISTENT_PAGE_OVERHEAD",
    "POOR_COMPRESSION_LIMIT",
    "ZcacheBackend",
]
