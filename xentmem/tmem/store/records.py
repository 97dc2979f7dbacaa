"""The store's records: a pool, a client (one guest domain, or zcache's one user), counters.

Plain slotted classes, mutated only by :class:`~xentmem.tmem.store.core.TmemStore` under its
lock; what they mean is in ``docs/tmem-semantics.md``, "The store".
"""

from __future__ import annotations

from collections import OrderedDict

from xentmem.tmem.abi import Oid, PoolUuid, pool_kind
from xentmem.tmem.store.pages import PageKey

#: Bytes charged per stored page on top of its data, by pool kind: its key (a 5-tuple), its
#: entries in the index, the storage and (ephemeral) the LRU with its stamp, the ``bytes``
#: header.  Measured with tracemalloc on CPython 3.11 (docs/zcache.md, "Capacity": 298-401
#: and 138-255 bytes per page, by how full the dicts are), the worst case rounded up.  Exact
#: accounting of the process's memory comes with a page arena.
EPHEMERAL_PAGE_OVERHEAD = 408
PERSISTENT_PAGE_OVERHEAD = 264
#: Bytes charged per object on top of its pages: its oid (three words, each up to 64 bits),
#: its page dict and its entry in the pool's, measured as above with one page an object
#: (370-404 bytes); a guest could else hold twice what it is charged, one page an object.
#: Charged to the store (what its capacity bounds), not to a client's cap.
OBJECT_OVERHEAD = 448


class Pool:
    """One pool: private to a client, or shared by every client that joined its uuid."""

    __slots__ = ("exclusive", "flags", "gid", "members", "objects", "owner", "owners", "pages",
                 "persistent", "shared", "uuid", "zbytes")

    def __init__(self, gid: int, flags: int, uuid: PoolUuid, *, persistent: bool,
                 shared: bool, owner: int) -> None:
        #: The store-wide id, the first word of every page key of this pool.
        self.gid = gid
        #: The flag word as the pool was made (the shared bit cleared for a private one).
        self.flags = flags
        self.uuid = uuid
        self.persistent = persistent
        self.shared = shared
        #: Private ephemeral: a get takes the page away.
        self.exclusive = not persistent and not shared
        #: oid -> {index: stored size}; an object with no page left is removed.
        self.objects: dict[Oid, dict[int, int]] = {}
        self.pages = 0
        #: Stored bytes of every page (data only, no bookkeeping).
        self.zbytes = 0
        #: client id -> how many of its slots name this pool, in the order they joined.
        self.members: dict[int, int] = {}
        #: A private pool's client, charged for all its pages (-1 for a shared pool).
        self.owner = -1 if shared else owner
        #: Shared pools only: page key -> the client charged for it (who put it last).
        self.owners: dict[PageKey, int] = {}

    @property
    def kind(self) -> str:
        return pool_kind(self.flags)

    def first_member(self) -> int:
        return next(iter(self.members))


class ClientCounters:
    """What a client did, counted since it was made (Xen's per-client and zcache2's names)."""

    __slots__ = (
        "compress_poor",
        "compressed_pages",
        "eph_ate_tail",
        "eph_ate_tail_failed",
        "evicted",
        "failed_eph_puts",
        "failed_pers_puts",
        "failed_puts",
        "flobjs",
        "flobjs_found",
        "flushes",
        "flushes_found",
        "found_gets",
        "gets",
        "lost_pages",
        "pers_ate_eph",
        "pers_ate_eph_failed",
        "put_to_flush",
        "puts",
        "succ_puts",
        "zero_puts",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Client:
    """One client: its pool slots, its settings (``xl tmem-set``), its pages and counters."""

    __slots__ = ("auth", "cap", "cid", "compress", "counters", "eph_pages", "eph_zbytes",
                 "frozen", "lru", "pers_pages", "pers_zbytes", "slots", "weight", "zero_pages")

    def __init__(self, cid: int, max_pools: int) -> None:
        self.cid = cid
        #: Pool id -> pool; the id a NEW_POOL answers is the lowest free slot.
        self.slots: list[Pool | None] = [None] * max_pools
        #: Eviction weight (0: never over quota) and cap in bytes (0: none).
        self.weight = 0
        self.cap = 0
        #: Kept for the host's packing (``xl tmem-set -p``); the store keeps what it is given.
        self.compress = True
        self.frozen = False
        #: Uuids of shared pools this client may join while the store's shared_auth is on.
        self.auth: set[PoolUuid] = set()
        #: This client's ephemeral pages, oldest first: page key -> put or touch stamp.
        self.lru: OrderedDict[PageKey, int] = OrderedDict()
        #: Pages and their stored data bytes, per kind, and zero pages held.  What they are
        #: charged is derived (one number less to keep on every op).
        self.eph_pages = self.pers_pages = 0
        self.eph_zbytes = self.pers_zbytes = 0
        self.zero_pages = 0
        self.counters = ClientCounters()

    @property
    def eph_bytes(self) -> int:
        """Bytes the ephemeral pages are charged (data and bookkeeping)."""
        return self.eph_zbytes + self.eph_pages * EPHEMERAL_PAGE_OVERHEAD

    @property
    def pers_bytes(self) -> int:
        return self.pers_zbytes + self.pers_pages * PERSISTENT_PAGE_OVERHEAD

    @property
    def charged(self) -> int:
        """Bytes charged to this client, what its cap bounds."""
        return self.eph_bytes + self.pers_bytes

    def pool(self, pool_id: int) -> Pool | None:
        """The pool in slot ``pool_id``, None for an empty or impossible slot."""
        if 0 <= pool_id < len(self.slots):
            return self.slots[pool_id]
        return None


__all__ = [
    "EPHEMERAL_PAGE_OVERHEAD",
    "OBJECT_OVERHEAD",
    "PERSISTENT_PAGE_OVERHEAD",
    "Client",
    "ClientCounters",
    "Pool",
]
