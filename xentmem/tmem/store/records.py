"""The store's records: a pool, a client (one guest domain, or zcache's one user), counters.

Plain slotted classes, mutated only by :class:`~xentmem.tmem.store.core.TmemStore` under its
lock; what they mean is in ``docs/tmem-semantics.md``, "The store".
"""

from __future__ import annotations

from collections import OrderedDict

from xentmem.tmem.abi import Oid, PoolUuid, pool_kind
from xentmem.tmem.store.pages import PageKey


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

    __slots__ = ("auth", "cap", "cid", "compress", "counters", "eph_bytes", "eph_pages",
                 "eph_zbytes", "frozen", "lru", "pers_bytes", "pers_pages", "pers_zbytes",
                 "slots", "weight", "zero_pages")

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
        #: Bytes charged against the capacity (data + bookkeeping) and pages, per kind.
        self.eph_bytes = self.pers_bytes = 0
        self.eph_pages = self.pers_pages = 0
        #: Stored data bytes per kind, and zero pages held.
        self.eph_zbytes = self.pers_zbytes = 0
        self.zero_pages = 0
        self.counters = ClientCounters()

    @property
    def charged(self) -> int:
        return self.eph_bytes + self.pers_bytes

    def pool(self, pool_id: int) -> Pool | None:
        """The pool in slot ``pool_id``, None for an empty or impossible slot."""
        if 0 <= pool_id < len(self.slots):
            return self.slots[pool_id]
        return None


__all__ = ["Client", "ClientCounters", "Pool"]
