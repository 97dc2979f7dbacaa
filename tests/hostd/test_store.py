"""The host's adapter of the tmem store: wire forms, per-client compression, the listing, and
the hypervisor's rules seen through it (docs/tmem-semantics.md, "The store")."""

from __future__ import annotations

import errno
import os

import pytest

from xentmem.hostd.store import HostStore
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
    pool_flags,
)
from xentmem.tmem.store import EPHEMERAL_PAGE_OVERHEAD, OBJECT_OVERHEAD, PERSISTENT_PAGE_OVERHEAD
from xentmem.xenbus.body import PageEncoding, encode_page

TEXT = (b"void *tmem_get(struct tmem_pool *pool, struct oid *oid, u32 index);\n" * 70)[:4096]
RAND = os.urandom(PAGE_SIZE)
UUID = PoolUuid.from_uuid("a1b2c3d4-0000-1111-2222-333344445555")


def put(store: HostStore, domid: int, pool: int, oid: int, index: int, page: bytes) -> int:
    encoding, data = encode_page(page)
    return store.put_page(domid, pool, Oid(oid), index, encoding, data)


@pytest.fixture
def store() -> HostStore:
    return HostStore(64 << 20)


def test_pool_ids_are_the_lowest_free_slot_up_to_sixteen(store: HostStore) -> None:
    ids = [store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL) for _ in range(17)]
    assert ids == [*range(16), -errno.EPERM]
    assert store.destroy_pool(5, 3) == 1
    assert store.destroy_pool(5, 3) == 0  # an empty slot
    assert store.destroy_pool(5, 99) == 0  # a bad slot
    assert store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == 3
    assert store.new_pool(6, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT) == 0  # per domain


@pytest.mark.parametrize("flags", [
    0x00000000,  # spec version 0
    pool_flags(persistent=True, shared=True),  # shared and persistent
    pool_flags(persistent=False, page_size=8192),
    POOL_PRIVATE_EPHEMERAL | 4,  # precompressed
    POOL_PRIVATE_EPHEMERAL | 0x100,  # a reserved bit
])
def test_new_pool_refuses_what_the_hypervisor_refuses(store: HostStore, flags: int) -> None:
    assert store.new_pool(5, PRIVATE_UUID, flags) == -errno.EPERM
    assert store.describe(5)["clients"][0]["pools"] == []


def shared(store: HostStore, domid: int, pool_id: int) -> bool:
    (client,) = store.describe(domid)["clients"]
    return next(p["shared"] for p in client["pools"] if p["pool_id"] == pool_id)


def test_shared_pools_need_authorisation_else_they_are_silently_private(store: HostStore) -> None:
    a = store.new_pool(5, UUID, POOL_SHARED_EPHEMERAL)
    assert shared(store, 5, a) is False
    assert store.new_pool(5, WILDCARD_UUID, POOL_SHARED_EPHEMERAL) == 1
    assert shared(store, 5, 1) is False  # (-1, -1) is always private
    assert store.authorise(5, UUID, True) == 1 and store.authorise(6, UUID, True) == 1
    s5 = store.new_pool(5, UUID, POOL_SHARED_EPHEMERAL)
    s6 = store.new_pool(6, UUID, POOL_SHARED_EPHEMERAL)
    assert shared(store, 5, s5) and shared(store, 6, s6)
    assert store.describe()["shared_pools"] == [{"uuid": str(UUID), "members": [5, 6],
                                                 "pages": 0}]
    assert put(store, 5, s5, 1, 0, TEXT) == 1
    assert store.get_page(6, s6, Oid(1), 0) == (1, TEXT)  # shared gets are not exclusive
    assert store.get_page(5, s5, Oid(1), 0) == (1, TEXT)
    assert store.destroy_pool(5, s5) == 1
    assert store.get_page(6, s6, Oid(1), 0) == (1, TEXT)  # the pool stays for the other member
    assert store.destroy_pool(6, s6) == 1
    assert store.describe()["shared_pools"] == []
    store.shared_auth = False  # xl tmem-shared-auth -a -A 0: anyone may share
    t = store.new_pool(7, UUID, POOL_SHARED_EPHEMERAL)
    assert shared(store, 7, t) is True


