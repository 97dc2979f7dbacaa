"""``zcache``: the local tmem store, lz4-compressed pages in a page arena that outlives the process.

It plays the part zcache2 played in the kernel: one client of the tmem store
(:class:`~xentmem.tmem.store.TmemStore`), which answers with the hypervisor's rules
(``docs/tmem-semantics.md``, "The store"), so the frontends see the same behaviour as over
Xen.  This module adds what is zcache's own: its params, lz4 outside the store's lock, the
zcache2 counters, and the restart: the pages live in ``<run dir>/zcache.arena`` and the pool
table beside it in ``zcache.pools``, so after a ``kill -9`` the persistent pools come back
for frontswap to adopt (``docs/zcache.md``, "Restart").
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import psutil
from lz4.block import decompress

from xentmem.clock import Clock
from xentmem.errors import ArenaError, BackendError, ParamError
from xentmem.guest.backend import Backend, GetResult
from xentmem.guest.backends.ramster.params import RAMSTER_PARAMS, parse_nodes, resolve_node_id
from xentmem.params import Param, ParamSet
from xentmem.roots import Roots
from xentmem.tmem.abi import PAGE_SIZE, ZERO_PAGE, Oid, PoolFlags, PoolUuid, TmemControl
from xentmem.tmem.arena import ARENA_PARAMS
from xentmem.tmem.capacity import ACCEPTED, MIB, capacity_bytes, is_share_of_ram
from xentmem.tmem.capacity import parse_capacity as _parse_capacity
from xentmem.tmem.store import (
    EPHEMERAL_PAGE_OVERHEAD,
    OBJECT_OVERHEAD,
    PERSISTENT_PAGE_OVERHEAD,
    POOR_COMPRESSION_LIMIT,
    ArenaPages,
    TmemStore,
    pack_page,
)
from xentmem.tmem.store.table import TableFile

if TYPE_CHECKING:  # redis-py is an extra: imported only with ramster=1
    from xentmem.guest.backends.ramster.remote import RemotePages
    from xentmem.guest.backends.ramster.tier import RemoteTier

log = logging.getLogger(__name__)

#: Xen's MAX_POOLS_PER_DOMAIN is 16; a local store serving an unlimited number of cleancache
#: filesystems (our cleancache has no 32-filesystem limit) needs more.
DEFAULT_MAX_POOLS = 1024
#: zcache is the store's only client.
CLIENT = 0

#: In the run directory: the arena (every page) and the pool table (what the pages mean).
ARENA_FILE = "zcache.arena"
POOLS_FILE = "zcache.pools"
#: RAMster's remote copies whose delete failed: kept so a restart does not adopt them again.
DELETES_FILE = "ramster.deletes"
#: The pool table file: this line, the xxh3-64 of the JSON body in hex, then the body.
POOLS_MAGIC = "xentmem-zcache-pools 1"

_DONE = 1
_GET_ZERO: GetResult = (1, ZERO_PAGE)

#: The ops that have a counting twin while ``detailed_stats`` is on.
_COUNTED_OPS = ("put_page", "flush_page", "flush_object")


def _persistent_row(untrusted_row: Any) -> bool:
    """A pool table row to restore: persistent, or too broken to tell (the table's check
    then refuses it, naming what is wrong)."""
    try:
        return PoolFlags.decode(untrusted_row["flags"]).persistent
    except (KeyError, TypeError, ValueError):
        return True


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
    ) + ARENA_PARAMS + RAMSTER_PARAMS

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
        #: Restored persistent pools no NEW_POOL has claimed yet: slot -> uuid.
        self._unclaimed: dict[int, PoolUuid] = {}
        #: Held across a pool change and the table's rewrite, so the file written last is
        #: the newest table (two frontends may make pools at once).
        self._table_lock = threading.Lock()
        #: What the start found in the run directory (``describe``, the log).
        self.restart: dict[str, Any] = {}
        capacity = self._resolve_capacity(checked["capacity"])
        #: RAMster's second tier (ramster=1): reached before anything local is opened, so a
        #: cluster that does not answer refuses the load with nothing half-made.
        self._remote: RemotePages | None = None
        tier = self._connect_tier(checked) if checked["ramster"] else None
        # Without a run directory (a backend made by hand: unit tests, benches) the pages
        # live in this process only; the daemon always gives one.
        self._arena: ArenaPages | None = None
        try:
            if roots is not None:
                self._arena = self._open_arena(roots.run, checked["allocator"])
            self._store = self._new_store(capacity)
            if self._arena is not None:
                self._restore()
            if tier is not None:
                self._attach_tier(tier, checked["ramster_ephemeral"])
        except BaseException:
            if self._arena is not None:
                self._arena.close()
            if tier is not None:
                tier.close()
            raise
        self._detail_lock = threading.Lock()
        self._detailed = False
        self._detail = _DetailedCounters()
        if checked["detailed_stats"]:
            self._switch_detailed(True)

    def _connect_tier(self, checked: Mapping[str, Any]) -> RemoteTier:
        """The remote tier on the cluster of ``ramster_nodes``, connected (every master
        answered); BackendError naming the node and what failed (``docs/ramster.md``)."""
        if not checked["ramster_nodes"]:
            raise ParamError("ramster=1 needs ramster_nodes (host:port,... of the cluster)")
        if checked["ramster_ca_file"] and not checked["ramster_tls"]:
            raise ParamError("ramster_ca_file needs ramster_tls=1 (it names the CAs that "
                             "verify the nodes' TLS certificates)")
        try:
            node_id = resolve_node_id(checked["ramster_node_id"], self.roots)
        except ValueError as exc:
            raise ParamError(f"ramster_node_id: {exc}") from None
        try:
            from xentmem.guest.backends.ramster.tier import RemoteTier, TierConfig
        except ImportError as exc:
            raise BackendError(f"zcache: ramster=1 needs redis-py ({exc}); install "
                               "xentmem[ramster]") from None
        tier = RemoteTier(TierConfig(
            nodes=parse_nodes(checked["ramster_nodes"]), node_id=node_id,
            user=checked["ramster_user"], password_file=checked["ramster_password_file"],
            tls=checked["ramster_tls"], ca_file=checked["ramster_ca_file"],
            replicas=checked["ramster_replicas"], timeout_ms=checked["ramster_timeout_ms"],
            ephemeral_ttl_s=checked["ramster_ephemeral_ttl_s"]))
        try:
            tier.connect()
        except BackendError as exc:
            raise BackendError(f"zcache: ramster node {node_id}: {exc}") from None
        return tier

    def _attach_tier(self, tier: RemoteTier, ephemeral: str) -> None:
        """The remote pages of this node as the cluster holds them after a restart: those of
        restored persistent pools adopted, the rest deleted (``docs/ramster.md``, "Restart")."""
        from xentmem.guest.backends.ramster.remote import RemotePages

        deletes = None if self._arena is None else \
            Path(self._arena.arena.path).with_name(DELETES_FILE)
        remote = RemotePages(self._store, CLIENT, tier, ephemeral=ephemeral,
                             clock_now=self.clock.monotonic, deletes_path=deletes)
        try:
            found = remote.adopt(self._unclaimed)
        except BackendError as exc:
            raise BackendError(f"zcache: ramster node {tier.config.node_id}: {exc}") from None
        self.restart.update(found)
        if found["remote_pages_adopted"] or found["remote_pages_dropped"]:
            log.info("zcache: ramster node %s: %d remote page(s) adopted, %d dropped",
                     tier.config.node_id, found["remote_pages_adopted"],
                     found["remote_pages_dropped"])
        self._remote = remote

    def _new_store(self, capacity: int) -> TmemStore:
        """One client, every uuid may be shared (no authorisation list: Xen's shared_auth off),
        as many shared pools as pool slots."""
        store = TmemStore(capacity, pages=self._arena, max_pools=self._max_pools,
                          max_shared_pools=self._max_pools, shared_auth=False)
        self._client = store.client(CLIENT)
        return store

    # -- the arena and the pool table: pages that outlive the process -------------------------

    def _open_arena(self, run: Path, allocator: str) -> ArenaPages:
        """The arena in the run directory, made if missing; a damaged one is set aside (the
        arena says so and what was lost); one that is not ours is refused."""
        try:
            run.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"zcache: run directory {run}: {exc.strerror}") from None
        try:
            return ArenaPages.open(run / ARENA_FILE, allocator=allocator)
        except ArenaError as exc:
            raise BackendError(f"zcache: {exc}") from None

    @classmethod
    def kept_pages_waiting(cls, roots: Roots) -> bool:
        """An arena and its pool table in the run directory: a process killed earlier (or
        stopped with its unload refused) left them, with the persistent pages in them."""
        return (roots.run / ARENA_FILE).exists() and (roots.run / POOLS_FILE).exists()

    @property
    def _pools_path(self) -> Path:
        assert self._arena is not None
        return Path(self._arena.arena.path).with_name(POOLS_FILE)

    def _restore(self) -> None:
        """After a restart: the persistent pools of the pool table back in their slots, with
        the arena's pages; ephemeral pages (cleancache's, whose pools are made again by new
        mounts) and pages of no listed pool are dropped."""
        assert self._arena is not None
        started = time.monotonic()
        report = self._arena.arena.report
        table: list[Any] = []
        problem = ""
        try:
            table = self._read_pools()
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            problem = str(exc)
        kept = [row for row in table if _persistent_row(row)]
        try:
            found = self._store.restore(kept)
        except ValueError as exc:
            problem = f"{self._pools_path}: {exc}"
            found = self._store.restore([])
        if problem:
            log.error("zcache: pool table not usable, every page in %s is dropped: %s",
                      report.path, problem)
        for row in kept if not problem else []:
            for slot in row["slots"].get(str(CLIENT), []):
                self._unclaimed[slot] = PoolUuid(*row["uuid"])
        self._save_pools()
        self.restart = report.restart_summary(found, started=started, problem=problem,
                                              pools=0 if problem else None)
        if report.how != "created":
            log.info("zcache: arena %s %s: %d persistent page(s) in %d pool(s) kept, %d "
                     "dropped (ephemeral or of no pool), %.2fs", report.path, report.how,
                     found["pages"], self.restart["pools_restored"], found["orphans"],
                     self.restart["seconds"])

    @property
    def _pools_file(self) -> TableFile:
        return TableFile(self._pools_path, POOLS_MAGIC)

    def _read_pools(self) -> list[Any]:
        """The pool table file, checked: ValueError naming the file and what is wrong."""
        untrusted = self._pools_file.read()
        if not isinstance(untrusted, list):
            raise ValueError(f"{self._pools_path}: not a list of pools")
        return untrusted

    def _save_pools(self) -> None:
        """The pool table, written atomically (a temporary file renamed over it)."""
        if self._arena is None:
            return
        self._pools_file.write(self._store.pool_table())

    def restored_pages(self, pool_id: int) -> list[tuple[Oid, int]]:
        """The (oid, index) of every page a restart brought back in pool ``pool_id``: what
        frontswap re-adopts for its swap areas (``docs/zcache.md``, "Restart")."""
        found = self._store.page_keys(CLIENT, pool_id)
        if self._remote is not None:
            found += self._remote.remote_keys(pool_id)
        return found

    @property
    def restored_pools(self) -> int:
        """Persistent pools a restart brought back that no NEW_POOL has claimed yet."""
        return len(self._unclaimed)

    @property
    def outlives_process(self) -> bool:
        """True when persistent pages survive a kill of this process (an arena file)."""
        return self._arena is not None

    # -- life cycle ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Drop every pool and page, and the arena with them (a clean unload repatriated
        the persistent pages first), but not RAMster's pending deletes, which the cluster
        must still take; the counting twins go too (they reference ``self``)."""
        remote, self._remote = self._remote, None
        pending = 0
        if remote is not None:
            pending = remote.drop_all()
        arena, self._arena = self._arena, None
        if arena is not None:  # remote copies left undeleted: the next load's SCAN drops them
            run = Path(arena.arena.path)
            arena.discard()
            run.with_name(POOLS_FILE).unlink(missing_ok=True)
            # Deletes the cluster did not take stay for the next load of the node: a shared
            # page flushed here is not in its SCAN, and would be served again.
            if remote is not None and not pending:
                run.with_name(DELETES_FILE).unlink(missing_ok=True)
        self._unclaimed.clear()
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
            "allocator": self.values["allocator"],
            "arena": None if self._arena is None else str(self._arena.arena.path),
            "restart": dict(self.restart),
            "detailed_stats": self._detailed,
            "ramster": {"enabled": False} if self._remote is None
            else {"enabled": True, **self._remote.describe()},
            "poor_compression_limit": POOR_COMPRESSION_LIMIT,
            "page_overhead": {
                "ephemeral": EPHEMERAL_PAGE_OVERHEAD,
                "persistent": PERSISTENT_PAGE_OVERHEAD,
                "object": OBJECT_OVERHEAD,
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
            while self._remote is not None and self._remote.remotify():
                pass  # a smaller store: persistent pages beyond it move now
        elif name == "detailed_stats":
            self._switch_detailed(bool(value))
        elif name.startswith("ramster_") and self._remote is not None:
            tier = self._remote.tier
            if name == "ramster_ephemeral":
                self._remote.ephemeral = value
            elif name == "ramster_timeout_ms":
                tier.config = replace(tier.config, timeout_ms=value)
                tier.reconnect_soon()
            elif name == "ramster_ephemeral_ttl_s":
                tier.config = replace(tier.config, ephemeral_ttl_s=value)

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
        """NEW_POOL; a private persistent pool restored after a restart is handed back
        (the lowest such slot with the same uuid) instead of a new one."""
        with self._table_lock:
            if self._unclaimed:
                try:
                    decoded: PoolFlags | None = PoolFlags.decode(flags)
                except (ValueError, TypeError):
                    decoded = None
                if decoded is not None and decoded.persistent and not decoded.shared:
                    for slot, restored_uuid in sorted(self._unclaimed.items()):
                        if restored_uuid == tuple(uuid):
                            del self._unclaimed[slot]
                            return slot
            rc = self._store.new_pool(CLIENT, uuid, flags)
            if rc >= 0 and self._remote is not None:
                self._remote.opened(rc, PoolUuid(*uuid))
            if rc >= 0 and self._arena is not None:
                try:
                    self._save_pools()
                except OSError as exc:  # refused means unchanged: the pool goes again
                    log.error("zcache: pool table %s not written: %s; new pool refused",
                              self._pools_path, exc)
                    if self._remote is not None:  # its slot must not stay cluster-wide
                        self._remote.destroyed(rc)
                    self._store.destroy_pool(CLIENT, rc)
                    return -errno.ENOMEM
            return rc

    def destroy_pool(self, pool_id: int) -> int:
        with self._table_lock:
            rc = self._store.destroy_pool(CLIENT, pool_id)
            self._unclaimed.pop(pool_id, None)
            if rc == _DONE and self._remote is not None:
                self._remote.destroyed(pool_id)
            if rc == _DONE and self._arena is not None:
                try:
                    self._save_pools()
                except OSError as exc:  # its pages are gone already; a restart drops it
                    log.error("zcache: pool table %s not written: %s", self._pools_path, exc)
            return rc

    # -- the data path (lean: lz4 here, outside the store's lock) ------------------------------

    def put_page(self, pool_id: int, oid: Oid, index: int, page: bytes) -> int:
        remote = self._remote
        if remote is not None:
            return remote.put_page(pool_id, oid, index, page)
        if len(page) != PAGE_SIZE:
            return self._store.refuse_put(CLIENT, pool_id, oid, index, -errno.EINVAL)
        return self._store.put_page(CLIENT, pool_id, oid, index, pack_page(page))

    def get_page(self, pool_id: int, oid: Oid, index: int) -> GetResult:
        remote = self._remote
        if remote is not None:
            return remote.get_page(pool_id, oid, index)
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
        remote = self._remote
        if remote is not None:
            return remote.flush_page(pool_id, oid, index)
        return self._store.flush_page(CLIENT, pool_id, oid, index)

    def flush_object(self, pool_id: int, oid: Oid) -> int:
        remote = self._remote
        if remote is not None:
            return remote.flush_object(pool_id, oid)
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

    def stats(self) -> dict[str, Any]:
        """zcache's counters; with ramster=1 the remote tier's too (``ramster_*``, the node
        id as text: metrics keep the numbers)."""
        remote = self._remote
        extra: dict[str, Any] = {} if remote is None else {
            "ramster_node_id": remote.owner, **remote.stats()}
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
                **self._arena_stats(store),
                **extra,
            }

    def _arena_stats(self, store: TmemStore) -> dict[str, int]:
        """With an arena: what the capacity bounds (``memory_bytes``: charged bytes plus the
        arena's beyond the pages' own) and the arena's counters (the store's lock is held)."""
        if self._arena is None:
            return {}
        figures = self._arena.arena.stats()
        return {"memory_bytes": store._memory_bytes()} | {
            f"arena_{name}": figures[name] for name in (
            "pages", "stored_bytes", "frames_used", "file_bytes", "metadata_bytes",
            "used_bytes", "checksum_failures", "dropped_records")}

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
    "OBJECT_OVERHEAD",
    "PERSISTENT_PAGE_OVERHEAD",
    "POOR_COMPRESSION_LIMIT",
    "ZcacheBackend",
]
