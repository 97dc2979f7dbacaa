"""The host's tmem store: every guest's pools and pages, with the hypervisor's rules.

It plays ``xen/common/tmem.c`` (Xen <= 4.12) for the host service: one client per guest
domain, created by its first op.  The rules it follows (pools, shared pools, gets, capacity
and eviction, weights, freeze, compression) are in docs/tmem-semantics.md, "The host's store".
The store is single-threaded by design: the host service runs it from its one loop.
"""

from __future__ import annotations

import errno
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import lz4.block

from xentmem.tmem.abi import (
    EEMPTY,
    EFROZEN,
    PAGE_SIZE,
    TMEM_DONE,
    TMEM_NOT_FOUND,
    WILDCARD_UUID,
    ZERO_PAGE,
    Oid,
    PoolFlags,
    PoolUuid,
)
from xentmem.xenbus.body import MAX_POOLS_PER_DOMAIN, PageEncoding, WireError, decode_page

MAX_GLOBAL_SHARED_POOLS = 16
#: Uuids one client may be authorised for (Xen: MAX_GLOBAL_SHARED_POOLS as well).
MAX_AUTH_UUIDS = 16
#: Bookkeeping charged per stored page on top of its data, so zero pages are not free.
PAGE_OVERHEAD = 128
#: A compressed page bigger than this is kept raw (zbud's largest zpage).
POOR_COMPRESSION_LIMIT = 4032
#: ``tmem_ensure_avail_pages`` gives up after this many fruitless evictions.
MAX_EVICTION_TRIES = 10

_PageKey = tuple["Pool", Oid, int]


@dataclass(eq=False)
class Pool:
    """A pool: private to one client's slot, or shared by every client that joined its uuid."""

    flags: PoolFlags
    uuid: PoolUuid
    shared: bool
    #: The client a private pool belongs to (-1 for a shared pool).
    owner: int = -1
    objects: dict[Oid, dict[int, bytes]] = field(default_factory=dict)
    pages: int = 0
    members: set[int] = field(default_factory=set)

    @property
    def persistent(self) -> bool:
        return self.flags.persistent

    @property
    def ephemeral(self) -> bool:
        return not self.flags.persistent


@dataclass
class ClientStats:
    puts: int = 0
    succ_puts: int = 0
    failed_puts: int = 0
    gets: int = 0
    found_gets: int = 0
    flushes: int = 0
    flobjs: int = 0
    evicted: int = 0
    compressed_pages: int = 0
    zero_pages: int = 0


@dataclass(eq=False)
class Client:
    """One guest domain's view of tmem."""

    domid: int
    pools: list[Pool | None] = field(default_factory=lambda: [None] * MAX_POOLS_PER_DOMAIN)
    weight: int = 0
    compress: bool = True
    frozen: bool = False
    auth: set[PoolUuid] = field(default_factory=set)
    eph_lru: OrderedDict[_PageKey, None] = field(default_factory=OrderedDict)
    eph_pages: int = 0
    pers_pages: int = 0
    stats: ClientStats = field(default_factory=ClientStats)