def test_auth_lists_hold_sixteen_uuids(store: HostStore) -> None:
    for i in range(16):
        assert store.authorise(5, PoolUuid(i, 1), True) == 1
    assert store.authorise(5, PoolUuid(99, 1), True) == -errno.ENOSPC
    assert store.authorise(5, PoolUuid(0, 1), False) == 1
    assert store.authorise(5, PoolUuid(99, 1), True) == 1


def test_private_ephemeral_gets_are_exclusive_persistent_ones_are_not(store: HostStore) -> None:
    eph = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    pers = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert store.get_page(5, eph, Oid(1), 0) == (-EEMPTY, None)
    for pool in (eph, pers):
        assert put(store, 5, pool, 1, 0, TEXT) == 1
        assert put(store, 5, pool, 1, 1, RAND) == 1
    assert store.get_page(5, eph, Oid(1), 0) == (1, TEXT)
    assert store.get_page(5, eph, Oid(1), 0) == (0, None)
    assert store.get_page(5, pers, Oid(1), 0) == (1, TEXT)
    assert store.get_page(5, pers, Oid(1), 0) == (1, TEXT)
    assert store.get_page(5, pers, Oid(2), 0) == (0, None)
    assert store.flush_page(5, pers, Oid(1), 0) == 1
    assert store.flush_page(5, pers, Oid(1), 0) == 0
    assert store.flush_object(5, pers, Oid(1)) == 1
    assert store.flush_object(5, pers, Oid(1)) == 0
    assert store.get_page(5, pers, Oid(1), 1) == (-EEMPTY, None)
    assert store.put_page(5, 9, Oid(1), 0, PageEncoding.ZERO, b"") == -errno.ENODEV
    assert store.get_page(5, 9, Oid(1), 0) == (-errno.ENODEV, None)
    assert store.flush_page(5, 9, Oid(1), 0) == -errno.ENODEV


def test_a_page_that_is_not_a_page_is_refused(store: HostStore) -> None:
    pool = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert store.put_page(5, pool, Oid(1), 0, PageEncoding.RAW, b"short") == -errno.EINVAL
    assert store.put_page(5, pool, Oid(1), 0, PageEncoding.LZ4, b"\xff" * 9) == -errno.EINVAL
    assert store.used_bytes == 0


def test_a_page_that_is_not_a_page_drops_the_older_copy() -> None:
    """Regression: the host kept the old copy when a put over it was malformed, so a guest
    whose put failed (cleancache never looks) could later get the stale page back.  Xen's
    ``do_tmem_dup_put`` drops the old copy on any failure, as zcache did."""
    store = HostStore(64 << 20)
    pool = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert put(store, 5, pool, 1, 0, TEXT) == 1
    assert store.put_page(5, pool, Oid(1), 0, PageEncoding.RAW, b"short") == -errno.EINVAL
    assert store.get_page(5, pool, Oid(1), 0) == (-EEMPTY, None)
    assert store.used_bytes == 0
    (client,) = store.describe(5)["clients"]
    assert (client["stats"]["puts"], client["stats"]["failed_puts"]) == (2, 1)


def test_capacity_evicts_ephemeral_pages_never_persistent_ones() -> None:
    pers_cost = PAGE_SIZE + PERSISTENT_PAGE_OVERHEAD
    eph_cost = PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD
    store = HostStore(2 * pers_cost + 2 * eph_cost + 2 * OBJECT_OVERHEAD)  # an object a pool
    pers = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    eph = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    assert put(store, 5, pers, 1, 0, RAND) == 1
    assert put(store, 5, pers, 1, 1, RAND) == 1
    assert put(store, 5, eph, 2, 0, RAND) == 1
    assert put(store, 5, eph, 2, 1, RAND) == 1
    assert store.used_bytes == 2 * pers_cost + 2 * eph_cost + 2 * OBJECT_OVERHEAD
    assert put(store, 5, eph, 2, 2, RAND) == 1  # the oldest ephemeral page goes
    assert store.describe()["evictions"] == 1
    assert store.get_page(5, eph, Oid(2), 0) == (0, None)
    assert put(store, 5, pers, 1, 2, RAND) == 1  # a persistent put evicts ephemeral ones
    assert put(store, 5, pers, 1, 3, RAND) == 1
    (client,) = store.describe(5)["clients"]
    assert (client["ephemeral_pages"], client["persistent_pages"]) == (0, 4)
    assert put(store, 5, pers, 1, 4, RAND) == -errno.ENOMEM  # nothing left to evict
    assert put(store, 5, eph, 2, 5, RAND) == -errno.ENOMEM
    assert store.get_page(5, pers, Oid(1), 0) == (1, RAND)  # persistent pages stay


