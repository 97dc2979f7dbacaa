"""Random op sequences against the tmem store and a plain reference model (hypothesis).

The model keeps the same rules in the plainest form: one list of every page, in put (or
shared-get) order, and sums over it for every figure.  After every op the store must answer
exactly what the model answers (return codes and page bytes), so eviction order, fairness by
weight, caps, duplicate puts, exclusive gets, shared pools and their authorisation, freeze,
and "persistent pages are never pushed out" are all held to one reading of
docs/tmem-semantics.md, "The store"; the invariants compare the store's accounting with the
model's.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from xentmem.tmem.abi import (
    EEMPTY,
    EFROZEN,
    PAGE_SIZE,
    POOL_PRIVATE_EPHEMERAL,
    POOL_PRIVATE_PERSISTENT,
    POOL_SHARED_EPHEMERAL,
    PRIVATE_UUID,
    WILDCARD_UUID,
    Oid,
    PoolUuid,
)
from xentmem.tmem.store import (
    EPHEMERAL_PAGE_OVERHEAD,
    OBJECT_OVERHEAD,
    PERSISTENT_PAGE_OVERHEAD,
    TmemStore,
    pack_page,
)

CLIENTS = (1, 2, 3)
SLOTS = 4
UUIDS = (PoolUuid(1, 1), PoolUuid(2, 2), WILDCARD_UUID)
KINDS = {"private": POOL_PRIVATE_EPHEMERAL, "persistent": POOL_PRIVATE_PERSISTENT,
         "shared": POOL_SHARED_EPHEMERAL}
FORMS = [b"", pack_page((b"tmem %d " * 500)[:PAGE_SIZE]),
         *(random.Random(seed).randbytes(PAGE_SIZE) for seed in range(2))]
RAW_EPH = PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD


@dataclass(eq=False)
class MPool:
    persistent: bool
    shared: bool
    uuid: PoolUuid
    owner: int
    members: dict[int, int] = field(default_factory=dict)


@dataclass(eq=False)
class MPage:
    pool: MPool
    oid: int
    index: int
    data: bytes
    owner: int

    @property
    def cost(self) -> int:
        overhead = PERSISTENT_PAGE_OVERHEAD if self.pool.persistent else EPHEMERAL_PAGE_OVERHEAD
        return len(self.data) + overhead


@dataclass
class MClient:
    slots: list[MPool | None] = field(default_factory=lambda: [None] * SLOTS)
    weight: int = 0
    cap: int = 0
    frozen: bool = False
    auth: set[PoolUuid] = field(default_factory=set)


class Model:
    """The store's rules, plainly: a list of pages, oldest (ephemeral) first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.clients: dict[int, MClient] = {}
        self.shared: dict[PoolUuid, MPool] = {}
        self.pages: list[MPage] = []
        self.shared_auth = True
        self.evictions = 0

    def client(self, cid: int) -> MClient:
        return self.clients.setdefault(cid, MClient())

    def find(self, pool: MPool, oid: int, index: int) -> MPage | None:
        return next((p for p in self.pages
                     if p.pool is pool and p.oid == oid and p.index == index), None)

    def charged(self, cid: int) -> int:
        return sum(p.cost for p in self.pages if p.owner == cid)

    def eph_bytes(self, cid: int | None = None) -> int:
        return sum(p.cost for p in self.pages
                   if not p.pool.persistent and cid in (None, p.owner))

    def used(self) -> int:
        objects = {(id(p.pool), p.oid) for p in self.pages}
        return sum(p.cost for p in self.pages) + len(objects) * OBJECT_OVERHEAD

    def holds_object(self, pool: MPool, oid: int) -> bool:
        return any(p.pool is pool and p.oid == oid for p in self.pages)

    def oldest(self, cid: int | None = None) -> MPage | None:
        return next((p for p in self.pages
                     if not p.pool.persistent and cid in (None, p.owner)), None)

    def evict(self, page: MPage) -> None:
        self.pages.remove(page)
        self.evictions += 1

    def victim(self, putter: int | None) -> MPage | None:
        total = sum(c.weight for c in self.clients.values())
        eph = self.eph_bytes()

        def over(cid: int) -> bool:
            weight = self.clients[cid].weight
            return weight > 0 and self.eph_bytes(cid) * total > eph * weight

        if total:
            if putter is not None and self.oldest(putter) and over(putter):
                return self.oldest(putter)
            worst = None
            for cid, client in self.clients.items():
                if self.oldest(cid) and over(cid) and (worst is None or self.eph_bytes(cid)
                        * self.clients[worst].weight > self.eph_bytes(worst) * client.weight):
                    worst = cid
            if worst is not None:
                return self.oldest(worst)
        return self.oldest()

    # -- ops --------------------------------------------------------------------------------

    def new_pool(self, cid: int, uuid: PoolUuid, kind: str) -> int:
        client = self.client(cid)
        if None not in client.slots:
            return -errno.EPERM
        slot = client.slots.index(None)
        shared = kind == "shared" and uuid != WILDCARD_UUID and (
            not self.shared_auth or uuid in client.auth)
        pool = self.shared.get(uuid) if shared else None
        if pool is None:
            pool = MPool(kind == "persistent", shared, uuid if kind == "shared" else PRIVATE_UUID,
                         cid)
            if shared:
                self.shared[uuid] = pool
        pool.members[cid] = pool.members.get(cid, 0) + 1
        client.slots[slot] = pool
        return slot

    def destroy_pool(self, cid: int, slot: int) -> int:
        client = self.client(cid)
        pool = client.slots[slot]
        if pool is None:
            return 0
        self.leave(cid, slot, pool)
        return 1

    def leave(self, cid: int, slot: int, pool: MPool) -> None:
        self.clients[cid].slots[slot] = None
        pool.members[cid] -= 1
        if pool.members[cid]:
            return
        del pool.members[cid]
        if pool.members:
            heir = next(iter(pool.members))
            for page in self.pages:
                if page.pool is pool and page.owner == cid:
                    page.owner = heir
            self.set_cap(heir, self.clients[heir].cap)  # the heir's cap holds too
            return
        self.pages = [p for p in self.pages if p.pool is not pool]
        if pool.shared:
            del self.shared[pool.uuid]

    def destroy_client(self, cid: int) -> int:
        client = self.clients.pop(cid, None)
        if client is None:
            return 0
        self.clients[cid] = client  # leave() reads it
        dropped = 0
        for slot, pool in enumerate(client.slots):
            if pool is not None:
                self.leave(cid, slot, pool)
                dropped += 1
        del self.clients[cid]
        return dropped

    def put(self, cid: int, slot: int, oid: int, index: int, data: bytes) -> int:
        client = self.client(cid)
        pool = client.slots[slot]
        if pool is None:
            return -errno.ENODEV
        old = self.find(pool, oid, index)
        if old is not None:
            self.pages.remove(old)
        elif client.frozen:
            return -EFROZEN
        page = MPage(pool, oid, index, data, cid)
        grows = 0 if self.holds_object(pool, oid) else OBJECT_OVERHEAD  # an object costs too
        while client.cap and self.charged(cid) + page.cost > client.cap:
            mine = self.oldest(cid)
            if mine is None:
                return -errno.ENOSPC if old else -errno.ENOMEM
            self.evict(mine)
        while self.used() + page.cost + grows > self.capacity:
            loser = self.victim(cid)
            if loser is None:
                return -errno.ENOSPC if old else -errno.ENOMEM
            self.evict(loser)
        if not grows and not self.holds_object(pool, oid):  # evicted with its other pages
            while self.used() + page.cost + OBJECT_OVERHEAD > self.capacity:
                loser = self.victim(cid)
                if loser is None:
                    return -errno.ENOSPC if old else -errno.ENOMEM
                self.evict(loser)
        self.pages.append(page)
        return 1

    def get(self, cid: int, slot: int, oid: int, index: int) -> tuple[int, bytes | None]:
        pool = self.client(cid).slots[slot]
        if pool is None:
            return -errno.ENODEV, None
        if not any(p.pool is pool for p in self.pages):
            return -EEMPTY, None
        page = self.find(pool, oid, index)
        if page is None:
            return 0, None
        if not pool.persistent:
            self.pages.remove(page)
            if pool.shared:  # most recently used
                self.pages.append(page)
        return 1, page.data

    def flush(self, cid: int, slot: int, oid: int, index: int | None) -> int:
        client = self.client(cid)
        pool = client.slots[slot]
        if pool is None:
            return -errno.ENODEV
        gone = [p for p in self.pages if p.pool is pool and p.oid == oid
                and index in (None, p.index)]
        self.pages = [p for p in self.pages if p not in gone]
        if client.frozen:
            return -EFROZEN
        return 1 if gone else 0

    def evict_until(self, enough: Callable[[], bool]) -> int:
        evicted = 0
        while not enough():
            loser = self.victim(None)
            if loser is None:
                break
            self.evict(loser)
            evicted += 1
        return evicted

    def set_capacity(self, capacity: int) -> int:
        self.capacity = capacity
        return self.evict_until(lambda: self.used() <= capacity)

    def flush_ephemeral(self, nbytes: int) -> int:
        before = self.used()
        self.evict_until(lambda: before - self.used() >= nbytes)
        return before - self.used()

    def set_cap(self, cid: int, cap: int) -> int:
        self.client(cid).cap = cap
        evicted = 0
        while cap and self.charged(cid) > cap and self.oldest(cid):
            self.evict(self.oldest(cid))  # type: ignore[arg-type]
            evicted += 1
        return evicted


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        capacity = 7 * RAW_EPH
        self.store = TmemStore(capacity, max_pools=SLOTS)
        self.model = Model(capacity)
        for cid in CLIENTS:  # slot 0 private, 1 persistent, 2 shared (UUIDS[0], authorised)
            self.authorise(cid, UUIDS[0], True)
            for kind in ("private", "persistent", "shared"):
                self.new_pool(cid, UUIDS[0], kind)

    @rule(cid=st.sampled_from(CLIENTS), uuid=st.sampled_from(UUIDS),
          kind=st.sampled_from(sorted(KINDS)))
    def new_pool(self, cid: int, uuid: PoolUuid, kind: str) -> None:
        store_uuid = uuid if kind == "shared" else PRIVATE_UUID
        assert self.store.new_pool(cid, store_uuid, KINDS[kind]) == \
            self.model.new_pool(cid, uuid, kind)

    @rule(cid=st.sampled_from(CLIENTS), slot=st.integers(0, SLOTS - 1))
    def destroy_pool(self, cid: int, slot: int) -> None:
        assert self.store.destroy_pool(cid, slot) == self.model.destroy_pool(cid, slot)

    @rule(cid=st.sampled_from(CLIENTS))
    def destroy_client(self, cid: int) -> None:
        assert self.store.destroy_client(cid) == self.model.destroy_client(cid)

    @rule(cid=st.sampled_from(CLIENTS), slot=st.integers(0, SLOTS - 1), oid=st.integers(0, 2),
          index=st.integers(0, 7), data=st.sampled_from(FORMS))
    def put(self, cid: int, slot: int, oid: int, index: int, data: bytes) -> None:
        assert self.store.put_page(cid, slot, Oid(oid), index, data) == \
            self.model.put(cid, slot, oid, index, data)

    @rule(cid=st.sampled_from(CLIENTS), slot=st.integers(0, 2), oid=st.integers(0, 2),
          start=st.integers(0, 4))
    def fill(self, cid: int, slot: int, oid: int, start: int) -> None:
        """Raw pages into one of the set-up pools, so that capacity and caps come into play."""
        for index in range(start, start + 4):
            self.put(cid, slot, oid, index, FORMS[2 + index % 2])

    @rule(cid=st.sampled_from(CLIENTS), slot=st.integers(0, SLOTS - 1), oid=st.integers(0, 2),
          index=st.integers(0, 7))
    def get(self, cid: int, slot: int, oid: int, index: int) -> None:
        assert self.store.get_page(cid, slot, Oid(oid), index) == \
            self.model.get(cid, slot, oid, index)

    @rule(cid=st.sampled_from(CLIENTS), slot=st.integers(0, SLOTS - 1), oid=st.integers(0, 2),
          index=st.none() | st.integers(0, 7))
    def flush(self, cid: int, slot: int, oid: int, index: int | None) -> None:
        if index is None:
            got = self.store.flush_object(cid, slot, Oid(oid))
        else:
            got = self.store.flush_page(cid, slot, Oid(oid), index)
        assert got == self.model.flush(cid, slot, oid, index)

    @rule(cid=st.sampled_from(CLIENTS), weight=st.integers(0, 3))
    def set_weight(self, cid: int, weight: int) -> None:
        self.store.set_weight(cid, weight)
        self.model.client(cid).weight = weight

    @rule(cid=st.sampled_from(CLIENTS), pages=st.integers(0, 4))
    def set_cap(self, cid: int, pages: int) -> None:
        assert self.store.set_cap(cid, pages * RAW_EPH) == self.model.set_cap(cid, pages * RAW_EPH)

    @rule(pages=st.integers(3, 9))
    def set_capacity(self, pages: int) -> None:
        assert self.store.set_capacity(pages * RAW_EPH) == self.model.set_capacity(pages * RAW_EPH)

    @rule(nbytes=st.integers(0, 3 * RAW_EPH))
    def flush_ephemeral(self, nbytes: int) -> None:
        assert self.store.flush_ephemeral(nbytes) == self.model.flush_ephemeral(nbytes)

    @rule(cid=st.sampled_from(CLIENTS), frozen=st.booleans())
    def freeze(self, cid: int, frozen: bool) -> None:
        self.store.freeze(cid, frozen)
        self.model.client(cid).frozen = frozen

    @rule(cid=st.sampled_from(CLIENTS), uuid=st.sampled_from(UUIDS[:2]), allow=st.booleans())
    def authorise(self, cid: int, uuid: PoolUuid, allow: bool) -> None:
        assert self.store.authorise(cid, uuid, allow) == 1
        (self.model.client(cid).auth.add if allow else self.model.client(cid).auth.discard)(uuid)

    @rule(on=st.booleans())
    def shared_auth(self, on: bool) -> None:
        self.store.shared_auth = self.model.shared_auth = on

    @invariant()
    def accounting_matches_the_model(self) -> None:
        store, model = self.store, self.model
        assert store.used_bytes == model.used()
        assert store.used_bytes <= store.capacity_bytes or store.eph_bytes == 0
        assert store.eph_bytes == model.eph_bytes()
        assert store.evictions == model.evictions
        assert sorted(store.clients) == sorted(model.clients)
        for cid, client in store.clients.items():
            mine = [p for p in model.pages if p.owner == cid]
            assert client.charged == sum(p.cost for p in mine)
            assert client.eph_pages == sum(not p.pool.persistent for p in mine)
            assert client.pers_pages == sum(p.pool.persistent for p in mine)
            assert client.zero_pages == sum(not p.data for p in mine)
            cap = model.clients[cid].cap
            assert not cap or client.charged <= cap or client.eph_pages == 0
        assert len(list(store.pages.keys())) == len(model.pages)
        assert sum(len(obj) for pool in store._by_gid.values()
                   for obj in pool.objects.values()) == len(model.pages)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