class HostStore:
    """Every client's pools and pages, with a host-wide capacity in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity must be > 0 bytes")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.clients: dict[int, Client] = {}
        self.shared_pools: dict[PoolUuid, Pool] = {}
        #: Xen's ``tmem_global.shared_auth``: when on, shared pools need an authorised uuid.
        self.shared_auth = True
        self.eph_lru: OrderedDict[_PageKey, None] = OrderedDict()
        self.evictions = 0
        #: Who owns each ephemeral page, for the per-client LRU (shared pages: the putter).
        self._eph_owner: dict[_PageKey, int] = {}

    # -- clients --------------------------------------------------------------------------------

    def client(self, domid: int) -> Client:
        """The client of ``domid``, created on first use (as Xen's first tmem op does)."""
        found = self.clients.get(domid)
        if found is None:
            found = self.clients[domid] = Client(domid)
        return found

    def destroy_client(self, domid: int) -> int:
        """Drop every pool of ``domid`` (the guest closed its device or died); pools dropped."""
        client = self.clients.pop(domid, None)
        if client is None:
            return 0
        dropped = 0
        for slot, pool in enumerate(client.pools):
            if pool is not None:
                self._leave(client, slot, pool)
                dropped += 1
        return dropped

    # -- the tmem ops ---------------------------------------------------------------------------

    def new_pool(self, domid: int, uuid: PoolUuid, flags_word: int) -> int:
        client = self.client(domid)
        flags = PoolFlags.decode(flags_word)
        if flags.refusal() is not None:
            return -errno.EPERM
        try:
            slot = client.pools.index(None)
        except ValueError:
            return -errno.EPERM
        shared = flags.shared
        if shared and (uuid == WILDCARD_UUID or (self.shared_auth and uuid not in client.auth)):
            shared = False
        if not shared:
            pool = Pool(flags._replace(shared=False), uuid, shared=False, owner=domid)
        else:
            found = self.shared_pools.get(uuid)
            if found is None:
                if len(self.shared_pools) >= MAX_GLOBAL_SHARED_POOLS:
                    return -errno.EPERM
                found = self.shared_pools[uuid] = Pool(flags, uuid, shared=True)
            pool = found
        pool.members.add(domid)
        client.pools[slot] = pool
        return slot

    def destroy_pool(self, domid: int, pool_id: int) -> int:
        client = self.client(domid)
        pool = self._pool(client, pool_id)
        if pool is None:
            return 0
        self._leave(client, pool_id, pool)
        return TMEM_DONE

    def put_page(
        self,
        domid: int,
        pool_id: int,
        oid: Oid,
        index: int,
        encoding: PageEncoding,
        untrusted_data: bytes,
    ) -> int:
        """PUT_PAGE of a page in its wire form (checked here: -EINVAL if it is not a page)."""
        client = self.client(domid)
        client.stats.puts += 1
        pool = self._pool(client, pool_id)
        if pool is None:
            client.stats.failed_puts += 1
            return -errno.ENODEV
        try:
            stored = self._stored_form(client, encoding, untrusted_data)
        except WireError:
            client.stats.failed_puts += 1
            return -errno.EINVAL
        obj = pool.objects.get(oid)
        old = obj.get(index) if obj is not None else None
        if old is None and client.frozen:
            client.stats.failed_puts += 1
            return -EFROZEN
        key = (pool, oid, index)
        delta = len(stored) - (len(old) if old is not None else -PAGE_OVERHEAD)
        if not self._make_room(client, delta, protect=key):
            client.stats.failed_puts += 1
            if old is not None:
                self._remove_page(pool, oid, index)
                return -errno.ENOSPC
            return -errno.ENOMEM
        if obj is None:
            obj = pool.objects[oid] = {}
        obj[index] = stored
        self.used_bytes += delta
        if old is None:
            pool.pages += 1
            self._count_page(pool, domid, +1)
        if pool.ephemeral:
            self._touch(key, domid if old is None else self._eph_owner.get(key, domid))
        client.stats.succ_puts += 1
        if not stored:
            client.stats.zero_pages += 1
        elif len(stored) < PAGE_SIZE:
            client.stats.compressed_pages += 1
        return TMEM_DONE

    def get_page(self, domid: int, pool_id: int, oid: Oid, index: int) -> tuple[int, bytes | None]:
        rc, encoding, data = self.get_page_form(domid, pool_id, oid, index)
        return rc, None if encoding is None else decode_page(encoding, data)

    def get_page_form(self, domid: int, pool_id: int, oid: Oid,
                      index: int) -> tuple[int, PageEncoding | None, bytes]:
        """GET_PAGE, with the page in the form it is kept in, which is a wire form too: the
        host answers a get without decompressing and compressing the page again."""
        client = self.client(domid)
        client.stats.gets += 1
        pool = self._pool(client, pool_id)
        if pool is None:
            return -errno.ENODEV, None, b""
        if not pool.pages:
            return -EEMPTY, None, b""
        obj = pool.objects.get(oid)
        stored = obj.get(index) if obj is not None else None
        if stored is None:
            return TMEM_NOT_FOUND, None, b""
        key = (pool, oid, index)
        if pool.ephemeral and not pool.shared:
            self._remove_page(pool, oid, index)
        elif pool.ephemeral:
            self.eph_lru.move_to_end(key)
            owner = self._eph_owner.get(key)
            if owner is not None and owner in self.clients:
                self.clients[owner].eph_lru.move_to_end(key)
        client.stats.found_gets += 1
        return TMEM_DONE, _stored_encoding(stored), stored

    def flush_page(self, domid: int, pool_id: int, oid: Oid, index: int) -> int:
        client = self.client(domid)
        client.stats.flushes += 1
        pool = self._pool(client, pool_id)
        if pool is None:
            return -errno.ENODEV
        flushed = self._remove_page(pool, oid, index)
        if client.frozen:
            return -EFROZEN
        return TMEM_DONE if flushed else TMEM_NOT_FOUND

    def flush_object(self, domid: int, pool_id: int, oid: Oid) -> int:
        client = self.client(domid)
        client.stats.flobjs += 1
        pool = self._pool(client, pool_id)
        if pool is None:
            return -errno.ENODEV
        obj = pool.objects.get(oid)
        indexes = list(obj) if obj is not None else []
        for index in indexes:
            self._remove_page(pool, oid, index)
        if client.frozen:
            return -EFROZEN
        return TMEM_DONE if indexes else TMEM_NOT_FOUND

    # -- control (xl tmem-*) --------------------------------------------------------------------

    def freeze(self, domid: int, frozen: bool = True) -> None:
        self.client(domid).frozen = frozen

    def set_weight(self, domid: int, weight: int) -> None:
        if not 0 <= weight <= 1_000_000:
            raise ValueError(f"weight {weight} outside 0..1000000")
        self.client(domid).weight = weight

    def set_compress(self, domid: int, compress: bool) -> None:
        """Affects pages put from now on (stored pages keep their form, as in Xen)."""
        self.client(domid).compress = compress

    def authorise(self, domid: int, uuid: PoolUuid, allow: bool) -> int:
        """``tmem-shared-auth``: 1 done, -ENOSPC when the client's list is full."""
        client = self.client(domid)
        if not allow:
            client.auth.discard(uuid)
            return TMEM_DONE
        if uuid not in client.auth and len(client.auth) >= MAX_AUTH_UUIDS:
            return -errno.ENOSPC
        client.auth.add(uuid)
        return TMEM_DONE

    def freeable_mb(self) -> int:
        """``tmem-freeable``: MiB the host could take back at once (the ephemeral pages)."""
        eph = sum(len(_stored(k)) + PAGE_OVERHEAD for k in self.eph_lru)
        return eph >> 20

    def describe(self, domid: int | None = None) -> dict[str, Any]:
        """What ``tmem-list -l`` shows, as a dict: the host, then each client and its pools."""
        clients = (
            [self.clients[domid]]
            if domid is not None and domid in self.clients
            else []
            if domid is not None
            else list(self.clients.values())
        )
        return {
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.used_bytes,
            "ephemeral_pages": len(self.eph_lru),
            "evictions": self.evictions,
            "shared_auth": self.shared_auth,
            "shared_pools": [
                {"uuid": str(u), "members": sorted(p.members), "pages": p.pages}
                for u, p in self.shared_pools.items()
            ],
            "freeable_mb": self.freeable_mb(),
            "clients": [self._describe_client(c) for c in sorted(clients, key=lambda c: c.domid)],
        }

    @staticmethod
    def _describe_client(client: Client) -> dict[str, Any]:
        pools = []
        for slot, pool in enumerate(client.pools):
            if pool is None:
                continue
            pools.append(
                {
                    "pool_id": slot,
                    "persistent": pool.persistent,
                    "shared": pool.shared,
                    "uuid": str(pool.uuid),
                    "pages": pool.pages,
                    "objects": len(pool.objects),
                }
            )
        return {
            "domid": client.domid,
            "weight": client.weight,
            "compress": client.compress,
            "frozen": client.frozen,
            "auth": sorted(str(u) for u in client.auth),
            "ephemeral_pages": client.eph_pages,
            "persistent_pages": client.pers_pages,
            "pools": pools,
            "stats": dict(client.stats.__dict__),
        }

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _pool(client: Client, pool_id: int) -> Pool | None:
        if not 0 <= pool_id < MAX_POOLS_PER_DOMAIN:
            return None
        return client.pools[pool_id]

    @staticmethod
    def _stored_form(client: Client, encoding: PageEncoding, untrusted_data: bytes) -> bytes:
        """Check the wire page, then keep it as this client's compression setting says."""
        page = decode_page(encoding, untrusted_data)
        if not client.compress:
            return page
        if encoding == PageEncoding.ZERO or page == ZERO_PAGE:
            return b""
        if encoding == PageEncoding.LZ4 and len(untrusted_data) <= POOR_COMPRESSION_LIMIT:
            return bytes(untrusted_data)
        packed = lz4.block.compress(page, store_size=False)
        return packed if len(packed) <= POOR_COMPRESSION_LIMIT else page

    def _count_page(self, pool: Pool, domid: int, delta: int) -> None:
        client = self.clients.get(domid)
        if client is None:
            return
        if pool.persistent:
            client.pers_pages += delta
        else:
            client.eph_pages += delta

    def _touch(self, key: _PageKey, owner: int) -> None:
        self.eph_lru[key] = None
        self.eph_lru.move_to_end(key)
        self._eph_owner[key] = owner
        client = self.clients.get(owner)
        if client is not None:
            client.eph_lru[key] = None
            client.eph_lru.move_to_end(key)

    def _remove_page(self, pool: Pool, oid: Oid, index: int) -> bool:
        obj = pool.objects.get(oid)
        if obj is None:
            return False
        stored = obj.pop(index, None)
        if stored is None:
            return False
        if not obj:
            del pool.objects[oid]
        pool.pages -= 1
        self.used_bytes -= len(stored) + PAGE_OVERHEAD
        key = (pool, oid, index)
        if pool.ephemeral:
            self.eph_lru.pop(key, None)
            owner = self._eph_owner.pop(key, None)
            owner_client = self.clients.get(owner) if owner is not None else None
            if owner_client is not None:
                owner_client.eph_lru.pop(key, None)
                owner_client.eph_pages -= 1
        else:  # persistent pools are never shared
            owner_client = self.clients.get(pool.owner)
            if owner_client is not None:
                owner_client.pers_pages -= 1
        return True

    def _over_quota(self, client: Client) -> bool:
        if client.weight <= 0 or not self.eph_lru:
            return False
        total_weight = sum(c.weight for c in self.clients.values())
        return client.eph_pages * total_weight > len(self.eph_lru) * client.weight

    def _make_room(self, client: Client, delta: int, *, protect: _PageKey) -> bool:
        """Evict ephemeral pages until ``delta`` more bytes fit; False if they cannot."""
        tries = 0
        while self.used_bytes + delta > self.capacity_bytes:
            lru = client.eph_lru if self._over_quota(client) and client.eph_lru else self.eph_lru
            victim = next((k for k in lru if k != protect), None)
            if victim is None and lru is not self.eph_lru:
                victim = next((k for k in self.eph_lru if k != protect), None)
            if victim is None:
                return False
            pool, oid, index = victim
            if self._remove_page(pool, oid, index):
                self.evictions += 1
                owner = self.clients.get(self._eph_owner.get(victim, -1))
                if owner is not None:
                    owner.stats.evicted += 1
            else:  # pragma: no cover - the LRU always names live pages
                tries += 1
                if tries >= MAX_EVICTION_TRIES:
                    return False
        return True

    def _leave(self, client: Client, slot: int, pool: Pool) -> None:
        """``client`` lets go of ``pool`` (its slot frees); the pool goes with its last member."""
        client.pools[slot] = None
        if client.domid in pool.members and client.pools.count(pool) == 0:
            pool.members.discard(client.domid)
        if pool.shared and pool.members:
            return
        for oid in list(pool.objects):
            for index in list(pool.objects.get(oid, {})):
                self._remove_page(pool, oid, index)
        if pool.shared:
            self.shared_pools.pop(pool.uuid, None)


def _stored_encoding(stored: bytes) -> PageEncoding:
    """What a stored form is: empty = zero page, 4096 bytes = raw, else an lz4 block (checked
    when it was put)."""
    if not stored:
        return PageEncoding.ZERO
    return PageEncoding.RAW if len(stored) == PAGE_SIZE else PageEncoding.LZ4


def _stored(key: _PageKey) -> bytes:
    pool, oid, index = key
    return pool.objects[oid][index]