def test_a_failed_duplicate_put_drops_the_old_copy() -> None:
    text_cost = len(encode_page(TEXT)[1]) + PERSISTENT_PAGE_OVERHEAD
    store = HostStore(PAGE_SIZE + PERSISTENT_PAGE_OVERHEAD + text_cost + OBJECT_OVERHEAD + 100)
    pers = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert put(store, 5, pers, 1, 0, TEXT) == 1
    assert put(store, 5, pers, 1, 1, RAND) == 1
    assert put(store, 5, pers, 1, 0, RAND) == -errno.ENOSPC  # bigger than the room left
    assert store.get_page(5, pers, Oid(1), 0) == (0, None)
    assert put(store, 5, pers, 1, 1, TEXT) == 1  # a dup that fits replaces


def eph_pages(store: HostStore, domid: int) -> int:
    return int(store.describe(domid)["clients"][0]["ephemeral_pages"])


def test_weights_decide_whose_ephemeral_pages_go() -> None:
    cost = PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD
    store = HostStore(8 * cost + 2 * OBJECT_OVERHEAD)
    a = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    b = store.new_pool(6, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    store.set_weight(5, 1)
    store.set_weight(6, 3)
    for i in range(4):
        assert put(store, 6, b, 1, i, RAND) == 1  # guest 6 fills first (oldest pages)
    for i in range(4):
        assert put(store, 5, a, 1, i, RAND) == 1
    # Guest 5 holds 4/8 of the pages with 1/4 of the weight: over quota, it evicts its own.
    assert put(store, 5, a, 1, 9, RAND) == 1
    assert (eph_pages(store, 5), eph_pages(store, 6)) == (4, 4)
    assert store.get_page(5, a, Oid(1), 0) == (0, None)
    # Guest 6 is within its share: guest 5, over its own, pays, though 6 holds the oldest page.
    assert put(store, 6, b, 1, 9, RAND) == 1
    assert (eph_pages(store, 5), eph_pages(store, 6)) == (3, 5)
    assert store.get_page(5, a, Oid(1), 1) == (0, None)
    store.set_weight(6, 0)  # weight 0: never over quota (Xen's default); 5 holds all the weight
    assert put(store, 5, a, 1, 10, RAND) == 1  # nobody is over quota: the host's oldest goes
    assert (eph_pages(store, 5), eph_pages(store, 6)) == (4, 4)
    assert store.get_page(6, b, Oid(1), 0) == (0, None)


def test_an_under_quota_guest_no_longer_evicts_its_own_pages_for_an_over_quota_one() -> None:
    """Regression: a guest within its weight's share that put into a full host lost the host's
    oldest page, its own here, while another guest sat over its quota (Xen's tmem_evict looks
    at the putter only).  Eviction is now fair by weight: the most-over-quota guest pays."""
    cost = PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD
    store = HostStore(4 * cost + 2 * OBJECT_OVERHEAD)
    a = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    b = store.new_pool(6, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    store.set_weight(5, 1)
    store.set_weight(6, 1)
    assert put(store, 6, b, 1, 0, RAND) == 1
    for i in range(3):
        assert put(store, 5, a, 1, i, RAND) == 1
    assert put(store, 6, b, 1, 1, RAND) == 1  # 6 holds 1/4 of a half share; 5 holds 3/4
    assert store.get_page(6, b, Oid(1), 0) == (1, RAND)
    assert (eph_pages(store, 5), eph_pages(store, 6)) == (2, 1)


def test_a_cap_bounds_what_a_guest_holds_and_never_costs_another_guest() -> None:
    cost = PAGE_SIZE + PERSISTENT_PAGE_OVERHEAD
    store = HostStore(64 << 20)
    pers = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    eph = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    other = store.new_pool(6, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert put(store, 6, other, 1, 0, RAND) == 1
    store.set_cap(5, 3 * cost)
    assert put(store, 5, eph, 1, 0, RAND) == 1
    assert put(store, 5, pers, 1, 0, RAND) == 1
    assert put(store, 5, pers, 1, 1, RAND) == 1
    assert put(store, 5, pers, 1, 2, RAND) == 1  # its own ephemeral page made room
    assert store.get_page(5, eph, Oid(1), 0) == (-EEMPTY, None)
    assert put(store, 5, pers, 1, 3, RAND) == -errno.ENOMEM  # its persistent pages stay
    assert store.get_page(6, other, Oid(1), 0) == (1, RAND)
    assert store.describe(5)["clients"][0]["cap_bytes"] == 3 * cost
    assert store.set_cap(5, 0) == 0  # no cap
    assert put(store, 5, pers, 1, 3, RAND) == 1


def test_frozen_clients_refuse_new_puts_and_say_so_on_flushes(store: HostStore) -> None:
    pool = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    assert put(store, 5, pool, 1, 0, TEXT) == 1
    store.freeze(5)
    assert put(store, 5, pool, 1, 1, TEXT) == -EFROZEN
    assert put(store, 5, pool, 1, 0, RAND) == 1  # a duplicate put is still allowed
    assert store.get_page(5, pool, Oid(1), 0) == (1, RAND)
    assert store.flush_page(5, pool, Oid(1), 0) == -EFROZEN
    assert store.get_page(5, pool, Oid(1), 0) == (-EEMPTY, None)  # ...but it happened
    store.freeze(5, False)
    assert put(store, 5, pool, 1, 1, TEXT) == 1


def test_compression_is_per_client(store: HostStore) -> None:
    p5 = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    p6 = store.new_pool(6, PRIVATE_UUID, POOL_PRIVATE_PERSISTENT)
    store.set_compress(6, False)
    for domid, pool in ((5, p5), (6, p6)):
        assert put(store, domid, pool, 1, 0, TEXT) == 1
        assert put(store, domid, pool, 1, 1, bytes(PAGE_SIZE)) == 1
    text5 = store.get_page_form(5, p5, Oid(1), 0)
    assert text5[1] == PageEncoding.LZ4 and len(text5[2]) < PAGE_SIZE
    assert store.get_page_form(5, p5, Oid(1), 1) == (1, PageEncoding.ZERO, b"")
    assert store.get_page_form(6, p6, Oid(1), 0) == (1, PageEncoding.RAW, TEXT)
    assert store.get_page_form(6, p6, Oid(1), 1) == (1, PageEncoding.RAW, bytes(PAGE_SIZE))
    assert store.get_page(5, p5, Oid(1), 0) == (1, TEXT)
    assert store.get_page(6, p6, Oid(1), 1) == (1, bytes(PAGE_SIZE))
    stats = store.describe(5)["clients"][0]["stats"]
    assert stats["compressed_pages"] == 1 and stats["zero_pages"] == 1


def test_destroying_a_client_frees_everything_and_listing_shows_it(store: HostStore) -> None:
    pool = store.new_pool(5, PRIVATE_UUID, POOL_PRIVATE_EPHEMERAL)
    assert put(store, 5, pool, 1, 0, RAND) == 1
    listing = store.describe()
    assert listing["clients"][0]["ephemeral_pages"] == 1
    assert listing["used_bytes"] == PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD + OBJECT_OVERHEAD
    assert store.freeable_mb() == 0
    assert store.destroy_client(5) == 1
    assert store.used_bytes == 0 and store.describe()["ephemeral_pages"] == 0
    assert store.describe()["clients"] == []
